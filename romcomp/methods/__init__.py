"""Decomposition methods: pure functions ``decompose(W, bias, stats, rank) -> Factors``, each described by
one :class:`~romcomp.methods.registry.Method` in its own module. A new method is one file that ends with
``METHOD = register(Method(...))`` and one name in the import line below."""

from __future__ import annotations

from romcomp.methods import asvd, fwsvd, lpaf, rom, svd, svd_llm  # noqa: F401 - each registers itself
from romcomp.methods.base import CrossStats, Factors, GradStats, InputStats
from romcomp.methods.registry import METHODS, Decompose, Method, Option, get_method, register

DEFAULT_METHOD = "rom"

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "CrossStats",
    "Decompose",
    "Factors",
    "GradStats",
    "InputStats",
    "Method",
    "Option",
    "get_method",
    "register",
]
