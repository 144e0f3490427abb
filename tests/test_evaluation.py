"""``romcomp eval``: perplexity by hand, lm-eval scoring against a direct computation, prompts, reports.

Fast tests use tiny random models and (for the harness path) a few documents of each local data file;
the slow test checks real SmolLM2-135M zero-shot accuracies against chance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import typer
from typer.testing import CliRunner

from romcomp.errors import BadInputError
from romcomp.evaluation import report as rep
from romcomp.evaluation.cli import parse_tasks, plan, register
from romcomp.evaluation.ppl import C4_CALIB_DOCS, c4_heldout_ids, c4_heldout_texts, run_ppl
from romcomp.evaluation.zeroshot import TASK_FILES

torch.set_num_threads(1)


def _load(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def tiny(tiny_llama: Path) -> tuple[Any, Any]:
    return _load(tiny_llama)


# ------------------------------------------------------------------------------------------- perplexity


def test_c4_heldout_is_the_last_100_lines(data_dir: Path) -> None:
    path = data_dir / "c4" / "c4_en_train_sample_1000.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    held = c4_heldout_texts(path)
    assert len(held) == 100 and C4_CALIB_DOCS == 900
    assert held[0] == json.loads(lines[900])["text"] and held[-1] == json.loads(lines[-1])["text"]


def test_ppl_equals_hand_computation(tiny: tuple[Any, Any], data_dir: Path) -> None:
    """exp(mean CE of tokens 1..L-1 over the first windows), with full logits from a plain forward."""
    model, tok = tiny
    seq_len, windows = 64, 3
    (entry,) = run_ppl(model, tok, ["c4"], data_dir, seq_len=seq_len, max_windows=windows, batch_size=2)
    ids = c4_heldout_ids(tok, data_dir)[: seq_len * windows].view(windows, seq_len)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    assert entry.tokens_scored == windows * (seq_len - 1) and entry.windows == windows
    assert math.isclose(entry.ppl, math.exp(nll), rel_tol=1e-4)
    assert entry.sha256 == "cdd5b754119131d2934e3e799a059a9d64f53a6aac9e7e2ef79b43120bb01a32"


# ------------------------------------------------------------------------------------- harness scoring


def _direct_loglikelihood(model: Any, tok: Any, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context) the straightforward way: one forward, no batching.

    Encoding follows lm-eval's documented rule: trailing context spaces move to the continuation, and
    the continuation's tokens are those of context+continuation after the context's tokens. Inputs
    longer than the model's context keep their last ``max_position_embeddings + 1`` tokens.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok(context + continuation)["input_ids"]
    n_ctx = len(tok(context)["input_ids"])
    kept = whole[-(model.config.max_position_embeddings + 1) :]
    offset = len(whole) - len(kept)
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([kept[:-1]])).logits[0].double(), dim=-1)
    return sum(logprobs[pos - offset - 1, whole[pos]].item() for pos in range(n_ctx, len(whole)))


@pytest.fixture(scope="module")
def harness(tiny: tuple[Any, Any], data_dir: Path) -> dict[str, Any]:
    """All nine tasks through lm-eval on the first 3 documents each, with per-sample log-likelihoods."""
    pytest.importorskip("lm_eval")
    from romcomp.evaluation.zeroshot import run_zeroshot

    model, tok = tiny
    results = run_zeroshot(model, tok, list(TASK_FILES), data_dir, limit=3, log_samples=True)
    return {r.task: r for r in results}


def test_harness_loglikelihoods_equal_direct(tiny: tuple[Any, Any], harness: dict[str, Any]) -> None:
    model, tok = tiny
    for task, result in harness.items():
        for sample in result.samples:
            pairs = zip(sample["arguments"], sample["filtered_resps"], strict=True)
            for (context, continuation), (ll, _greedy) in pairs:
                direct = _direct_loglikelihood(model, tok, context, continuation)
                assert math.isclose(ll, direct, rel_tol=1e-4, abs_tol=1e-3), (task, context[-40:])


def test_prompts_match_lm_eval_formats(harness: dict[str, Any]) -> None:
    """The first document of each task, rendered by hand from lm-eval 0.4.13's task definitions."""
    first = {task: result.samples[0]["arguments"] for task, result in harness.items()}
    piqa_q = "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert first["piqa"][0][0] == piqa_q and first["piqa"][0][1].startswith(" Provide the guinea pig")
    assert first["arc_easy"][0] == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?"
        "\nAnswer:",
        " Sunlight is the source of energy for nearly all ecosystems.",
    )
    assert first["boolq"][0][0].startswith("All biomass goes through") and first["boolq"][0][0].endswith(
        "\nQuestion: does ethanol take more energy make that produces?\nAnswer:"
    )
    assert [c for _, c in first["boolq"]] == [" no", " yes"]
    assert first["copa"][0] == ("The man turned on the faucet, therefore", "  the toilet filled with water.")
    assert [ctx for ctx, _ in first["winogrande"]] == [
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    ]
    assert {c for _, c in first["winogrande"]} == {" always got the easier cases."}
    hs_ctx = "Pole vault: Pole vault is a sport where you run with a pole and stop and swing your body."
    hs_ctx += " A few women"  # ctx_b capitalized, as lm-eval's process_docs does
    assert first["hellaswag"][0] == (hs_ctx, " go down a rock and stop.")
    assert first["lambada_openai"][0][0].endswith("I don't care about")
    assert first["lambada_openai"][0][1] == " signs"
    assert first["openbookqa"][0][0].endswith("the best way to save money is to")


def test_acc_and_acc_norm_follow_the_harness_rule(harness: dict[str, Any]) -> None:
    """acc = argmax ll; acc_norm = argmax ll / len(choice) in *characters* (lm-eval 0.4.13's rule;
    byte length is its separate ``acc_bytes``). Checked on every scored document's log-likelihoods."""
    for task in ("piqa", "arc_easy", "hellaswag", "openbookqa"):
        acc, acc_norm = [], []
        for sample in harness[task].samples:
            lls = [ll for ll, _ in sample["filtered_resps"]]
            chars = [len(c[1:]) for _, c in sample["arguments"]]  # continuation minus the " " delimiter
            gold = sample["target"]
            acc.append(float(max(range(len(lls)), key=lambda i: lls[i]) == gold))
            acc_norm.append(float(max(range(len(lls)), key=lambda i: lls[i] / chars[i]) == gold))
        metrics = harness[task].metrics
        assert metrics["acc"] == pytest.approx(sum(acc) / len(acc)), task
        assert metrics["acc_norm"] == pytest.approx(sum(acc_norm) / len(acc_norm)), task


def _uniform_model(path: Path) -> tuple[Any, Any]:
    """A tiny model whose final norm is zeroed: every next-token distribution is uniform over bytes,
    so a choice's log-likelihood is exactly -(its byte count) * log(vocab)."""
    model, tok = _load(path)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    return model, tok


def test_multiple_choice_picks_the_constructed_answer(tiny_llama: Path, tmp_path: Path) -> None:
    """Under a uniform model, acc picks the fewest bytes; acc_norm picks the fewest bytes per *character*.

    Doc 1: "ab" (3 tokens with the space) beats "abcdefgh" (9) on acc, and loses on acc_norm (1.5 vs
    1.125 tokens per char). Doc 2: "éé" (5 tokens, 2 chars) vs "abc" (4 tokens, 3 chars): acc and
    character acc_norm both pick "abc" (gold 1); byte normalization would pick "éé" (5/4 < 4/3).
    """
    pytest.importorskip("lm_eval")
    from romcomp.evaluation.zeroshot import run_zeroshot

    data = tmp_path / "data" / "zeroshot_llmfoundry"
    data.mkdir(parents=True)
    docs = [
        {"query": "Question: which?\n", "choices": ["ab", "abcdefgh"], "gold": 0},
        {"query": "Question: which?\n", "choices": ["éé", "abc"], "gold": 1},
    ]
    (data / "piqa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    model, tok = _uniform_model(tiny_llama)
    (result,) = run_zeroshot(model, tok, ["piqa"], tmp_path / "data", log_samples=True)
    log_v = math.log(model.config.vocab_size)
    lls = [[ll for ll, _ in s["filtered_resps"]] for s in result.samples]
    assert lls[0] == pytest.approx([-3 * log_v, -9 * log_v])
    assert lls[1] == pytest.approx([-5 * log_v, -4 * log_v])
    assert result.metrics["acc"] == 1.0  # both golds
    assert result.metrics["acc_norm"] == 0.5  # doc 1 goes to the long choice, doc 2 stays on "abc"


# ------------------------------------------------------------------------------------------ CLI input


def test_parse_tasks_groups_and_names() -> None:
    assert parse_tasks("ppl") == (["wikitext2", "ptb", "c4"], [])
    assert parse_tasks("piqa, c4") == (["c4"], ["piqa"])
    assert parse_tasks("zeroshot")[1] == list(TASK_FILES)


@pytest.mark.parametrize(
    ("models", "tasks", "kwargs", "match"),
    [
        (["x"], "ppl,bogus", {}, "unknown task 'bogus'"),
        (["/no/such/model-dir"], "ppl", {}, "unknown model"),
        (["x"], "ppl", {"limit": 0}, "--limit must be >= 1"),
        (["x"], "ppl", {"dtype": "int8"}, "--dtype"),
        ([], "ppl", {}, "at least one MODEL"),
    ],
)
def test_bad_input_is_refused_before_loading(
    models: list[str], tasks: str, kwargs: dict[str, Any], match: str, data_dir: Path, monkeypatch
) -> None:
    import romcomp.evaluation.cli as ecli

    monkeypatch.setattr(ecli, "load_model", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(BadInputError, match=match):
        plan(models, tasks, data_dir, **kwargs)


def test_cli_command_end_to_end(tiny_llama: Path, data_dir: Path, tmp_path: Path) -> None:
    """``romcomp eval`` on a tiny model: exit 0, JSON with settings and hashes, markdown marked partial."""
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:  # a group, so that "eval" is a subcommand as in romcomp's app
        pass

    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    args = ["eval", str(tiny_llama), "--tasks", "wikitext2,ptb", "--limit", "2", "--seq-len", "32"]
    args += ["--threads", "1", "--json", str(out_json), "--report", str(out_md), "--data-dir", str(data_dir)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = rep.load_json(out_json)
    assert doc["partial"] is True and doc["settings"]["limit"] == 2 and doc["settings"]["threads"] == 1
    entry = doc["models"][0]["perplexity"]["wikitext2"]
    assert entry["windows"] == 2 and entry["tokens_scored"] == 62 and entry["seq_len"] == 32
    assert doc["data"]["ptb/ptb.test.txt"].startswith("91a2fa93")
    assert "PARTIAL RUN" in out_md.read_text() and doc["versions"]["lm_eval"]


# --------------------------------------------------------------------------------------------- reports


def _report() -> dict[str, Any]:
    doc = rep.new_report({"limit": None, "seq_len": 2048, "threads": 2, "dtype": "float32", "batch_size": 4})
    for spec, scale in (("dense", 1.0), ("dense-r0.3", 1.7)):
        doc["models"].append(
            {
                "spec": spec, "description": f"{spec}: local directory", "fingerprint": "ab" * 32,
                "perplexity": {"wikitext2": {"ppl": 20.123 * scale, "tokens_scored": 286_713, "windows": 140,
                                             "windows_available": 140}},
                "zeroshot": {
                    "piqa": {"metrics": {"acc": 0.645 / scale, "acc_stderr": 0.03, "acc_norm": 0.66 / scale},
                             "docs_scored": 1838, "docs_total": 1838},
                    "winogrande": {"metrics": {"acc": 0.515}, "docs_scored": 1267, "docs_total": 1267},
                },
            }
        )  # fmt: skip
    return doc


def test_report_json_markdown_round_trip(tmp_path: Path) -> None:
    doc = _report()
    rep.write_json(doc, tmp_path / "r.json")
    loaded = rep.load_json(tmp_path / "r.json")
    assert loaded == doc and rep.to_markdown(loaded) == rep.to_markdown(doc)
    names, rows = rep.parse_markdown_table(rep.to_markdown(loaded))
    assert names == ["dense", "dense-r0.3"]
    for column, model in enumerate(loaded["models"]):
        assert float(rows["wikitext2 ppl"][column]) == round(model["perplexity"]["wikitext2"]["ppl"], 2)
        assert float(rows["piqa acc"][column]) == round(model["zeroshot"]["piqa"]["metrics"]["acc"], 4)
        assert rows["wikitext2 tokens scored"][column] == "286,713"
        assert float(rows["zero-shot mean acc"][column]) == round(rep.mean_acc(model), 4)
    assert "acc_stderr" not in " ".join(rows) and "PARTIAL" not in rep.to_markdown(loaded)
    assert not rep.is_partial(loaded)


def test_partial_runs_are_marked() -> None:
    doc = _report()
    doc["models"][0]["zeroshot"]["piqa"]["docs_scored"] = 50
    assert rep.is_partial(doc)
    doc["settings"]["limit"] = 50
    doc["partial"] = rep.is_partial(doc)
    assert rep.to_markdown(doc).splitlines()[2].startswith("**PARTIAL RUN** (--limit 50")


# ------------------------------------------------------------------------------------ real model (slow)


@pytest.mark.slow
def test_smollm2_zeroshot_above_chance(data_dir: Path) -> None:
    """Dense SmolLM2-135M, first 50 examples: PIQA, ARC-Easy and HellaSwag clearly above chance.

    Measured on the first 200 (this harness): PIQA acc 0.645, ARC-Easy 0.49, HellaSwag acc_norm 0.38;
    chance is 0.5 / 0.25 / 0.25, so margins of 0.07 / 0.15 / 0.05 leave room for the 50-example noise
    (one standard error is about 0.07) while still failing for a broken prompt or scoring.
    """
    pytest.importorskip("lm_eval")
    from romcomp.errors import RomcompError
    from romcomp.evaluation.zeroshot import run_zeroshot
    from romcomp.sources import resolve_model

    try:
        path = resolve_model("smollm2-135m").path
    except RomcompError as err:
        pytest.skip(f"smollm2-135m not available: {err}")
    model, tok = _load(path)
    tasks = ["piqa", "arc_easy", "hellaswag"]
    results = {r.task: r.metrics for r in run_zeroshot(model, tok, tasks, data_dir, limit=50)}
    assert results["piqa"]["acc"] > 0.5 + 0.07, results
    assert results["arc_easy"]["acc"] > 0.25 + 0.15, results
    assert results["hellaswag"]["acc_norm"] > 0.25 + 0.05, results


def test_task_templates_are_package_files() -> None:
    """Every task has a template with both placeholders (pyproject ships ``evaluation/tasks/*.yaml``)."""
    from romcomp.evaluation.zeroshot import CACHE_PLACEHOLDER, DATA_PLACEHOLDER, TEMPLATE_DIR

    for task in TASK_FILES:
        text = (TEMPLATE_DIR / f"{task}.yaml").read_text()
        assert DATA_PLACEHOLDER in text and CACHE_PLACEHOLDER in text, task
