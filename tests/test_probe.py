"""``romcomp probe``: parse-derived tasks by hand, Hewitt & Liang controls, the probe on planted features,
and the command end to end on a tiny model with a planted SNLI-format file (no ../shared needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from romcomp.studies.probing.probe import probe_layers
from romcomp.studies.probing.tasks import build_task, control_labels, parse
from tests.conftest import romcomp_cli

PARSES = [
    "(ROOT (S (NP (DT A) (NN man)) (VP (VBZ is) (VP (VBG sleeping))) (. .)))",
    "(ROOT (S (NP (DT The) (NNS dogs)) (VP (VBD ran) (PP (IN in) (NP (DT the) (NN park)))) (. .)))",
    "(ROOT (NP (NP (DT A) (NN woman)) (PP (IN in) (NP (DT a) (JJ red) (NN hat))) (. .)))",
    "(ROOT (S (NP (NNS People)) (VP (VBP are) (VP (VBG walking) (PP (IN on) (NP (DT the) (NN beach)))))"
    " (. .)))",
]


def test_parse_and_the_derived_labels_by_hand() -> None:
    trees = [parse(p) for p in PARSES]
    assert trees[0].leaves() == ["A", "man", "is", "sleeping", "."]
    assert [t.depth() - 1 for t in trees] == [4, 5, 4, 6]
    texts, labels = build_task("sentence_length", trees)
    assert texts[1] == "The dogs ran in the park ." and labels == [0, 1, 1, 1]  # 5, 7, 7, 7 tokens
    assert build_task("tense", trees) == ([texts[0], texts[1], texts[3]], [1, 0, 1])  # no clause in #3
    assert build_task("subject_number", trees)[1] == [0, 1, 1]  # man, dogs, People
    assert build_task("tree_depth", trees)[1] == [0, 1, 0, 2]
    tops = dict(zip(*build_task("top_constituents", trees), strict=True))
    assert tops[texts[0]] == tops[texts[1]] != tops[texts[2]]  # "S: NP VP ." twice, "NP: NP PP ." once
    shifted, flags = build_task("bigram_shift", trees * 25, seed=3)
    assert 30 < sum(flags) < 70
    for text, flag, tree in zip(shifted, flags, trees * 25, strict=True):
        words, original = text.split(), tree.leaves()
        diff = [i for i, (a, b) in enumerate(zip(words, original, strict=True)) if a != b]
        assert (
            (diff == []) if not flag else (len(diff) == 2 and diff[1] == diff[0] + 1 and original[-1] == ".")
        )


def test_control_labels_are_one_random_label_per_last_word_type() -> None:
    texts = [f"w{i % 7} x{i % 13} ." for i in range(400)]
    labels = [i % 3 for i in range(400)]
    control = control_labels(texts, labels, seed=0)
    by_type: dict[str, set[int]] = {}
    for text, c in zip(texts, control, strict=True):
        by_type.setdefault(text.split()[1], set()).add(c)
    assert len(by_type) == 13 and all(len(v) == 1 for v in by_type.values())
    assert set(control) <= {0, 1, 2}


def test_probe_on_a_planted_separable_feature_and_its_control() -> None:
    """Layer 1 carries the label in one coordinate (margin 1, noise 0.1), layer 0 is pure noise; the
    control labels are random per 'word type' (200 types) so no layer can beat chance on them."""
    rng = np.random.default_rng(0)
    n, d = 800, 24
    labels = rng.integers(0, 2, n)
    types = rng.integers(0, 200, n)
    type_label = rng.integers(0, 2, 200)
    control = type_label[types]
    noise = rng.normal(size=(2, n, d)).astype(np.float32)
    noise[1, :, 0] = (2 * labels - 1) + 0.1 * rng.normal(size=n)
    result = probe_layers(torch.from_numpy(noise), labels.tolist(), control.tolist(), seed=0)
    first, second = result["layers"]
    assert second["acc"] >= 0.98 and abs(second["control_acc"] - 0.5) < 0.1
    assert second["selectivity"] > 0.35 and abs(first["acc"] - 0.5) < 0.1
    assert (result["n_train"], result["n_test"], result["classes"]) == (640, 160, 2)


def test_probe_command_end_to_end_on_a_tiny_model(tiny_llama: Path, tmp_path: Path) -> None:
    data = tmp_path / "data" / "nli"
    data.mkdir(parents=True)
    rows = []
    for i in range(60):
        premise, hypothesis = PARSES[i % 4], PARSES[(i + 1) % 4]
        for noun in ("man", "park", "hat", "beach"):
            premise, hypothesis = premise.replace(noun, f"{noun}{i}"), hypothesis.replace(noun, f"{noun}x{i}")
        rows.append(
            json.dumps({"sentence1_parse": premise, "sentence2_parse": hypothesis, "gold_label": "-"})
        )
    (data / "snli_1.0_test_subset.jsonl").write_text("\n".join(rows))
    out = tmp_path / "probe"
    data_dir = str(tmp_path / "data")
    proc = romcomp_cli("probe", str(tiny_llama), str(tiny_llama), "--out", str(out), "--data-dir", data_dir,
                       "--tasks", "sentence_length,bigram_shift", "--threads", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((out / "probe.json").read_text())
    assert [m["name"] for m in doc["models"]] == [str(tiny_llama)] * 2
    for m in doc["models"]:
        for task in ("sentence_length", "bigram_shift"):
            layers = m["tasks"][task]["layers"]
            assert len(layers) == 3 + 1  # embeddings + three blocks
            for row in layers:
                assert row["selectivity"] == pytest.approx(row["acc"] - row["control_acc"])
    assert doc["models"][0]["tasks"] == doc["models"][1]["tasks"]  # same model, same numbers
    assert (out / "selectivity.png").read_bytes()[:4] == b"\x89PNG" and "bigram_shift" in (
        out / "report.md"
    ).read_text()
    bad = romcomp_cli(
        "probe", str(tiny_llama), "--out", str(out), "--tasks", "syntax", "--data-dir", str(tmp_path / "data")
    )
    assert bad.returncode == 2 and "unknown probing task" in bad.stderr
    every = tmp_path / "every2"
    proc = romcomp_cli("probe", str(tiny_llama), "--out", str(every), "--data-dir", data_dir, "--tasks",
                       "sentence_length", "--threads", "2", "--layer-step", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((every / "probe.json").read_text())["models"][0]["tasks"]["sentence_length"]["layers"]
    full = doc["models"][0]["tasks"]["sentence_length"]["layers"]
    assert [r["layer"] for r in rows] == [0, 2, 3] and rows == [full[0], full[2], full[3]]  # same split, fits
    assert "| 2 |" in (every / "report.md").read_text()
    bad = romcomp_cli("probe", str(tiny_llama), "--out", str(every), "--layer-step", "0", "--data-dir",
                      data_dir)  # fmt: skip
    assert bad.returncode == 2 and "--layer-step must be >= 1" in bad.stderr


def test_features_are_the_causal_lms_hidden_states_pooled_by_hand(tiny_llama: Path) -> None:
    """The base model run (no logits) gives the causal LM's own hidden states, mean-pooled over each
    sentence's tokens with the padding left out, in the order given (and the last layer alone when asked)."""
    from romcomp.evaluation.features import sentence_features
    from romcomp.studies.probing.probe import load_probe_model

    model, tok = load_probe_model(str(tiny_llama))
    texts = ["a much longer sentence than the others are", "a short one", "middling length here"]
    features = sentence_features(model, tok, texts)  # batched by length, returned in the given order
    assert features.shape == (model.config.num_hidden_layers + 1, 3, model.config.hidden_size)
    torch.testing.assert_close(sentence_features(model, tok, texts, all_layers=False)[0], features[-1])
    with torch.inference_mode():
        for i, text in enumerate(texts):
            states = model(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states
            by_hand = torch.stack([h[0].mean(0) for h in states])
            torch.testing.assert_close(features[:, i], by_hand, rtol=1e-4, atol=1e-5)
