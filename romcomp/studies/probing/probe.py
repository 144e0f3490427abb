"""Linear probes on frozen hidden states: a seeded logistic-regression probe per layer and task.

Features (:func:`romcomp.evaluation.features.sentence_features`): each sentence's hidden states averaged
over its tokens (padding excluded), for the embedding output and every block's output, in float32. Probe
(:func:`romcomp.evaluation.features.probe_accuracy`, the classifier ``romcomp eval``'s NLI heads use too):
multinomial logistic regression with scikit-learn's L2 objective, full-batch L-BFGS with a fixed budget,
on standardized features, trained on a seeded 80% of the sentences and scored on the other 20%; the
control task uses the same split. Selectivity = task accuracy − control accuracy (Hewitt & Liang, 2019).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from romcomp.evaluation.features import probe_accuracy

TEST_SHARE = 0.2


def load_probe_model(path: str) -> tuple[Any, Any]:
    """A decoder as its causal-LM class (its hidden states are the base model's), an encoder as AutoModel;
    romcomp outputs through romcomp's registered loading."""
    from transformers import AutoConfig, AutoTokenizer

    import romcomp  # noqa: F401 - registers the romcomp quantizer
    from romcomp.model.shell import auto_class

    model = auto_class(AutoConfig.from_pretrained(path)).from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def probed_layers(n_states: int, step: int) -> list[int]:
    """Every ``step``-th hidden state from the embeddings, and always the last block's output."""
    return sorted({*range(0, n_states, step), n_states - 1})


def split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded train/test split of ``n`` items."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * (1 - TEST_SHARE)))
    return order[:cut], order[cut:]


def probe_layers(features: torch.Tensor, labels: Sequence[int], control: Sequence[int], seed: int = 0,
                 layer_ids: Sequence[int] | None = None) -> dict[str, Any]:  # fmt: skip
    """Per layer (``features[i]`` is layer ``layer_ids[i]``, default ``i``): task and control test accuracy
    and selectivity; plus the majority baseline."""
    y, c = np.asarray(labels), np.asarray(control)
    train, test = split(len(y), seed)
    layers = []
    for i, layer in enumerate(layer_ids if layer_ids is not None else range(features.shape[0])):
        x = features[i].numpy()
        acc = probe_accuracy(x, y, train, test)
        ctrl = probe_accuracy(x, c, train, test)
        layers.append({"layer": layer, "acc": acc, "control_acc": ctrl, "selectivity": acc - ctrl})
    majority = Counter(y[train].tolist()).most_common(1)[0][0]
    return {
        "n_train": int(len(train)),
        "n_test": int(len(test)),
        "classes": int(len(set(y.tolist()))),
        "majority_acc": float((y[test] == majority).mean()),
        "layers": layers,
    }
