"""``romcomp eval``: lm-eval scoring against a direct computation, prompts, MMLU, speed, plots, reports
(its perplexity record is tested in tests/test_perplexity.py).

Fast tests use tiny random models and a few documents of the local data files. Marked slow: the tests
that read the shared data heavily (the harness over all nine task files, the CLI run that tokenizes the
whole WikiText-2 and PTB test texts) and the one that checks real SmolLM2-135M accuracies against chance.
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

from romcomp.cli.evaluate import register
from romcomp.errors import BadInputError
from romcomp.evaluation import report as rep
from romcomp.evaluation.efficiency import SpeedSettings
from romcomp.evaluation.plan import Tasks, parse_tasks, plan
from romcomp.evaluation.zeroshot import TASK_FILES

torch.set_num_threads(1)


def _load(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def tiny(tiny_llama: Path) -> tuple[Any, Any]:
    return _load(tiny_llama)


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
    from romcomp.evaluation.zeroshot import run_zeroshot

    model, tok = tiny
    results = run_zeroshot(model, tok, list(TASK_FILES), data_dir, limit=3, log_samples=True)
    return {r.task: r for r in results}


@pytest.mark.slow
def test_harness_loglikelihoods_equal_direct(tiny: tuple[Any, Any], harness: dict[str, Any]) -> None:
    model, tok = tiny
    for task, result in harness.items():
        for sample in result.samples:
            pairs = zip(sample["arguments"], sample["filtered_resps"], strict=True)
            for (context, continuation), (ll, _greedy) in pairs:
                direct = _direct_loglikelihood(model, tok, context, continuation)
                assert math.isclose(ll, direct, rel_tol=1e-4, abs_tol=1e-3), (task, context[-40:])


@pytest.mark.slow
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
    assert first["commonsense_qa"][0][0] == (
        "Question: A revolving door is convenient for two direction travel, but it also serves as a security "
        "measure at a what?\nA. bank\nB. department store\nC. mall\nD. new york\nAnswer:"
    )
    assert [c for _, c in first["commonsense_qa"]] == [" A", " B", " C", " D"]
    assert first["rte"][0][0] == (
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, according "
        "to the Christopher Reeve Foundation.\nQuestion: Christopher Reeve had an accident. True or False?"
        "\nAnswer:"
    )
    assert [c for _, c in first["rte"]] == [" True", " False"] and harness["rte"].samples[0]["target"] == 1
    assert first["snli"][0][0] == (
        "Four young men sit on the floor close to a television that is showing Elmo from Sesame Street.\n"
        "Question: Four males are playing out in the yard. True, False or Neither?\nAnswer:"
    )
    assert [c for _, c in first["snli"]] == [" True", " Neither", " False"]
    assert harness["snli"].samples[0]["target"] == 2  # contradiction
    assert first["winogender_female"][0][0].startswith('Sentence: "The technician told the customer that she')
    assert [c for _, c in first["winogender_female"]] == [" the technician", " the customer"]
    assert first["winogender_male"][0][0].startswith('Sentence: "The technician told the customer that he')


@pytest.mark.slow
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
    for task in ("rte", "snli", "winogender_female", "winogender_male"):  # acc only: argmax of the sums
        acc = []
        for sample in harness[task].samples:
            lls = [ll for ll, _ in sample["filtered_resps"]]
            acc.append(float(max(range(len(lls)), key=lambda i: lls[i]) == sample["target"]))
        assert harness[task].metrics["acc"] == pytest.approx(sum(acc) / len(acc)), task


def _solved_nli_prompts(data_dir: Path, task: str) -> dict[str, str]:
    """Every pair of an NLI file rendered by hand as a solved example: prompt -> " <gold answer>"."""
    from romcomp.evaluation.nli_head import load_pairs

    premises, hypotheses, labels = load_pairs(f"{task}_head", data_dir / TASK_FILES[task])
    solved = {}
    for premise, hypothesis, label in zip(premises, hypotheses, labels, strict=True):
        if task == "rte":
            prompt, answer = (
                f"{premise}\nQuestion: {hypothesis} True or False?\nAnswer:",
                ["True", "False"][label],
            )
        else:
            h = hypothesis.strip() + ("" if hypothesis.strip().endswith(".") else ".")
            prompt, answer = (
                f"{premise}\nQuestion: {h} True, False or Neither?\nAnswer:",
                ["True", "Neither", "False"][label],
            )
        solved[prompt] = f" {answer}"
    return solved


@pytest.mark.slow
def test_few_shot_nli_prompts_are_solved_pairs_from_the_file(
    tiny: tuple[Any, Any], harness: dict[str, Any], data_dir: Path
) -> None:
    """``num_fewshot`` 2: each context is two solved pairs of the same file (gold answers, never the
    scored pair), then the zero-shot prompt of the scored pair; the harness's log-likelihoods of these
    longer contexts still equal a direct computation."""
    from romcomp.evaluation.zeroshot import run_zeroshot

    model, tok = tiny
    results = run_zeroshot(model, tok, ["rte", "snli"], data_dir, limit=3, log_samples=True, num_fewshot=2)
    for result in results:
        solved = _solved_nli_prompts(data_dir, result.task)
        for sample, zero in zip(result.samples, harness[result.task].samples, strict=True):
            zero_context = zero["arguments"][0][0]
            context = sample["arguments"][0][0]
            assert context.endswith("\n\n" + zero_context), result.task
            shots = context[: -len(zero_context) - 2].split("\n\n")
            assert len(shots) == 2, shots
            for shot in shots:
                prompt, answer = shot.rsplit("Answer:", 1)
                assert solved[prompt + "Answer:"] == answer and prompt + "Answer:" != zero_context
            for (ctx, continuation), (ll, _greedy) in zip(
                sample["arguments"], sample["filtered_resps"], strict=True
            ):
                direct = _direct_loglikelihood(model, tok, ctx, continuation)
                assert math.isclose(ll, direct, rel_tol=1e-4, abs_tol=1e-3), result.task


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
    assert parse_tasks("ppl") == Tasks(["wikitext2", "ptb", "c4"], [])  # test splits only
    assert parse_tasks("validation") == Tasks(["wikitext2-valid", "ptb-valid"], [])
    assert parse_tasks("c4,ptb-valid") == Tasks(["c4", "ptb-valid"], [])
    assert parse_tasks("piqa, c4, speed") == Tasks(["c4"], ["piqa"], speed=True)
    assert parse_tasks("zeroshot").zeroshot == [
        "piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa", "copa",
        "lambada_openai",
    ]  # fmt: skip
    assert parse_tasks("knowledge") == Tasks([], ["commonsense_qa"], mmlu=True)
    everything = parse_tasks("all")
    assert everything.zeroshot == list(TASK_FILES) and everything.mmlu and everything.speed


@pytest.mark.parametrize(
    ("models", "tasks", "kwargs", "match"),
    [
        (["x"], "ppl,bogus", {}, "unknown task 'bogus'"),
        (["/no/such/model-dir"], "ppl", {}, "unknown model"),
        (["x"], "ppl", {"limit": 0}, "--limit must be >= 1"),
        (["x"], "snli", {"num_fewshot": -1}, "--num-fewshot must be >= 0"),
        (["x"], "ppl", {"dtype": "int8"}, "--dtype"),
        ([], "ppl", {}, "at least one MODEL"),
    ],
)
def test_bad_input_is_refused_before_loading(
    models: list[str], tasks: str, kwargs: dict[str, Any], match: str, data_dir: Path, monkeypatch
) -> None:
    import romcomp.evaluation.run as erun

    monkeypatch.setattr(erun, "load_model", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(BadInputError, match=match):
        plan(models, tasks, data_dir, **kwargs)


@pytest.mark.slow
def test_cli_command_end_to_end(tiny_llama: Path, data_dir: Path, tmp_path: Path) -> None:
    """``romcomp eval`` on a tiny model: exit 0, JSON with settings and hashes, markdown marked partial."""
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:  # a group, so that "eval" is a subcommand as in romcomp's app
        pass

    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    args = ["eval", str(tiny_llama), "--tasks", "wikitext2,ptb,validation", "--limit", "2", "--seq-len", "32"]
    args += ["--threads", "1", "--json", str(out_json), "--report", str(out_md), "--data-dir", str(data_dir)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = rep.load_json(out_json)
    assert doc["partial"] is True and doc["settings"]["limit"] == 2 and doc["settings"]["threads"] == 1
    entry = doc["models"][0]["perplexity"]["wikitext2"]
    assert entry["windows"] == 2 and entry["tokens_scored"] == 62 and entry["seq_len"] == 32
    assert doc["data"]["ptb/ptb.test.txt"].startswith("91a2fa93")
    valid = doc["models"][0]["perplexity"]["wikitext2-valid"]  # the validation split, not the test text
    assert valid["data_file"].endswith("wiki.valid.tokens") and valid["ppl"] != entry["ppl"]
    assert doc["models"][0]["perplexity"]["ptb-valid"]["data_file"].endswith("ptb.valid.txt")
    assert "PARTIAL RUN" in out_md.read_text() and doc["versions"]["lm_eval"]
    settings_line = next(line for line in out_md.read_text().splitlines() if "seeds" in line)
    assert "seq len 32" in settings_line and "num_fewshot" not in settings_line  # perplexity only


def test_cli_num_fewshot_end_to_end(tiny_llama: Path, data_dir: Path, tmp_path: Path) -> None:
    """``--num-fewshot 1`` reaches the harness and the report states it (JSON settings, markdown line)."""
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:
        pass

    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    args = [
        "eval",
        str(tiny_llama),
        "--tasks",
        "snli",
        "--limit",
        "2",
        "--num-fewshot",
        "1",
        "--threads",
        "1",
    ]
    args += ["--json", str(out_json), "--report", str(out_md), "--data-dir", str(data_dir)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = rep.load_json(out_json)
    assert doc["settings"]["num_fewshot"] == {"zeroshot": 1, "mmlu": 5}
    assert doc["models"][0]["zeroshot"]["snli"]["docs_scored"] == 2
    assert "lm-eval tasks num_fewshot 1, MMLU num_fewshot 5" in out_md.read_text()


# ------------------------------------------------------------------------------------------------- MMLU


@pytest.fixture(scope="module")
def mmlu_run(tiny: tuple[Any, Any], data_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Two subjects, first 3 test questions each, 5-shot, with per-sample log-likelihoods."""
    from romcomp.evaluation.mmlu import run_mmlu
    from romcomp.evaluation.zeroshot import harness_model

    model, tok = tiny
    lm = harness_model(model, tok, 4, None)
    return run_mmlu(lm, data_dir, limit=3, only=["anatomy", "high_school_us_history"], log_samples=True)


def _mmlu_prompt(data_dir: Path, subject: str, index: int) -> str:
    """The 5-shot prompt rendered by hand from the CSVs and lm-eval's mmlu template."""
    from romcomp.evaluation.mmlu import read_csv

    def block(doc: dict[str, Any]) -> str:
        options = "".join(f"\n{letter}. {text}" for letter, text in zip("ABCD", doc["choices"], strict=True))
        return f"{doc['question'].strip()}{options}\nAnswer:"

    shots = read_csv(data_dir / "mmlu" / "dev" / f"{subject}_dev.csv")
    test = read_csv(data_dir / "mmlu" / "test" / f"{subject}_test.csv")[index]
    name = subject.replace("_", " ")
    intro = f"The following are multiple choice questions (with answers) about {name}.\n\n"
    return intro + "".join(f"{block(d)} {'ABCD'[d['answer']]}\n\n" for d in shots) + block(test)


def test_mmlu_prompts_scores_and_averages(
    tiny: tuple[Any, Any], mmlu_run: tuple[Any, dict[str, Any]], data_dir: Path
) -> None:
    """Prompts equal the hand-rendered 5-shot text; log-likelihoods equal a direct computation;
    acc is the argmax letter; macro/micro averages follow from the subject accuracies."""
    model, tok = tiny
    result, samples = mmlu_run
    for subject, docs in samples.items():
        correct = []
        for sample in docs:
            args = sample["arguments"]
            assert [c for _, c in args] == [" A", " B", " C", " D"]
            assert args[0][0] == _mmlu_prompt(data_dir, subject, sample["doc_id"]), subject
            lls = [ll for ll, _ in sample["filtered_resps"]]
            if subject == "anatomy":  # prompts fit the tiny model's 256-token context only in part
                for (context, continuation), ll in zip(args, lls, strict=True):
                    assert math.isclose(ll, _direct_loglikelihood(model, tok, context, continuation),
                                        rel_tol=1e-4, abs_tol=1e-3)  # fmt: skip
            correct.append(float(max(range(4), key=lambda i: lls[i]) == sample["target"]))
        entry = result.subjects[subject]
        assert entry["acc"] == pytest.approx(sum(correct) / len(correct))
        assert entry["docs_scored"] == 3 and entry["category"] in ("stem", "humanities")
    assert result.subjects["anatomy"]["docs_total"] == 135
    accs = [e["acc"] for e in result.subjects.values()]
    assert result.macro() == pytest.approx(sum(accs) / 2)
    summary = result.to_dict()
    assert summary["docs_scored"] == 6 and summary["num_fewshot"] == 5
    assert set(summary["categories"]) == {"stem", "humanities"}


def test_mmlu_data_errors_are_one_line(tmp_path: Path) -> None:
    from romcomp.errors import RomcompError
    from romcomp.evaluation.mmlu import read_csv, subjects

    with pytest.raises(RomcompError, match="MMLU data missing"):
        subjects(tmp_path)
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "dev").mkdir()
    header = "question,choice0,choice1,choice2,choice3,answer\n"
    (tmp_path / "mmlu" / "test" / "x_test.csv").write_text(header)
    with pytest.raises(RomcompError, match="x lack a test or dev CSV"):
        subjects(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text(header + "q,a,b,c,d,7\n")
    with pytest.raises(RomcompError, match="bad.csv:2"):
        read_csv(bad)


# ------------------------------------------------------------------------------------------- efficiency


def test_speed_and_memory_measurements(tiny: tuple[Any, Any], tiny_llama: Path) -> None:
    from romcomp.compression.memory import peak_rss as peak_rss_bytes
    from romcomp.evaluation.efficiency import (
        SpeedSettings,
        measure_speed,
        reset_peak_rss,
        weight_bytes_on_disk,
    )

    model, _ = tiny
    settings = SpeedSettings(prefill_len=4096, decode_prompt_len=16, decode_tokens=4, repeats=1)
    speed = measure_speed(model, settings)
    assert speed["settings"]["prefill_len"] == model.config.max_position_embeddings  # capped by context
    assert speed["threads"] == torch.get_num_threads()
    for key in ("prefill_tokens_per_s", "decode_b1_tokens_per_s", "decode_b8_tokens_per_s"):
        assert math.isfinite(speed[key]) and speed[key] > 0, key
    assert speed["decode_b1_ms_per_token"] == pytest.approx(1000 / speed["decode_b1_tokens_per_s"])
    shards = list(tiny_llama.glob("*.safetensors"))
    assert len(shards) > 1 and weight_bytes_on_disk(tiny_llama) == sum(p.stat().st_size for p in shards)
    if reset_peak_rss():  # Linux: the high-water mark restarts from the current RSS
        before = peak_rss_bytes()
        block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB touched
        assert peak_rss_bytes() >= before + (60 << 20)
        del block
        reset_peak_rss()
        assert peak_rss_bytes() < before + (32 << 20)


# ------------------------------------------------------------------------------------------------ plots


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature and the chunk's CRC."""
    import struct
    import zlib

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    (crc,) = struct.unpack(">I", data[29:33])
    assert zlib.crc32(data[12:29]) == crc
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def test_plots_are_valid_pngs(tmp_path: Path) -> None:
    from romcomp.evaluation.plots import lines, write_plots

    doc = _report()
    doc["models"].append(json.loads(json.dumps(doc["models"][0])) | {"spec": "other", "ratio": 0.0})
    for model, ratio, width in zip(doc["models"], (0.0, 0.3, 0.0), (576, 576, 896), strict=True):
        model.update(ratio=ratio, shape={"hidden_size": width, "num_hidden_layers": 30, "vocab_size": 49152},
                     base_label=f"base-{width}", romcomp={"ratio": ratio} if ratio else None,
                     efficiency={"decode_b1_tokens_per_s": 10.0 + ratio, "decode_b8_tokens_per_s": 50.0,
                                 "prefill_tokens_per_s": 400.0})  # fmt: skip
    ppl = lines(doc, lambda m: m["perplexity"]["wikitext2"]["ppl"])
    assert ppl["base-576"] == [(0.0, 20.123), (0.3, pytest.approx(20.123 * 1.7))] and len(ppl) == 2
    written = write_plots(doc, tmp_path / "sub" / "report")
    assert [p.name for p in written] == ["report-ppl.png", "report-acc.png", "report-throughput.png"]
    for path in written:
        width, height = _png_size(path)
        assert width > 200 and height > 200


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
                "parameters": int(134_515_008 / scale), "bytes_on_disk": int(538_090_408 / scale),
                "mmlu": {"macro_acc": 0.25 / scale, "micro_acc": 0.26, "categories": {"stem": 0.24},
                         "subjects": {"anatomy": {"acc": 0.3 / scale}},
                         "docs_scored": 135, "docs_total": 135},
                "efficiency": {"prefill_tokens_per_s": 441.5 * scale, "decode_b1_tokens_per_s": 15.8,
                               "decode_b1_ms_per_token": 63.3, "decode_b8_tokens_per_s": 75.5,
                               "threads": 2, "settings": SpeedSettings().to_dict()},
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
        assert float(rows["zero-shot mean acc (tasks run)"][column]) == round(rep.mean_acc(model), 4)
        assert float(rows["MMLU 5-shot macro acc"][column]) == round(model["mmlu"]["macro_acc"], 4)
        assert float(rows["prefill tokens/s (batch 1)"][column]) == round(
            model["efficiency"]["prefill_tokens_per_s"], 1
        )
        assert int(rows["parameters"][column].replace(",", "")) == model["parameters"]
    assert "7-task mean acc" not in rows  # only two of the seven tasks ran
    assert "| anatomy | 0.3000 | 0.1765 |" in rep.to_markdown(loaded)
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
def test_smollm2_dense_and_compressed_cli_report(compressed: tuple[Path, str], tmp_path: Path) -> None:
    """``romcomp eval smollm2-135m <ratio-0.2 output>`` with --limit: accuracies above chance, perplexity and
    size ordered as compression implies, speed measured, the report round-trips and the plots are PNGs.

    Dense SmolLM2 on the first 200 (this harness): PIQA acc 0.645, ARC-Easy 0.49, HellaSwag acc_norm 0.38;
    chance is 0.5 / 0.25 / 0.25, so margins of 0.07 / 0.15 / 0.05 leave room for the 50-example noise
    (one standard error is about 0.07) while still failing for a broken prompt or scoring.
    """
    from tests.conftest import romcomp_cli

    out, _ = compressed
    out_json, out_md = tmp_path / "eval.json", tmp_path / "eval.md"
    proc = romcomp_cli(
        "eval", "smollm2-135m", str(out), "--tasks", "wikitext2,piqa,arc_easy,hellaswag,speed",
        "--limit", "50", "--ppl-windows", "4", "--seq-len", "512", "--threads", "2",
        "--json", str(out_json), "--report", str(out_md), timeout=1500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = rep.load_json(out_json)
    dense, small = doc["models"]
    acc = {task: entry["metrics"] for task, entry in dense["zeroshot"].items()}
    assert acc["piqa"]["acc"] > 0.5 + 0.07, acc
    assert acc["arc_easy"]["acc"] > 0.25 + 0.15, acc
    assert acc["hellaswag"]["acc_norm"] > 0.25 + 0.05, acc
    assert dense["ratio"] == 0.0 and small["ratio"] == 0.2 and small["romcomp"]["method"] == "rom"
    assert "c4" in small["romcomp"]["calibration"]
    assert dense["perplexity"]["wikitext2"]["ppl"] < small["perplexity"]["wikitext2"]["ppl"]
    assert small["parameters"] < dense["parameters"] and small["bytes_on_disk"] < dense["bytes_on_disk"]
    for model in doc["models"]:
        assert model["efficiency"]["threads"] == 2 and model["efficiency"]["decode_b8_tokens_per_s"] > 0
        assert 0 < model["load_peak_rss_bytes"] <= model["run_peak_rss_bytes"] or not model["rss_reset"]
    assert doc["partial"] and out_md.read_text() == rep.to_markdown(doc) and "PARTIAL RUN" in proc.stdout
    names, rows = rep.parse_markdown_table(out_md.read_text())
    assert names == ["smollm2-135m", str(out)] and rows["ratio"] == ["0.00", "0.20"]
    plots = [Path(p) for p in doc["plots"]]
    assert [p.name for p in plots] == ["eval-ppl.png", "eval-acc.png", "eval-throughput.png"]
    assert all(_png_size(p)[0] > 200 for p in plots)


def test_task_templates_are_package_files() -> None:
    """Every task has a template with both placeholders (pyproject ships ``evaluation/tasks/*.yaml``)."""
    from romcomp.evaluation.zeroshot import CACHE_PLACEHOLDER, DATA_PLACEHOLDER, TEMPLATE_DIR

    for task in TASK_FILES:
        text = (TEMPLATE_DIR / f"{task}.yaml").read_text()
        assert DATA_PLACEHOLDER in text and CACHE_PLACEHOLDER in text, task


def test_winogender_gap_is_female_minus_male_and_reported() -> None:
    model = {"name": "m", "zeroshot": {"winogender_female": {"metrics": {"acc": 0.55}},
                                       "winogender_male": {"metrics": {"acc": 0.6}}}}  # fmt: skip
    assert rep.winogender_gap(model) == pytest.approx(-0.05)
    assert rep.winogender_gap({"zeroshot": {"winogender_female": {"metrics": {"acc": 0.5}}}}) is None
    rows = dict(rep.table_rows({"models": [model], "settings": {}}))
    assert rows["Winogender gap (female - male acc)"] == ["-0.0500"]
    assert parse_tasks("winogender,nli").zeroshot == ["rte", "snli", "winogender_female", "winogender_male"]
    assert "rte" not in parse_tasks("zeroshot").zeroshot  # the seven-task group keeps its meaning


def test_nli_documents_are_counted_as_scored(data_dir: Path) -> None:
    """A full NLI run is not marked partial: SNLI's 23 unlabelled pairs and RTE's header are not documents."""
    from romcomp.evaluation.zeroshot import count_docs

    assert count_docs(data_dir / TASK_FILES["snli"], "snli") == 1254
    assert count_docs(data_dir / TASK_FILES["rte"], "rte") == 277
    assert count_docs(data_dir / TASK_FILES["winogender_male"], "winogender_male") == 60
