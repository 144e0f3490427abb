"""Fit strategies: collect the statistics a block's linears need, compute each linear's factors with the
run's method, and swap them in — one stage (a set of linear groups) at a time.

Three strategies share one fitting loop (:func:`fit_stage`) and one apply step (:func:`apply`):

- **local** (:func:`fit_local`): each linear fits its own outputs on the inputs it sees (the compressed
  stream's, or the dense model's with ``calib_stream='dense'``);
- **error-aware** (:func:`fit_error_aware`): each linear regresses the dense block's outputs on the
  compressed block's inputs (two streams, paired statistics);
- **experts** (:func:`fit_block_experts`): fused MoE projections, expert by expert, after the linears.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from romcomp.compression.activations import Boundary
from romcomp.compression.blocks import BlockIO, Tee, emit, narrower_at_output, rounded
from romcomp.compression.experts import fit_experts
from romcomp.compression.stats import CrossCollector, collect_input_stats, collect_output_stats
from romcomp.hf.modeling_romcomp import swap_linear
from romcomp.methods import Decompose, Factors, GradStats, Method
from romcomp.model.discovery import StopForward

Group = tuple[str, ...]
StatsFor = Callable[[Group, str], tuple[Any, Decompose]]
"""``(group, linear name) -> (statistics, decompose function)`` for one variant of a stage."""


@dataclass
class BlockTimes:
    forward: float = 0.0  # calibration forwards + statistics accumulation
    decompose: float = 0.0
    write: float = 0.0
    rss: int = 0  # process RSS after the block was freed: flat across blocks when memory is bounded


@dataclass
class Variant:
    """One output of a run (one ratio): its rank map and its compressed activation stream."""

    ranks: dict[str, int]
    source: Boundary | None = None
    sink: Boundary | None = None


@dataclass
class FitContext:
    """What every fit needs from the run: block I/O, the method and its options, the stage layout."""

    io: BlockIO
    method: Method
    options: dict[str, float] = field(default_factory=dict)
    sequential: bool = True
    calib_stream: str = "compressed"
    gradients: Mapping[str, torch.Tensor] | None = None  # the streamed gradient pass's (read lazily)

    def stages(self) -> list[list[Group]]:
        """Linear groups fitted together: one at a time (each sees its predecessors compressed) or all."""
        groups = self.io.arch.groups
        return [[g] for g in groups] if self.sequential else [list(groups)]

    def by_output(self, block: nn.Module, group: Group) -> bool:
        """Accumulate output moments for a one-linear group when that is the smaller covariance and the
        method can use it (:func:`~romcomp.compression.blocks.narrower_at_output`)."""
        if self.method.decompose_outputs is None or len(group) != 1:
            return False
        return narrower_at_output(block.get_submodule(group[0]))


def factor(
    ctx: FitContext, linear: nn.Linear, full: str, stats: Any, decompose: Decompose, rank: int
) -> Factors:
    """One linear's factors; a gradient method reads the loss's sensitivities instead of ``stats``."""
    if ctx.method.gradients is not None:
        stats = GradStats(ctx.gradients[f"{full}.fisher_in"], ctx.gradients.get(f"{full}.grad"))
    bias = None if linear.bias is None else linear.bias.data
    factors = decompose(linear.weight.data, bias, stats, rank, **ctx.options)
    factors.check_finite(full)
    return factors


def apply(block: nn.Module, name: str, factors: Factors, out_dtype: torch.dtype) -> None:
    """Replace linear ``name`` of ``block`` by its factors, rounded to the output dtype."""
    pair = swap_linear(block, name, factors.rank)
    pair.down.weight.data = rounded(factors.down, out_dtype)
    pair.up.weight.data = rounded(factors.up, out_dtype)
    if factors.bias is not None:
        pair.up.bias.data = rounded(factors.bias, out_dtype)


@dataclass
class StageTarget:
    """One variant's block in a stage: where its factors go and where its statistics come from."""

    block: nn.Module
    ranks: dict[str, int]
    statistics: StatsFor
    release: Callable[[Group], None] = lambda _group: None  # the group's memoized roots are done with


def fit_stage(ctx: FitContext, prefix: str, stage: Sequence[Group], dense: nn.Module,
              targets: Sequence[StageTarget]) -> list[list[str]]:  # fmt: skip
    """Factor every linear of ``stage`` that a target's rank map names — the *dense* linear of ``dense``
    (the same weight for every variant) — and apply the factors to that target's block; returns the
    notes per target. Group by group, variant by variant, so one variant's memoized roots are live at a
    time."""
    notes: list[list[str]] = [[] for _ in targets]
    for group in stage:
        linears = {name: dense.get_submodule(name) for name in group}  # before any variant swaps them
        for j, target in enumerate(targets):
            for name in group:
                full = prefix + name
                if full in target.ranks:
                    stats, decompose = target.statistics(group, name)
                    f = factor(ctx, linears[name], full, stats, decompose, target.ranks[full])
                    apply(target.block, name, f, ctx.io.out_dtype)
                    notes[j] += [f"{full}: {n}" for n in f.notes]
            target.release(group)
    return notes


def fit_local(ctx: FitContext, index: int, blocks: list[nn.Module], variants: Sequence[Variant],
              times: BlockTimes) -> list[list[str]]:  # fmt: skip
    """Each linear is fitted to its own outputs on the inputs ``blocks[0]`` sees (``variants[0]``'s stream;
    with ``calib_stream='dense'`` the dense model's, whose outputs then go to every sink right away).

    Several variants share one set of statistics only when they see the same inputs (the dense stream in
    one stage): one forward serves every ratio and each dense weight is decomposed at every ratio's rank,
    so a method's rank-independent work (SVD-LLM's inverse and SVD) is done once."""
    notes: list[list[str]] = [[] for _ in variants]
    prefix = ctx.io.arch.block_prefix(index)
    for n_stage, stage in enumerate(ctx.stages()):
        t0 = time.perf_counter()
        by_output = [g for g in stage if ctx.by_output(blocks[0], g)]
        by_input = [g for g in stage if g not in by_output]
        with (
            collect_input_stats(blocks[0], by_input) as stats,
            collect_output_stats(blocks[0], [g[0] for g in by_output]) as out_stats,
        ):
            dense_outputs = ctx.calib_stream == "dense" and n_stage == 0
            sinks = Tee([v.sink for v in variants]) if dense_outputs else None
            ctx.io.forward(index, blocks[0], variants[0].source, sinks)
        times.forward += time.perf_counter() - t0
        t0 = time.perf_counter()
        targets = _local_targets(ctx, blocks, variants, by_output, stats, out_stats)
        for j, extra in enumerate(fit_stage(ctx, prefix, stage, blocks[0], targets)):
            notes[j] += extra
        del stats, out_stats  # covariances are not needed by the compressed forward below
        times.decompose += time.perf_counter() - t0
    return notes


def fit_error_aware(ctx: FitContext, index: int, dense: nn.Module, blocks: list[nn.Module],
                    variants: Sequence[Variant], dense_source: Boundary, dense_sink: Boundary | None,
                    times: BlockTimes) -> tuple[list[list[str]], bool]:  # fmt: skip
    """Each stage's linears regress the dense block's outputs on the compressed block's inputs.

    Collect runs the dense block on the dense stream once per batch, shared by every variant, and each
    compressed copy on its own stream; all stop at the stage's last leader, except the dense forward of
    the last stage, which runs on and fills ``dense_sink`` (one dense forward saved). Returns the notes
    and whether ``dense_sink`` was filled."""
    prefix = ctx.io.arch.block_prefix(index)
    notes: list[list[str]] = [[] for _ in variants]
    stages = ctx.stages()
    filled = False
    for n_stage, stage in enumerate(stages):
        names = [prefix + name for group in stage for name in group]
        active = [j for j, v in enumerate(variants) if any(n in v.ranks for n in names)]
        if not active:
            continue  # the whole stage stays dense in every variant: nothing to fit
        t0 = time.perf_counter()
        last = n_stage == len(stages) - 1
        leaders = [g[0] for g in stage]
        collector = CrossCollector(
            dense, [blocks[j] for j in active], leaders, stop=True, stop_dense=not last
        )
        try:
            sink = dense_sink if last else None
            paired_forward(
                ctx.io, index, dense, dense_source, sink, [(blocks[j], variants[j].source) for j in active]
            )
            filled = sink is not None
        finally:
            collector.close()
        times.forward += time.perf_counter() - t0
        t0 = time.perf_counter()
        targets = [
            _cross_target(ctx, blocks[j], variants[j].ranks, st)
            for st, j in zip(collector.stats, active, strict=True)
        ]
        for j, extra in zip(active, fit_stage(ctx, prefix, stage, dense, targets), strict=True):
            notes[j] += extra
        del collector, targets
        times.decompose += time.perf_counter() - t0
    return notes, filled


def _local_targets(ctx: FitContext, blocks: list[nn.Module], variants: Sequence[Variant],
                   by_output: list[Group], stats: dict, out_stats: dict) -> list[StageTarget]:  # fmt: skip
    """Every variant reads the same statistics; the last one releases a group's memoized roots (SVD-LLM's
    inverse and SVD serve every ratio before that)."""

    def statistics(group: Group, name: str) -> tuple[Any, Decompose]:
        if group in by_output:
            return out_stats[name], ctx.method.decompose_outputs
        return stats[group[0]], ctx.method.decompose

    def release(group: Group) -> None:
        if group[0] in stats:
            stats[group[0]].derived.clear()

    targets = [StageTarget(b, v.ranks, statistics) for b, v in zip(blocks, variants, strict=True)]
    targets[-1].release = release
    return targets


def _cross_target(ctx: FitContext, block: nn.Module, ranks: dict[str, int], stats: dict) -> StageTarget:
    decompose = ctx.method.decompose_cross

    def release(group: Group) -> None:
        stats[group[0]].hat.derived.clear()

    return StageTarget(block, ranks, lambda group, _name: (stats[group[0]], decompose), release)


def paired_forward(
    io: BlockIO, index: int, dense: nn.Module, dense_source: Boundary, dense_sink: Boundary | None,
    compressed: list[tuple[nn.Module, Boundary]],
) -> None:  # fmt: skip
    """Per batch: the dense forward (to ``dense_sink`` when it runs to the end), then each compressed
    one; hooks pair their inputs and may stop a forward early."""
    with io.calibration_mode():
        for start, stop in io.batches(dense_source.shape[0]):
            for module, stream in [(dense, dense_source), *compressed]:
                try:
                    out = io.call_block(module, index, stream.read(start, stop))
                except StopForward:
                    continue
                if module is dense and dense_sink is not None:
                    emit(out, dense_sink, start, stop)


def fit_block_experts(
    ctx: FitContext, index: int, block: nn.Module, variant: Variant, times: BlockTimes
) -> list[str]:
    """The block's fused MoE expert projections, after its linears: per-expert statistics over the routed
    tokens of one more forward of the compressed block (stopped after the experts), local fit (see
    :mod:`romcomp.compression.experts`)."""
    if not ctx.io.arch.experts:
        return []
    clock = {"forward": 0.0}

    def run(_stats: dict) -> None:
        t0 = time.perf_counter()
        ctx.io.forward_until_stopped(index, block, variant.source)
        clock["forward"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    notes = fit_experts(block, list(ctx.io.arch.experts), variant.ranks, ctx.io.arch.block_prefix(index),
                        run, ctx.method, ctx.io.out_dtype)  # fmt: skip
    times.forward += clock["forward"]
    times.decompose += time.perf_counter() - t0 - clock["forward"]
    return notes
