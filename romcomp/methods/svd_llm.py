"""SVD-LLM (Wang et al., ICLR 2025), variant "W" (no LoRA update): truncation-aware data whitening.

As the official code computes it (``SVDLLM.py``: ``profle_svdllm`` then ``whitening``): ``S`` is the
Cholesky factor of the *sum* ``X Xᵀ`` over the calibration tokens (float64); when ``X Xᵀ`` is not
positive definite the code adds ``(−λ_min + 10⁻⁶)·I`` and factors again. ``W`` (float32) is multiplied by
``S`` (cast to float32), the product is decomposed by SVD, and the top ``k`` triplets become
``up = U_k Σ_k^½`` and ``down = Σ_k^½ V_kᵀ S⁻¹`` with ``S⁻¹`` inverted in float64 and then cast to float32
(``+10⁻⁶·I`` first if the inversion fails). The bias, if any, is kept as it is (OPT in their code).

In exact arithmetic this is ROM's projection at the same rank — ``U_k Σ_k V_kᵀ S⁻¹ = U_k U_kᵀ W`` — so the
two differ only where float32 ``W·S``, ``S⁻¹`` and the damping do: that difference is what the peer's own
numbers carry, and why it is reproduced rather than replaced by :mod:`romcomp.methods.rom`.
"""

from __future__ import annotations

import torch

from romcomp.methods.base import Factors, InputStats
from romcomp.methods.linalg import symmetric_from_upper
from romcomp.methods.registry import Method, register


def whitening_factor(stats: InputStats) -> tuple[torch.Tensor, list[str]]:
    """The official code's Cholesky factor of ``Σ x xᵀ`` (float64), with its damping rule."""
    raw = symmetric_from_upper(stats.xtx)
    try:
        return torch.linalg.cholesky(raw), []
    except torch.linalg.LinAlgError:
        shift = -float(torch.linalg.eigvalsh(raw)[0]) + 1e-6
        raw.diagonal().add_(shift)
        note = f"X Xᵀ not positive definite: added {shift:.3g}·I before its Cholesky factor (as SVD-LLM)"
        return torch.linalg.cholesky(raw), [note]


def _root(stats: InputStats) -> tuple[torch.Tensor, list[str]]:
    """:func:`whitening_factor`, once per input (shared by the linears that read it)."""
    return stats.memo("svd-llm-root", lambda: whitening_factor(stats))


def whitening_inverse(stats: InputStats) -> tuple[torch.Tensor, list[str]]:
    """``S⁻¹`` as the official code forms it (float64 ``inv``, ``+10⁻⁶·I`` if singular), cast to float32;
    shared by the linears of one input (q/k/v, gate/up) and, in a multi-ratio run on the dense stream, by
    every ratio (the 8960-wide ``down_proj`` inverse of Qwen2.5-1.5B is the costliest step per linear)."""
    root, notes = _root(stats)
    try:
        inverse = torch.linalg.inv(root)
    except torch.linalg.LinAlgError:
        inverse = torch.linalg.inv(root + 1e-6 * torch.eye(root.shape[0], dtype=root.dtype))
        notes = [*notes, "whitening factor singular: added 1e-06·I before inverting it (as SVD-LLM)"]
    return inverse.float(), notes


def whitened_svd(weight: torch.Tensor, stats: InputStats) -> tuple[torch.Tensor, ...]:
    """The float32 SVD of ``W S``; rank-independent, so the last one is kept for the next call with the
    same weight (the engine passes one dense weight to every ratio of a shared-statistics run, as
    ``linear.weight.data``: a new tensor object on every access, so sameness is the same memory, shape
    and strides — the held reference keeps that memory from being reused). A different weight replaces
    it, freeing the old factors first: at most one SVD is ever held."""
    held = stats.derived.get("svd-llm-svd")
    if held is not None and _same_tensor(held[0], weight):
        return held[1:]
    stats.derived.pop("svd-llm-svd", None)
    root, _ = _root(stats)
    u, s, vh = torch.linalg.svd(weight.float() @ root.float(), full_matrices=False)
    stats.derived["svd-llm-svd"] = (weight, u, s, vh)
    return u, s, vh


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Views of the same memory with the same layout (``linear.weight.data`` twice)."""
    return (a.data_ptr(), a.shape, a.stride(), a.dtype) == (b.data_ptr(), b.shape, b.stride(), b.dtype)


def decompose(weight: torch.Tensor, bias: torch.Tensor | None, stats: InputStats, rank: int) -> Factors:
    """Rank-``rank`` SVD-LLM factors of one linear layer (float32 SVD of ``W S``, as the official code)."""
    inverse, notes = stats.memo("svd-llm-inverse", lambda: whitening_inverse(stats))
    u, s, vh = whitened_svd(weight, stats)
    sqrt = s[:rank].sqrt()
    return Factors(
        down=(sqrt[:, None] * (vh[:rank] @ inverse)).contiguous(),
        up=(u[:, :rank] * sqrt[None, :]).contiguous(),
        bias=None if bias is None else bias.float().clone(),
        notes=list(notes),
    )


METHOD = register(
    Method(name="svd-llm", help="whitened SVD as the official SVD-LLM code", decompose=decompose)
)
