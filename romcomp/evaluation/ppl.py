"""Perplexity for ``romcomp eval``: WikiText-2 test, PTB test and a C4 split held out from calibration.

All three use
:func:`romcomp.evaluation.perplexity.perplexity` (non-overlapping windows, chunked LM head, so the
full-vocabulary logits never exceed one chunk). WikiText-2 and PTB follow the GPTQ / SVD-LLM protocol
documented there.

C4 has no test split in the data directory, only the first 1000 documents of the train shard that
calibration also samples from. Documents ``C4_CALIB_DOCS..C4_DOCS-1`` (the last 100 JSON lines) are
therefore *held out*: calibration with ``c4`` samples only from the first ``C4_CALIB_DOCS`` lines
(``calib.datasets``), or the C4 number would measure text the model was fitted on. The held-out
documents are joined with ``" "`` and tokenized once, as GPTQ's C4 evaluation joins its validation
documents.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calib.datasets import C4_CALIB_DOCS, C4_DOCS, resolve_data_dir
from romcomp.errors import RomcompError
from romcomp.evaluation.perplexity import (
    PTB_TEST,
    WIKITEXT2_TEST,
    _encode_eval,
    perplexity,
    ptb_test_ids,
    wikitext2_test_ids,
)

C4_SAMPLE = "c4/c4_en_train_sample_1000.jsonl"
C4_JOINER = " "

PPL_FILES: dict[str, str] = {"wikitext2": WIKITEXT2_TEST, "ptb": PTB_TEST, "c4": C4_SAMPLE}
PROTOCOLS: dict[str, str] = {
    "wikitext2": "WikiText-2 raw test, HF rows joined with \\n\\n, tokenizer defaults",
    "ptb": "PTB test (ptb_text_only rows) joined with \\n\\n, tokenizer defaults",
    "c4": f"C4 sample JSON lines {C4_CALIB_DOCS + 1}-{C4_DOCS} (held out from calibration) joined with ' '",
}


@dataclass
class PplEntry:
    """One dataset's perplexity plus what a reader needs to reproduce it."""

    dataset: str
    ppl: float
    nll: float
    tokens_scored: int
    windows: int
    windows_available: int
    seq_len: int
    data_file: str
    sha256: str
    protocol: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ppl_data_files(datasets: Sequence[str], data_dir: str | Path | None) -> dict[str, Path]:
    """Each dataset's file, or one RomcompError naming every missing one (checked before loading)."""
    root = resolve_data_dir(data_dir)
    if root is None:
        raise RomcompError("no data directory found: pass --data-dir or set $ROMCOMP_DATA_DIR")
    files = {name: root / PPL_FILES[name] for name in datasets}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise RomcompError(f"perplexity data missing: {', '.join(missing)} (set --data-dir)")
    return files


def c4_heldout_texts(path: Path) -> list[str]:
    """``text`` of JSON lines ``C4_CALIB_DOCS..`` of the C4 sample (counted in lines, blank docs included)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) < C4_DOCS:
        raise RomcompError(f"{path} has {len(lines)} lines, expected {C4_DOCS}: not the known C4 sample")
    return [json.loads(line)["text"] for line in lines[C4_CALIB_DOCS:C4_DOCS]]


def c4_heldout_ids(tokenizer: Any, data_dir: str | Path | None = None) -> torch.LongTensor:
    """Token ids of the held-out C4 documents joined with ``C4_JOINER``, tokenizer defaults (BOS once)."""
    path = ppl_data_files(["c4"], data_dir)["c4"]
    return _encode_eval(tokenizer, C4_JOINER.join(c4_heldout_texts(path)))


def dataset_ids(name: str, tokenizer: Any, data_dir: str | Path | None) -> torch.LongTensor:
    """Token ids of one evaluation stream by name (``wikitext2``, ``ptb`` or ``c4``)."""
    loaders = {"wikitext2": wikitext2_test_ids, "ptb": ptb_test_ids, "c4": c4_heldout_ids}
    return loaders[name](tokenizer, data_dir)


def run_ppl(
    model: nn.Module,
    tokenizer: Any,
    datasets: Sequence[str],
    data_dir: str | Path | None,
    seq_len: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
) -> list[PplEntry]:
    """Perplexity on each dataset over its first ``max_windows`` windows (all when None)."""
    files = ppl_data_files(datasets, data_dir)
    entries = []
    for name in datasets:
        ids = dataset_ids(name, tokenizer, data_dir)
        result = perplexity(
            model,
            ids,
            seq_len=seq_len,
            max_windows=max_windows,
            batch_size=batch_size,
            progress=f"ppl {name}",
        )
        entries.append(
            PplEntry(
                dataset=name, ppl=result.ppl, nll=result.nll, tokens_scored=result.tokens_scored,
                windows=result.windows, windows_available=ids.numel() // seq_len, seq_len=seq_len,
                data_file=str(files[name]), sha256=_sha256(files[name]), protocol=PROTOCOLS[name],
            )
        )  # fmt: skip
    return entries


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
