"""Linear algebra shared by the methods, with the precision chosen per step.

Measured on the 2-core EPYC reference machine for a 4096² problem (``tools/bench_decompose.py``):
``torch.linalg.eigh`` float64 9.5 s, LAPACK ``syevd`` through scipy 6.7 s in float64 and 3.7 s in float32;
``xᵀx`` as a float32 GEMM 1.0 s, as ``ssyrk`` (one triangle, half the flops) 0.37 s. So:

- covariances: float32 ``syrk`` per chunk, summed in float64 (:mod:`romcomp.compression.stats`);
- whitening root: float64 Cholesky (n³/3 flops, 0.2 s; a tiny recorded jitter when Σ is singular);
- products and the eigensolver: float32 (``EIGH_DTYPE``).

Only the *subspace* of the top ``k`` directions is used. A float32 solve is exact for a matrix perturbed by
~c·ε·λ_max (ε = 1.2e-7, c ≈ 2-7 measured), so it loses the kept tail when the smallest kept eigenvalue is
that small: massive activations (SmolLM2 layer 11's ``down_proj``: float32 alone discarded 11% more output
energy than float64) do that. The guard (``FLOAT32_TAIL_FLOOR``) re-solves such matrices in float64 and
records it; elsewhere float32's excess stays below 1e-4 of the discarded energy. ``tests/test_math.py``
and ``tests/test_numerics_guard.py`` compare against float64 references (real SmolLM2 statistics, planted
spikes), and ``tools/bench_decompose.py`` measures the perplexity both ways.
"""

from __future__ import annotations

from collections.abc import Iterator

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


ROW_BLOCK = 1024
"""Rows per step of the blocked d² operations below (and ``stats.add_rows``): no whole-matrix temporary."""


def _mirrored_blocks(upper: torch.Tensor) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """``(rows, cols, values)`` pieces tiling the symmetric matrix whose upper triangle is ``upper``'s, a
    row block at a time (each piece at most ROW_BLOCK × d)."""
    d = upper.shape[0]
    for i in range(0, d, ROW_BLOCK):
        j = min(i + ROW_BLOCK, d)
        diag = upper[i:j, i:j]
        yield slice(i, j), slice(i, j), torch.triu(diag) + torch.triu(diag, diagonal=1).T
        yield slice(i, j), slice(j, None), upper[i:j, j:]
        yield slice(j, None), slice(i, j), upper[i:j, j:].T


def symmetric_from_upper(m: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is ``m``'s (a full symmetric ``m`` is returned as is).

    Mirrored in row blocks into one new square (or into ``out``, a view the caller owns, such as the top
    left of an augmented matrix): ``triu(m) + triu(m, 1).T`` would hold three d² temporaries at once, 2.7 GiB
    in float64 at Llama-2-7B's ``down_proj`` input (11008), which the memory plan would have to count.
    """
    out = torch.empty_like(m) if out is None else out
    for rows, cols, values in _mirrored_blocks(m):
        out[rows, cols] = values
    return out


def subtract_symmetric_from_upper(target: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """``target -= S`` in place for the symmetric ``S`` whose upper triangle is ``upper``'s, in row blocks
    (no d² temporary); returns ``target``."""
    for rows, cols, values in _mirrored_blocks(upper):
        target[rows, cols] -= values
    return target


def psd_root(sigma: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Lower-triangular ``L`` (float64) with ``L Lᵀ ≈ Σ``: Cholesky, with a recorded diagonal jitter when
    Σ is singular (few tokens, dead channels): 1e-10 of the mean variance first, escalated ×100 until the
    factorization succeeds (the value used is recorded). At the first step it only adds variance in
    directions the data barely visits, so it does not change which directions are kept.

    Memory: Σ and the root, two n² float64 squares, on every route (the memory plan counts two; at
    Qwen2.5-Coder-1.5B's 8960² ``down_proj`` input an identity and a jittered copy beside them cost 1.2
    GiB over the cap): the jitter goes onto Σ's own diagonal, which is restored bit for bit afterwards
    (Σ may be a memoized matrix), and the eigen fallback scales its eigenvectors in place."""
    sigma = sigma.double()
    root, info = torch.linalg.cholesky_ex(sigma)
    if int(info) == 0:
        return root, []
    scale = float(sigma.diagonal().mean().clamp_min(1e-300))
    diagonal = sigma.diagonal()
    original = diagonal.clone()
    try:
        for exponent in range(0, 12, 2):
            jitter = scale * JITTER * 10.0**exponent
            diagonal.copy_(original).add_(jitter)
            torch.linalg.cholesky_ex(sigma, out=(root, info))
            if int(info) == 0:
                return root, [f"singular input covariance: added {jitter:.3g}·I for its Cholesky root"]
    finally:
        diagonal.copy_(original)
    del root
    evals, evecs = torch.linalg.eigh(sigma)
    clamped = int((evals < 0).sum())
    note = (
        f"input covariance not definite even with jitter: eigen root, {clamped}"
        f" negative eigenvalue(s) clamped"
    )
    return evecs.mul_(evals.clamp_min(0).sqrt()[None, :]), [note]


FLOAT32_TAIL_FLOOR = 1e-4
"""Smallest kept eigenvalue, relative to the largest, that a float32 solve is trusted with (0: never redo).

Below it :func:`top_eigvecs` redoes the solve in float64; see there for why 1e-4."""


def scaled_syevd(
    sym: torch.Tensor, upper: bool, dtype: torch.dtype, *, vectors: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """All eigenvalues (ascending, float64) and, with ``vectors``, eigenvectors of ``sym`` scaled to unit
    maximum diagonal (no overflow in float32), from LAPACK's divide-and-conquer ``syevd`` in ``dtype``;
    returns them with the scale (true eigenvalues = scaled · scale). LAPACK can fail to converge on
    degenerate matrices, and a single-precision solve can return something not finite: torch's float64
    solver then serves. With ``upper`` only the upper triangle is read."""
    scale = float(sym.diagonal().abs().max()) if sym.numel() else 1.0
    scale = scale if 0 < scale < float("inf") else 1.0  # a zero matrix stays zero, not NaN
    if dtype == torch.float64:
        a = sym.to(torch.float64, copy=True)  # a copy even when ``sym`` is float64: LAPACK overwrites it
        a /= scale
    else:
        a = (sym / scale).to(dtype)  # scaled before the cast: no overflow in float32
    try:
        out = scipy.linalg.eigh(
            a.numpy(), lower=not upper, eigvals_only=not vectors, driver="evd",
            overwrite_a=True, check_finite=False,
        )  # fmt: skip
        evals, vecs = out if vectors else (out, None)
        if np.isfinite(evals).all():
            return torch.from_numpy(evals).double(), None if vecs is None else torch.from_numpy(vecs), scale
    except (np.linalg.LinAlgError, ValueError):
        pass
    full = (symmetric_from_upper(sym) if upper else (sym + sym.T) / 2).double() / scale
    if vectors:
        evals, vecs = torch.linalg.eigh(full)
        return evals, vecs, scale
    return torch.linalg.eigvalsh(full), None, scale


def _syevd(sym: torch.Tensor, upper: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """All eigenpairs (ascending) of ``sym`` in the scaled units of :func:`scaled_syevd`."""
    evals, vecs, _ = scaled_syevd(sym, upper, dtype)
    return evals, vecs


def _float32_tail_unresolved(evals: torch.Tensor, vecs: torch.Tensor, k: int) -> bool:
    """Whether a single-precision solve (``vecs`` not float64) kept a ``k``-th eigenvalue under
    ``FLOAT32_TAIL_FLOOR``·λ_max. Keeping all ``n`` directions needs no resolution (any basis spans them)."""
    n = evals.shape[0]
    if vecs.dtype == torch.float64 or not 0 < k < n or FLOAT32_TAIL_FLOOR <= 0:
        return False
    top = float(evals[-1])
    return top > 0 and float(evals[-k]) < FLOAT32_TAIL_FLOOR * top


def _float64_note(evals: torch.Tensor, k: int) -> str:
    """The recorded note for a float64 redo, with the float64 solve's λ_k/λ_max."""
    ratio = float(evals[-k]) / float(evals[-1])
    return (
        f"float32 eigensolver could not resolve the kept tail (λ_k/λ_max = {ratio:.1e} < "
        f"{FLOAT32_TAIL_FLOOR:.0e}): solved in float64"
    )


def _top_columns(vecs: torch.Tensor, k: int) -> torch.Tensor:
    """The last ``k`` columns of an ascending eigenbasis, in descending order, as float64."""
    return vecs[:, max(vecs.shape[1] - k, 0) :].flip(1).contiguous().double()


def top_eigvecs(
    sym: torch.Tensor, k: int, upper: bool = False, *, notes: list[str] | None = None
) -> torch.Tensor:
    """Top-``k`` eigenvectors (columns, descending eigenvalue) of a symmetric matrix.

    With ``upper`` only the upper triangle of ``sym`` is read. Runs in ``EIGH_DTYPE`` on a copy scaled to
    unit maximum diagonal (no overflow in float32) with LAPACK's divide-and-conquer ``syevd``: on covariance
    spectra (power law, clustered near zero) it beat the subset solvers ``syevr``/``syevx`` for the top
    ~40% of the pairs (6.7 s vs 14 s at 4096², float64) and torch's ``eigh`` (9.5 s). Falls back to torch's
    float64 solver if LAPACK fails.

    Range guard: if the float32 solve keeps a ``λ_k < FLOAT32_TAIL_FLOOR·λ_max`` (1e-4), it is redone in
    float64 (``syevd`` on a float64 copy of ``sym``) and, when ``notes`` is given, one line is appended.
    Why 1e-4: a backward-stable float32 solve is exact for some ``A + E`` with ``‖E‖ ≈ c·ε·λ_max`` (ε =
    1.2e-7; LAPACK's worst-case ``c`` grows like n: 5e-4·λ_max at n = 4096). Eigenvalues near ``c·ε·λ_max``
    are round-off and their directions arbitrary; massive activations (a few channels 1e2-1e4 x the median)
    put the whole tail there. Measured, the float32 subspace discards
    ``(c·ε·λ_max/λ_k)²`` more output energy (relative) than float64's, with ``c`` ≈ 2 at n = 256-2048 on
    planted spectra and up to ~7 on real SmolLM2-135M covariances; its layer-11 ``down_proj`` (λ_k/λ_max =
    2.5e-7 at 20% compression) discarded 11% more through the output route, 1.5e-6 more with the guard.
    The floor ``100·c·ε`` ≈ 1e-4 keeps the excess under 1e-4, the level ``tests/test_math.py`` accepts for
    float32; the ``n·ε`` bound would redo nearly every layer. An unresolved tail always trips it (its
    float32 eigenvalues sit at the round-off floor, ~5e-7·λ_max at n = 1024-2048); on SmolLM2 (C4, ratios
    0.2 and 0.5) it redoes 10% of the (linear, ratio) pairs, mostly ``q_proj`` at 0.2. The gap
    λ_k - λ_{k+1} is not tested: a small gap mixes directions of nearly equal energy, a second-order cost,
    the one measured above. Keeping all n directions needs no guard (any basis spans them). A redo costs
    the float32 solve plus a float64 one: at 1024², 1 thread, 0.12-0.13 s float32 vs 0.19-0.21 s float64,
    0.29-0.31 s in all.
    """
    if k < 1:
        return torch.zeros(sym.shape[0], 0, dtype=torch.float64)
    evals, vecs = _syevd(sym, upper, EIGH_DTYPE)
    if _float32_tail_unresolved(evals, vecs, k):
        del vecs
        evals, vecs = _syevd(sym, upper, torch.float64)
        if notes is not None:
            notes.append(_float64_note(evals, k))
    return _top_columns(vecs, k)


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
    wide = d_out <= d_in
    evals, vecs = _syevd(syrk_upper(m.T if wide else m), True, EIGH_DTYPE)
    if _float32_tail_unresolved(evals, vecs, k):
        # The float32 Gram itself can carry ~ε·λ_max of round-off (a float64 solve of it loses the same
        # tail): rebuild it from M, and map back, in float64.
        del vecs
        m = m.double()
        evals, vecs = _syevd(syrk_upper(m.T if wide else m), True, torch.float64)
        notes.append(_float64_note(evals, k))
    if wide:
        return _top_columns(vecs, k), notes
    u = _top_columns(vecs, k).to(m.dtype)
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
