"""Probing tasks derived from local annotated text: SNLI's constituency parses (no SentEval files offline).

Each task is a list of (sentence, label) pairs over the unique sentences of ``nli/snli_1.0_test_subset.jsonl``
(premises and hypotheses; ~1.7k sentences), rendered as the parse's tokens joined by spaces (SentEval's
form). After Conneau et al. (2018), "What you can cram into a single vector":

- ``sentence_length``: word count in five bins (≤ 5, 6–7, 8–9, 10–12, ≥ 13 tokens).
- ``word_content``: which of the ten most frequent nouns the sentence contains (sentences with exactly one).
- ``bigram_shift``: whether two adjacent words were swapped (half the sentences, seeded, punctuation kept).
- ``tree_depth``: depth of the constituency tree in five bins (≤ 4, 5, 6, 7, ≥ 8).
- ``top_constituents``: the root's constituent and the sequence under it (``S: NP VP .``, ``NP: NP PP .``;
  the five most frequent, other sentences dropped).
- ``tense``: the main clause's first verb, past (VBD) or present (VBP/VBZ).
- ``subject_number``: the subject noun phrase's last noun, singular (NN/NNP) or plural (NNS/NNPS).

Control tasks (Hewitt & Liang, 2019): the same sentences, each *word type* given a random label drawn from
the task's label distribution, and a sentence labelled with its last word's random label — a probe can
only fit it by memorizing word identities, so task accuracy minus control accuracy (selectivity) is what
the representation makes linearly available beyond that.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

SNLI_FILE = "nli/snli_1.0_test_subset.jsonl"
TASKS = ("sentence_length", "word_content", "bigram_shift", "tree_depth", "top_constituents", "tense",
         "subject_number")  # fmt: skip
PUNCT = {".", ",", ":", ";", "!", "?", "``", "''", "-LRB-", "-RRB-", "'", '"'}


@dataclass
class Tree:
    label: str
    children: list[Tree | str]

    def leaves(self) -> list[str]:
        out: list[str] = []
        for c in self.children:
            out.extend([c] if isinstance(c, str) else c.leaves())
        return out

    def depth(self) -> int:
        return 1 + max((c.depth() for c in self.children if isinstance(c, Tree)), default=0)

    def tagged(self) -> list[tuple[str, str]]:
        """(tag, word) of every leaf."""
        out: list[tuple[str, str]] = []
        for c in self.children:
            if isinstance(c, str):
                out.append((self.label, c))
            else:
                out.extend(c.tagged())
        return out


def parse(text: str) -> Tree:
    """A Penn-Treebank s-expression, ``(ROOT (S (NP (DT A) (NN man)) ...))``."""
    tokens = text.replace("(", " ( ").replace(")", " ) ").split()
    stack: list[Tree] = []
    root: Tree | None = None
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "(":
            node = Tree(tokens[i + 1], [])
            if stack:
                stack[-1].children.append(node)
            stack.append(node)
            i += 2
            continue
        if tok == ")":
            root = stack.pop()
        else:
            stack[-1].children.append(tok)
        i += 1
    if root is None or stack:
        raise ValueError(f"unbalanced parse: {text[:60]}")
    return root


def load_sentences(data_dir: Path) -> list[Tree]:
    """Unique sentences (premises and hypotheses) of the local SNLI subset, in file order."""
    seen: dict[str, Tree] = {}
    with (data_dir / SNLI_FILE).open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            doc = json.loads(line)
            for key in ("sentence1_parse", "sentence2_parse"):
                tree = parse(doc[key])
                seen.setdefault(" ".join(tree.leaves()), tree)
    return list(seen.values())


def _clause(tree: Tree) -> Tree | None:
    """The root's clause (ROOT → S), or None for fragments."""
    top = tree.children[0] if tree.label == "ROOT" and tree.children else tree
    return top if isinstance(top, Tree) and top.label == "S" else None


def _bin(value: int, edges: tuple[int, ...]) -> int:
    return sum(value > e for e in edges)


def _label_sentence_length(tree: Tree) -> int | None:
    return _bin(len(tree.leaves()), (5, 7, 9, 12))


def _label_tree_depth(tree: Tree) -> int | None:
    return _bin(tree.depth() - 1, (4, 5, 6, 7))  # ROOT not counted


def _clause_tags(tree: Tree, label: str, prefix: str) -> list[str]:
    """The tags starting with ``prefix`` under the root clause's first ``label`` child (its VP, its NP)."""
    clause = _clause(tree)
    child = (
        next((c for c in clause.children if isinstance(c, Tree) and c.label == label), None)
        if clause
        else None
    )
    return [] if child is None else [t for t, _ in child.tagged() if t.startswith(prefix)]


def _label_tense(tree: Tree) -> int | None:
    verbs = _clause_tags(tree, "VP", "VB")
    return {"VBD": 0, "VBP": 1, "VBZ": 1}.get(verbs[0]) if verbs else None


def _label_subject_number(tree: Tree) -> int | None:
    nouns = _clause_tags(tree, "NP", "NN")
    return int(nouns[-1] in ("NNS", "NNPS")) if nouns else None


def _constituents(tree: Tree) -> str | None:
    top = tree.children[0] if tree.label == "ROOT" and tree.children else tree
    if not isinstance(top, Tree):
        return None
    return f"{top.label}: " + " ".join(c.label for c in top.children if isinstance(c, Tree))


def build_task(name: str, trees: list[Tree], seed: int = 0) -> tuple[list[str], list[int]]:
    """``(texts, labels)`` of one probing task (label ids 0..n-1)."""
    texts = [" ".join(t.leaves()) for t in trees]
    if name == "bigram_shift":
        rng = random.Random(seed)
        out, labels = [], []
        for t in trees:
            words = t.leaves()
            spots = [i for i in range(len(words) - 1) if words[i] not in PUNCT and words[i + 1] not in PUNCT]
            if not spots:
                continue
            flip = rng.random() < 0.5
            if flip:
                i = rng.choice(spots)
                words[i], words[i + 1] = words[i + 1], words[i]
            out.append(" ".join(words))
            labels.append(int(flip))
        return out, labels
    if name == "word_content":
        counts = Counter(
            w.lower() for t in trees for w in {w for tag, w in t.tagged() if tag in ("NN", "NNS")}
        )
        targets = [w for w, _ in counts.most_common(10)]
        pairs = []
        for text, t in zip(texts, trees, strict=True):
            present = [i for i, w in enumerate(targets) if w in {x.lower() for x in t.leaves()}]
            if len(present) == 1:
                pairs.append((text, present[0]))
        return [p[0] for p in pairs], [p[1] for p in pairs]
    if name == "top_constituents":
        seqs = [_constituents(t) for t in trees]
        top = [s for s, _ in Counter(s for s in seqs if s).most_common(5)]
        pairs = [(text, top.index(s)) for text, s in zip(texts, seqs, strict=True) if s in top]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    label = {"sentence_length": _label_sentence_length, "tree_depth": _label_tree_depth,
             "tense": _label_tense, "subject_number": _label_subject_number}[name]  # fmt: skip
    pairs = [(text, y) for text, t in zip(texts, trees, strict=True) if (y := label(t)) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def control_labels(texts: list[str], labels: list[int], seed: int = 0) -> list[int]:
    """Hewitt & Liang's control: a random label per word type, drawn from the task's label distribution;
    each sentence takes its last (non-punctuation) word's label."""
    rng = random.Random(seed + 1)
    population = list(labels)
    by_type: dict[str, int] = {}
    out = []
    for text in texts:
        words = [w for w in text.split() if w not in PUNCT] or text.split()
        key = words[-1].lower()
        if key not in by_type:
            by_type[key] = rng.choice(population)
        out.append(by_type[key])
    return out
