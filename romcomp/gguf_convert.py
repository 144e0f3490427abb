"""GGUF -> Hugging Face safetensors conversion, one tensor at a time.

transformers can load a GGUF file directly, but it dequantises the whole model into RAM at once, which does
not fit the memory budget for 7B+ models. Here the file is memory-mapped with ``gguf.GGUFReader`` and each
tensor is dequantised, renamed to its HF name, and appended to a safetensors shard; peak memory is one shard
plus one tensor. Config and tokenizer come from transformers' GGUF metadata parsing (cheap: no tensors).
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

from romcomp.errors import BadInputError, RomcompError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 2_000_000_000
SINGLE_SHARD_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# GGUF tensor name -> HF parameter name (without the .weight/.bias suffix).
GLOBAL_TENSOR_NAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
BLOCK_TENSOR_NAMES: dict[str, str] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
SUPPORTED_ARCHITECTURES = frozenset({"llama", "qwen2"})  # llama.cpp stores Mistral as "llama"
# llama.cpp's converter interleaves the rotary halves of q/k rows for these; HF expects them split.
ROPE_PERMUTED_ARCHITECTURES = frozenset({"llama"})

_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")
_SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class _Planned:
    """One GGUF tensor and where it goes."""

    tensor: gguf.ReaderTensor
    hf_name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


def hf_tensor_name(gguf_name: str) -> str:
    """Map a llama.cpp tensor name to the HF parameter name; unknown names are an error, never skipped."""
    if m := _BLOCK_RE.fullmatch(gguf_name):
        layer, base, suffix = m.groups()
        if base in BLOCK_TENSOR_NAMES:
            return f"model.layers.{int(layer)}.{BLOCK_TENSOR_NAMES[base]}.{suffix}"
    elif (m := _GLOBAL_RE.fullmatch(gguf_name)) and m.group(1) in GLOBAL_TENSOR_NAMES:
        return f"{GLOBAL_TENSOR_NAMES[m.group(1)]}.{m.group(2)}"
    raise RomcompError(
        f"GGUF tensor {gguf_name!r} has no known Hugging Face name; this model is not supported"
    )


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
        if arch not in SUPPORTED_ARCHITECTURES:
            raise RomcompError(
                f"GGUF architecture {arch!r} is not supported (supported: llama, mistral, qwen2)"
            )
        planned = _plan_tensors(readers)  # before the slow metadata parsing, so a bad tensor fails fast
        config = _save_config_and_tokenizer(parts[0], tmp, dtype)
        _check_tied_embeddings(planned, config)
        _write_weights(planned, tmp, dtype, _rope_heads(arch, config))
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


def _plan_tensors(readers: list[gguf.GGUFReader]) -> list[_Planned]:
    """Name and shape of every tensor, in file order (layer order: convenient for layer-wise loading)."""
    planned = []
    for reader in readers:
        for tensor in reader.tensors:
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists dims innermost first
            planned.append(_Planned(tensor, hf_tensor_name(tensor.name), shape))
    names = [p.hf_name for p in planned]
    if len(set(names)) != len(names):
        raise RomcompError("GGUF file contains duplicate tensors")
    return planned


def _check_tied_embeddings(planned: list[_Planned], config: PretrainedConfig) -> None:
    """A checkpoint without an output matrix is only valid when the config ties it to the embeddings."""
    has_lm_head = any(p.hf_name == "lm_head.weight" for p in planned)
    if not has_lm_head and not getattr(config, "tie_word_embeddings", False):
        raise RomcompError("GGUF file has no output.weight but the config does not tie word embeddings")


def _rope_heads(arch: str, config: PretrainedConfig) -> dict[str, int]:
    """Head count per GGUF tensor kind whose rows llama.cpp permuted; empty when the architecture is not."""
    if arch not in ROPE_PERMUTED_ARCHITECTURES:
        return {}
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    return {"attn_q": n_head, "attn_k": n_kv}


def reverse_rope_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of q/k rows (per head: interleaved pairs -> two contiguous halves)."""
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def _load_tensor(p: _Planned, dtype: torch.dtype, rope_heads: dict[str, int]) -> torch.Tensor:
    """Dequantise one tensor into an owned, contiguous torch tensor of ``dtype`` in HF layout."""
    arr = gguf.quants.dequantize(p.tensor.data, p.tensor.tensor_type).reshape(p.shape)
    block = _BLOCK_RE.fullmatch(p.tensor.name)
    if block and block.group(2) in rope_heads:
        arr = reverse_rope_permute(arr, rope_heads[block.group(2)])
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
    planned: list[_Planned], out: Path, dtype: torch.dtype, rope_heads: dict[str, int]
) -> None:
    """Write the shards one after another, holding at most one shard's tensors in memory."""
    groups = _shard_groups(planned, dtype)
    weight_map: dict[str, str] = {}
    total = 0
    for group, shard_name in zip(groups, _shard_names(len(groups)), strict=True):
        tensors = {p.hf_name: _load_tensor(p, dtype, rope_heads) for p in group}
        save_file(tensors, str(out / shard_name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, shard_name))
        del tensors
        log.info("wrote %s (%d tensors)", shard_name, len(group))
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
