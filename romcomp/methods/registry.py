"""A decomposition method as one descriptor: what it computes, what it needs, what it supports.

The engine, the configuration check, the memory plan and the CLI's help read these fields; nothing outside
a method's own file asks for a method by name. Adding a method is one file that ends with
``METHOD = register(Method(...))`` and one import line in :mod:`romcomp.methods`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from romcomp.errors import BadInputError

Decompose = Callable[[Any, Any, Any, int], Any]
"""``decompose(weight, bias, stats, rank) -> Factors``: a pure function of one linear."""

STATISTICS = ("input moment", "output moment", "cross moment", "gradients", "none")
"""What a decompose function can read: the inputs' second moment (with Σ x and Σ |x|: InputStats), the
outputs' (InputStats of y), the paired dense/compressed moments (CrossStats), the streamed gradient pass's
results (GradStats), or nothing but the weight."""

GRADIENTS = (None, "fisher", "full")
"""The streamed gradient pass a method needs: none, per-input-channel Fisher sums, or also every weight's
summed gradient (d_out × d_in per linear)."""


@dataclass(frozen=True)
class Option:
    """A method's own knob (``--density``): a number in ``(low, high]`` with a default."""

    name: str
    default: float
    low: float
    high: float
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: float) -> None:
        if not self.low < value <= self.high:
            raise BadInputError(f"{self.flag} takes a value in ({self.low:g}, {self.high:g}], got {value}")


@dataclass(frozen=True)
class Method:
    """One decomposition method. Calling it decomposes with its main statistics (``needs``)."""

    name: str
    help: str  # one line: the CLI's --method help and the error listing
    decompose: Decompose
    needs: str = "input moment"  # one of STATISTICS
    decompose_outputs: Decompose | None = None  # from the outputs' moment (cheaper when d_out < d_in)
    decompose_cross: Decompose | None = None  # the error-aware fit (CrossStats: paired inputs, or dense
    # outputs with compressed inputs for a linear narrower at its output)
    decompose_cross_outputs: Decompose | None = None  # the error-aware fit from paired *output* moments
    gradients: str | None = None  # one of GRADIENTS
    options: tuple[Option, ...] = ()
    experts: bool = True  # can factor fused MoE experts (one local fit per expert on its routed tokens)

    def __post_init__(self) -> None:
        if self.needs not in STATISTICS or self.gradients not in GRADIENTS:
            raise ValueError(f"method {self.name}: needs {self.needs!r}, gradients {self.gradients!r}")
        if (self.needs == "gradients") != (self.gradients is not None):
            raise ValueError(f"method {self.name}: gradient statistics need a gradient pass and back")

    def __call__(self, weight, bias, stats, rank: int):
        return self.decompose(weight, bias, stats, rank)

    @property
    def fits(self) -> tuple[str, ...]:
        """The fits it supports, default first."""
        return ("error-aware", "local") if self.decompose_cross is not None else ("local",)

    @property
    def data_free(self) -> bool:
        return self.needs == "none"

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)


METHODS: dict[str, Method] = {}
"""Every registered method by name, in registration order (the CLI lists them so)."""


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (a name registered twice is a programming error)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """Look a method up by name; unknown names are bad input."""
    try:
        return METHODS[name]
    except KeyError:
        raise BadInputError(f"unknown method '{name}'; available: {', '.join(sorted(METHODS))}") from None


def methods_with(predicate: Callable[[Method], bool]) -> list[str]:
    """Names of the registered methods for which ``predicate`` holds (for error messages)."""
    return [m.name for m in METHODS.values() if predicate(m)]


def option_names() -> list[str]:
    """Every method option's name (config fields the CLI passes through)."""
    return list(dict.fromkeys(o.name for m in METHODS.values() for o in m.options))


def method_help() -> str:
    """The ``--method`` help: every registered method with its line."""
    return "Decomposition method: " + "; ".join(f"{m.name} ({m.help})" for m in METHODS.values()) + "."


def option_help(name: str) -> str:
    """A method option's CLI help: the methods that take it, what it does, its default."""
    owners = [m for m in METHODS.values() if m.option(name) is not None]
    if not owners:
        return f"(no registered method takes --{name})"
    o = owners[0].option(name)
    return f"With --method {' or '.join(m.name for m in owners)}: {o.help} [default: {o.default:g}]."
