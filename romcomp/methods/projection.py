"""The whitened output projection both ROM fits share (local: :mod:`romcomp.methods.rom`; error-aware:
:mod:`romcomp.methods.error_aware`): the augmented weight ``W̃ = [W b]``, the augmented input moment ``Σ̃``,
its root ``L`` (``L Lᵀ = Σ̃``) and the restriction of a layer to an orthonormal output basis."""

from __future__ import annotations

import torch

from romcomp.methods.base import Factors, InputStats
from romcomp.methods.linalg import psd_root, symmetric_from_upper


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
