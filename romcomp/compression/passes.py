"""The compression pass: every block of the model, fitted and written for every output (one per ratio) in
lockstep, driven by :class:`~romcomp.compression.runner.Runner`.

A block counts as done only after its shard and every stream's next boundary are durable and each
manifest records it; input boundaries are deleted only after every manifest is saved, so a kill between
two manifests recomputes that block for all outputs (same bytes). The dense stream (the error-aware fit's
targets) lives in the first output's work directory.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from romcomp.compression import distributed
from romcomp.compression.activations import Boundary
from romcomp.compression.fit import (
    BlockTimes,
    FitContext,
    Variant,
    fit_block_experts,
    fit_error_aware,
    fit_local,
)
from romcomp.compression.memory import resident_bytes
from romcomp.compression.output import Manifest, OutputDir
from romcomp.compression.replay import replaying
from romcomp.compression.runner import Runner, Streams


@dataclass
class Target:
    """One output directory being written: its :class:`OutputDir`, manifest and rank map."""

    output: OutputDir
    manifest: Manifest
    ranks: dict[str, int]


def compress_block(ctx: FitContext, fit: str, index: int, base: nn.Module, variants: Sequence[Variant],
                   dense_source: Boundary | None = None, dense_sink: Boundary | None = None,
                   ) -> tuple[list[nn.Module], BlockTimes, list[list[str]]]:  # fmt: skip
    """Fit every stage of the loaded block ``base`` for each variant (one per ratio), then propagate: fill
    each variant's ``sink`` (and ``dense_sink``, the dense model's stream, for the error-aware fit)."""
    keep_base = fit == "error-aware"  # ``base`` stays dense for the dense stream; else the last variant's
    blocks = [copy.deepcopy(base) for _ in variants[: None if keep_base else -1]]
    blocks += [] if keep_base else [base]
    shape = variants[0].source.shape
    with replaying(blocks, ctx.io.arch, shape, ctx.work, ctx.in_ram) as replays:
        times, notes = _fit_and_propagate(
            replace(ctx, replays=replays), keep_base, index, base, blocks, variants, dense_source, dense_sink
        )
    return blocks, times, notes


def _fit_and_propagate(ctx: FitContext, keep_base: bool, index: int, base: nn.Module, blocks: list[nn.Module],
                       variants: Sequence[Variant], dense_source: Boundary | None,
                       dense_sink: Boundary | None) -> tuple[BlockTimes, list[list[str]]]:  # fmt: skip
    """:func:`compress_block`'s work, with the compressed copies' first sublayers replayed once fitted;
    ``keep_base``: the error-aware fit (``base`` stays dense and carries the dense stream)."""
    times = BlockTimes()
    if keep_base:
        notes, filled = fit_error_aware(ctx, index, base, blocks, variants, dense_source, dense_sink, times)
        if not filled:
            t0 = time.perf_counter()
            ctx.io.forward(index, base, dense_source, dense_sink)
            times.forward += time.perf_counter() - t0
    elif shares_statistics(ctx, variants):
        notes = fit_local(ctx, index, blocks, variants, times)
    else:
        notes = [fit_local(ctx, index, [b], [v], times)[0] for b, v in zip(blocks, variants, strict=True)]
    ctx.replays.arm_before(len(ctx.io.arch.groups), blocks)  # every linear is final
    for j, (block, v) in enumerate(zip(blocks, variants, strict=True)):
        notes[j] += fit_block_experts(ctx, index, block, v, times)
    t0 = time.perf_counter()
    for block, v in zip(blocks, variants, strict=True):
        if keep_base or ctx.calib_stream == "compressed":
            ctx.io.forward(index, block, v.source, v.sink)
    times.forward += time.perf_counter() - t0
    return times, notes


def shares_statistics(ctx: FitContext, variants: Sequence[Variant]) -> bool:
    """Whether every ratio's linears see the same inputs: the dense stream in one stage (each ratio's
    stream is then the dense model's, the same bytes), so statistics can be collected once."""
    return len(variants) > 1 and ctx.calib_stream == "dense" and len(ctx.stages()) == 1


@dataclass
class CompressPass:
    """The runner's work for the compression pass over ``targets`` (one per ratio)."""

    ctx: FitContext
    fit: str
    targets: Sequence[Target]
    times: dict[int, BlockTimes] = field(default_factory=dict)
    label: str = "blocks"
    _block: tuple[BlockTimes, list[list[str]]] | None = None
    _traffic: distributed.Traffic = field(default_factory=distributed.Traffic)  # at the block's start

    def streams(self, boundary: int) -> dict[str, Path]:
        paths = {f"out{j}": t.output.acts_path(boundary) for j, t in enumerate(self.targets)}
        if self.fit == "error-aware":
            paths["dense"] = self.targets[0].output.acts_path(boundary, "dense")
        return paths

    def sources(self, index: int) -> dict[str, Path]:
        return self.streams(index)

    def sinks(self, index: int) -> dict[str, Path]:
        return self.streams(index + 1)

    def process(self, index: int, block: nn.Module, sources: Streams, sinks: Streams) -> None:
        self._traffic = replace(distributed.current().traffic)
        variants = [
            Variant(t.ranks, sources[f"out{j}"], sinks[f"out{j}"]) for j, t in enumerate(self.targets)
        ]
        blocks, bt, notes = compress_block(
            self.ctx, self.fit, index, block, variants, sources.get("dense"), sinks.get("dense")
        )
        t0 = time.perf_counter()
        for t, b in zip(self.targets, blocks, strict=True):
            t.output.write_shard(index, self.ctx.io.block_tensors(index, b))
        bt.write = time.perf_counter() - t0
        self._block = (bt, notes)

    def finish(self, index: int, sources: Streams) -> None:
        bt, notes = self._block
        self._block = None
        bt.rss, rss_anon = resident_bytes()
        for t, block_notes in zip(self.targets, notes, strict=True):
            if index in t.manifest.blocks_done:
                continue  # recomputed after a kill between two manifests: same bytes, already recorded
            t.manifest.blocks_done.append(index)
            if block_notes:
                t.manifest.notes[str(index)] = block_notes
            t.manifest.block_times[str(index)] = {
                "forward": round(bt.forward, 3), "decompose": round(bt.decompose, 3),
                "write": round(bt.write, 3), "rss": bt.rss, "rss_anon": rss_anon, **self._comm(),
            }  # fmt: skip
            t.output.save_manifest(t.manifest)
        distributed.current().barrier()  # recorded before any rank drops the block's inputs
        for b in sources.values():
            os.remove(b.path)
        self.times[index] = bt

    def _comm(self) -> dict[str, float]:
        """Distributed: the block's collectives — seconds, bytes all-reduced and broadcast."""
        world = distributed.current()
        if not world.active:
            return {}
        sent = world.traffic.since(self._traffic)
        return {**sent, "comm": round(sent["comm"], 3)}


def compress_blocks(ctx: FitContext, fit: str, targets: Sequence[Target], windows: torch.Tensor, in_ram: bool,
                    n_blocks: int, progress: bool) -> dict[int, BlockTimes]:  # fmt: skip
    """The compression pass over the blocks no manifest records as done yet; returns their times."""
    ctx = replace(ctx, work=targets[0].output.work, in_ram=in_ram)  # the dense taps' scratch
    work = CompressPass(ctx, fit, targets)
    first = min(min(set(range(n_blocks)) - set(t.manifest.blocks_done), default=n_blocks) for t in targets)
    if first < n_blocks:
        runner = Runner(ctx.io, ctx.io.stream_shape(windows), in_ram, progress)
        carry = runner.start(windows, work.sources(first), fresh=first == 0)
        runner.run(work, range(first, n_blocks), carry, total=n_blocks, done=first)
    return work.times
