"""Mixture-of-experts projections: factored expert by expert, on the tokens routed to each expert.

transformers 5 stores an MoE layer's experts as fused 3-D parameters (``experts.gate_up_proj``: experts ×
2·intermediate × hidden). A rank map names such a projection once (``model.layers.3.mlp.experts.down_proj``)
and every expert of it gets that rank: one factor pair per expert, stacked into a :class:`LowRankExperts`.

Statistics: each expert's own inputs (or, for a projection narrower at its output, its outputs) over the
tokens the router sends it, on the compressed stream, after the block's linears are compressed — routing
then follows what the compressed model computes. The fit is the method's local one (ROM) whatever
``--fit`` says: the dense and compressed streams route tokens differently, so there are no paired inputs
for a regression. An expert that saw fewer tokens than its statistics' width has a rank-deficient moment
(the subspace is not determined by the data); it is fitted by plain SVD of its weight and reported.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from romcomp.compression.blocks import outputs_narrower, rounded
from romcomp.compression.stats import collect_expert_stats
from romcomp.hf.modeling_romcomp import LowRankExperts, low_rank_experts, swap_experts
from romcomp.methods import svd as plain_svd
from romcomp.methods.base import InputStats
from romcomp.methods.registry import Decompose, Method

STARVED = "fewer routed tokens than their statistics' width"
"""The note's wording, which the end-of-run summary counts."""


def expert_matrices(module: nn.Module, proj: str) -> torch.Tensor:
    """Every expert's ``proj`` weight as experts × d_out × d_in (a view), whatever the family's layout."""
    weight = getattr(module, proj).detach()
    return weight.transpose(1, 2) if module.is_transposed else weight


def expert_bias(module: nn.Module, proj: str, expert: int) -> torch.Tensor | None:
    return getattr(module, f"{proj}_bias").detach()[expert] if module.has_bias else None


def projection_shape(block: nn.Module, name: str) -> tuple[int, int, int, bool]:
    """``(experts, d_in, d_out, bias)`` of the fused projection ``name`` (relative to ``block``)."""
    owner, _, proj = name.rpartition(".")
    module = block.get_submodule(owner)
    n, rows, cols = getattr(module, proj).shape
    d_in, d_out = (rows, cols) if module.is_transposed else (cols, rows)
    return n, d_in, d_out, bool(module.has_bias)


def narrow(block: nn.Module, name: str) -> bool:
    """Accumulate outputs rather than inputs: the smaller moment (``down_proj``: hidden² < intermediate²)."""
    _, d_in, d_out, bias = projection_shape(block, name)
    return outputs_narrower(d_in, d_out, bias)


def fit_projection(
    block: nn.Module, name: str, pair: LowRankExperts, experts: range,
    stats: dict[tuple[str, int], InputStats], decompose: Decompose, data_free: bool,
    out_dtype: torch.dtype, label: str,
) -> list[str]:  # fmt: skip
    """Factor the ``experts`` of projection ``name`` at ``pair``'s rank from ``stats`` (consumed) into
    ``pair`` (each expert's factors written into it as they come, rounded to ``out_dtype`` as the output
    stores them: no second copy of a projection's factors), and return the notes. Directions a fit lacks
    stay zero: plain SVD of a weight with a bias has one fewer than ROM's augmented fit, and the experts
    of a projection share one stored rank."""
    owner, _, proj = name.rpartition(".")
    module = block.get_submodule(owner)
    dense = expert_matrices(module, proj)
    starved: list[str] = []
    notes: list[str] = []
    for e in experts:
        st = stats.pop((name, e), None)
        weight, b = dense[e], expert_bias(module, proj, e)
        if not data_free and (st is None or st.count < st.xtx.shape[0]):
            starved.append(f"{e} ({0 if st is None else st.count})")
            f = plain_svd.decompose(weight, b, None, pair.rank)
        else:
            f = decompose(weight, b, st, pair.rank)
        f.check_finite(f"{label}[expert {e}]")
        notes += [f"expert {e}: {x}" for x in f.notes]
        pair.down.data[e, : f.rank] = rounded(f.down, out_dtype)
        pair.up.data[e, :, : f.rank] = rounded(f.up, out_dtype)
        if f.bias is not None:
            getattr(module, f"{proj}_bias").data[e] = rounded(f.bias, out_dtype)
    if starved:
        notes.append(f"experts saw {STARVED}, fitted by plain SVD of the weight: {', '.join(starved)}")
    return [f"{label}: {x}" for x in notes]


def expert_passes(n: int, size: int | None) -> list[range]:
    """The experts of each statistics pass over ``n`` experts: all in one, or ``size`` at a time."""
    size = size or n
    return [range(lo, min(lo + size, n)) for lo in range(0, n, size)]


def fit_experts(
    block: nn.Module, names: list[str], ranks: dict[str, int], prefix: str,
    run: Callable[[dict], None], method: Method, out_dtype: torch.dtype, chunk: int | None = None,
) -> list[str]:  # fmt: skip
    """Collect every named projection's per-expert statistics with calibration passes (``run``, given
    the live statistics dict, runs the forwards) and fit them with ``method`` (from the outputs' moment
    where that side is narrower and the method has an output variant).

    ``chunk`` experts at a time (all by default): one pass per chunk, so only a chunk's moments are held
    (the memory plan's choice). The factors go into pairs swapped in after the last chunk: every pass sees
    the dense experts, and an expert's statistics depend on its own weights alone (the router and the
    layers before it are final), so any chunking gives the same factors."""
    wanted = [n for n in names if prefix + n in ranks]
    if not wanted:
        return []
    outputs = {n: narrow(block, n) and method.decompose_outputs is not None for n in wanted}
    pairs = {n: low_rank_experts(block, n, ranks[prefix + n]) for n in wanted}
    notes: list[str] = []
    for experts in expert_passes(projection_shape(block, wanted[0])[0], chunk):
        with collect_expert_stats(block, wanted, outputs.__getitem__, stop=True, experts=experts) as stats:
            run(stats)
        for name in wanted:
            decompose = method.decompose_outputs if outputs[name] else method.decompose
            notes += fit_projection(block, name, pairs[name], experts, stats, decompose, method.data_free,
                                    out_dtype, prefix + name)  # fmt: skip
    for name, pair in pairs.items():
        swap_experts(block, name, pair.rank, pair)
    return notes
