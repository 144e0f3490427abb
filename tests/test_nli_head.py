"""RTE/SNLI scored by a head on frozen features: folds, a planted answer, the data readers, and the
``romcomp eval`` path for encoders (and decoders) end to end on tiny random models (no ``../shared``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from romcomp.cli.evaluate import register
from romcomp.evaluation import report as rep
from romcomp.evaluation.nli_head import cross_validated_accuracy, load_pairs, stratified_folds
from tests.conftest import romcomp_cli
from tests.families import make_bert

WORDS = "the a cat dog sat ran on under mat park red blue big small man woman saw heard".split()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return make_bert(tmp_path_factory.mktemp("bert") / "tiny-bert")


@pytest.fixture(scope="module")
def nli_dir(tmp_path_factory) -> Path:
    """``nli/rte_dev.tsv`` (30 pairs, with a quote GLUE-style) and ``nli/snli…jsonl`` (36 lines, 6 without
    a gold label) of random words."""
    root = tmp_path_factory.mktemp("data")
    (root / "nli").mkdir()
    rng = np.random.default_rng(0)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS, size=int(rng.integers(4, 9))))

    rows = ["sentence1\tsentence2\tlabel\tidx"]
    rows += [f'{sentence()} "quoted\tit {sentence()}.\t{i % 2}\t{i}' for i in range(30)]
    (root / "nli" / "rte_dev.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    gold = ["entailment", "neutral", "contradiction", "entailment", "neutral", "-"]
    lines = [json.dumps({"sentence1": sentence(), "sentence2": sentence(), "gold_label": gold[i % 6]})
             for i in range(36)]  # fmt: skip
    (root / "nli" / "snli_1.0_test_subset.jsonl").write_text("\n".join(lines), encoding="utf-8")
    return root


def test_stratified_folds_cover_every_pair_once_with_each_class_share() -> None:
    labels = [0] * 50 + [1] * 31 + [2] * 19
    folds = stratified_folds(labels, k=5, seed=3)
    assert sorted(np.concatenate(folds).tolist()) == list(range(100))
    y = np.asarray(labels)
    for cls, count in ((0, 50), (1, 31), (2, 19)):
        per_fold = [int((y[f] == cls).sum()) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == count
    assert [f.tolist() for f in folds] == [f.tolist() for f in stratified_folds(labels, k=5, seed=3)]


def test_head_finds_a_planted_label_and_not_a_random_one() -> None:
    """One feature carries the label (plus noise) among 40 noise features: pooled accuracy ~1; labels
    drawn independently of the features: accuracy near the majority baseline."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, size=300)
    x = rng.normal(size=(300, 41))
    x[:, 7] += 6.0 * y  # classes 6 noise deviations apart: Bayes accuracy > 0.99
    planted = cross_validated_accuracy(x, y)
    assert planted["acc"] >= 0.95 and planted["pairs"] == 300 and len(planted["fold_accs"]) == 5
    assert abs(planted["acc"] - np.mean(planted["fold_accs"])) < 0.01  # equal folds: pooled ~ mean
    noise = cross_validated_accuracy(x, rng.integers(0, 3, size=300))
    assert abs(noise["acc"] - 1 / 3) < 0.12, noise["acc"]
    with pytest.raises(ValueError, match="needs >= 10 pairs"):
        cross_validated_accuracy(x[:8], y[:8])


def test_readers_drop_unlabelled_snli_pairs_and_keep_rte_quotes(nli_dir: Path) -> None:
    premises, hypotheses, labels = load_pairs("rte_head", nli_dir / "nli" / "rte_dev.tsv")
    assert len(labels) == 30 and labels[:4] == [0, 1, 0, 1] and '"quoted' in premises[0]
    assert hypotheses[0].startswith("it ")
    _, _, snli = load_pairs("snli_head", nli_dir / "nli" / "snli_1.0_test_subset.jsonl")
    assert len(snli) == 30 and snli[:5] == [0, 1, 2, 0, 1]
    assert len(load_pairs("snli_head", nli_dir / "nli" / "snli_1.0_test_subset.jsonl", limit=12)[2]) == 12


def _eval(*args: str) -> tuple[int, str]:
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:  # a group, so that "eval" is a subcommand as in romcomp's app
        pass

    result = CliRunner().invoke(app, ["eval", *args, "--threads", "1"])
    return result.exit_code, result.output


def test_encoder_eval_scores_nli_by_the_head(tiny_bert: Path, nli_dir: Path, tmp_path: Path) -> None:
    """An encoder: no --tasks means nli, scored by the head (every pair once, five folds); --limit marks
    the run partial; tasks that need a next-token head, and a run mixing encoders and decoders, are
    refused in one line before any load."""
    out = tmp_path / "r.json"
    code, output = _eval(str(tiny_bert), "--data-dir", str(nli_dir), "--json", str(out), "--report",
                         str(tmp_path / "r.md"))  # fmt: skip
    assert code == 0, output
    doc = rep.load_json(out)
    heads = doc["models"][0]["nli_head"]
    assert set(heads) == {"rte_head", "snli_head"} and doc["partial"] is False
    assert heads["rte_head"]["pairs"] == heads["rte_head"]["pairs_total"] == 30
    assert heads["snli_head"]["pairs"] == 30 and heads["snli_head"]["classes"] == 3
    for entry in heads.values():
        assert len(entry["fold_accs"]) == 5 and 0.0 <= entry["acc"] <= 1.0
        assert entry["acc"] == pytest.approx(np.mean(entry["fold_accs"]), abs=1e-9)  # 30 pairs: equal folds
    markdown = (tmp_path / "r.md").read_text()
    assert "rte_head acc (5-fold head)" in markdown
    settings_line = next(line for line in markdown.splitlines() if line.startswith("- ") and "seeds" in line)
    assert "NLI head 5-fold CV (seed 0)" in settings_line
    assert "seq len" not in settings_line and "num_fewshot" not in settings_line  # no next-token settings
    code, output = _eval(str(tiny_bert), "--tasks", "snli", "--limit", "20", "--data-dir", str(nli_dir),
                         "--json", str(out))  # fmt: skip
    doc = rep.load_json(out)
    assert code == 0 and doc["partial"] is True and list(doc["models"][0]["nli_head"]) == ["snli_head"]
    assert doc["models"][0]["nli_head"]["snli_head"]["pairs"] == 20
    proc = romcomp_cli("eval", str(tiny_bert), "--tasks", "wikitext2,rte", "--data-dir", str(nli_dir))
    assert proc.returncode != 0 and "is an encoder" in proc.stderr and "wikitext2" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_decoder_eval_runs_the_head_and_refuses_a_mixed_run(
    tiny_llama: Path, tiny_bert: Path, nli_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "r.json"
    code, output = _eval(str(tiny_llama), "--tasks", "rte_head", "--data-dir", str(nli_dir), "--json",
                         str(out))  # fmt: skip
    assert code == 0, output
    assert rep.load_json(out)["models"][0]["nli_head"]["rte_head"]["pairs"] == 30
    proc = romcomp_cli("eval", str(tiny_llama), str(tiny_bert), "--tasks", "nli_head", "--data-dir",
                       str(nli_dir))  # fmt: skip
    assert proc.returncode != 0 and "separate runs" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
