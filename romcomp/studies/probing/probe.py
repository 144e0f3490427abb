"""Frozen hidden states of every layer, and a seeded logistic-regression probe per layer and task.

Features: each sentence's hidden states averaged over its tokens (padding excluded), for the embedding
output and every block's output (``output_hidden_states``), in float32. Probe: multinomial logistic
regression with scikit-learn's L2 objective (``C = PROBE_C``), full-batch L-BFGS for at most
``PROBE_ITERS`` iterations (a fixed budget; torch, ~50× faster than scikit-learn's lbfgs here), on
standardized features, trained on a seeded 80% of the sentences and scored on the other 20%; the control
task uses the same split. Selectivity = task accuracy − control accuracy (Hewitt & Liang, 2019).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

PROBE_C = 1.0
PROBE_ITERS = 100
TEST_SHARE = 0.2
BATCH = 32


def is_encoder_model(model: Any) -> bool:
    return not getattr(model.config, "is_decoder", False) and "CausalLM" not in type(model).__name__


def load_probe_model(path: str) -> tuple[Any, Any]:
    """A decoder as its causal-LM class (its hidden states are the base model's), an encoder as AutoModel;
    romcomp outputs through romcomp's registered loading."""
    from transformers import AutoConfig, AutoTokenizer

    import romcomp  # noqa: F401 - registers the romcomp quantizer
    from romcomp.compress.engine import auto_class

    model = auto_class(AutoConfig.from_pretrained(path)).from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


@torch.inference_mode()
def sentence_features(
    model: Any, tokenizer: Any, texts: Sequence[str], all_layers: bool = True
) -> torch.Tensor:
    """``(layers + 1, sentences, hidden)`` mean-pooled hidden states (embeddings first), or ``(1, sentences,
    hidden)`` of the last layer only (``all_layers=False``: no per-layer states kept). A decoder runs as its
    base model: the same hidden states without the LM head's logits (32 × 512 × 49k floats for SmolLM2:
    3 GB of memory that nothing reads). Sentences are batched by length (less padding), returned in order."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:  # decoders often ship none; padding is masked out of the mean anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    body = getattr(model, "base_model", model)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks = []
    for start in range(0, len(texts), BATCH):
        batch = tokenizer([texts[i] for i in order[start : start + BATCH]], return_tensors="pt", padding=True)
        out = body(**batch, output_hidden_states=all_layers)
        states = out.hidden_states if all_layers else (out.last_hidden_state,)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        chunks.append(torch.stack([(h.float() * mask).sum(1) / mask.sum(1) for h in states]))
    pooled = torch.cat(chunks, dim=1)
    return pooled[:, torch.argsort(torch.tensor(order))]


def probed_layers(n_states: int, step: int) -> list[int]:
    """Every ``step``-th hidden state from the embeddings, and always the last block's output."""
    return sorted({*range(0, n_states, step), n_states - 1})


def split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded train/test split of ``n`` items."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * (1 - TEST_SHARE)))
    return order[:cut], order[cut:]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, scikit-learn's objective (``C·Σ loss + ½‖W‖²``, divided by n):
    full-batch L-BFGS from zero for at most ``PROBE_ITERS`` iterations (deterministic; a fixed budget)."""
    n, d = x.shape
    w = torch.zeros(d, classes, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=PROBE_ITERS, history_size=10, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-10)  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + (w * w).sum() / (2 * PROBE_C * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def probe_accuracy(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    """Test accuracy of the logistic-regression probe trained on ``train`` (features standardized with
    the training part's mean and deviation)."""
    classes = int(y.max()) + 1
    if len(set(y[train].tolist())) < 2:
        return float((y[test] == y[train][0]).mean())
    xt = torch.from_numpy(x).float()
    mean, std = xt[train].mean(0), xt[train].std(0).clamp_min(1e-6)
    xt = (xt - mean) / std
    labels = torch.from_numpy(y).long()
    w, b = fit_logistic(xt[train], labels[train], classes)
    return float(((xt[test] @ w + b).argmax(1) == labels[test]).float().mean())


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
