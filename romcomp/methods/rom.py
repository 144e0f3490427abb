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

from romcomp.methods import error_aware, linalg
from romcomp.methods.base import Factors, InputStats
from romcomp.methods.linalg import top_eigvecs, top_left_singular
from romcomp.methods.projection import augmented_weight, project, whitening_root
from romcomp.methods.registry import Method, register


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


METHOD = register(
    Method(
        name="rom",
        help="the default: PCA of each linear's outputs, error-aware by default",
        decompose=decompose,
        decompose_outputs=decompose_outputs,
        decompose_cross=error_aware.decompose,
        decompose_cross_outputs=error_aware.decompose_outputs,
    )
)
