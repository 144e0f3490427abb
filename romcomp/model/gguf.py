"""GGUF -> Hugging Face safetensors conversion, one tensor at a time, for every family transformers reads.

transformers can load a GGUF file directly, but it dequantises the whole model into RAM at once, which does
not fit the memory budget for 7B+ models. Here the file is memory-mapped with ``gguf.GGUFReader`` and each
tensor is dequantised, renamed to its HF name, and appended to a safetensors shard; peak memory is one shard
plus one tensor. Config and tokenizer come from transformers' GGUF metadata parsing (cheap: no tensors).

The per-family knowledge is transformers' own, not a copy: the GGUF -> HF name map comes from
``get_gguf_hf_weights_map`` on the family's module tree (built on the meta device from the parsed config,
through gguf-py's ``TensorNameMap``), and each tensor goes through the family's ``TensorProcessor`` (llama's
q/k rotary un-permutation, Gemma's ``norm - 1``, MoE experts stacked into the fused 3-D parameters). So any
architecture transformers' GGUF loader reads converts here, and a name transformers cannot place is an
error naming it, never a silently missing weight.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    TensorProcessor,
    get_gguf_hf_weights_map,
)

from romcomp.errors import BadInputError, RomcompError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 2_000_000_000
SINGLE_SHARD_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

DERIVED_TENSORS = re.compile(r"rope_freqs\.weight|rope_factors_(long|short)\.weight")
"""GGUF tensors with no HF parameter: transformers derives them from the config (rotary frequencies)."""

_SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class _Planned:
    """One HF parameter and the GGUF tensor(s) it is made of (two for fused MoE gate/up experts)."""

    hf_name: str
    shape: tuple[int, ...]
    sources: tuple[gguf.ReaderTensor, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


def gguf_parts(path: Path) -> list[Path]:
    """All files of a GGUF checkpoint: ``path`` alone, or every part of a llama.cpp split given part 1."""
    m = _SPLIT_RE.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    if int(m["no"]) != 1:
        raise BadInputError(
            f"{path} is part {int(m['no'])} of a split GGUF; give the first part (-00001-of-...)"
        )
    parts = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise BadInputError(f"split GGUF {path.name} is incomplete; missing: {', '.join(missing)}")
    return parts


def gguf_field(reader: gguf.GGUFReader, key: str) -> object | None:
    """A metadata value decoded to a Python value, or None when absent."""
    field = reader.get_field(key)
    return None if field is None else field.contents()


def gguf_quant_label(path: Path) -> str:
    """Quantisation label for reports, e.g. "Q4_K_M", from ``general.file_type``."""
    file_type = gguf_field(gguf.GGUFReader(path), "general.file_type")
    if not isinstance(file_type, int):
        return "unknown quant"
    try:
        return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"file_type {file_type}"


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> None:
    """Convert a GGUF checkpoint into a HF model directory (config, tokenizer, generation config, weights).

    Everything is written into a temporary directory beside ``out_dir`` and renamed at the end, so an
    interrupted conversion never leaves a directory that looks complete. ``out_dir`` must not exist yet
    (an empty directory is tolerated).
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    parts = gguf_parts(gguf_path)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise RomcompError(f"refusing to convert into non-empty directory {out_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        readers = [gguf.GGUFReader(p) for p in parts]
        arch = str(gguf_field(readers[0], "general.architecture"))
        try:
            config = _save_config_and_tokenizer(parts[0], tmp, dtype)
        except (ValueError, KeyError) as e:  # an architecture or tokenizer transformers does not read
            raise RomcompError(f"transformers cannot read this GGUF ({arch!r}): {e!r}") from e
        processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
        planned, mapping = _plan_tensors(readers, config, processor)
        _write_weights(planned, tmp, dtype, processor, mapping)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_config_and_tokenizer(gguf_path: Path, out: Path, dtype: torch.dtype) -> PretrainedConfig:
    """Save config.json, generation_config.json and tokenizer files parsed from the GGUF metadata.

    This goes through transformers' public GGUF loaders, so config keys and tokenizer conversion stay whatever
    transformers itself would produce; each call re-parses the metadata (the slow part for 150k vocabularies).
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    src, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    # The saved directory holds plain dense weights: no trace of GGUF quantisation may remain.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)

    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    tokenizer.save_pretrained(out)
    _tidy_tokenizer_config(out / "tokenizer_config.json", tokenizer.chat_template)
    return config


def _tidy_tokenizer_config(path: Path, chat_template: object) -> None:
    """Keep the chat template in tokenizer_config.json too (older readers look only there) and drop the
    load-time flags transformers records, which describe how this process read the GGUF, not the tokenizer."""
    data = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):
        data.pop(key, None)
    if isinstance(chat_template, str):
        data.setdefault("chat_template", chat_template)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _plan_tensors(
    readers: list[gguf.GGUFReader], config: PretrainedConfig, processor: TensorProcessor
) -> tuple[list[_Planned], dict[str, str]]:
    """Every HF parameter with its GGUF source tensors, in file order (layer by layer), and the name map.

    The family's module tree is built on the meta device to learn the HF names and shapes; a GGUF tensor
    transformers cannot place, or an HF parameter no tensor fills (other than a tied ``lm_head``), is an
    error before anything is written."""
    from romcomp.model.shell import build_shell

    shell = build_shell(config)
    shapes = {n: tuple(t.shape) for n, t in shell.state_dict().items()}
    mapping = get_gguf_hf_weights_map(shell, processor)
    sources: dict[str, list[gguf.ReaderTensor]] = {}
    unplaced = []
    for reader in readers:
        for tensor in reader.tensors:
            # fused MoE experts are keyed without ".weight" (see transformers' Qwen2MoeTensorProcessor)
            target = mapping.get(tensor.name) or mapping.get(tensor.name.removesuffix(".weight"))
            if target in shapes:
                sources.setdefault(target, []).append(tensor)
            elif not DERIVED_TENSORS.fullmatch(tensor.name):
                unplaced.append(tensor.name)
    if unplaced:
        raise RomcompError(
            f"GGUF tensor {unplaced[0]!r} has no Hugging Face name in {type(shell).__name__}"
            f" ({len(unplaced)} such tensors); this file does not match its declared architecture"
        )
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [n for n in shapes if n not in sources and not (tied and n == "lm_head.weight")]
    if missing:
        hint = " (an untied output matrix)" if missing == ["lm_head.weight"] else ""
        raise RomcompError(f"GGUF file has no tensor for {missing[0]}{hint} ({len(missing)} missing)")
    planned = [_Planned(name, shapes[name], tuple(srcs)) for name, srcs in sources.items()]
    return planned, mapping


def _load_tensor(
    p: _Planned, dtype: torch.dtype, processor: TensorProcessor, mapping: dict[str, str]
) -> torch.Tensor:
    """Dequantise the source tensor(s) of one HF parameter and bring them into HF layout with the
    family's processor; an owned, contiguous torch tensor of ``dtype``."""
    parsed: dict[str, dict] = {"tensors": {}}  # where MoE processors stack experts
    arr = None
    for tensor in p.sources:
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=mapping, parsed_parameters=parsed
        )
        if result.name is not None:
            arr = result.weights
    if arr is None:
        arr = parsed["tensors"].pop(p.hf_name).numpy()
    if int(np.prod(arr.shape)) != p.numel:
        raise RomcompError(f"GGUF tensor for {p.hf_name} has shape {arr.shape}, expected {p.shape}")
    arr = arr.reshape(p.shape)
    # F32/F16 tensors come back as views of the read-only memory map; torch needs its own writable copy.
    if (
        arr.dtype != np.float32
        or not arr.flags.writeable
        or not arr.flags.c_contiguous
        or not arr.flags.owndata
    ):
        arr = np.array(arr, dtype=np.float32, order="C", copy=True)
    return torch.from_numpy(arr).to(dtype)


def _shard_groups(planned: list[_Planned], dtype: torch.dtype) -> list[list[_Planned]]:
    """Greedily group tensors into shards of at most MAX_SHARD_BYTES (a bigger single tensor gets its own)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    groups: list[list[_Planned]] = [[]]
    size = 0
    for p in planned:
        nbytes = p.numel * itemsize
        if groups[-1] and size + nbytes > MAX_SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += nbytes
    return groups


def _shard_names(count: int) -> Iterator[str]:
    if count == 1:
        yield SINGLE_SHARD_NAME
        return
    for i in range(1, count + 1):
        yield f"model-{i:05d}-of-{count:05d}.safetensors"


def _write_weights(
    planned: list[_Planned], out: Path, dtype: torch.dtype, processor: TensorProcessor,
    mapping: dict[str, str],
) -> None:  # fmt: skip
    """Write the shards one after another, holding at most one shard's tensors in memory."""
    groups = _shard_groups(planned, dtype)
    weight_map: dict[str, str] = {}
    total = 0
    for group, shard_name in zip(groups, _shard_names(len(groups)), strict=True):
        tensors = {p.hf_name: _load_tensor(p, dtype, processor, mapping) for p in group}
        save_file(tensors, str(out / shard_name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, shard_name))
        del tensors
        log.info("wrote %s (%d tensors)", shard_name, len(group))
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
