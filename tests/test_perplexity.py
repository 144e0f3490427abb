"""Perplexity: chunked evaluation equals the model's own loss; the test text follows the standard protocol;
``romcomp eval``'s record (held-out C4) equals a hand computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import romcomp.evaluation.perplexity as pp
from calib.datasets import hf_wikitext_rows
from romcomp.errors import BadInputError, RomcompError
from romcomp.evaluation.perplexity import (
    C4_CALIB_DOCS,
    PerplexityResult,
    c4_heldout_ids,
    c4_heldout_texts,
    perplexity,
    ptb_test_ids,
    run_ppl,
    wikitext2_test_ids,
)
from tests.conftest import REAL_DATA, byte_tokenizer, needs_real_data, real_model
from tests.families import tiny_causal_lm

_SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=128,
)


def _tiny(kind: str = "llama") -> torch.nn.Module:
    return tiny_causal_lm(kind, _SMALL)


def _direct_nll(model: torch.nn.Module, ids: torch.Tensor, seq_len: int, n_windows: int) -> float:
    """Mean NLL the straightforward way: the model's own ``labels`` loss, window by window."""
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.double() for w in windows]
    return torch.stack(losses).mean().item()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (1000,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["llama", "gemma2", "granite"])
def test_chunked_equals_model_loss(kind: str, ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny(kind)
    monkeypatch.setattr(pp, "_LOGIT_CHUNK", 37)  # chunks that straddle window boundaries
    result = perplexity(model, ids, seq_len=64, batch_size=3)
    expected = _direct_nll(model, ids, 64, 15)
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(expected), rel=1e-5)
    assert result.ppl > 1.5  # not a trivially uniform model


def test_every_scored_token_once(ids: torch.Tensor) -> None:
    result = perplexity(_tiny(), ids, seq_len=64)
    assert isinstance(result, PerplexityResult)
    assert result.windows == 1000 // 64 and result.seq_len == 64
    assert result.tokens_scored == result.windows * 63


def test_max_windows_takes_the_first_windows(ids: torch.Tensor) -> None:
    model = _tiny()
    first = perplexity(model, ids, seq_len=64, max_windows=4)
    assert first.windows == 4 and first.tokens_scored == 4 * 63
    assert first.nll == pytest.approx(_direct_nll(model, ids, 64, 4), rel=1e-5)
    assert perplexity(model, ids[: 4 * 64], seq_len=64).nll == pytest.approx(first.nll, rel=1e-6)
    assert perplexity(model, ids, seq_len=64, max_windows=1000).windows == 15


def test_batch_size_does_not_change_result(ids: torch.Tensor) -> None:
    model = _tiny()
    one = perplexity(model, ids, seq_len=64, batch_size=1)
    many = perplexity(model, ids, seq_len=64, batch_size=16)
    assert one.nll == pytest.approx(many.nll, rel=1e-5)


def test_fallback_without_separate_decoder(ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny()
    expected = perplexity(model, ids, seq_len=64).nll
    monkeypatch.setattr(model, "get_decoder", lambda: model)
    assert perplexity(model, ids, seq_len=64).nll == pytest.approx(expected, rel=1e-6)


def test_restores_training_mode(ids: torch.Tensor) -> None:
    model = _tiny().train()
    perplexity(model, ids, seq_len=64, max_windows=1)
    assert model.training


def test_accepts_batch_of_one(ids: torch.Tensor) -> None:
    model = _tiny()
    assert perplexity(model, ids[None], seq_len=64).nll == pytest.approx(perplexity(model, ids, 64).nll)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq_len": 2000}, "too few for one window"),
        ({"seq_len": 1}, "seq_len must be >= 2"),
        ({"max_windows": 0}, "max_windows"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments(ids: torch.Tensor, kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(BadInputError, match=match):
        perplexity(_tiny(), ids, **kwargs)


def test_float_ids_rejected() -> None:
    with pytest.raises(BadInputError, match="integer"):
        perplexity(_tiny(), torch.zeros(200), seq_len=64)


@pytest.mark.slow  # tokenizes the whole 1.3 MB test split
@needs_real_data
def test_wikitext2_ids_are_hf_rows_joined() -> None:
    """The evaluated text is ``"\\n\\n".join`` of the HF rows, which is longer than the raw file."""
    raw = (REAL_DATA / "wikitext2_raw" / "wiki.test.raw").read_bytes()
    rows = hf_wikitext_rows(raw)
    assert len(rows) == 4358 and rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    joined = "\n\n".join(rows)
    assert joined.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")
    # A public CRLF copy of this joined text is 1,305,941 characters long.
    assert len(joined) + joined.count("\n") == 1_305_941
    ids = wikitext2_test_ids(byte_tokenizer())
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.numel() == len(joined.encode("utf-8")) > len(raw)


@needs_real_data
def test_ptb_ids_are_stripped_rows_joined() -> None:
    text = (REAL_DATA / "ptb" / "ptb.test.txt").read_text()
    joined = "\n\n".join(line.strip() for line in text.split("\n"))
    assert ptb_test_ids(byte_tokenizer(), REAL_DATA).numel() == len(joined.encode("utf-8"))


def test_missing_eval_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RomcompError, match="ROMCOMP_DATA_DIR") as info:
        wikitext2_test_ids(byte_tokenizer(), tmp_path)
    assert str(tmp_path / "wikitext2_raw" / "wiki.test.raw") in str(info.value)


def test_c4_heldout_is_the_last_100_lines(data_dir: Path) -> None:
    path = data_dir / "c4" / "c4_en_train_sample_1000.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    held = c4_heldout_texts(path)
    assert len(held) == 100 and C4_CALIB_DOCS == 900
    assert held[0] == json.loads(lines[900])["text"] and held[-1] == json.loads(lines[-1])["text"]


def test_ppl_equals_hand_computation(tiny_llama: Path, data_dir: Path) -> None:
    """``romcomp eval``'s record: exp(mean CE of tokens 1..L-1 over the first windows), with full logits
    from a plain forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    seq_len, windows = 64, 3
    (entry,) = run_ppl(model, tok, ["c4"], data_dir, seq_len=seq_len, max_windows=windows, batch_size=2)
    ids = c4_heldout_ids(tok, data_dir)[: seq_len * windows].view(windows, seq_len)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    assert entry.tokens_scored == windows * (seq_len - 1) and entry.windows == windows
    assert math.isclose(entry.ppl, math.exp(nll), rel_tol=1e-4)
    assert entry.sha256 == "cdd5b754119131d2934e3e799a059a9d64f53a6aac9e7e2ef79b43120bb01a32"


@pytest.fixture(scope="module")
def smollm2() -> tuple[torch.nn.Module, object]:
    """Real SmolLM2-135M: skipped when it cannot be had, a failure under CI (``conftest.real_model``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = real_model("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.slow
@needs_real_data
def test_smollm2_wikitext2_dense_perplexity(smollm2: tuple[torch.nn.Module, object]) -> None:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized) on the first 40 x 512 WikiText-2 test windows.

    Measured 29.19 with the standard protocol (rows joined with "\\n\\n"); the raw file as-is gives 28.69.
    """
    model, tokenizer = smollm2
    ids = wikitext2_test_ids(tokenizer)
    result = perplexity(model, ids, seq_len=512, max_windows=40)
    print(f"smollm2-135m wikitext2 ppl {result.ppl:.3f}")
    assert result.windows == 40 and result.tokens_scored == 40 * 511
    assert 27 < result.ppl < 31
