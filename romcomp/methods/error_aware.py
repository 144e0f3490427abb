"""Error-aware ROM: reduced-rank regression of the dense model's outputs on the compressed model's inputs.

Local ROM fits each linear to its own outputs on whatever inputs it sees. But after the first compressed
layer the inputs ``x̂`` a layer sees differ from the dense model's ``x``, and what the model needs is the
*dense* output ``W x``. Minimizing ``E‖W̃ x̃ − A x̃̂‖²`` over rank-``k`` maps ``A`` (``x̃ = [x; 1]`` folds the
bias in) is a reduced-rank regression with the closed form

    M₀ = W̃ Σ_{x x̂} Σ_{x̂ x̂}⁻¹      (the best full-rank map from x̂ to the dense outputs)
    A  = V_k V_kᵀ M₀,  V_k = top-k eigenvectors of M₀ Σ_{x̂ x̂} M₀ᵀ

computed like ROM through the whitened ``M₀ L`` (``L Lᵀ = Σ_{x̂ x̂}``). ``Σ_{x̂ x̂}`` is often
ill-conditioned (few tokens per dimension, near-dead channels), so ``M₀`` is a ridge regression *towards
the dense weight* rather than towards zero:

    M₀ = argmin E‖W̃ x̃ − M x̃̂‖² + ‖(M − W̃) Δ^½‖²  =  W̃ + W̃ (Σ_{x x̂} − Σ_{x̂ x̂}) (Σ_{x̂ x̂} + Δ)⁻¹

with ``Δ = DAMP · diag(Σ_{x̂ x̂})`` (:data:`RIDGE`, :data:`DAMP`: chosen on validation text). Directions the
calibration data barely visits keep the dense weight, and when the two streams are identical (the first
stage of the first block: :attr:`CrossStats.identical`) ``M₀ = W̃``, so the fit is local ROM.
"""

from __future__ import annotations

import torch

from romcomp.methods import linalg
from romcomp.methods.base import CrossStats, Factors
from romcomp.methods.linalg import symmetric_from_upper, top_eigvecs, top_left_singular
from romcomp.methods.projection import augmented_sigma, augmented_weight, project, whitening_root

DAMP = 1.0
"""The ridge towards the dense weight, relative to each channel's own variance (:data:`RIDGE`). Chosen on
*validation* text (``tools/sweep_knobs.py``: SmolLM2-135M, C4 32 × 512, ratios 0.2 and 0.3, geometric
mean of WikiText-2-validation and PTB-validation perplexity over the first 40 × 512 tokens; the table is
in docs/results.md): per-channel 0.1 → 71.72, 0.3 → 69.40, **1 → 68.39**, 3 → 69.00; the mean-variance
ridge at 0.3 → 70.76, 1 → 70.02. A full regression (small ridge) over-fits the cross moments of the
calibration tokens; a strong one keeps a first-order correction of the upstream error, which generalizes."""


RIDGE = "channel"
"""The ridge's shape: ``"channel"`` adds ``DAMP · Σ̃_ii`` to channel ``i`` (a ridge in standardized
coordinates); ``"mean"`` adds ``DAMP · mean(diag Σ̃)`` to every direction (the shape before issue 24). With
massive activations — SmolLM2's residual stream has one channel at 84,000× the median from block 12 on —
the mean is set by those few channels, the ridge is then ~14× the typical channel's variance and most of
the regression's correction is damped away; the per-channel ridge damps every channel alike (validation
score 68.39 against 70.02, −2.3%; at 0.3 WikiText-2 validation 63.41 against 66.52)."""


def ridge(variances: torch.Tensor) -> torch.Tensor | float:
    """What :func:`target_map` adds to the diagonal of ``Σ̃`` (float64 ``variances`` = that diagonal)."""
    mean = float(variances.mean().clamp_min(1e-300))
    if RIDGE == "channel":
        return DAMP * variances.clamp_min(1e-6 * mean)  # a dead channel keeps a definite floor
    return DAMP * mean


SOLVE_DTYPE = torch.float32
"""Precision of the regression's correction ``W D (Σ̃ + Δ)⁻¹`` (the product and the Cholesky solve; ``D``
and ``Σ̃`` are summed in float64, and the correction is added to the float64 weight). Jacobi-scaled, the
per-channel ridge bounds the condition number by ``(d_in + 1 + DAMP) / DAMP``, so float32 carries
≲ d_in·ε ≈ 1e-3 relative error *on the correction*, itself a fraction of ``W``
(``tests/test_error_aware.py`` bounds the map's change); the float64 path serves when the float32
Cholesky fails. At Llama-2-7B's shapes on this machine's two cores: q_proj's map 7.8 → 4.1 s,
gate_proj's 17.8 → 10.3 s (whole fit 17.4 → 13.3 s, 37.8 → 29.6 s)."""


def target_map(weight: torch.Tensor, bias: torch.Tensor | None, stats: CrossStats) -> torch.Tensor:
    """``M₀`` (float64, d_out × (d_in + bias)): the ridge regression of the dense outputs on ``x̂``.

    With ``D̃ = E[x̃ x̃̂ᵀ] − Σ̃ = [[D, x̄ − μ̂], [0, 0]]`` the correction's numerator is ``W̃ D̃ = [W D, W (x̄ − μ̂)]``
    (the bias column meets the zero row). Written for memory (``d_in`` is 11008 at Llama-2-7B's
    ``down_proj``: 0.90 GiB per float64 square): ``D`` lives in the cross sums' own storage
    (:meth:`CrossStats.difference`), so besides the statistics the fit holds two squares, Σ̃ + δI and its
    Cholesky root; :func:`romcomp.compression.memory.estimate` counts exactly this. Statistics paired with
    the dense *outputs* give the numerator without ``D``: :func:`_numerator_from_outputs`.
    """
    with_bias = bias is not None
    w = augmented_weight(weight, bias)
    if w.data_ptr() == weight.data_ptr():  # a float64 weight without bias: never update it in place
        w = w.clone()
    sigma = augmented_sigma(stats.hat, with_bias)
    if stats.dense_outputs:
        product = _numerator_from_outputs(weight, bias, stats, sigma)
    else:
        product = _numerator(weight, with_bias, stats)
        if product is None:
            return w  # identical streams (first fitted layer, x̂ = x): local ROM exactly
    sigma.diagonal().add_(ridge(sigma.diagonal()))
    # Jacobi scaling S = diag(Σ̃ + Δ)^-½ (in place: no third square): S (Σ̃ + Δ) S has a unit diagonal, so
    # massive channels do not stretch what the float32 Cholesky sees (a per-channel ridge alone would not
    # bound it), and X = W̃ D̃ S (S (Σ̃ + Δ) S)⁻¹ S is the same map
    scale = sigma.diagonal().rsqrt()
    sigma.mul_(scale[:, None]).mul_(scale[None, :])
    for dtype in (SOLVE_DTYPE, torch.float64):
        root, info = torch.linalg.cholesky_ex(sigma.to(dtype))  # definite: Δ > 0 (float32 may still fail)
        if int(info) == 0:
            break
    del sigma
    # (Σ̃ + Δ) Xᵀ = (W̃ D̃)ᵀ  →  X = W̃ D̃ (Σ̃ + Δ)⁻¹
    product = product.to(root.dtype).mul_(scale.to(root.dtype)[None, :])  # in place: no extra product
    solved = torch.cholesky_solve(product.T, root).T
    del product
    w += solved.mul_(scale.to(solved.dtype)[None, :])
    return w


def _numerator(weight: torch.Tensor, with_bias: bool, stats: CrossStats) -> torch.Tensor | None:
    """``W̃ D̃`` (``SOLVE_DTYPE``) from paired inputs; None when the streams were identical (``D̃ = 0``:
    the sums alone cannot say so, their GEMM and ``syrk`` round differently)."""
    if stats.identical:
        return None
    diff = stats.difference()
    shift = (stats.xsum - stats.hat.xsum) / max(stats.count, 1)  # x̄ − μ̂
    w = weight.to(SOLVE_DTYPE)
    product = w @ diff.to(SOLVE_DTYPE)
    if with_bias:
        product = torch.cat([product, (w @ shift.to(SOLVE_DTYPE))[:, None]], dim=1)
    return product


def _numerator_from_outputs(
    weight: torch.Tensor, bias: torch.Tensor | None, stats: CrossStats, sigma: torch.Tensor
) -> torch.Tensor:
    """``W̃ D̃`` (``SOLVE_DTYPE``) from the dense outputs ``y = W x + b`` paired with ``x̂``:
    ``W D = E[y x̂ᵀ] − b μ̂ᵀ − W Σ̂`` and ``W (x̄ − μ̂) = ȳ − b − W μ̂``, with ``Σ̂`` read from ``sigma``
    (``Σ̃``, before the ridge). The same numerator as :func:`_numerator` (the identity is exact for the
    forward's ``y``; ``tests/test_error_aware.py`` compares the two fits), from a d_out × d_in cross moment:
    at Llama-2-7B's ``down_proj`` 1.5 instead of 4.0 TFLOP of cross products per 16k tokens, 4096- instead
    of 11008-wide stored dense values, and no 11008² ``D``. The product ``W Σ̂`` replaces ``W D``: the
    same cost. Only exact when the forward computed ``y`` from this very ``W`` (float32 forwards; the
    engine pairs inputs under bfloat16 autocast, whose rounded weights would bias ``W D``)."""
    n = max(stats.count, 1)
    d = weight.shape[1]
    w = weight.to(SOLVE_DTYPE)
    product = stats.cross.to(SOLVE_DTYPE).div_(n)
    product.addmm_(w, sigma[:d, :d].to(SOLVE_DTYPE), alpha=-1.0)
    if bias is None:
        return product
    mu = stats.hat.mean
    b = bias.double()
    product -= (b[:, None] * mu[None, :]).to(SOLVE_DTYPE)
    shift = stats.xsum / n - b - weight.double() @ mu
    return torch.cat([product, shift.to(SOLVE_DTYPE)[:, None]], dim=1)


def decompose(weight: torch.Tensor, bias: torch.Tensor | None, stats: CrossStats, rank: int) -> Factors:
    """Rank-``rank`` factors of the error-aware fit: top-k left singular vectors of ``M₀ L``."""
    m0 = target_map(weight, bias, stats)
    root, notes = whitening_root(stats.hat, bias is not None)
    whitened = m0.to(linalg.EIGH_DTYPE) @ root.to(linalg.EIGH_DTYPE)
    basis, more = top_left_singular(whitened, rank)
    del whitened
    d_in = weight.shape[1]
    return project(basis, m0[:, :d_in], m0[:, d_in] if bias is not None else None, notes + more)


def decompose_outputs(
    weight: torch.Tensor, bias: torch.Tensor | None, stats: CrossStats, rank: int
) -> Factors:
    """Rank-``rank`` factors of a linear narrower at its output (``down_proj``), from paired *output*
    moments: ``stats`` pairs the dense outputs ``y = W x + b`` with ``ŷ = W x̂ + b``, the same dense layer
    on the compressed stream's inputs (the stage's layer is still dense when its statistics are taken).

    The fit is ROM's form, ``A = V_k V_kᵀ W̃``, with the subspace chosen for the dense outputs:
    ``E‖y − V Vᵀ ŷ‖² = E‖y‖² − tr(Vᵀ S V)`` with ``S = E[y ŷᵀ] + E[ŷ yᵀ] − E[ŷ ŷᵀ] = D + Dᵀ + Σ_ŷ``, so
    ``V_k`` is the top-k eigenvectors of the d_out² ``S`` (identical streams: ``S = Σ_y``, local ROM by
    output). Unlike :func:`decompose` it does not re-fit ``W`` to the upstream error — that regression
    needs d_in² moments and solves (11008² at Llama-2-7B's ``down_proj``: 6 TFLOP of statistics per 16k
    tokens and ~45 s of float64 solves per block, against 0.8 TFLOP and one 4096² eigensolve here).

    The re-fit is worth its cost: on SmolLM2-135M (default allocation, C4 32 × 512, WikiText-2
    *validation* 40 × 512) this fit for ``down_proj`` gave 39.95 / 73.52 at ratios 0.2 / 0.3 against the
    regression's 36.93 / 64.59. So it is a memory fallback only (the planner's middle step between the
    full error-aware fit and the local one), never the default.
    """
    d = stats.difference()  # E[y ŷᵀ] − E[ŷ ŷᵀ], in place of the cross sums
    s = symmetric_from_upper(stats.hat.xtx).div_(max(stats.count, 1))
    s += d
    s += d.T
    notes: list[str] = []
    basis = top_eigvecs(s, rank, notes=notes)
    del s
    return project(basis, weight, bias, notes)
