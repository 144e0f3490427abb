"""Efficiency numbers for ``romcomp eval``: size, peak memory, prefill and decode throughput on the CPU.

Why these and how:
- *Parameters* and *bytes on disk* are what a ratio buys; counted from the loaded model and the weight
  files (``*.safetensors``/``*.bin``) of its directory.
- *Peak RSS while loading* and *while running*: the process high-water mark (``VmHWM``) is reset before
  each phase through ``/proc/self/clear_refs`` (Linux >= 4.0), so in a multi-model run every model gets
  its own peak rather than the largest one seen so far. Where the reset is impossible the numbers are
  the cumulative high-water mark and the report says so (``rss_reset: false``).
- *Prefill*: one forward over a fixed-length prompt at batch 1 (tokens/s), the time to first token.
- *Decode*: greedy steps with the KV cache after a short prompt, at batch 1 (latency, ms/token) and
  batch 8 (throughput, tokens/s counted over the whole batch). The loop calls the model's own forward,
  so dense and romcomp models run exactly the code a user's ``generate`` runs, minus sampling overhead.
Prompts are seeded random token ids: throughput does not depend on the text. Every timing is the
median of ``repeats`` runs after one warm-up, and the thread count is recorded beside it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


@dataclass
class SpeedSettings:
    """Fixed protocol so numbers from different runs are comparable."""

    prefill_len: int = 512
    decode_prompt_len: int = 64
    decode_tokens: int = 32
    batches: tuple[int, ...] = (1, 8)
    repeats: int = 3
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (lists, not tuples, so a report reads back equal to what was written)."""
        return {**asdict(self), "batches": list(self.batches)}


def weight_bytes_on_disk(path: Path) -> int:
    """Bytes of the weight files in a model directory (tokenizer/config files excluded)."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark of this process; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _prompt(model: Any, batch: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def _median_seconds(fn: Any, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def prefill_seconds(model: Any, length: int, repeats: int, seed: int) -> float:
    """Median wall time of one batch-1 forward over ``length`` tokens (KV cache built, as in generate)."""
    ids = _prompt(model, 1, length, seed)
    return _median_seconds(lambda: model(ids, use_cache=True, logits_to_keep=1), repeats)


@torch.inference_mode()
def decode_seconds(model: Any, batch: int, prompt_len: int, tokens: int, repeats: int, seed: int) -> float:
    """Median wall time of ``tokens`` greedy decode steps after a ``prompt_len`` prompt (prefill excluded)."""
    ids = _prompt(model, batch, prompt_len, seed)

    def steps() -> None:
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(tokens):
            out = model(nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        timings.append(time.perf_counter() - start)

    timings: list[float] = []
    steps()  # warm-up
    timings.clear()
    for _ in range(repeats):
        steps()
    return statistics.median(timings)


def measure_speed(model: Any, settings: SpeedSettings | None = None) -> dict[str, Any]:
    """Prefill tokens/s and decode tokens/s + ms/token per batch size, with the settings used."""
    s = settings or SpeedSettings()
    context = int(getattr(model.config, "max_position_embeddings", s.prefill_len) or s.prefill_len)
    prefill_len = min(s.prefill_len, context)
    decode_prompt = min(s.decode_prompt_len, max(context - s.decode_tokens, 1))
    used = {**s.to_dict(), "prefill_len": prefill_len, "decode_prompt_len": decode_prompt}
    result: dict[str, Any] = {"settings": used, "threads": torch.get_num_threads()}
    seconds = prefill_seconds(model, prefill_len, s.repeats, s.seed)
    result["prefill_tokens_per_s"] = prefill_len / seconds
    result["prefill_seconds"] = seconds
    for batch in s.batches:
        seconds = decode_seconds(model, batch, decode_prompt, s.decode_tokens, s.repeats, s.seed)
        result[f"decode_b{batch}_tokens_per_s"] = batch * s.decode_tokens / seconds
        result[f"decode_b{batch}_ms_per_token"] = 1000 * seconds / s.decode_tokens
    return result


def describe(speed: dict[str, Any]) -> str:
    """One line for the report: the protocol behind the throughput numbers."""
    s = speed["settings"]
    batches = "/".join(str(b) for b in s["batches"])
    return (
        f"prefill {s['prefill_len']} tokens at batch 1; decode {s['decode_tokens']} greedy tokens after a "
        f"{s['decode_prompt_len']}-token prompt at batch {batches}; median of {s['repeats']} runs after a "
        f"warm-up; {speed['threads']} threads"
    )
