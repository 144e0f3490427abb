"""Numerically careful linear algebra shared by the methods (all float64)."""

from __future__ import annotations

import torch


def psd_sqrt(sigma: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """A square root ``R`` with ``R Rᵀ = Σ`` from the eigendecomposition; negative eigenvalues from
    round-off are clamped to zero (recorded), so singular or ill-conditioned Σ never produce NaN."""
    notes: list[str] = []
    evals, evecs = torch.linalg.eigh((sigma + sigma.T) / 2)
    negative = int((evals < 0).sum())
    if negative:
        notes.append(f"clamped {negative} negative eigenvalue(s) of the input covariance")
    return evecs * evals.clamp_min(0).sqrt()[None, :], notes


def top_eigvecs(sym: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` eigenvectors (columns, descending eigenvalue) of a symmetric matrix."""
    _, evecs = torch.linalg.eigh((sym + sym.T) / 2)
    return evecs[:, -k:].flip(1).contiguous()


def top_output_subspace(weight: torch.Tensor, sigma: torch.Tensor, k: int) -> tuple[torch.Tensor, list[str]]:
    """Orthonormal basis (d_out×k) of the top-k eigenvectors of ``C = W Σ Wᵀ``.

    ``C`` has rank at most d_in, so when d_out > d_in we solve the d_in-sized problem instead: with
    ``M = W R`` (``R Rᵀ = Σ``), ``C = M Mᵀ`` and its eigenvectors are ``M u / s`` for the eigenpairs
    ``(u, s²)`` of ``Mᵀ M`` (e.g. 5120² instead of 13824² for a 13B gate/up projection). Directions with no
    variance get zero columns: the projection is then exact on the data's span and stays finite.
    """
    d_out, d_in = weight.shape
    notes: list[str] = []
    if d_out <= d_in:
        return top_eigvecs(weight @ sigma @ weight.T, k), notes
    root, notes = psd_sqrt(sigma)
    m = weight @ root
    evals, evecs = torch.linalg.eigh(m.T @ m)
    evals, evecs = evals[-k:].flip(0), evecs[:, -k:].flip(1)
    scale = evals.clamp_min(0).sqrt()
    # only exact/underflowing zeros need guarding: round-off-sized directions still give finite, orthonormal
    # columns (M u_i ⟂ M u_j), whereas dividing by ~0 would not
    tiny = scale <= scale.max().clamp_min(1e-300) * 1e-12
    if tiny.any():
        notes.append(f"{int(tiny.sum())} of {k} output directions carry no variance (zeroed)")
    basis = (m @ evecs) / torch.where(tiny, torch.ones_like(scale), scale)[None, :]
    basis[:, tiny] = 0
    return basis, notes
