"""Frozen sentence features and the logistic-regression classifier trained on them.

Shared by ``romcomp eval``'s NLI heads (:mod:`romcomp.evaluation.nli_head`) and the probing study
(:mod:`romcomp.studies.probing`), so heads and probes are one implementation. Features: each sentence's
hidden states averaged over its tokens (padding excluded), for the embedding output and every block's
output (``output_hidden_states``), in float32. Classifier: multinomial logistic regression with
scikit-learn's L2 objective (``C = PROBE_C``), full-batch L-BFGS for at most ``PROBE_ITERS`` iterations
(a fixed budget; torch, ~50× faster than scikit-learn's lbfgs here), on features standardized with the
training part's statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

PROBE_C = 1.0
PROBE_ITERS = 100
BATCH = 32


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
