"""Shared types of the decomposition methods: what a method receives and what it returns."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from romcomp.methods.linalg import subtract_symmetric_from_upper, symmetric_from_upper


@dataclass
class InputStats:
    """Second-moment statistics of one linear's inputs, accumulated in float64.

    ``xtx`` is the sum of ``x xᵀ`` and ``xsum`` the sum of ``x`` over ``count`` calibration tokens; the
    sums (not means) are kept so that accumulation over batches is exact and order-independent enough.
    Only the upper triangle of ``xtx`` is read (the accumulator fills just that half: ``syrk``).
    ``derived`` memoizes what several linears of a group compute from the same statistics (the whitening
    root of q/k/v or gate/up), so it is computed once per shared input.
    """

    xtx: torch.Tensor
    xsum: torch.Tensor
    count: int = 0
    derived: dict[Hashable, Any] = field(default_factory=dict, repr=False, compare=False)
    abs_sum: torch.Tensor | None = None  # Σ |x| per channel (ASVD's scaling); None where not accumulated

    @classmethod
    def zeros(cls, dim: int) -> InputStats:
        d64 = torch.float64
        return cls(torch.zeros(dim, dim, dtype=d64), torch.zeros(dim, dtype=d64), 0,
                   abs_sum=torch.zeros(dim, dtype=d64))  # fmt: skip

    @property
    def second_moment(self) -> torch.Tensor:
        """``E[x xᵀ]`` (uncentred), mirrored from the upper triangle."""
        return symmetric_from_upper(self.xtx).div_(max(self.count, 1))

    def memo(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per ``key`` for these statistics."""
        if key not in self.derived:
            self.derived[key] = compute()
        return self.derived[key]

    @property
    def mean(self) -> torch.Tensor:
        return self.xsum / max(self.count, 1)


@dataclass
class GradStats:
    """What the streamed gradient pass measured for one linear: ``Σ_windows Σ_rows (∂L/∂W)²`` per input
    channel (``fisher_in``, float64) and, when asked for, ``Σ_windows ∂L/∂W`` (``grad``, d_out × d_in)."""

    fisher_in: torch.Tensor
    grad: torch.Tensor | None = None


@dataclass
class Factors:
    """``W ≈ up @ down`` (+ ``bias``): ``down`` is k×d_in, ``up`` is d_out×k, both float32."""

    down: torch.Tensor
    up: torch.Tensor
    bias: torch.Tensor | None
    notes: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def dense(self) -> torch.Tensor:
        """The reconstructed weight (for tests and error measurement)."""
        return self.up.double() @ self.down.double()

    def check_finite(self, name: str) -> None:
        """Never emit NaN/Inf weights silently."""
        for label, t in (("down", self.down), ("up", self.up), ("bias", self.bias)):
            if t is not None and not torch.isfinite(t).all():
                from romcomp.errors import RomcompError

                raise RomcompError(f"non-finite values in the {label} factor of {name}")


@dataclass
class CrossStats:
    """Paired statistics of one linear's inputs in two activation streams, accumulated in float64.

    ``hat`` holds the moments of the *compressed* model's inputs ``x̂`` (what the fitted layer will see);
    ``cross`` is ``Σ x x̂ᵀ`` against the *dense* model's inputs ``x`` of the same tokens, and ``xsum`` is
    ``Σ x``. That is all an error-aware fit needs: the dense outputs ``W x`` are never stored.

    With ``dense_outputs`` the dense side is the layer's *outputs* ``y = W x + b`` instead (``cross`` is
    ``Σ y x̂ᵀ``, d_out × d_in, and ``xsum`` is ``Σ y``): the same regression for a linear narrower at its
    output (``down_proj``), from a d_out × d_in cross moment instead of a d_in² one
    (:func:`romcomp.methods.error_aware.target_map` recovers ``W (E[x x̂ᵀ] − Σ̂)`` from it).
    """

    hat: InputStats
    cross: torch.Tensor
    xsum: torch.Tensor
    is_difference: bool = False  # ``cross`` already turned into ``E[x x̂ᵀ] − E[x̂ x̂ᵀ]`` (see difference())
    dense_outputs: bool = False
    identical: bool = True  # every pair added so far had x̂ = x bit for bit (see accumulate_cross)

    @classmethod
    def zeros(cls, dim: int, dense_outputs: int | None = None) -> CrossStats:
        """Moments of ``dim``-wide compressed inputs, paired with dense inputs of the same width or, when
        ``dense_outputs`` gives a width, with the dense outputs."""
        dense = dim if dense_outputs is None else dense_outputs
        return cls(
            InputStats.zeros(dim),
            torch.zeros(dense, dim, dtype=torch.float64),
            torch.zeros(dense, dtype=torch.float64),
            dense_outputs=dense_outputs is not None,
            identical=dense_outputs is None,
        )

    @property
    def count(self) -> int:
        return self.hat.count

    def difference(self) -> torch.Tensor:
        """``D = E[x x̂ᵀ] − E[x̂ x̂ᵀ]`` (float64, d_in²), computed once *in place of* the cross sums, which
        nothing needs afterwards: the linears of a group (q/k/v) share it and no second d_in² square is
        allocated. ``D`` is *not* exactly zero when the two streams were equal: the cross sums are a GEMM
        and the second moment a ``syrk``, which round differently (≈ 3e-7 relative); :attr:`identical`
        says when the streams were equal."""
        if self.dense_outputs:
            raise ValueError("paired with the dense outputs: there is no input difference D")
        if not self.is_difference:
            subtract_symmetric_from_upper(self.cross, self.hat.xtx).div_(max(self.count, 1))
            self.is_difference = True
        return self.cross
