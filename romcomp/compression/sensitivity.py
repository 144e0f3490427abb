"""ASVD's per-layer sensitivity, measured block by block (``--allocation asvd``).

ASVD (Yuan et al., 2023) compresses one linear at a time to each candidate parameter ratio and records
the model's perplexity on calibration windows; its rank search then spends the budget where that damage
is smallest
(:func:`romcomp.compression.allocation.allocate_asvd`). A whole-model evaluation per (linear, candidate)
is ``linears × candidates`` model forwards — 1,260 for SmolLM2-135M, hours on a CPU, and it needs the model
in memory. Here the damage is measured where it happens, inside the dense pre-pass that already holds the
block and its statistics: the linear is replaced by its rank-k output-optimal projection (ROM's local fit,
whatever ``--method`` is), the block is run on the first ``WINDOWS`` calibration windows, and the
sensitivity is the squared change of the block's output relative to what the block adds to the residual
stream. Cost: ``linears × candidates`` block forwards on ``WINDOWS`` windows per block — 42 × 8 = 336
window-forwards per block for a Llama-style block, about five times a 64-window pre-pass's forwards.
The departure (block output instead of the model's perplexity, ROM's projection instead of ASVD's scaled
SVD) is what makes it streamable; the search is ASVD's own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from romcomp.compression.activations import Boundary
from romcomp.compression.allocation import ASVD_CANDIDATES, measured_cuts
from romcomp.compression.blocks import BlockIO
from romcomp.compression.ranks import uniform_rank
from romcomp.methods.base import Factors

WINDOWS = 8
"""Calibration windows each sensitivity is measured on (ASVD's official default: 32 windows of 2048
tokens, i.e. 64k tokens; here 8 × the calibration length, 4k tokens at 512)."""


def block_sensitivity(
    io: BlockIO,
    index: int,
    block: nn.Module,
    source: Boundary,
    names: list[str],
    factors: Callable[[str, int], Factors],
    ranks: Callable[[nn.Module], list[int | None]] | None = None,
    relative_to: str = "update",
) -> dict[str, torch.Tensor]:
    """``{linear name: damage per candidate}`` for block ``index`` on its dense inputs ``source``;
    ``factors(name, rank)`` gives that linear's rank-``rank`` factors. Candidates: ``ranks(linear)`` (a
    ``None`` rank: the linear stays dense, no damage), by default ASVD's (``ASVD_CANDIDATES``). The damage
    is the squared change of the block's output relative to what the block adds to the residual stream
    (``relative_to="update"``, ASVD's) or to the block's output itself (``"output"``: the relative error
    of the stream the next block reads). Each linear's weight is restored before the next one is measured,
    so every measurement sees the dense block otherwise."""
    ranks = ranks or _asvd_ranks
    n = min(WINDOWS, source.shape[0])
    with torch.inference_mode():
        inputs = [source.read(start, stop) for start, stop in io.batches(n)]
        reference = [io.call_block(block, index, x) for x in inputs]
        if relative_to == "output":
            scale = sum(float(y.double().pow(2).sum()) for y in reference)
        else:
            scale = sum(float((y - x).double().pow(2).sum()) for x, y in zip(inputs, reference, strict=True))
        result = {}
        for name in names:
            linear = block.get_submodule(name)
            weight = linear.weight.data
            bias = None if linear.bias is None else linear.bias.data
            damage = []
            try:
                for rank in ranks(linear):
                    if rank is None:  # factors at this ratio would not be smaller: the linear stays dense
                        damage.append(0.0)
                        continue
                    linear.weight.data = weight  # factor the dense weight, not the last candidate's
                    if bias is not None:
                        linear.bias.data = bias
                    f = factors(name, rank)
                    linear.weight.data = f.dense().to(weight.dtype)
                    if bias is not None and f.bias is not None:
                        linear.bias.data = f.bias.to(bias.dtype)
                    err = sum(
                        float((io.call_block(block, index, x) - y).double().pow(2).sum())
                        for x, y in zip(inputs, reference, strict=True)
                    )
                    damage.append(err / scale if scale > 0 else 0.0)
            finally:
                linear.weight.data = weight
                if bias is not None:
                    linear.bias.data = bias
            result[name] = torch.tensor(damage, dtype=torch.float64)
    return result


def _asvd_ranks(linear: nn.Module) -> list[int | None]:
    return [uniform_rank(linear.in_features, linear.out_features, 1.0 - c) for c in ASVD_CANDIDATES]


def measured_ranks(linear: nn.Module) -> list[int | None]:
    """The ``auto`` allocation's measured signal: ranks at ``MEASURED_FRACTIONS`` of the outputs' rank."""
    return measured_cuts(min(linear.in_features + int(linear.bias is not None), linear.out_features))
