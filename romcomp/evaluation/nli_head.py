"""RTE and SNLI scored by a classification head on frozen sentence features (encoders, and any model).

Why a head: an encoder has no next-token distribution to score a prompt with, so what its features know
about entailment is measured the SentEval way — a logistic regression on the pair features
``[u, v, |u − v|, u ⊙ v]`` of the mean-pooled last-layer states of premise ``u`` and hypothesis ``v``
(padding excluded). For a decoder it is a second view beside the log-likelihood prompt: the prompt asks
whether the model *uses* the information zero-shot, the head whether its features *hold* it.

The data directory has evaluation sets only (RTE dev: 277 pairs, SNLI: 1254 labelled pairs of a test
subset), so the head is trained and scored by seeded, stratified ``FOLDS``-fold cross-validation on them:
every pair is scored exactly once, by a head that never saw it; accuracy is pooled over the folds. The
features and the classifier are :mod:`romcomp.evaluation.features` (scikit-learn's L2 objective, L-BFGS,
fixed budget, features standardized on each fold's training part), which the probing study uses too, so
probes and heads share one implementation.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

FOLDS = 5
SEED = 0
HEAD_TASKS = {"rte_head": "rte", "snli_head": "snli"}
"""Head task -> the log-likelihood task whose data file (and label set) it shares."""
SNLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}


def load_pairs(task: str, path: Path, limit: int | None = None) -> tuple[list[str], list[str], list[int]]:
    """(premises, hypotheses, labels) of ``rte_head`` (GLUE TSV, 0 = entailment) or ``snli_head`` (JSON
    lines; pairs without a gold label dropped); the first ``limit`` pairs when given."""
    premises, hypotheses, labels = [], [], []
    if HEAD_TASKS[task] == "rte":
        with path.open(encoding="utf-8", newline="") as handle:
            for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
                premises.append(row["sentence1"])
                hypotheses.append(row["sentence2"])
                labels.append(int(row["label"]))
    else:
        for line in path.read_text(encoding="utf-8").splitlines():
            doc = json.loads(line) if line.strip() else {}
            if doc.get("gold_label") in SNLI_LABELS:
                premises.append(doc["sentence1"])
                hypotheses.append(doc["sentence2"])
                labels.append(SNLI_LABELS[doc["gold_label"]])
    n = len(labels) if limit is None else min(limit, len(labels))
    return premises[:n], hypotheses[:n], labels[:n]


def pair_features(
    model: Any, tokenizer: Any, premises: Sequence[str], hypotheses: Sequence[str]
) -> np.ndarray:
    """``(pairs, 4 · hidden)`` SentEval pair features from the last layer's mean-pooled states (each
    distinct sentence encoded once: SNLI repeats every premise for three hypotheses)."""
    from romcomp.evaluation.features import sentence_features

    texts = list(dict.fromkeys([*premises, *hypotheses]))
    index = {text: i for i, text in enumerate(texts)}
    last = sentence_features(model, tokenizer, texts, all_layers=False)[0].double()
    u = last[[index[p] for p in premises]]
    v = last[[index[h] for h in hypotheses]]
    return torch.cat([u, v, (u - v).abs(), u * v], dim=1).numpy()


def stratified_folds(labels: Sequence[int], k: int = FOLDS, seed: int = SEED) -> list[np.ndarray]:
    """``k`` disjoint test folds covering every index once, each class dealt round-robin after a seeded
    shuffle (so every fold has each class's share, to within one pair)."""
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    start = 0
    for label in sorted(set(y.tolist())):
        members = rng.permutation(np.flatnonzero(y == label))
        for i, index in enumerate(members):
            folds[(start + i) % k].append(int(index))
        start = (start + len(members)) % k
    return [np.sort(np.asarray(fold, dtype=np.int64)) for fold in folds]


def cross_validated_accuracy(
    x: np.ndarray, labels: Sequence[int], k: int = FOLDS, seed: int = SEED
) -> dict[str, Any]:
    """Pooled accuracy of the head over ``k`` stratified folds, per-fold accuracies, and the majority
    baseline (the most frequent class's share: the accuracy a head that learned nothing reaches)."""
    from romcomp.evaluation.features import probe_accuracy

    y = np.asarray(labels)
    if len(y) < 2 * k or len(set(y.tolist())) < 2:
        raise ValueError(f"a {k}-fold head needs >= {2 * k} pairs of >= 2 classes, got {len(y)}")
    correct, per_fold = 0.0, []
    everything = np.arange(len(y))
    for test in stratified_folds(y, k, seed):
        train = np.setdiff1d(everything, test)
        acc = probe_accuracy(x, y, train, test)
        per_fold.append(acc)
        correct += acc * len(test)
    acc = correct / len(y)
    return {
        "acc": acc,
        "acc_stderr": float(np.sqrt(acc * (1 - acc) / len(y))),
        "fold_accs": per_fold,
        "majority_acc": float(np.bincount(y).max() / len(y)),
        "pairs": int(len(y)),
        "classes": int(len(set(y.tolist()))),
        "folds": k,
    }


def run_heads(model: Any, tokenizer: Any, tasks: Sequence[str], files: dict[str, Path],
              limit: int | None = None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Each head task's cross-validated result, with the pairs available and the data file read."""
    from romcomp.evaluation.zeroshot import count_docs, sha256_file

    results = {}
    for task in tasks:
        path = files[HEAD_TASKS[task]]
        premises, hypotheses, labels = load_pairs(task, path, limit)
        result = cross_validated_accuracy(pair_features(model, tokenizer, premises, hypotheses), labels)
        total = count_docs(path, HEAD_TASKS[task])  # the prompt task's count of the same file's pairs
        results[task] = {**result, "pairs_total": total, "data_file": str(path), "sha256": sha256_file(path)}
    return results
