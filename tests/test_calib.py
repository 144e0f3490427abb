"""Calibration data: sources, test-split refusal, missing data, and deterministic window sampling."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

import calib
import calib.datasets as cd
from calib import (
    CalibSource,
    calibration_tokens_description,
    calibration_windows,
    known_datasets,
    load_calibration,
    resolve_data_dir,
)
from calib.errors import CalibError, CalibInputError
from calib.paths import REPO_ROOT
from tests.conftest import REAL_DATA, byte_tokenizer, missing_real_data, needs_real_data


@pytest.fixture(scope="module")
def byte_tok() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test off the network and independent of the caller's ROMCOMP_DATA_DIR."""
    monkeypatch.setenv("ROMCOMP_OFFLINE", "1")
    monkeypatch.delenv("ROMCOMP_DATA_DIR", raising=False)


def _source(texts: list[str], stream: bool = False) -> CalibSource:
    return CalibSource("synthetic", texts, "synthetic docs", "0" * 64, stream=stream)


def test_byte_tokenizer_is_one_token_per_byte(byte_tok: PreTrainedTokenizerFast) -> None:
    assert len(cd.encode_plain(byte_tok, "héllo")) == len("héllo".encode())


def test_package_exports_api() -> None:
    assert calib.load_calibration is load_calibration
    assert known_datasets() == ["c4", "wikitext2", "ptb"]


def test_resolve_data_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROMCOMP_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("ROMCOMP_DATA_DIR")
    default = REPO_ROOT.parent / "shared" / "data"
    assert resolve_data_dir() == (default if default.is_dir() else None)


@needs_real_data
def test_c4_source_from_real_data() -> None:
    src = load_calibration("c4")
    assert src.name == "c4" and not src.stream
    assert len(src.texts) == 900  # the last 100 of the 1000 lines are held out for evaluation
    assert src.texts[0].startswith("Beginners BBQ Class Taking Place in Missoula!")
    assert src.sha256 == "cdd5b754119131d2934e3e799a059a9d64f53a6aac9e7e2ef79b43120bb01a32"
    assert src.description == (
        "c4 (c4_en_train_sample_1000.jsonl, train split, first 900 of 1000 lines, the rest held out for "
        "evaluation, 900 docs, sha256 cdd5b754…)"
    )


@needs_real_data
def test_wikitext2_and_ptb_are_validation_streams() -> None:
    wiki = load_calibration("wikitext2", REAL_DATA)
    assert wiki.stream and len(wiki.texts) == 3760
    assert "wiki.valid.tokens" in wiki.description and "validation" in wiki.description
    assert "raw validation split is not available" in wiki.description
    assert wiki.sha256.startswith("f0737ed3")
    ptb = load_calibration("ptb", REAL_DATA)
    assert ptb.stream and len(ptb.texts) == 3370 and "ptb.valid.txt" in ptb.description
    assert ptb.texts[0] == ptb.texts[0].strip()


@needs_real_data
@pytest.mark.parametrize(
    "relpath", ["wikitext2_raw/wiki.test.raw", "ptb/ptb.test.txt", "wikitext2_tokenized/wiki.test.tokens"]
)
def test_refuses_real_test_splits(relpath: str) -> None:
    with pytest.raises(CalibInputError, match="refusing to calibrate on a test split"):
        load_calibration(str(REAL_DATA / relpath))


def test_refuses_any_test_named_file(tmp_path: Path) -> None:
    path = tmp_path / "my_Test_docs.txt"
    path.write_text("some text\n")
    with pytest.raises(CalibInputError, match="test split"):
        load_calibration(str(path))


def test_unknown_name_lists_known(tmp_path: Path) -> None:
    with pytest.raises(CalibInputError, match="c4, wikitext2, ptb"):
        load_calibration("pile")
    with pytest.raises(CalibInputError, match="unknown calibration data"):
        load_calibration(str(tmp_path / "missing.jsonl"))


def test_errors_carry_the_cli_exit_codes() -> None:
    """calib's errors are its own (it imports nothing from romcomp) and carry romcomp's exit codes: 2 for a
    wrong request, 1 for text that cannot be had; romcomp's CLI reports them with its own."""
    from romcomp.errors import USER_ERRORS

    assert (CalibError.exit_code, CalibInputError.exit_code) == (1, 2)
    assert issubclass(CalibInputError, CalibError) and issubclass(CalibInputError, ValueError)
    assert CalibError in USER_ERRORS and calib.CalibInputError is CalibInputError


def test_missing_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CalibError, match="ROMCOMP_DATA_DIR") as info:
        load_calibration("c4", tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "c4" / "c4_en_train_sample_1000.jsonl") in message
    assert "offline" in message
    assert not isinstance(info.value, CalibInputError) and info.value.exit_code == 1


def test_hub_fallback_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROMCOMP_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(cd, "_reachable", lambda endpoint: True)

    def failing_download(*args: object, **kwargs: object) -> str:
        raise OSError("no route to host")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", failing_download)
    with pytest.raises(CalibError, match="no route to host"):
        load_calibration("c4", tmp_path)


def test_hub_unreachable_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROMCOMP_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(cd, "_reachable", lambda endpoint: False)
    with pytest.raises(CalibError, match="unreachable"):
        load_calibration("c4", tmp_path)


def test_hub_fallback_reads_first_docs_of_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shard = tmp_path / "c4-train.00000-of-01024.json.gz"
    with gzip.open(shard, "wt", encoding="utf-8") as handle:
        for i in range(cd.C4_DOCS + 5):
            handle.write(json.dumps({"text": f"doc {i}", "url": "u"}) + "\n")
    monkeypatch.delenv("ROMCOMP_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(cd, "_reachable", lambda endpoint: True)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda *a, **k: str(shard))
    src = load_calibration("c4", tmp_path / "empty")
    assert len(src.texts) == cd.C4_CALIB_DOCS and src.texts[-1] == f"doc {cd.C4_CALIB_DOCS - 1}"
    assert "hub allenai/c4" in src.description


def test_jsonl_user_file(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "first doc"}\n\n{"text": "second", "x": 1}\n{"text": "   "}\n')
    src = load_calibration(str(path))
    assert src.texts == ["first doc", "second"] and src.name == str(path) and not src.stream
    assert "2 docs" in src.description and src.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_jsonl_without_text_field_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(CalibInputError, match=r"docs.jsonl:2: .*'text'"):
        load_calibration(str(path))


def test_plain_text_split_on_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "notes.raw"
    path.write_text("para one\nline two\n\n  \n para two \n\n\n")
    src = load_calibration(str(path))
    assert src.texts == ["para one\nline two", "para two"]


def test_windows_shape_and_determinism(byte_tok: PreTrainedTokenizerFast) -> None:
    texts = [f"document {i} " + "abcdefghij" * (5 + i % 7) for i in range(50)]
    src = _source(texts)
    first = calibration_windows(byte_tok, src, 8, 32, seed=0)
    assert first.shape == (8, 32) and first.dtype == torch.long
    assert torch.equal(first, calibration_windows(byte_tok, src, 8, 32, seed=0))
    assert not torch.equal(first, calibration_windows(byte_tok, src, 8, 32, seed=1))


def test_windows_ignore_global_random_state(byte_tok: PreTrainedTokenizerFast) -> None:
    src = _source(["xyz " * 40 + str(i) for i in range(20)])
    random.seed(1)
    a = calibration_windows(byte_tok, src, 4, 16, seed=3)
    random.seed(2)
    assert torch.equal(a, calibration_windows(byte_tok, src, 4, 16, seed=3))


def test_document_windows_are_spans_of_single_long_documents(byte_tok: PreTrainedTokenizerFast) -> None:
    long_docs = [chr(ord("A") + i) * 100 for i in range(5)]
    short_docs = ["short"] * 20
    src = _source(long_docs + short_docs)
    windows = calibration_windows(byte_tok, src, 10, 40, seed=0)
    for row in windows.tolist():
        assert len(set(row)) == 1  # one letter: cut from a single long document
    assert byte_tok.eos_token_id not in windows


def test_documents_are_tokenized_lazily(byte_tok: PreTrainedTokenizerFast) -> None:
    texts = ["lorem ipsum " * 20 for _ in range(1000)]
    sampler = cd._DocumentSampler(byte_tok, texts, 64)
    assert sampler.sample(4, random.Random(0)) is not None
    assert len(sampler._cache) <= 4


def test_short_documents_fall_back_to_eos_stream(byte_tok: PreTrainedTokenizerFast) -> None:
    src = _source([f"line {i}" for i in range(200)])  # every document is shorter than seq_len
    windows = calibration_windows(byte_tok, src, 6, 48, seed=5)
    assert windows.shape == (6, 48)
    assert (windows == byte_tok.eos_token_id).any()
    assert torch.equal(windows, calibration_windows(byte_tok, src, 6, 48, seed=5))


def test_too_little_text_says_how_many_windows_fit(byte_tok: PreTrainedTokenizerFast) -> None:
    src = _source(["tiny doc"] * 10)  # 10 * 8 bytes + 9 EOS = 89 tokens
    with pytest.raises(CalibInputError, match="89 tokens: at most 2 windows of 40"):
        calibration_windows(byte_tok, src, 3, 40, seed=0)


def test_stream_source_windows_come_from_joined_text(byte_tok: PreTrainedTokenizerFast) -> None:
    rows = ["", " = Title = \n", "", " body text here \n"] * 30
    src = _source(rows, stream=True)
    windows = calibration_windows(byte_tok, src, 5, 20, seed=0)
    assert windows.shape == (5, 20)
    joined = "\n\n".join(rows)
    assert all(byte_tok.decode(row) in joined for row in windows.tolist())


def test_bad_sizes_are_rejected(byte_tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(CalibInputError):
        calibration_windows(byte_tok, _source(["abc"]), 0, 8, seed=0)


def test_tokens_description() -> None:
    src = _source(["x"])
    assert calibration_tokens_description(src, 128, 512, 0) == "synthetic docs: 128 x 512 tokens, seed 0"


@needs_real_data
@pytest.mark.parametrize(
    "name,n,length",
    [("c4", 16, 256), pytest.param("wikitext2", 8, 512, marks=pytest.mark.slow)],  # tokenizes 1.1 MB twice
)
def test_windows_real_data(byte_tok: PreTrainedTokenizerFast, name: str, n: int, length: int) -> None:
    src = load_calibration(name)
    windows = calibration_windows(byte_tok, src, n, length, seed=0)
    assert windows.shape == (n, length)
    assert torch.equal(windows, calibration_windows(byte_tok, src, n, length, seed=0))


def test_c4_calibration_never_sees_the_held_out_documents() -> None:
    """The last 100 JSON lines of the C4 sample are `romcomp eval`'s held-out C4 perplexity text."""
    import json as _json

    from calib.datasets import C4_CALIB_DOCS, resolve_data_dir

    root = resolve_data_dir()
    if root is None or not (root / "c4" / "c4_en_train_sample_1000.jsonl").exists():
        missing_real_data(f"the C4 sample {(root or REAL_DATA) / 'c4' / 'c4_en_train_sample_1000.jsonl'}")
    lines = (root / "c4" / "c4_en_train_sample_1000.jsonl").read_text(encoding="utf-8").splitlines()
    held_out = {_json.loads(line)["text"] for line in lines[C4_CALIB_DOCS:] if line.strip()}
    source = load_calibration("c4")
    assert held_out and not held_out & set(source.texts)
    assert len(source.texts) <= C4_CALIB_DOCS and "held out" in source.description
