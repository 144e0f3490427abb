"""The before/after perplexity line printed by ``romcomp MODEL --ppl-windows N``.

A thin caller of :mod:`romcomp.evaluation.perplexity` (same text, windows and chunked head as ``romcomp
eval``). It loads whole models (dense and compressed) in float32, so it is meant for small models;
``romcomp eval`` measures large ones (``--dtype bfloat16``, one model at a time, with a report).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from romcomp.evaluation.perplexity import PerplexityResult, perplexity, wikitext2_test_ids


@dataclass
class BeforeAfter:
    dense: PerplexityResult
    compressed: PerplexityResult

    def line(self, calibration: str) -> str:
        d, c = self.dense, self.compressed
        return (
            f"WikiText-2 test perplexity (first {d.windows} x {d.seq_len} tokens, "
            f"{d.tokens_scored:,} scored): "
            f"dense {d.ppl:.2f} -> compressed {c.ppl:.2f} (calibration: {calibration})"
        )


def model_ppl(model_dir: Path, ids: torch.Tensor, windows: int, seq_len: int) -> PerplexityResult:
    import romcomp  # noqa: F401 - registers the romcomp Auto classes

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    result = perplexity(model, ids, seq_len=seq_len, max_windows=windows)
    del model
    return result


def before_after(
    source: Path, out: Path, windows: int, seq_len: int = 512, data_dir: Path | None = None
) -> BeforeAfter:
    """Perplexity of the dense source and the compressed output on the same WikiText-2 test windows."""
    ids = wikitext2_test_ids(AutoTokenizer.from_pretrained(source), data_dir)
    return BeforeAfter(model_ppl(source, ids, windows, seq_len), model_ppl(out, ids, windows, seq_len))
