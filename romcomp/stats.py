"""Statistics collection: forward pre-hooks, owned by a context manager, that accumulate input moments.

Linears that share an input (q/k/v, gate/up) share one accumulator, hooked on the first of the group.
Accumulation is float64 so that summing tens of thousands of tokens loses nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from romcomp.methods.base import InputStats


def accumulate(stats: InputStats, x: torch.Tensor) -> None:
    """Add a batch of inputs (any leading shape) to ``stats``."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float64)
    stats.xtx.addmm_(x.T, x)
    stats.xsum += x.sum(dim=0)
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
