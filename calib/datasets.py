"""Calibration text: where it comes from and how token windows are cut from it.

Low-rank compression is calibrated on activations, so which text those activations come from, and
exactly which tokens, decides the result. This module makes that choice explicit and reproducible:

* a *source* (:class:`CalibSource`) is a named standard set (``c4``, ``wikitext2``, ``ptb``) or a
  user file, read from the local data directory and identified by the sha256 of the bytes read;
* *windows* (:func:`calibration_windows`) are ``n_samples`` random spans of ``seq_len`` tokens drawn
  with a private ``random.Random(seed)``, so the same seed gives the same tensor on any machine.

Test splits are refused outright: calibrating on the text that is later used to report perplexity
would make the reported numbers meaningless.

Tokenization adds no special tokens (no BOS/EOS around windows). GPTQ and SVD-LLM cut raw windows
out of tokenized text, and for most tokenizers a BOS would only ever appear when a window happened to
start at a document's first token, so leaving it out keeps every window the same kind of sample.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from calib.errors import CalibError, CalibInputError
from calib.paths import DATA_DIR_ENV, offline, resolve_data_dir

STREAM_JOINER = "\n\n"
"""How row-per-line corpora (WikiText, PTB) become one text: ``"\\n\\n".join(rows)``, as GPTQ/SVD-LLM do."""

C4_HUB_REPO = "allenai/c4"
C4_HUB_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_DOCS = 1000
C4_CALIB_DOCS = 900
"""Calibration uses JSON lines ``[0, C4_CALIB_DOCS)`` of the C4 sample; the rest is held out for
``romcomp eval`` (C4 perplexity), so no evaluated text is ever calibrated on."""
_HUB_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class CalibSource:
    """Calibration text plus what is needed to report exactly where it came from.

    ``stream`` is False for document corpora (C4, user files): windows are cut from single documents.
    It is True for row-per-line corpora (WikiText-2, PTB), whose ``texts`` are the rows of one running
    text: windows are cut from ``STREAM_JOINER.join(texts)`` tokenized once, the standard protocol.
    """

    name: str
    texts: list[str]
    description: str
    sha256: str
    stream: bool = False


@dataclass(frozen=True)
class _NamedSet:
    relpath: str
    split: str
    reader: str  # "jsonl", "wikitext" or "ptb"
    note: str = ""
    max_lines: int | None = None  # only the first lines are calibration data; the rest is held out


_NAMED: dict[str, _NamedSet] = {
    "c4": _NamedSet(
        "c4/c4_en_train_sample_1000.jsonl",
        "train",
        "jsonl",
        f"first {C4_CALIB_DOCS} of {C4_DOCS} lines, the rest held out for evaluation",
        max_lines=C4_CALIB_DOCS,
    ),
    "wikitext2": _NamedSet(
        "wikitext2_tokenized/wiki.valid.tokens",
        "validation",
        "wikitext",
        "wikitext-2-v1 tokenized text with <unk>, as the raw validation split is not available",
    ),
    "ptb": _NamedSet("ptb/ptb.valid.txt", "validation", "ptb"),
}


def known_datasets() -> list[str]:
    """Names accepted by :func:`load_calibration` besides file paths."""
    return list(_NAMED)


def hf_wikitext_rows(data: bytes) -> list[str]:
    """Rows exactly as the Hugging Face ``wikitext`` builder yields them from a ``wiki.*`` file.

    The builder iterates the file's lines and keeps a line (with its ``\\n``) when it has
    non-blank content, else yields ``""``. Joining these rows with ``"\\n\\n"`` therefore does *not*
    give back the file, and published perplexities depend on that exact text.
    """
    with io.TextIOWrapper(io.BytesIO(data), encoding="utf-8") as handle:
        return [line if line.strip() else "" for line in handle]


def hf_ptb_rows(data: bytes) -> list[str]:
    """Rows as the Hugging Face ``ptb_text_only`` builder yields them: every line, stripped."""
    with io.TextIOWrapper(io.BytesIO(data), encoding="utf-8") as handle:
        return [line.strip() for line in handle]


def load_calibration(name: str, data_dir: str | Path | None = None) -> CalibSource:
    """Load a named calibration set or a user file (``.jsonl`` with ``text``, or plain text).

    Raises CalibInputError for test splits and unknown names, CalibError when a named set's file is
    missing (after a hub attempt for ``c4`` when not offline). Nothing is ever substituted silently.
    """
    if name in _NAMED:
        return _load_named(name, resolve_data_dir(data_dir))
    path = Path(name).expanduser()
    if "test" in path.name.lower():
        raise CalibInputError(
            f"refusing to calibrate on a test split ({name}): test text is for evaluation only; "
            f"use a train/validation file or one of {', '.join(known_datasets())}"
        )
    if path.is_file():
        return _load_user_file(path)
    raise CalibInputError(
        f"unknown calibration data {name!r}: not an existing file and not one of "
        f"{', '.join(known_datasets())}"
    )


def _load_named(name: str, root: Path | None) -> CalibSource:
    spec = _NAMED[name]
    path = root / spec.relpath if root is not None else None
    if path is not None and path.is_file():
        return _source_from_file(name, path, spec)
    hub = _try_hub(name)
    if isinstance(hub, CalibSource):
        return hub
    looked = str(path) if path is not None else f"<data dir>/{spec.relpath} (no data dir found)"
    raise CalibError(
        f"calibration set {name!r} not found: looked for {looked}; {hub}. "
        f"Point --data-dir or ${DATA_DIR_ENV} at a directory containing {spec.relpath}"
    )


def _source_from_file(name: str, path: Path, spec: _NamedSet) -> CalibSource:
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if spec.reader == "jsonl":
        lines = data.splitlines()[: spec.max_lines] if spec.max_lines else data.splitlines()
        texts = _jsonl_texts(b"\n".join(lines), path)
        what = f"{len(texts)} docs"
    else:
        texts = hf_wikitext_rows(data) if spec.reader == "wikitext" else hf_ptb_rows(data)
        what = f"{len(texts)} rows joined with \\n\\n"
    note = f", {spec.note}" if spec.note else ""
    description = f"{name} ({path.name}, {spec.split} split{note}, {what}, sha256 {sha[:8]}…)"
    return CalibSource(name, texts, description, sha, stream=spec.reader != "jsonl")


def _load_user_file(path: Path) -> CalibSource:
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if path.suffix.lower() == ".jsonl":
        texts, kind = _jsonl_texts(data, path), "jsonl"
    else:
        texts, kind = _blank_line_documents(_decode(data, path)), "text split on blank lines"
    if not texts:
        raise CalibInputError(f"calibration file {path} contains no text")
    description = f"{path} ({kind}, {len(texts)} docs, sha256 {sha[:8]}…)"
    return CalibSource(str(path), texts, description, sha)


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CalibInputError(f"calibration file {path} is not UTF-8 text: {err}") from err


def _jsonl_texts(data: bytes, path: Path) -> list[str]:
    """The ``text`` field of every JSON line; a line without one is an error, not a skip."""
    texts = []
    for lineno, line in enumerate(_decode(data, path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CalibInputError(f"{path}:{lineno}: not valid JSON ({err})") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CalibInputError(f"{path}:{lineno}: a JSON object with a string field 'text' is required")
        if record["text"].strip():
            texts.append(record["text"])
    return texts


def _blank_line_documents(text: str) -> list[str]:
    return [doc.strip() for doc in re.split(r"\n[ \t\r]*\n", text) if doc.strip()]


def _try_hub(name: str) -> CalibSource | str:
    """Fetch ``c4`` from the hub when allowed; otherwise say why not (for the error message).

    The reachability probe exists because ``hf_hub_download`` retries for ~20 s without a network,
    and a missing local file should be reported at once on offline machines.
    """
    if name != "c4":
        return f"no hub fallback for {name!r}"
    if offline():
        return "hub download skipped (offline mode)"
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError:
        return "huggingface_hub is not installed"
    if not _reachable(constants.ENDPOINT):
        return f"hub download skipped ({constants.ENDPOINT} unreachable)"
    try:
        gz_path = Path(hf_hub_download(C4_HUB_REPO, C4_HUB_FILE, repo_type="dataset", etag_timeout=5))
        return _c4_from_gzip(gz_path)
    except Exception as err:  # any network/hub failure becomes part of one clear error
        return f"hub download of {C4_HUB_REPO}/{C4_HUB_FILE} failed ({type(err).__name__}: {err})"


def _reachable(endpoint: str) -> bool:
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=_HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _c4_from_gzip(gz_path: Path) -> CalibSource:
    """The first C4_CALIB_DOCS documents of the shard: the calibration part of the local sample file."""
    texts: list[str] = []
    with gzip.open(gz_path, "rt", encoding="utf-8") as handle:
        for line in handle:
            texts.append(json.loads(line)["text"])
            if len(texts) == C4_CALIB_DOCS:
                break
    sha = hashlib.sha256(gz_path.read_bytes()).hexdigest()
    where = f"hub {C4_HUB_REPO} {C4_HUB_FILE}"
    description = f"c4 ({where}, train split, first {len(texts)} docs, sha256 {sha[:8]}…)"
    return CalibSource("c4", texts, description, sha)


def calibration_tokens_description(source: CalibSource, n_samples: int, seq_len: int, seed: int) -> str:
    """One line for reports: the source description plus the window shape and seed."""
    return f"{source.description}: {n_samples} x {seq_len} tokens, seed {seed}"


def calibration_windows(
    tokenizer: Any, source: CalibSource, n_samples: int, seq_len: int, seed: int
) -> torch.LongTensor:
    """``[n_samples, seq_len]`` token windows, GPTQ-style and deterministic in ``seed``.

    Document corpora: pick a random document, and if it has at least ``seq_len`` tokens take a window
    at a random offset, else pick again. Documents are tokenized lazily and each at most once. When
    the documents long enough cannot hold ``n_samples`` disjoint windows (e.g. short paragraphs), the
    documents are joined with EOS separators and windows are cut from that stream instead. Stream
    corpora (WikiText-2, PTB) always use the stream. CalibInputError when even the stream is too short.
    """
    if n_samples < 1 or seq_len < 1:
        raise CalibInputError(f"n_samples and seq_len must be positive (got {n_samples}, {seq_len})")
    if source.stream:
        stream = encode_plain(tokenizer, STREAM_JOINER.join(source.texts))
    else:
        sampler = _DocumentSampler(tokenizer, source.texts, seq_len)
        windows = sampler.sample(n_samples, random.Random(seed))
        if windows is not None:
            return torch.tensor(windows, dtype=torch.long)
        stream = sampler.eos_joined_stream()
    return _stream_windows(stream, n_samples, seq_len, random.Random(seed), source.name)


def encode_plain(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens (``verbose=False`` mutes the max-length warning)."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _stream_windows(
    stream: Sequence[int], n_samples: int, seq_len: int, rng: random.Random, name: str
) -> torch.LongTensor:
    capacity = len(stream) // seq_len
    if capacity < n_samples:
        raise CalibInputError(
            f"calibration data {name!r} has {len(stream)} tokens: at most {capacity} windows of {seq_len} "
            f"tokens, but {n_samples} were asked for; lower --n-samples/--seq-len or use more data"
        )
    starts = [rng.randint(0, len(stream) - seq_len) for _ in range(n_samples)]
    ids = torch.as_tensor(stream, dtype=torch.long)
    return torch.stack([ids[s : s + seq_len] for s in starts])


class _DocumentSampler:
    """GPTQ's document sampling with a token cache, so each document is tokenized at most once."""

    def __init__(self, tokenizer: Any, texts: list[str], seq_len: int) -> None:
        self._encode: Callable[[str], list[int]] = lambda text: encode_plain(tokenizer, text)
        self._eos: int | None = getattr(tokenizer, "eos_token_id", None)
        self._texts = texts
        self._seq_len = seq_len
        self._cache: dict[int, list[int]] = {}

    def tokens(self, index: int) -> list[int]:
        if index not in self._cache:
            self._cache[index] = self._encode(self._texts[index])
        return self._cache[index]

    def _capacity(self) -> int:
        """Disjoint windows the documents tokenized so far could give."""
        return sum(len(ids) // self._seq_len for ids in self._cache.values())

    def _all_tokenized(self) -> bool:
        return len(self._cache) == len(self._texts)

    def sample(self, n_samples: int, rng: random.Random) -> list[list[int]] | None:
        """``n_samples`` windows, or None when the long documents cannot supply that many."""
        windows: list[list[int]] = []
        eligible: list[int] | None = None
        while len(windows) < n_samples:
            if eligible is None and self._all_tokenized():
                eligible = [i for i in range(len(self._texts)) if len(self._cache[i]) >= self._seq_len]
                if self._capacity() < n_samples:
                    return None
            index = rng.choice(eligible) if eligible is not None else rng.randrange(len(self._texts))
            ids = self.tokens(index)
            if len(ids) >= self._seq_len:
                start = rng.randint(0, len(ids) - self._seq_len)
                windows.append(ids[start : start + self._seq_len])
        if self._capacity() < n_samples:
            for index in range(len(self._texts)):
                self.tokens(index)
            if self._capacity() < n_samples:
                return None
        return windows

    def eos_joined_stream(self) -> list[int]:
        """All documents as one token stream, EOS between them (``\\n\\n`` text when there is no EOS)."""
        if self._eos is None:
            return self._encode(STREAM_JOINER.join(self._texts))
        stream: list[int] = []
        for index in range(len(self._texts)):
            if index:
                stream.append(self._eos)
            stream.extend(self.tokens(index))
        return stream
