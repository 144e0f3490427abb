"""Perplexity, the one implementation: the evaluation texts, the windows and the chunked LM head.

Every perplexity romcomp reports comes from :func:`perplexity` on ids from :func:`dataset_ids`: ``romcomp
eval`` (:func:`run_ppl`, one :class:`PplEntry` per set) and the compress command's ``--ppl-windows`` line
(:mod:`romcomp.evaluation.quality`).

Protocol (so numbers compare with published ones): the test split's rows are joined with
``"\\n\\n"`` and tokenized once with the tokenizer's defaults (a Llama-style tokenizer thus puts a
single BOS at the very start of the stream, none elsewhere); the ids are cut into non-overlapping
windows ``ids[i*L:(i+1)*L]`` (the tail shorter than L is dropped); inside each window tokens 1..L-1
are scored given their prefix; ``ppl = exp(mean NLL over all scored tokens)``.

C4 has no test split in the data directory, only the first 1000 documents of the train shard that
calibration also samples from. Documents ``C4_CALIB_DOCS..C4_DOCS-1`` (the last 100 JSON lines) are
therefore *held out*: calibration with ``c4`` samples only from the first ``C4_CALIB_DOCS`` lines
(``calib.datasets``), or the C4 number would measure text the model was fitted on. The held-out
documents are joined with ``" "`` and tokenized once, as GPTQ's C4 evaluation joins its validation
documents.

Memory: full-vocabulary logits for a batch (4 x 512 x 49k floats = 400 MB for SmolLM2, 1 GB for a
128k vocabulary) would dominate the footprint on a CPU box, so the decoder's final hidden states are
computed once and the LM head is applied to ``_LOGIT_CHUNK`` positions at a time. The zero-shot path
(:mod:`romcomp.evaluation.loglik`) scores lm-eval's requests with the same three helpers:
:func:`final_hidden`, :func:`output_head` and :func:`head_logits`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from calib.datasets import C4_CALIB_DOCS, C4_DOCS, STREAM_JOINER, hf_ptb_rows, hf_wikitext_rows
from calib.paths import DATA_DIR_ENV, resolve_data_dir
from romcomp.errors import BadInputError, RomcompError

_LOGIT_CHUNK = 256
WIKITEXT2_TEST = "wikitext2_raw/wiki.test.raw"
PTB_TEST = "ptb/ptb.test.txt"
C4_SAMPLE = "c4/c4_en_train_sample_1000.jsonl"
C4_JOINER = " "

PPL_FILES: dict[str, str] = {"wikitext2": WIKITEXT2_TEST, "ptb": PTB_TEST, "c4": C4_SAMPLE}
VALIDATION_FILES: dict[str, str] = {
    "wikitext2-valid": "wikitext2_tokenized/wiki.valid.tokens",
    "ptb-valid": "ptb/ptb.valid.txt",
}
"""Validation splits, for choosing constants by measured quality: no reported number uses them (the raw
WikiText-2 validation file is not in the data directory; the tokenized v1 one is, ``<unk>`` and all)."""
EVAL_FILES: dict[str, str] = {**PPL_FILES, **VALIDATION_FILES}
PROTOCOLS: dict[str, str] = {
    "wikitext2-valid": "WikiText-2 v1 (tokenized) validation, HF rows joined with \\n\\n, tokenizer defaults",
    "ptb-valid": "PTB validation (ptb_text_only rows) joined with \\n\\n, tokenizer defaults",
    "wikitext2": "WikiText-2 raw test, HF rows joined with \\n\\n, tokenizer defaults",
    "ptb": "PTB test (ptb_text_only rows) joined with \\n\\n, tokenizer defaults",
    "c4": f"C4 sample JSON lines {C4_CALIB_DOCS + 1}-{C4_DOCS} (held out from calibration) joined with ' '",
}


@dataclass
class PerplexityResult:
    """``ppl = exp(nll)``; ``nll`` is the mean over ``tokens_scored = windows * (seq_len - 1)`` tokens."""

    ppl: float
    nll: float
    tokens_scored: int
    windows: int
    seq_len: int


@dataclass
class PplEntry:
    """One dataset's perplexity plus what a reader needs to reproduce it (a ``romcomp eval`` record)."""

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


# ------------------------------------------------------------------------------------- evaluation texts


def encode_eval(tokenizer: Any, text: str) -> torch.LongTensor:
    """Tokenize with the tokenizer's defaults (special tokens included), as the reference code does."""
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0]
    return ids.to(torch.long)


def wikitext2_test_ids(tokenizer: Any, data_dir: str | Path | None = None) -> torch.LongTensor:
    """Token ids of the WikiText-2 raw test split, exactly as ``tokenizer("\\n\\n".join(test["text"]))``.

    ``test["text"]`` are the Hugging Face ``wikitext-2-raw-v1`` rows, rebuilt from ``wiki.test.raw``
    line by line (non-blank lines keep their ``\\n``, blank lines become ``""``). The joined text is
    *not* the file content: it has extra newlines, and perplexities depend on them.
    """
    return _joined_rows(hf_wikitext_rows, WIKITEXT2_TEST, tokenizer, data_dir)


def ptb_test_ids(tokenizer: Any, data_dir: str | Path | None = None) -> torch.LongTensor:
    """Token ids of the PTB test split: ``ptb_text_only`` rows (stripped lines) joined with ``"\\n\\n"``.

    This is SVD-LLM's protocol (same joiner as for WikiText-2); GPTQ's ``ptb-new`` joins with ``" "``.
    """
    return _joined_rows(hf_ptb_rows, PTB_TEST, tokenizer, data_dir)


def wikitext2_valid_ids(tokenizer: Any, data_dir: str | Path | None = None) -> torch.LongTensor:
    """Token ids of the WikiText-2 v1 validation split, rows as the HF builder yields them, ``\\n\\n``."""
    return _joined_rows(hf_wikitext_rows, VALIDATION_FILES["wikitext2-valid"], tokenizer, data_dir)


def ptb_valid_ids(tokenizer: Any, data_dir: str | Path | None = None) -> torch.LongTensor:
    """Token ids of the PTB validation split, as :func:`ptb_test_ids` reads the test split."""
    return _joined_rows(hf_ptb_rows, VALIDATION_FILES["ptb-valid"], tokenizer, data_dir)


def _joined_rows(rows: Any, relpath: str, tokenizer: Any, data_dir: str | Path | None) -> torch.LongTensor:
    """The file's rows (``rows(bytes)``, as the HF builder yields them) joined with ``STREAM_JOINER``."""
    return encode_eval(tokenizer, STREAM_JOINER.join(rows(_eval_file(relpath, data_dir).read_bytes())))


def c4_heldout_texts(path: Path) -> list[str]:
    """``text`` of JSON lines ``C4_CALIB_DOCS..`` of the C4 sample (counted in lines, blank docs included)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) < C4_DOCS:
        raise RomcompError(f"{path} has {len(lines)} lines, expected {C4_DOCS}: not the known C4 sample")
    return [json.loads(line)["text"] for line in lines[C4_CALIB_DOCS:C4_DOCS]]


def c4_heldout_ids(tokenizer: Any, data_dir: str | Path | None = None) -> torch.LongTensor:
    """Token ids of the held-out C4 documents joined with ``C4_JOINER``, tokenizer defaults (BOS once)."""
    path = ppl_data_files(["c4"], data_dir)["c4"]
    return encode_eval(tokenizer, C4_JOINER.join(c4_heldout_texts(path)))


def dataset_ids(name: str, tokenizer: Any, data_dir: str | Path | None) -> torch.LongTensor:
    """Token ids of one evaluation stream by name (``wikitext2``, ``ptb``, ``c4`` or a validation split)."""
    loaders = {"wikitext2": wikitext2_test_ids, "ptb": ptb_test_ids, "c4": c4_heldout_ids,
               "wikitext2-valid": wikitext2_valid_ids, "ptb-valid": ptb_valid_ids}  # fmt: skip
    return loaders[name](tokenizer, data_dir)


def ppl_data_files(datasets: Sequence[str], data_dir: str | Path | None) -> dict[str, Path]:
    """Each dataset's file, or one RomcompError naming every missing one (checked before loading)."""
    root = resolve_data_dir(data_dir)
    if root is None:
        raise RomcompError("no data directory found: pass --data-dir or set $ROMCOMP_DATA_DIR")
    files = {name: root / EVAL_FILES[name] for name in datasets}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise RomcompError(f"perplexity data missing: {', '.join(missing)} (set --data-dir)")
    return files


def _eval_file(relpath: str, data_dir: str | Path | None) -> Path:
    root = resolve_data_dir(data_dir)
    path = root / relpath if root is not None else None
    if path is None or not path.is_file():
        looked = str(path) if path is not None else f"<data dir>/{relpath} (no data dir found)"
        raise RomcompError(
            f"evaluation text not found: looked for {looked}. "
            f"Point --data-dir or ${DATA_DIR_ENV} at a directory containing {relpath}"
        )
    return path


# -------------------------------------------------------------------------------------- romcomp eval


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


# ------------------------------------------------------------------------------------------ computation


def perplexity(
    model: nn.Module,
    ids: torch.LongTensor,
    seq_len: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    progress: str | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` over the first ``max_windows`` (default: all) full windows of ``ids``.

    Runs in inference mode and in eval mode (restoring the previous train/eval state afterwards);
    ``progress`` names a progress bar on stderr (none when None).
    """
    from tqdm import tqdm

    windows = _windows(ids, seq_len, max_windows)
    if batch_size < 1:
        raise BadInputError(f"batch_size must be >= 1, got {batch_size}")
    device = _model_device(model)
    total_nll = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            bar = tqdm(total=windows.shape[0], desc=progress, unit="window", disable=progress is None)
            for batch in windows.split(batch_size):
                total_nll += _batch_nll(model, batch.to(device))
                bar.update(batch.shape[0])
            bar.close()
    finally:
        model.train(was_training)
    scored = windows.shape[0] * (seq_len - 1)
    nll = total_nll / scored
    return PerplexityResult(math.exp(nll), nll, scored, windows.shape[0], seq_len)


def _windows(ids: torch.Tensor, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """``[n, seq_len]`` non-overlapping windows from the start of ``ids`` (1-D or ``[1, T]``)."""
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise BadInputError(f"ids must be a 1-D integer tensor, got shape {tuple(ids.shape)} {ids.dtype}")
    if seq_len < 2:
        raise BadInputError(f"seq_len must be >= 2 to score any token, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise BadInputError(f"max_windows must be >= 1 or None, got {max_windows}")
    available = ids.numel() // seq_len
    if available == 0:
        raise BadInputError(f"{ids.numel()} tokens are too few for one window of seq_len={seq_len}")
    count = available if max_windows is None else min(available, max_windows)
    return ids[: count * seq_len].to(torch.long).view(count, seq_len)


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _batch_nll(model: nn.Module, batch: torch.Tensor) -> float:
    """Summed NLL of tokens 1..L-1 of every window, never holding more than a chunk of logits."""
    hidden = final_hidden(model, batch)
    head = output_head(model)
    states = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    targets = batch[:, 1:].reshape(-1)
    total = 0.0
    for start in range(0, targets.numel(), _LOGIT_CHUNK):
        stop = start + _LOGIT_CHUNK
        logits = head_logits(model, head, states[start:stop])
        total += F.cross_entropy(logits, targets[start:stop], reduction="sum").item()
    return total


def output_head(model: nn.Module) -> nn.Module:
    """The LM head (``get_output_embeddings()``), or a RomcompError naming the model that has none."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise RomcompError(f"{type(model).__name__} has no output embeddings (LM head) to score tokens with")
    return head


def head_logits(model: nn.Module, head: nn.Module, states: torch.Tensor) -> torch.Tensor:
    """Float32 logits ``[..., vocab]`` of final hidden ``states`` (a chunk of positions), with the
    post-head scaling the model's own ``forward`` applies."""
    return _apply_logit_transforms(getattr(model, "config", None), head(states)).float()


def final_hidden(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Final (post-norm) hidden states ``[B, L, H]`` that the LM head turns into logits.

    Prefers the decoder module; models without a separate one are run whole with
    ``output_hidden_states`` and ``logits_to_keep=1`` so that they, too, skip full logits.
    """
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is not None and decoder is not model:
        out = decoder(input_ids=batch, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    try:
        out = model(input_ids=batch, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    except TypeError:
        out = model(input_ids=batch, use_cache=False, output_hidden_states=True)
    return out.hidden_states[-1]


def _apply_logit_transforms(config: Any, logits: torch.Tensor) -> torch.Tensor:
    """Post-head logit scaling some architectures apply inside ``forward`` (Granite, Cohere, Gemma 2/3).

    Applying the head by hand would otherwise skip these and report a wrong perplexity.
    """
    scaling = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    if scaling:
        logits = logits / scaling
    scale = getattr(config, "logit_scale", None)  # Cohere: logits * logit_scale
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3: cap * tanh(logits / cap)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
