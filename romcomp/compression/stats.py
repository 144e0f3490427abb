"""Statistics collection: forward pre-hooks, owned by a context manager, that accumulate input moments.

Linears that share an input (q/k/v, gate/up) share one accumulator, hooked on the first of the group. A
linear whose output is narrower than its input (down_proj) can instead have its *outputs* accumulated
(:func:`collect_output_stats`), which is cheaper and is all an output-space method such as ROM needs.
Precision per step: each chunk of at most ``CHUNK`` tokens is multiplied in float32 with BLAS ``syrk`` (one
triangle: half a GEMM's flops, 2.6x faster than ``x.T @ x`` here; the relative error of a 4096-term float32
dot product, ~1e-6, is three orders of magnitude below the sampling noise of a 65k-token covariance), and the
chunks are summed into float64 accumulators so that nothing is lost over tens of thousands of tokens.
``tests/test_math.py`` checks the agreement.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from romcomp.methods.base import CrossStats, InputStats
from romcomp.methods.linalg import ROW_BLOCK, syrk_upper
from romcomp.model.discovery import StopForward

CHUNK = 4096


def add_rows(target: torch.Tensor, chunk: torch.Tensor) -> None:
    """``target += chunk`` (float64 += float32) a row block at a time: a whole-matrix mixed-dtype add
    materializes a float64 copy of ``chunk`` first — 0.9 GiB at an 11008-wide input — which no memory
    plan should have to count."""
    for i in range(0, chunk.shape[0], ROW_BLOCK):
        target[i : i + ROW_BLOCK] += chunk[i : i + ROW_BLOCK]


def accumulate(stats: InputStats, x: torch.Tensor) -> None:
    """Add a batch of inputs (any leading shape) to ``stats``."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)
    for start in range(0, x.shape[0], CHUNK):
        chunk = x[start : start + CHUNK]
        add_rows(stats.xtx, syrk_upper(chunk))  # upper triangle only
        stats.xsum += chunk.sum(dim=0, dtype=torch.float64)
        if stats.abs_sum is not None:
            stats.abs_sum += chunk.abs().sum(dim=0, dtype=torch.float64)
    stats.count += x.shape[0]


@contextmanager
def _collect(
    block: nn.Module, names: Sequence[str], width: Callable[[nn.Linear], int],
    register: Callable[[nn.Linear, InputStats], RemovableHandle],
) -> Iterator[dict[str, InputStats]]:  # fmt: skip
    """One accumulator per named linear, fed by the hook ``register`` installs; hooks removed on exit."""
    stats: dict[str, InputStats] = {}
    handles = []
    for name in names:
        linear = block.get_submodule(name)
        stats[name] = InputStats.zeros(width(linear))
        handles.append(register(linear, stats[name]))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def collect_input_stats(
    block: nn.Module, groups: Sequence[Sequence[str]]
) -> AbstractContextManager[dict[str, InputStats]]:
    """``{group leader name: InputStats}`` filled by every forward of ``block`` inside the context."""

    def register(linear: nn.Linear, acc: InputStats) -> RemovableHandle:
        return linear.register_forward_pre_hook(lambda _m, args: accumulate(acc, args[0].detach()))

    return _collect(block, [group[0] for group in groups], lambda linear: linear.in_features, register)


def collect_output_stats(
    block: nn.Module, names: Sequence[str]
) -> AbstractContextManager[dict[str, InputStats]]:
    """``{linear name: stats of its outputs}`` filled by every forward of ``block`` inside the context."""

    def register(linear: nn.Linear, acc: InputStats) -> RemovableHandle:
        return linear.register_forward_hook(lambda _m, _args, out: accumulate(acc, out.detach()))

    return _collect(block, names, lambda linear: linear.out_features, register)


@contextmanager
def collect_expert_stats(
    block: nn.Module, projections: Sequence[str], by_output: Callable[[str], bool], stop: bool = False,
    experts: Collection[int] | None = None,
) -> Iterator[dict[tuple[str, int], InputStats]]:  # fmt: skip
    """``{(projection name, expert): stats}`` over the tokens routed to each expert, for the fused expert
    projections named (``mlp.experts.gate_up_proj``) of ``block``, filled by its forwards inside the
    context through the ``"romcomp"`` experts implementation's observer; a projection for which
    ``by_output(name)`` holds accumulates its outputs instead of its inputs (the narrower side). An expert
    no token reached has no entry. With ``stop`` the forward ends after the last experts module; with
    ``experts`` only those experts' statistics are kept (the others' moments are never allocated)."""
    stats: dict[tuple[str, int], InputStats] = {}
    owners: dict[str, list[str]] = {}
    for name in projections:
        owner, _, proj = name.rpartition(".")
        owners.setdefault(owner, []).append(proj)

    def observer(owner: str, wanted: list[str]) -> Callable:
        def observe(proj: str, expert: int, x: torch.Tensor, y: torch.Tensor) -> None:
            if proj in wanted and (experts is None or expert in experts):
                full = f"{owner}.{proj}"
                value = y if by_output(full) else x
                if (full, expert) not in stats:
                    stats[full, expert] = InputStats.zeros(value.shape[-1])
                accumulate(stats[full, expert], value.detach())

        return observe

    def end(_m: nn.Module, _args: tuple, _out) -> None:
        raise StopForward

    modules = [block.get_submodule(owner) for owner in owners]
    handles = [modules[-1].register_forward_hook(end)] if stop and modules else []
    for module, (owner, wanted) in zip(modules, owners.items(), strict=True):
        module.romcomp_observer = observer(owner, wanted)
    try:
        yield stats
    finally:
        for module in modules:
            del module.romcomp_observer
        for h in handles:
            h.remove()


def accumulate_cross(stats: CrossStats, x: torch.Tensor, x_hat: torch.Tensor) -> None:
    """Add paired dense inputs ``x`` and compressed inputs ``x̂`` of the same tokens to ``stats``.

    The cross product is a float32 GEMM per chunk (``Σ x x̂ᵀ`` is not symmetric, so no ``syrk``), summed
    in float64 like the second moments. ``stats.identical`` stays true while every batch pairs equal
    values (the first stage of the first block: the regression is then local ROM, and its fit skips the
    solve); comparing costs one read of both, against the GEMM's ``d_in`` multiply-adds per element.
    """
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)
    x_hat = x_hat.reshape(-1, x_hat.shape[-1]).to(torch.float32)
    if stats.identical:
        stats.identical = not stats.dense_outputs and torch.equal(x, x_hat)
    for start in range(0, x.shape[0], CHUNK):
        add_rows(stats.cross, x[start : start + CHUNK].T @ x_hat[start : start + CHUNK])
        stats.xsum += x[start : start + CHUNK].sum(dim=0, dtype=torch.float64)
    accumulate(stats.hat, x_hat)


def tap(linear: nn.Module, hook: Callable, output: bool) -> RemovableHandle:
    """``hook(module, args, *output)`` on the linear's inputs (pre-hook) or, with ``output``, its outputs."""
    return linear.register_forward_hook(hook) if output else linear.register_forward_pre_hook(hook)


def tap_width(block: nn.Module, name: str, outputs: Collection[str]) -> int:
    """The width of what :func:`tap` sees of linear ``name``: its outputs if named in ``outputs``."""
    linear = block.get_submodule(name)
    return linear.out_features if name in outputs else linear.in_features


class CrossCollector:
    """Paired input statistics of the leaders of some linear groups: the dense block's values (stored by
    :class:`romcomp.compression.fit.DenseTaps`, put in :attr:`pending` per batch by the caller) against
    one or more compressed copies of the block (one per ratio of a multi-ratio run).

    Each compressed hook pairs its own input of the same tokens with the pending dense one and
    accumulates. With ``stop`` a forward ends (:class:`StopForward`) once the last leader is seen, so the
    layers after it are not computed. Leaders named in ``outputs`` pair their *outputs* on both sides (a
    linear narrower at its output, fitted from output moments when memory is short:
    :func:`romcomp.methods.error_aware.decompose_outputs`); those named in ``dense_outputs`` pair the
    dense outputs with the compressed inputs (the same regression from a narrower cross moment:
    :class:`~romcomp.methods.base.CrossStats`).
    """

    def __init__(self, blocks: Sequence[nn.Module], leaders: Sequence[str], stop: bool,
                 outputs: Collection[str] = (), dense_outputs: Collection[str] = ()) -> None:  # fmt: skip
        def zeros(block: nn.Module, name: str) -> CrossStats:
            dense = block.get_submodule(name).out_features if name in dense_outputs else None
            return CrossStats.zeros(tap_width(block, name, outputs), dense)

        self.stats = [{n: zeros(block, n) for n in leaders} for block in blocks]
        self.pending: dict[str, torch.Tensor] = {}
        self.handles: list[RemovableHandle] = []
        last = leaders[-1] if stop else None
        for name in leaders:
            side = name in outputs
            for j, block in enumerate(blocks):
                self.handles.append(tap(block.get_submodule(name), self._pair(j, name, last, side), side))

    def _pair(self, j: int, name: str, last: str | None, side: bool) -> Callable:
        def hook(_m: nn.Module, args: tuple, *out) -> None:
            accumulate_cross(self.stats[j][name], self.pending[name], (out[0] if side else args[0]).detach())
            if name == last:
                raise StopForward

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.pending.clear()
