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

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from romcomp.methods.base import InputStats
from romcomp.methods.linalg import syrk_upper

CHUNK = 4096


def accumulate(stats: InputStats, x: torch.Tensor) -> None:
    """Add a batch of inputs (any leading shape) to ``stats``."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)
    for start in range(0, x.shape[0], CHUNK):
        chunk = x[start : start + CHUNK]
        stats.xtx += syrk_upper(chunk)  # upper triangle only
        stats.xsum += chunk.sum(dim=0, dtype=torch.float64)
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
