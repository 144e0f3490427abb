"""Rank allocation and parameter accounting.

Ratio convention (SVD-LLM's): ``ratio`` is the fraction of the decoder-block linear parameters removed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class LinearShape:
    """A compressible linear: dotted module name and its dimensions; ``count`` matrices of that shape
    share the name and the rank (the experts of a fused MoE projection)."""

    name: str
    d_in: int
    d_out: int
    bias: bool = False
    count: int = 1

    @property
    def dense_params(self) -> int:
        return self.count * self.d_in * self.d_out

    @property
    def rank_cost(self) -> int:
        """Parameters one more rank costs (over every matrix that shares the name)."""
        return self.count * (self.d_in + self.d_out)

    def factored_params(self, rank: int) -> int:
        return rank * self.rank_cost


def uniform_rank(d_in: int, d_out: int, ratio: float) -> int | None:
    """``k = floor((1−r)·d_in·d_out/(d_in+d_out))``, or ``None`` when factoring would save nothing."""
    k = math.floor((1.0 - ratio) * d_in * d_out / (d_in + d_out))
    if k <= 0:
        k = 1
    if k * (d_in + d_out) >= d_in * d_out:
        return None
    return k


def allocate_uniform(shapes: Iterable[LinearShape], ratio: float) -> dict[str, int]:
    """Uniform allocation: every linear gets the rank of the same per-matrix ratio (dense ones omitted)."""
    ranks: dict[str, int] = {}
    for s in shapes:
        k = uniform_rank(s.d_in, s.d_out, ratio)
        if k is not None:
            ranks[s.name] = k
    return ranks


def linear_params(shapes: Iterable[LinearShape], ranks: dict[str, int]) -> tuple[int, int]:
    """``(dense, kept)`` weight parameters of the block linears under ``ranks`` (biases excluded)."""
    dense = kept = 0
    for s in shapes:
        dense += s.dense_params
        kept += s.factored_params(ranks[s.name]) if s.name in ranks else s.dense_params
    return dense, kept
