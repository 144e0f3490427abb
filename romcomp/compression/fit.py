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

import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from romcomp.compression import distributed
from romcomp.compression.activations import Boundary, Scratch
from romcomp.compression.blocks import BlockIO, Tee, emit, narrower_at_output, rounded
from romcomp.compression.experts import fit_experts
from romcomp.compression.replay import Replays
from romcomp.compression.stats import (
    CrossCollector,
    collect_input_stats,
    collect_output_stats,
    tap,
    tap_width,
)
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
    work: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))  # scratch files (DenseTaps)
    in_ram: bool = True  # the memory plan keeps activations (and the dense taps) in RAM
    cross_outputs: bool = False  # the error-aware fit pairs narrow linears' outputs (memory fallback)
    replays: Replays | None = None  # the block's compressed copies' first sublayers, replayed once fitted
    expert_chunk: int | None = None  # MoE experts whose moments one statistics pass holds (None: all)

    def arm_replays(self, stage: Sequence[Group], blocks: list[nn.Module]) -> None:
        """Before ``stage``'s forwards: replay the first sublayer of ``blocks`` if it is final by now."""
        if self.replays is not None:
            self.replays.arm_before(self.io.arch.groups.index(stage[0]), blocks)

    def stages(self) -> list[list[Group]]:
        """Linear groups fitted together: one at a time (each sees its predecessors compressed) or all."""
        groups = self.io.arch.groups
        return [[g] for g in groups] if self.sequential else [list(groups)]

    def by_output(self, block: nn.Module, group: Group, cross: bool = False) -> bool:
        """Accumulate output moments for a one-linear group when that is the smaller covariance and the
        method can use it (:func:`~romcomp.compression.blocks.narrower_at_output`): in the local fit, and
        in the error-aware (``cross``) fit only when the memory plan asked for it (``cross_outputs``: the
        regression's d_in² moments are what does not fit; it costs quality, see
        :func:`romcomp.methods.error_aware.decompose_outputs`)."""
        decompose = self.method.decompose_cross_outputs if cross else self.method.decompose_outputs
        if decompose is None or len(group) != 1 or (cross and not self.cross_outputs):
            return False
        return narrower_at_output(block.get_submodule(group[0]))

    def dense_outputs(self, block: nn.Module, group: Group) -> bool:
        """In the error-aware fit, pair a narrow linear's *dense outputs* with its compressed inputs (the
        same regression from a d_out × d_in cross moment, :class:`~romcomp.methods.base.CrossStats`),
        unless it is fitted from outputs on both sides (``cross_outputs``) or the forwards run under
        bfloat16 autocast (the outputs would then come from rounded weights, not ``W``)."""
        if len(group) != 1 or self.cross_outputs or self.io.compute_dtype != torch.float32:
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
    time. Distributed, each linear is factored by one rank (``World.owner``) and broadcast to the others
    once its group is done."""
    world = distributed.current()
    notes: list[list[str]] = [[] for _ in targets]
    for group in stage:
        linears = {name: dense.get_submodule(name) for name in group}  # before any variant swaps them
        done: list[tuple[int, str, Factors | None]] = []
        for batch in _order(group, targets):
            for j, name in batch:
                full = prefix + name
                if full in targets[j].ranks:
                    f = None
                    if world.owner(ctx.io.arch.linears, name) == world.rank:
                        stats, decompose = targets[j].statistics(group, name)
                        f = factor(ctx, linears[name], full, stats, decompose, targets[j].ranks[full])
                    done.append((j, name, f))
                    if not world.active:  # applied at once: no second copy of the factors is held
                        _apply(ctx, targets[j].block, prefix, name, done.pop()[2], notes[j])
            for j in dict.fromkeys(j for j, _ in batch):
                targets[j].release(group)
        while done:  # distributed: the group's factors, each from the rank that computed it
            j, name, f = done.pop(0)
            f = world.broadcast_factors(f, world.owner(ctx.io.arch.linears, name))
            _apply(ctx, targets[j].block, prefix, name, f, notes[j])
    return notes


def _order(group: Group, targets: Sequence[StageTarget]) -> list[list[tuple[int, str]]]:
    """Batches of (target, linear) in the order they are factored, each target's memoized roots released
    after its batch: variant by variant (one variant's roots live at a time), or — when every variant
    reads the same statistics — linear by linear, so consecutive calls factor the same weight (SVD-LLM's
    rank-independent SVD, held for one weight at a time, then serves every ratio)."""
    if len(targets) > 1 and all(t.statistics is targets[0].statistics for t in targets):
        return [[(j, name) for name in group for j in range(len(targets))]]
    return [[(j, name) for name in group] for j in range(len(targets))]


def _apply(ctx: FitContext, block: nn.Module, prefix: str, name: str, f: Factors, notes: list[str]) -> None:
    apply(block, name, f, ctx.io.out_dtype)
    notes += [f"{prefix}{name}: {n}" for n in f.notes]


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
            if ctx.calib_stream == "dense" and n_stage == 0:  # its outputs are every variant's next inputs
                ctx.io.forward(index, blocks[0], variants[0].source, Tee([v.sink for v in variants]))
            else:  # only the statistics are wanted: stop once the stage's last leader has been seen
                ctx.arm_replays(stage, blocks[:1])
                last = stage[-1]
                handle = tap(blocks[0].get_submodule(last[0]), _stop, last in by_output)
                try:
                    ctx.io.forward_until_stopped(index, blocks[0], variants[0].source)
                finally:
                    handle.remove()
        distributed.current().reduce_stats(stats, out_stats)
        times.forward += time.perf_counter() - t0
        t0 = time.perf_counter()
        targets = _local_targets(ctx, blocks, variants, by_output, stats, out_stats)
        for j, extra in enumerate(fit_stage(ctx, prefix, stage, blocks[0], targets)):
            notes[j] += extra
        del stats, out_stats  # covariances are not needed by the compressed forward below
        times.decompose += time.perf_counter() - t0
    return notes


def _stop(*_args) -> None:
    """A hook that ends the forward (registered after the statistics hooks, so they run first)."""
    raise StopForward


def fit_error_aware(ctx: FitContext, index: int, dense: nn.Module, blocks: list[nn.Module],
                    variants: Sequence[Variant], dense_source: Boundary, dense_sink: Boundary | None,
                    times: BlockTimes) -> tuple[list[list[str]], bool]:  # fmt: skip
    """Each stage's linears regress the dense block's outputs on the compressed block's inputs.

    The dense block runs once, to the end (filling ``dense_sink``), and its values at every leader
    of the stages to fit are stored (:class:`DenseTaps`); then, stage by stage, each compressed copy runs
    on its own stream up to the stage's last leader and pairs its values with the stored ones. Returns
    the notes and whether ``dense_sink`` was filled (not when no stage has anything to fit)."""
    prefix = ctx.io.arch.block_prefix(index)
    notes: list[list[str]] = [[] for _ in variants]
    todo = []
    for stage in ctx.stages():
        names = [prefix + name for group in stage for name in group]
        active = [j for j, v in enumerate(variants) if any(n in v.ranks for n in names)]
        if active:  # else the whole stage stays dense in every variant: nothing to fit
            outputs = {g[0] for g in stage if ctx.by_output(dense, g, cross=True)}
            todo.append((stage, active, outputs, {g[0] for g in stage if ctx.dense_outputs(dense, g)}))
    if not todo:
        return notes, False
    t0 = time.perf_counter()
    leaders = [g[0] for stage, *_ in todo for g in stage]
    taps = DenseTaps.record(
        ctx, index, dense, dense_source, dense_sink, leaders, set().union(*(o | y for *_, o, y in todo))
    )
    times.forward += time.perf_counter() - t0
    try:
        for stage, active, outputs, dense_outputs in todo:
            t0 = time.perf_counter()
            ctx.arm_replays(stage, [blocks[j] for j in active])
            collector = CrossCollector(
                [blocks[j] for j in active], [g[0] for g in stage], True, outputs, dense_outputs
            )
            try:
                paired_forward(
                    ctx.io, index, taps, collector, [(blocks[j], variants[j].source) for j in active]
                )
            finally:
                collector.close()
            distributed.current().reduce_stats(*collector.stats)
            times.forward += time.perf_counter() - t0
            t0 = time.perf_counter()
            targets = [
                _cross_target(ctx, blocks[j], variants[j].ranks, st, outputs)
                for st, j in zip(collector.stats, active, strict=True)
            ]
            for j, extra in zip(active, fit_stage(ctx, prefix, stage, dense, targets), strict=True):
                notes[j] += extra
            del collector, targets
            times.decompose += time.perf_counter() - t0
    finally:
        taps.close()
    return notes, True


@dataclass
class DenseTaps:
    """The dense block's values at the leaders the error-aware fit pairs (inputs, or outputs for a
    linear narrower at its output), from one dense forward of the block: a stage then runs only the
    compressed copies (the dense partial forwards of every stage, ~0.6 of a block forward, are saved).
    Held like the activation stream: in memory when the plan keeps activations in RAM, else in scratch
    files of the work directory (page cache)."""

    values: dict[str, Scratch]

    @classmethod
    def record(cls, ctx: FitContext, index: int, dense: nn.Module, source: Boundary,
               sink: Boundary | None, leaders: Sequence[str], outputs: set[str]) -> DenseTaps:  # fmt: skip
        n, seq = source.shape[:2]
        taps = cls({
            name: Scratch.create(ctx.work / f"tap-{name}.bin", (n, seq, tap_width(dense, name, outputs)),
                                 ctx.in_ram)
            for name in leaders
        })  # fmt: skip
        at = [0]

        def store(name: str, side: bool) -> Callable:
            def hook(_m: nn.Module, args: tuple, *out) -> None:
                value = (out[0] if side else args[0]).detach()
                taps.values[name].write(at[0], value.reshape(-1, seq, value.shape[-1]))

            return hook

        handles = [tap(dense.get_submodule(n), store(n, n in outputs), n in outputs) for n in leaders]
        try:
            with ctx.io.calibration_mode():
                for start, stop in ctx.io.batches(n):
                    at[0] = start
                    emit(ctx.io.call_block(dense, index, source.read(start, stop)), sink, start, stop)
        except BaseException:
            taps.close()
            raise
        finally:
            for h in handles:
                h.remove()
        return taps

    def read(self, start: int, stop: int, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {name: self.values[name].read(start, stop) for name in names}

    def close(self) -> None:
        for v in self.values.values():
            v.close()


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


def _cross_target(ctx: FitContext, block: nn.Module, ranks: dict[str, int], stats: dict,
                  outputs: set[str]) -> StageTarget:  # fmt: skip
    """The error-aware fit's statistics: paired inputs, or paired outputs for the leaders in ``outputs``."""

    def statistics(group: Group, _name: str) -> tuple[Any, Decompose]:
        by_output = group[0] in outputs
        return stats[group[0]], (
            ctx.method.decompose_cross_outputs if by_output else ctx.method.decompose_cross
        )

    def release(group: Group) -> None:
        stats[group[0]].hat.derived.clear()

    return StageTarget(block, ranks, statistics, release)


def paired_forward(io: BlockIO, index: int, taps: DenseTaps, collector: CrossCollector,
                   compressed: list[tuple[nn.Module, Boundary]]) -> None:  # fmt: skip
    """Per batch: the stored dense values to ``collector``, then each compressed forward (its hooks pair
    and may stop it early)."""
    with io.calibration_mode():
        for start, stop in io.batches(compressed[0][1].shape[0]):
            collector.pending = taps.read(start, stop, collector.stats[0])
            for module, stream in compressed:
                try:
                    io.call_block(module, index, stream.read(start, stop))
                except StopForward:
                    continue


def fit_block_experts(
    ctx: FitContext, index: int, block: nn.Module, variant: Variant, times: BlockTimes
) -> list[str]:
    """The block's fused MoE expert projections, after its linears: per-expert statistics over the routed
    tokens of more forwards of the compressed block (stopped after the experts; one per chunk of
    ``ctx.expert_chunk`` experts), local fit (see
    :mod:`romcomp.compression.experts`)."""
    if not ctx.io.arch.experts:
        return []
    clock = {"forward": 0.0}

    def run(_stats: dict) -> None:
        t0 = time.perf_counter()
        ctx.io.forward_until_stopped(index, block, variant.source)
        clock["forward"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    notes = fit_experts(block, list(ctx.io.arch.experts), variant.ranks, ctx.io.arch.block_prefix(index),
                        run, ctx.method, ctx.io.out_dtype, ctx.expert_chunk)  # fmt: skip
    times.forward += clock["forward"]
    times.decompose += time.perf_counter() - t0 - clock["forward"]
    return notes
