"""ROM (LLM-ROM, Chavan et al. 2023): project each linear's outputs onto their top principal directions.

For ``y = W x + b`` the outputs' second moment is ``C = W̃ Σ̃ W̃ᵀ`` with the augmented ``W̃ = [W b]`` and
``Σ̃ = E[x̃ x̃ᵀ]`` for ``x̃ = [x; 1]``, so input statistics suffice. With ``V_k`` the top-k eigenvectors of
``C`` the layer becomes ``V_k (V_kᵀ W) x + V_k V_kᵀ b``: the rank-k map that minimizes the expected squared
output error on the calibration distribution.

When ``d_out`` is smaller than ``d_in`` (``down_proj``: 4096 outputs of 11008 inputs in Llama-2-7B), the
engine instead accumulates ``C`` directly from the layer's outputs (:func:`decompose_outputs`): a d_out²
accumulator instead of d_in², and no ``W Σ Wᵀ`` product — the same subspace, 7x less covariance work there.

We do not mean-centre: the uncentred second moment makes the projection reproduce the outputs' mean too,
which a centred PCA would lose unless a bias were added to layers that have none (Llama has none).
"""

from __future__ import annotations

import torch

from romcomp.methods import linalg
from romcomp.methods.base import Factors, InputStats
from romcomp.methods.linalg import psd_root, symmetric_from_upper, top_eigvecs, top_left_singular


def augmented_weight(
    weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``W̃ = [W b]``: the bias folded in as a weight on a constant-1 input."""
    w = weight.to(dtype)
    return w if bias is None else torch.cat([w, bias.to(dtype)[:, None]], dim=1)


def augmented_sigma(stats: InputStats, with_bias: bool) -> torch.Tensor:
    """``Σ̃ = E[x̃ x̃ᵀ]`` for ``x̃ = [x; 1]`` (just ``E[x xᵀ]`` without a bias)."""
    if not with_bias:
        return stats.second_moment
    d = stats.xtx.shape[0]
    sigma = torch.empty(d + 1, d + 1, dtype=torch.float64)  # one square, filled in place
    symmetric_from_upper(stats.xtx, out=sigma[:d, :d])
    sigma[:d, :d] /= max(stats.count, 1)
    sigma[:d, d] = sigma[d, :d] = stats.mean
    sigma[d, d] = 1.0
    return sigma


def whitening_root(stats: InputStats, with_bias: bool) -> tuple[torch.Tensor, list[str]]:
    """``L`` with ``L Lᵀ = Σ̃``, computed once per shared input (q/k/v, gate/up) and kept on ``stats``."""
    return stats.memo(("root", with_bias), lambda: psd_root(augmented_sigma(stats, with_bias)))


def project(
    basis: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, notes: list[str] | None = None
) -> Factors:
    """The layer restricted to an orthonormal output basis ``V_k``: ``down = V_kᵀ W``, ``up = V_k``,
    bias ``V_k V_kᵀ b``. ``down`` in float32: it is rounded to the checkpoint's 16-bit dtype next."""
    down = basis.float().T @ weight.float()
    new_bias = basis @ (basis.T @ bias.double()) if bias is not None else None
    return Factors(
        down=down.contiguous(),
        up=basis.float().contiguous(),
        bias=None if new_bias is None else new_bias.float(),
        notes=notes or [],
    )


def decompose(weight: torch.Tensor, bias: torch.Tensor | None, stats: InputStats, rank: int) -> Factors:
    """Rank-``rank`` ROM factors of one linear layer: the top-k left singular vectors of ``W̃ L``."""
    root, notes = whitening_root(stats, bias is not None)
    whitened = augmented_weight(weight, bias, linalg.EIGH_DTYPE) @ root.to(linalg.EIGH_DTYPE)
    basis, more = top_left_singular(whitened, rank)
    del whitened
    return project(basis, weight, bias, notes + more)


def decompose_outputs(
    weight: torch.Tensor, bias: torch.Tensor | None, out_stats: InputStats, rank: int
) -> Factors:
    """Rank-``rank`` ROM factors from the second moment of the layer's *outputs* ``y = W x + b``.

    ``out_stats`` holds ``Σ y yᵀ`` over the calibration tokens, i.e. exactly ``W̃ Σ̃ W̃ᵀ`` (bias included),
    so the factors equal :func:`decompose`'s up to round-off and the sign of each basis vector.
    """
    notes: list[str] = []
    basis = top_eigvecs(out_stats.xtx, rank, upper=True, notes=notes)  # eigenvectors of the sum = of the mean
    return project(basis, weight, bias, notes)
