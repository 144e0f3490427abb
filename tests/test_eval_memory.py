"""``romcomp eval``'s memory bounds: log-likelihoods from chunked logits equal the plain full-logits
computation (lm-eval's stock HFLM for the harness, a full-logits cross-entropy for perplexity) on tiny
random models, with the chunking and the request-batch splitting actually exercised."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import romcomp.evaluation.loglik as ll
import romcomp.evaluation.perplexity as pp
from tests.conftest import byte_tokenizer
from tests.families import tiny_causal_lm

torch.set_num_threads(1)

VOCAB = 300
_SMALL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=VOCAB, max_position_embeddings=64,
)  # fmt: skip


def _tiny(kind: str = "llama") -> torch.nn.Module:
    return tiny_causal_lm(kind, _SMALL)


def _greedy(model: torch.nn.Module, context: list[int], count: int) -> list[int]:
    """``count`` greedy tokens after ``context``: continuations the harness must flag as greedy."""
    ids = list(context)
    with torch.no_grad():
        for _ in range(count):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(context) :]


def _requests(model: torch.nn.Module) -> list[tuple[tuple[str, str], list[int], list[int]]]:
    """lm-eval token requests: shared contexts with 1-4 choices (the one-token cache groups the
    one-token ones), continuations of 1-9 tokens, greedy ones, and one over ``max_length`` (64)."""
    rng = random.Random(0)
    reqs = []
    for i in range(14):
        context = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 50))]
        for j in range(rng.choice([1, 2, 4])):
            cont = [rng.randrange(VOCAB) for _ in range(rng.choice([1, 1, 3, 9]))]
            reqs.append(((f"ctx{i}", f"choice{j}"), context, cont))
        reqs.append(((f"ctx{i}", "greedy"), context, _greedy(model, context, rng.choice([1, 5]))))
    long = [rng.randrange(VOCAB) for _ in range(90)]
    reqs.append((("long", "greedy"), long, _greedy(model, long[-60:], 3)))
    return reqs


@pytest.mark.parametrize("kind", ["llama", "gemma2", "granite"])
def test_bounded_harness_equals_stock_hflm(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Request by request, the bounded harness gives lm-eval's own (log-likelihood, greedy) answers,
    while the head never sees more than ``logit_chunk`` positions and the batches are split."""
    from lm_eval.models.huggingface import HFLM

    model, tok = _tiny(kind), byte_tokenizer()
    reqs = _requests(model)
    expected = HFLM(pretrained=model, tokenizer=tok, batch_size=3)._loglikelihood_tokens(reqs, True)

    head_rows: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda _m, args, _out: head_rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0])
    )
    forwards: list[tuple[int, ...]] = []
    final_hidden = ll.final_hidden
    monkeypatch.setattr(
        ll, "final_hidden", lambda m, b: forwards.append(tuple(b.shape)) or final_hidden(m, b)
    )
    lm = ll.bounded_hflm(model, tok, batch_size=3, max_length=None, activation_budget=0)
    lm.logit_chunk = 2
    lm.activation_budget = 100 * ll.activation_bytes_per_token(model.config, 4, 64)  # ~100 tokens a batch
    got = lm._loglikelihood_tokens(reqs, True)
    hook.remove()

    assert len(got) == len(expected) == len(reqs)
    for (want, want_greedy), (have, have_greedy) in zip(expected, got, strict=True):
        assert have == pytest.approx(want, rel=1e-5, abs=1e-4)
        assert have_greedy == want_greedy
    assert sum(greedy for _, greedy in expected) >= 14  # the constructed greedy continuations
    assert len({round(value, 3) for value, _ in expected}) > len(reqs) // 2  # not a degenerate model
    assert max(head_rows) == 2 and len(head_rows) > len(forwards)  # continuations straddle chunks
    limit = {length: ll.batch_token_budget(model, length, lm.activation_budget) for _, length in forwards}
    assert all(rows * length <= limit[length] or rows == 1 for rows, length in forwards)  # token-bounded
    assert max(rows for rows, _ in forwards) > 1 and len(forwards) > len(reqs) // 3


def test_score_continuations_equals_full_log_softmax() -> None:
    """Every chunk size gives the full-logits sums: a dropped or double-counted position would not."""
    model = _tiny()
    rows = torch.randn(11, 64, generator=torch.Generator().manual_seed(0))
    conts = [[int(t) for t in torch.randint(0, VOCAB, (11,))], [7], [3, 1, 4, 1, 5]]
    with torch.no_grad():
        logp = F.log_softmax(model.lm_head(rows).float(), dim=-1)
        want = [float(logp[torch.arange(len(c)), torch.tensor(c)].sum()) for c in conts]
        argmax = logp.argmax(-1)
        conts.append(argmax[-4:].tolist())  # greedy over the last 4 rows (lm-eval's rule)
        want.append(float(logp[torch.arange(4), argmax[-4:]].sum()))
        for chunk in (1, 2, 3, 5, 11, 100):
            got = ll.score_continuations(model, rows, conts, chunk=chunk)
            assert [value for value, _ in got] == pytest.approx(want, rel=1e-6), chunk
            assert [greedy for _, greedy in got] == [False, False, False, True], chunk


@pytest.mark.parametrize("chunk", [1, 7, 63, 64, 256])
def test_perplexity_chunks_equal_full_logits(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The perplexity NLL of a batch, head applied ``chunk`` positions at a time, equals cross-entropy
    over the model's own full logits (chunks that straddle windows, one that covers everything)."""
    model = _tiny("granite")
    batch = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(input_ids=batch).logits
        want = F.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB).float(), batch[:, 1:].reshape(-1), reduction="sum"
        )
    monkeypatch.setattr(pp, "_LOGIT_CHUNK", chunk)
    with torch.no_grad():
        assert pp._batch_nll(model, batch) == pytest.approx(float(want), rel=1e-6)


def test_split_batches_bounds_requests_and_tokens() -> None:
    lengths = [50, 40, 40, 30, 10, 10, 10, 10, 10, 5]
    ranges = ll.split_batches(lengths, 4, lambda _length: 100)
    assert ranges == [(0, 2), (2, 4), (4, 8), (8, 10)]  # 2 x 50, 2 x 40, 4 x 10 (request cap), rest
    assert ll.split_batches([500, 20], 4, lambda _length: 100) == [(0, 1), (1, 2)]  # too long: alone
    assert ll.split_batches([], 4, lambda _length: 100) == []
    covered = [
        i for start, stop in ll.split_batches(lengths, 3, lambda _length: 64) for i in range(start, stop)
    ]
    assert covered == list(range(len(lengths)))


def test_batch_token_budget_scales_with_budget_dtype_and_attention() -> None:
    model = _tiny()
    per_token = ll.activation_bytes_per_token(model.config, 4, 32)
    assert per_token == 4 * (8 * 64 + 4 * 128)
    assert ll.batch_token_budget(model, 32, 1000 * per_token) == 1000
    assert ll.batch_token_budget(model.to(torch.bfloat16), 32, 1000 * per_token) == 2000
    assert ll.batch_token_budget(model, 32, 0) == 1
    model.config._attn_implementation = "eager"  # scores grow with the length
    assert ll.activation_bytes_per_token(model.config, 4, 1000) > ll.activation_bytes_per_token(
        model.config, 4, 10
    )


def test_harness_model_is_the_bounded_one(tiny_llama: Any) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from romcomp.evaluation.zeroshot import harness_model

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    lm = harness_model(model, AutoTokenizer.from_pretrained(tiny_llama), 4, None)
    assert type(lm).__name__ == "BoundedHFLM" and lm.batch_size == 4
    assert lm.activation_budget == ll.ACTIVATION_BUDGET_BYTES


def test_auto_dtype_is_the_checkpoints_own(tiny_llama: Any, tmp_path: Any) -> None:
    """``--dtype auto`` loads a bf16 checkpoint in bf16 (half the RAM of float32), a float32 one in
    float32; a config that records nothing usable means float32."""
    import shutil
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from romcomp.evaluation.run import checkpoint_dtype, load_model

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(bf16)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_llama / name).is_file():
            shutil.copy(tiny_llama / name, bf16 / name)
    assert load_model(bf16, "auto")[0].dtype == torch.bfloat16
    assert load_model(bf16, "float32")[0].dtype == torch.float32
    assert load_model(tiny_llama, "auto")[0].dtype == torch.float32
    assert checkpoint_dtype(SimpleNamespace(dtype=None, torch_dtype="float16")) == "float16"
    assert checkpoint_dtype(SimpleNamespace(dtype=torch.bfloat16)) == "bfloat16"
    assert checkpoint_dtype(SimpleNamespace(dtype=torch.float64)) == "float32"
    assert checkpoint_dtype(SimpleNamespace()) == "float32"


def test_report_names_the_dtypes_auto_chose() -> None:
    from romcomp.evaluation.report import _knobs

    assert "dtype auto (bfloat16/float32)" in _knobs(
        {"dtype": "auto", "dtypes_used": ["bfloat16", "float32"]}
    )
    assert "dtype float32" in _knobs({"dtype": "float32", "dtypes_used": ["float32"]})
