"""Plain truncated SVD of the weight: the data-free baseline every paper compares against."""

from __future__ import annotations

import torch

from romcomp.methods.base import Factors, InputStats
from romcomp.methods.registry import Method, register


def decompose(weight: torch.Tensor, bias: torch.Tensor | None, stats: InputStats, rank: int) -> Factors:
    """Best rank-``rank`` approximation of ``W`` in Frobenius norm; ignores the calibration data."""
    del stats
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return Factors(
        down=(root[:, None] * vh[:rank]).float().contiguous(),
        up=(u[:, :rank] * root[None, :]).float().contiguous(),
        bias=None if bias is None else bias.float().clone(),
    )


METHOD = register(
    Method(name="svd", help="plain truncated SVD, data-free", decompose=decompose, needs="none")
)
