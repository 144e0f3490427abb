"""Registry of decomposition methods: ``decompose(W, bias, stats, rank) -> Factors`` pure functions."""

from __future__ import annotations

from collections.abc import Callable

import torch

from romcomp.errors import BadInputError
from romcomp.methods import asvd, error_aware, fwsvd, lpaf, rom, svd, svd_llm
from romcomp.methods.base import Factors, GradStats, InputStats

Decompose = Callable[[torch.Tensor, "torch.Tensor | None", InputStats, int], Factors]

METHODS: dict[str, Decompose] = {
    "rom": rom.decompose,
    "svd": svd.decompose,
    "svd-llm": svd_llm.decompose,
    "asvd": asvd.decompose,
    "fwsvd": fwsvd.decompose,
    "lpaf": lpaf.decompose,
}

GRADIENT_METHODS = frozenset({"fwsvd", "lpaf"})
"""Methods that take :class:`GradStats` from the streamed gradient pass instead of activation moments."""

FULL_GRADIENT_METHODS = frozenset({"lpaf"})
"""Gradient methods that need every weight's summed gradient, not only per-channel Fisher sums."""


OUTPUT_METHODS: dict[str, Decompose] = {"rom": rom.decompose_outputs}
"""Methods that can work from the second moment of a linear's outputs (cheaper when d_out < d_in)."""


CROSS_METHODS: dict[str, Decompose] = {"rom": error_aware.decompose}
"""Methods with an error-aware variant (paired dense/compressed statistics: :class:`CrossStats`)."""


def get_output_method(name: str) -> Decompose | None:
    """The output-statistics variant of a method, or None when it needs input statistics."""
    return OUTPUT_METHODS.get(name)


def get_method(name: str) -> Decompose:
    """Look a method up by name; unknown names are bad input."""
    try:
        return METHODS[name]
    except KeyError:
        raise BadInputError(f"unknown method '{name}'; available: {', '.join(sorted(METHODS))}") from None


__all__ = [
    "CROSS_METHODS",
    "FULL_GRADIENT_METHODS",
    "GRADIENT_METHODS",
    "METHODS",
    "OUTPUT_METHODS",
    "Factors",
    "GradStats",
    "InputStats",
    "get_method",
    "get_output_method",
]
