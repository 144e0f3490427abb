"""Statistics collection: forward pre-hooks, owned by a context manager, that accumulate input moments.

Linears that share an input (q/k/v, gate/up) share one accumulator, hooked on the first of the group. A
linear whose output is narrower than its input (down_proj) can instead have its *outputs* accumulated
(:func:`collect_output_stats`), which is cheaper and is all an output-space method such as ROM needs.
Precision per step: each chunk of at most ``CHUNK`` tokens is multiplied in float32 (2-3x faster than
float64 here; the relative error of a 4096-term float32 dot product, ~1e-6, is three orders of magnitude
below the sampling noise of a 65k-token covariance), and the chunks are summed into float64 accumulators
so that nothing is lost over tens of thousands of tokens. ``tests/test_math.py`` checks the agreement.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from romcomp.methods.base import InputStats

CHUNK = 4096


def accumulate(stats: InputStats, x: torch.Tensor) -> None:
    """Add a batch of inputs (any leading shape) to ``stats``."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)
    for start in range(0, x.shape[0], CHUNK):
        chunk = x[start : start + CHUNK]
        stats.xtx += (chunk.T @ chunk).to(torch.float64)
        stats.xsum += chunk.sum(dim=0, dtype=torch.float64)
    stats.count += x.shape[0]


@contextmanager
def collect_input_stats(block: nn.Module, groups: Sequence[Sequence[str]]) -> Iterator[dict[str, InputStats]]:
    """Yield ``{group leader name: InputStats}`` filled by every forward of ``block`` inside the context."""
    stats: dict[str, InputStats] = {}
    handles = []
    for group in groups:
        leader = block.get_submodule(group[0])
        stats[group[0]] = InputStats.zeros(leader.in_features)

        def hook(_module: nn.Module, args: tuple, acc: InputStats = stats[group[0]]) -> None:
            accumulate(acc, args[0].detach())

        handles.append(leader.register_forward_pre_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


@contextmanager
def collect_output_stats(block: nn.Module, names: Sequence[str]) -> Iterator[dict[str, InputStats]]:
    """Yield ``{linear name: stats of its outputs}`` filled by every forward of ``block`` in the context."""
    stats: dict[str, InputStats] = {}
    handles = []
    for name in names:
        linear = block.get_submodule(name)
        stats[name] = InputStats.zeros(linear.out_features)

        def hook(_module: nn.Module, _args: tuple, out: torch.Tensor, acc: InputStats = stats[name]) -> None:
            accumulate(acc, out.detach())

        handles.append(linear.register_forward_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
