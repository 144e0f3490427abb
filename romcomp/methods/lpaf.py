"""LPAF (seed "Low-Rank Prune-And-Factorize"): first-order unstructured pruning, then a factorization that
knows which entries were pruned.

1. **Prune**: each weight's first-order saliency ``|W ⊙ ∂L/∂W|`` (the loss change a Taylor expansion
   predicts for zeroing it; ``∂L/∂W`` summed over the calibration windows by the streamed gradient pass,
   :mod:`romcomp.compression.gradients`)
   ranks the entries of the matrix; the top ``density`` fraction is kept (mask
   ``M``), the rest are "don't care".
2. **Sparsity-aware factorization**: the rank-k ``Ŵ`` minimizing the error on the *kept* entries only,
   ``‖M ⊙ (W − Ŵ)‖_F``, by expectation-maximization (Srebro & Jaakkola, 2003): fill the pruned entries
   with the current estimate, truncate by SVD, repeat (``ITERATIONS``). It starts from the plain truncated
   SVD of ``W``, and no step increases the kept entries' error, so it never does worse there than SVD; at
   density 1.0 every entry is kept and the result *is* the truncated SVD (``tests/test_methods.py``).

What the paper's re-training does is not done: no recovery fine-tuning (a backward pass per step over the
whole model would exceed the CPU budget this tool is built for); the first-order saliency and the
factorization's freedom on pruned entries are all that remain of it, and the README reports the quality
that gives.
"""

from __future__ import annotations

import math

import torch

from romcomp.methods.base import Factors, GradStats
from romcomp.methods.registry import Method, Option, register

DENSITY = 0.5
"""Without ``--density``: half of each matrix's entries (the least salient) are pruned to "don't care"
before the factorization."""

ITERATIONS = 8
"""EM steps after the SVD start (float32 SVDs: each is one truncated SVD of the layer's matrix)."""


def saliency_mask(weight: torch.Tensor, grad: torch.Tensor, density: float) -> torch.Tensor:
    """The entries kept by first-order pruning to ``density`` (ties broken by position)."""
    score = (weight.double() * grad.double()).abs().flatten()
    keep = min(score.numel(), max(1, math.ceil(density * score.numel())))
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[torch.topk(score, keep, sorted=False).indices] = True
    return mask.view_as(weight)


def _truncated(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def decompose(
    weight: torch.Tensor, bias: torch.Tensor | None, stats: GradStats, rank: int, density: float = DENSITY
) -> Factors:
    """Rank-``rank`` LPAF factors of one linear layer (``stats.grad``: the summed gradient; ``density``:
    the fraction of entries the pruning keeps)."""
    if stats.grad is None:
        raise ValueError("LPAF needs the summed weight gradients (the gradient pass's full=True)")
    w = weight.float()
    mask = saliency_mask(weight, stats.grad, density)
    u, s, vh = _truncated(w, rank)
    if not bool(mask.all()):
        for _ in range(ITERATIONS):
            estimate = (u * s[None, :]) @ vh
            u, s, vh = _truncated(torch.where(mask, w, estimate), rank)
    sqrt = s.sqrt()
    return Factors(
        down=(sqrt[:, None] * vh).contiguous(),
        up=(u * sqrt[None, :]).contiguous(),
        bias=None if bias is None else bias.float().clone(),
    )


METHOD = register(
    Method(
        name="lpaf",
        help="first-order pruning, then a factorization of the kept weights",
        decompose=decompose,
        needs="gradients",
        gradients="full",
        options=(
            Option("density", DENSITY, 0.0, 1.0, "fraction of each matrix's weights its pruning keeps"),
        ),
        experts=False,
    )
)
