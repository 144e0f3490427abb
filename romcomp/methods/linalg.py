"""Linear algebra shared by the methods, with the precision chosen per step.

Measured on the 2-core EPYC reference machine for a 4096² problem (``tools/bench_decompose.py``):
``torch.linalg.eigh`` float64 9.5 s, LAPACK ``syevd`` through scipy 6.7 s in float64 and 3.7 s in float32;
``xᵀx`` as a float32 GEMM 1.0 s, as ``ssyrk`` (one triangle, half the flops) 0.37 s. So:

- covariances: float32 ``syrk`` per chunk, summed in float64 (:mod:`romcomp.stats`);
- whitening root: float64 Cholesky (n³/3 flops, 0.2 s; a tiny recorded jitter when Σ is singular);
- products and the eigensolver: float32 (``EIGH_DTYPE``).

Only the *subspace* of the top ``k`` directions is used, and float32 perturbs it only among directions whose
eigenvalues are within ~1e-7·λ_max of each other, which carry the same energy either way; the factors are
then rounded to bfloat16/float16 (relative 4e-3) anyway. ``tests/test_math.py`` compares against a float64
reference on real SmolLM2 statistics, and ``tools/bench_decompose.py`` measures the perplexity both ways.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from scipy.linalg import blas

EIGH_DTYPE = torch.float32
"""Precision of the whitened products and the eigensolver (float64 is the reference, ~2.5x slower)."""

JITTER = 1e-10
"""Relative diagonal jitter (× mean variance) tried first when a covariance is not numerically definite."""


def syrk_upper(x: torch.Tensor) -> torch.Tensor:
    """``xᵀx`` of a (tokens × d) matrix with BLAS ``syrk``: the upper triangle only (the lower is zero).

    Half the flops of ``x.T @ x``. BLAS sees the Fortran-ordered view of ``xᵀ`` (no copy) and fills the
    *lower* triangle of a Fortran array, whose transpose is a C-contiguous upper triangle: adding it to a
    C-contiguous accumulator then runs at memory speed (a strided add cost as much as the product).
    """
    fn = blas.ssyrk if x.dtype == torch.float32 else blas.dsyrk
    if x.T.is_contiguous():  # x is a transposed view (a wide M's Mᵀ): BLAS reads it as is, trans=1
        return torch.from_numpy(fn(1.0, x.T.numpy().T, trans=1, lower=1)).T
    return torch.from_numpy(fn(1.0, x.contiguous().numpy().T, trans=0, lower=1)).T


def symmetric_from_upper(m: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is ``m``'s (a full symmetric ``m`` is returned as is)."""
    return torch.triu(m) + torch.triu(m, diagonal=1).T


def psd_root(sigma: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Lower-triangular ``L`` (float64) with ``L Lᵀ ≈ Σ``: Cholesky, with a recorded diagonal jitter when
    Σ is singular (few tokens, dead channels): 1e-10 of the mean variance first, escalated ×100 until the
    factorization succeeds (the value used is recorded). At the first step it only adds variance in
    directions the data barely visits, so it does not change which directions are kept."""
    sigma = sigma.double()
    root, info = torch.linalg.cholesky_ex(sigma)
    if int(info) == 0:
        return root, []
    scale = float(sigma.diagonal().mean().clamp_min(1e-300))
    eye = torch.eye(sigma.shape[0], dtype=torch.float64)
    for exponent in range(0, 12, 2):
        jitter = scale * JITTER * 10.0**exponent
        root, info = torch.linalg.cholesky_ex(sigma + jitter * eye)
        if int(info) == 0:
            return root, [f"singular input covariance: added {jitter:.3g}·I for its Cholesky root"]
    evals, evecs = torch.linalg.eigh(sigma)
    clamped = int((evals < 0).sum())
    note = (
        f"input covariance not definite even with jitter: eigen root, {clamped}"
        f" negative eigenvalue(s) clamped"
    )
    return evecs * evals.clamp_min(0).sqrt()[None, :], [note]


def top_eigvecs(sym: torch.Tensor, k: int, upper: bool = False) -> torch.Tensor:
    """Top-``k`` eigenvectors (columns, descending eigenvalue) of a symmetric matrix.

    With ``upper`` only the upper triangle of ``sym`` is read. Runs in ``EIGH_DTYPE`` on a copy scaled to
    unit maximum diagonal (no overflow in float32) with LAPACK's divide-and-conquer ``syevd``: on covariance
    spectra (power law, clustered near zero) it beat the subset solvers ``syevr``/``syevx`` for the top
    ~40% of the pairs (6.7 s vs 14 s at 4096², float64) and torch's ``eigh`` (9.5 s). Falls back to torch's
    float64 solver if LAPACK fails.
    """
    if k < 1:
        return torch.zeros(sym.shape[0], 0, dtype=torch.float64)
    scale = float(sym.diagonal().abs().max())
    a = (sym / (scale if scale > 0 else 1.0)).to(EIGH_DTYPE).numpy()  # a zero matrix stays zero, not NaN
    try:
        _, vecs = scipy.linalg.eigh(a, lower=not upper, driver="evd", overwrite_a=True, check_finite=False)
    except (np.linalg.LinAlgError, ValueError):
        full = symmetric_from_upper(sym) if upper else (sym + sym.T) / 2
        _, evecs = torch.linalg.eigh(full.double())
        return evecs[:, -k:].flip(1).contiguous()
    return torch.from_numpy(np.ascontiguousarray(vecs[:, : -k - 1 : -1])).double()


def top_left_singular(m: torch.Tensor, k: int) -> tuple[torch.Tensor, list[str]]:
    """Orthonormal basis (rows(m)×k) of the top-k left singular vectors of ``m``, via the smaller Gram matrix.

    ROM's output covariance is ``C = W Σ Wᵀ = M Mᵀ`` for the whitened ``M = W L``. When ``M`` is wide
    (d_out ≤ d_in) we solve ``M Mᵀ`` directly; when it is tall (13B gate/up: 13824×5120) we solve the
    d_in-sized ``Mᵀ M`` and map its eigenvectors back, ``M u / s``: same subspace, ~1/10 of the cost.
    The basis is orthonormal (QR), so the projection is exact on the data's span even when Σ is singular.
    """
    notes: list[str] = []
    m = m.to(EIGH_DTYPE)
    d_out, d_in = m.shape
    if d_out <= d_in:
        return top_eigvecs(syrk_upper(m.T), k, upper=True), notes
    u = top_eigvecs(syrk_upper(m), k, upper=True).to(EIGH_DTYPE)
    mu = m @ u
    scale = mu.norm(dim=0)
    tiny = scale <= scale.max().clamp_min(1e-30) * 1e-6
    if tiny.any():
        notes.append(f"{int(tiny.sum())} of {k} output directions carry (almost) no variance")
    # M u_i ⟂ M u_j only to round-off relative to the largest eigenvalue, so columns of round-off-sized
    # variance (singular Σ, or float32 below ~1e-7·λ_max) can be far from orthogonal; QR re-orthonormalizes
    # while keeping the span of every leading set of columns, so B Bᵀ stays a projection.
    basis, _ = torch.linalg.qr(mu)
    return basis.double(), notes
