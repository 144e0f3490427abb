"""ASVD (Yuan et al., 2023): activation-aware SVD — input channels scaled by their mean magnitude.

As the official code does it (``act_aware_utils.calib_input_distribution`` with ``abs_mean``, then
``SVDLinear.from_linear``): each input channel's scale is the mean of ``|x|`` over the calibration tokens
to the power ``α`` (``ALPHA = 0.5``, the paper's), plus 10⁻⁶; the SVD of ``W·diag(s)`` is truncated and the
scaling folded back into the right factor, ``down = Σ_k^½ V_kᵀ diag(s)⁻¹``, ``up = U_k Σ_k^½``; the bias
stays. One deliberate difference: the official code calls ``torch.svd_lowrank`` (randomized, two power
iterations); here the SVD is exact, which can only lower the truncation error of the same scaled matrix.
Only a scale of the channels is used, so the result does not depend on whether ``|x|`` is summed or
averaged. With every scale equal this is plain SVD (``tests/test_methods.py``).
"""

from __future__ import annotations

import torch

from romcomp.methods.base import Factors, InputStats
from romcomp.methods.registry import Method, register

ALPHA = 0.5


def channel_scale(stats: InputStats, alpha: float = ALPHA) -> torch.Tensor:
    """``mean|x|^α + 10⁻⁶`` per input channel (float64)."""
    return (stats.abs_sum / max(stats.count, 1)).pow(alpha) + 1e-6


def decompose(weight: torch.Tensor, bias: torch.Tensor | None, stats: InputStats, rank: int) -> Factors:
    """Rank-``rank`` ASVD factors of one linear layer."""
    return scaled_svd(weight, bias, channel_scale(stats), rank)


def scaled_svd(weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, rank: int) -> Factors:
    """The rank-``rank`` truncated SVD of ``W·diag(scale)`` with the scaling folded back into ``down``: the
    best rank-k fit of ``W`` in the column-weighted norm ``‖(W − Ŵ)·diag(scale)‖`` (ASVD, FWSVD)."""
    u, s, vh = torch.linalg.svd(weight.double() * scale[None, :], full_matrices=False)
    sqrt = s[:rank].sqrt()
    return Factors(
        down=(sqrt[:, None] * vh[:rank] / scale[None, :]).float().contiguous(),
        up=(u[:, :rank] * sqrt[None, :]).float().contiguous(),
        bias=None if bias is None else bias.float().clone(),
    )


METHOD = register(Method(name="asvd", help="activation-aware SVD, alpha 0.5", decompose=decompose))
