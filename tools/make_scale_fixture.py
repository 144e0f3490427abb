"""Write random-weight checkpoints with the real shapes of Llama 7B / 13B / 8B-GQA and Qwen1.5-MoE-A2.7B.

These are fixtures for measuring romcomp's memory and speed at real scale, not its quality: every
weight is seeded Gaussian noise (norms are ones), so perplexities are meaningless, but tensor names,
shapes, dtype (bf16), sharding and the tokenizer are what a real Hugging Face Llama checkpoint has.

Usage (from the repository root)::

    python tools/make_scale_fixture.py --shape llama2-7b --out /data/fixture-llama2-7b
    python tools/make_scale_fixture.py --shape llama3-8b --out DIR --seed 0 --shard-size 2GB
    python tools/make_scale_fixture.py --shape llama2-13b --out DIR --layers 4   # fewer blocks, quick
    python tools/make_scale_fixture.py --shape tiny --out /tmp/fixture-tiny --shard-size 2MB

Tensor names and shapes come from the family's causal LM built on the meta device (nothing is
materialised). The shard plan is made up front from the shapes, then each shard is generated tensor by
tensor (row chunks in float32, cast into a preallocated bf16 tensor), written to ``*.tmp`` and renamed,
and freed, so peak RAM is about one shard (``--shard-size``) plus one float32 chunk. Each tensor has its
own generator seeded from ``--seed`` and the tensor's index, so values do not depend on the sharding.
``config.json``, ``model.safetensors.index.json`` and finally ``fixture.json`` are written last and
atomically, so an interrupted run never looks complete; rerunning on a complete fixture with the same
arguments exits at once ("already there").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
MARKER = "fixture.json"
INDEX = "model.safetensors.index.json"
BOS_ID, EOS_ID = 256, 257  # byte tokenizer: ids 0-255 are bytes, then <bos>, <eos>
CHUNK_ELEMENTS = 1 << 24  # float32 elements generated at a time (64 MiB)
EMBED_STD = 0.02

SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    ),
    "llama2-13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
    ),
    # Qwen1.5-MoE-A2.7B: 60 routed experts (top 4) of width 1408 beside a 5632-wide shared expert; the
    # experts are written fused (experts × out × in), as transformers 5 names them
    "qwen1.5-moe-a2.7b": dict(
        model_type="qwen2_moe",
        hidden_size=2048,
        intermediate_size=5632,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        num_experts=60,
        num_experts_per_tok=4,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=151936,
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
    ),
    "tiny-moe": dict(  # the MoE code path in seconds
        model_type="qwen2_moe",
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=512,
        num_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
    ),
    "tiny": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    ),
}


@dataclass(frozen=True)
class Spec:
    """One tensor to write: its state-dict name, shape, position in the state dict and shard."""

    name: str
    shape: tuple[int, ...]
    index: int
    shard: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * 2  # bf16


def parse_size(text: str) -> int:
    """'2GB' -> 2e9, '400MB', '500KB', '1GiB', or a plain number of bytes (as transformers reads them)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2GB, 400MB, 1GiB)")
    number, unit = float(match.group(1)), match.group(2).upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(number * base**power)


def build_config(shape: str, layers: int | None):
    """The config of a shape (Llama unless it names a ``model_type``), with bf16 dtype and the byte
    tokenizer's bos/eos ids."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(SHAPES[shape])
    model_type = fields.pop("model_type", "llama")
    if layers is not None:
        fields["num_hidden_layers"] = layers
    config = AutoConfig.for_model(
        model_type, **fields, tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        dtype="bfloat16",
    )  # fmt: skip
    config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    return config


def tensor_specs(config) -> list[Spec]:
    """Names and shapes of the family's causal-LM state dict, from a model built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    specs = [Spec(name, tuple(t.shape), i) for i, (name, t) in enumerate(model.state_dict().items())]
    del model
    return specs


def plan_shards(specs: list[Spec], shard_size: int) -> list[Spec]:
    """Greedy in state-dict order: start a new shard when the next tensor would pass ``shard_size``."""
    planned: list[Spec] = []
    shard, used = 0, 0
    for spec in specs:
        if used and used + spec.nbytes > shard_size:
            shard, used = shard + 1, 0
        planned.append(Spec(spec.name, spec.shape, spec.index, shard))
        used += spec.nbytes
    return planned


def shard_name(shard: int, total: int) -> str:
    return f"model-{shard + 1:05d}-of-{total:05d}.safetensors"


def std_of(spec: Spec) -> float | None:
    """None for norm weights (ones); 0.02 for the embedding; 1/sqrt(fan_in) for Linear [out, in] and for
    fused experts [experts, out, in]."""
    if len(spec.shape) == 1:
        return None
    if spec.name.endswith("embed_tokens.weight"):
        return EMBED_STD
    return 1.0 / math.sqrt(spec.shape[-1])


def make_tensor(spec: Spec, seed: int, buffer: torch.Tensor) -> torch.Tensor:
    """The seeded bf16 values of one tensor, generated in float32 row chunks of at most ``buffer``."""
    std = std_of(spec)
    if std is None:
        return torch.ones(spec.shape, dtype=torch.bfloat16)
    out = torch.empty(spec.shape, dtype=torch.bfloat16)
    cols = spec.shape[-1]
    rows = math.prod(spec.shape[:-1])
    flat = out.view(rows, cols)
    step = max(1, buffer.numel() // cols)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + spec.index)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        chunk = buffer[: n * cols].view(n, cols)
        chunk.normal_(0.0, std, generator=gen)
        flat[start : start + n].copy_(chunk)
    return out


def byte_tokenizer():
    """A fast byte-level tokenizer: one id per UTF-8 byte (0-255), then <bos> 256, <eos> 257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>")
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS_ID, EOS_ID), (tok.bos_token_id, tok.eos_token_id)
    return tok


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and os.replace, so the file is either absent or complete."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def expected_marker(args: argparse.Namespace, config, plan: list[Spec]) -> dict[str, Any]:
    """What fixture.json holds for these arguments (everything that decides the files' bytes)."""
    total = plan[-1].shard + 1
    sizes = {shard_name(s, total): 0 for s in range(total)}
    for spec in plan:
        sizes[shard_name(spec.shard, total)] += spec.nbytes
    return {
        "format_version": FORMAT_VERSION,
        "shape": args.shape,
        "seed": args.seed,
        "num_hidden_layers": config.num_hidden_layers,
        "shard_size": args.shard_size,
        "params": sum(math.prod(s.shape) for s in plan),
        "total_size": sum(s.nbytes for s in plan),
        "shard_data_bytes": sizes,
    }


def is_complete(out: Path, marker: dict[str, Any]) -> bool:
    """True when fixture.json matches and every shard, the index and the config are there."""
    try:
        if json.loads((out / MARKER).read_text()) != marker:
            return False
    except (OSError, ValueError):
        return False
    needed = [out / INDEX, out / "config.json", out / "tokenizer.json"]
    return all(p.is_file() for p in needed) and all((out / n).is_file() for n in marker["shard_data_bytes"])


def clear_stale(out: Path) -> None:
    """Remove what an earlier (interrupted or different) run of this tool left; refuse foreign files."""
    ours = re.compile(
        r"(model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json|config\.json|fixture\.json"
        r"|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|chat_template\.jinja)(\.tmp)?"
    )
    entries = list(out.iterdir())
    foreign = [p.name for p in entries if not ours.fullmatch(p.name)]
    if foreign:
        names = ", ".join(sorted(foreign)[:5])
        sys.exit(f"{out} holds files this tool did not write ({names}); pick another --out")
    for path in entries:
        path.unlink()


def write_shards(out: Path, plan: list[Spec], seed: int) -> None:
    """Generate and write the shards one at a time (tmp name, then rename), printing progress."""
    from safetensors.torch import save_file

    total = plan[-1].shard + 1
    buffer = torch.empty(CHUNK_ELEMENTS, dtype=torch.float32)
    start, written, done = time.perf_counter(), 0, 0
    for shard in range(total):
        tensors = {s.name: make_tensor(s, seed, buffer) for s in plan if s.shard == shard}
        name = shard_name(shard, total)
        tmp = out / (name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # safetensors creates files 0600
        os.replace(tmp, out / name)
        done += len(tensors)
        written += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        print(
            f"  {name}: {done}/{len(plan)} tensors, {written / 1e9:.2f} GB, "
            f"{time.perf_counter() - start:.1f} s",
            flush=True,
        )


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=parse_size, default=parse_size("2GB"), help="e.g. 2GB, 400MB")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    args = parser.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be >= 1")

    t0 = time.perf_counter()
    config = build_config(args.shape, args.layers)
    plan = plan_shards(tensor_specs(config), args.shard_size)
    marker = expected_marker(args, config, plan)
    out: Path = args.out
    if is_complete(out, marker):
        print(f"already there: {out} ({args.shape}, seed {args.seed}, {config.num_hidden_layers} layers)")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    clear_stale(out)
    total = plan[-1].shard + 1
    print(
        f"{args.shape}: {marker['params'] / 1e9:.3f} B params, {marker['total_size'] / 1e9:.2f} GB bf16, "
        f"{len(plan)} tensors in {total} shard(s) -> {out}",
        flush=True,
    )

    write_shards(out, plan, args.seed)
    byte_tokenizer().save_pretrained(out)
    write_atomic(out / "config.json", config.to_json_string())  # what config.save_pretrained writes
    weight_map = {s.name: shard_name(s.shard, total) for s in plan}
    write_json(out / INDEX, {"metadata": {"total_size": marker["total_size"]}, "weight_map": weight_map})
    write_json(out / MARKER, marker)

    print(
        f"done: shape={args.shape} layers={config.num_hidden_layers} params={marker['params']} "
        f"bytes={marker['total_size']} seconds={time.perf_counter() - t0:.1f} "
        f"peak_rss={peak_rss_gib():.2f} GiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
