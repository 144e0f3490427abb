"""FWSVD (Hsu et al., ICLR 2022): Fisher-weighted SVD — input channels weighted by the loss's sensitivity.

Each input channel ``j`` of a linear gets the importance ``s_j = sqrt(Σ_windows Σ_i (∂L/∂W_ij)²)`` (the
empirical Fisher information of the weights in that channel, summed over the output rows: the paper's
row-wise sum, in its ``y = x W`` convention), from the streamed gradient pass
(:mod:`romcomp.compression.gradients`); the truncated SVD of ``W·diag(s)`` is folded back as in ASVD.
With every importance equal this is plain SVD (``tests/test_methods.py``).
"""

from __future__ import annotations

import torch

from romcomp.methods.asvd import scaled_svd
from romcomp.methods.base import Factors, GradStats
from romcomp.methods.registry import Method, register


def decompose(weight: torch.Tensor, bias: torch.Tensor | None, stats: GradStats, rank: int) -> Factors:
    """Rank-``rank`` FWSVD factors of one linear layer."""
    scale = stats.fisher_in.double().sqrt()
    return scaled_svd(weight, bias, scale + 1e-12 * float(scale.max()), rank)


METHOD = register(
    Method(
        name="fwsvd",
        help="Fisher-weighted SVD, streamed gradients",
        decompose=decompose,
        needs="gradients",
        gradients="fisher",
        experts=False,
    )
)
