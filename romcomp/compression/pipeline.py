"""The whole compression run: prepare, choose ranks (a dense pre-pass where the allocation needs one),
the gradient pass where the method needs one, the compression pass, then each output finalized.

:func:`dry_run` stops after preparing: the :class:`~romcomp.compression.estimate.RunPlan` (memory plan,
configuration, time estimate) a real run announces before its first pass (``run_spec(announce=...)``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import torch

from romcomp.compression import distributed
from romcomp.compression.allocation import (
    allocate_asvd,
    allocate_auto,
    allocate_last_n,
    allocate_uniform,
    allocate_v2,
)
from romcomp.compression.blocks import BlockIO, outputs_narrower
from romcomp.compression.config import RunSpec
from romcomp.compression.estimate import LinearCost, RunModel, RunPlan, estimate_time, probe
from romcomp.compression.fit import BlockTimes, FitContext
from romcomp.compression.gradients import gradient_pass
from romcomp.compression.memory import peak_rss
from romcomp.compression.output import Manifest, OutputDir, WorkerDir, check_out_dir
from romcomp.compression.passes import Target, compress_blocks
from romcomp.compression.prepare import Prepared, prepare, unfactorized_weights
from romcomp.compression.ranks import linear_params
from romcomp.compression.record import new_manifest, output_config
from romcomp.compression.result import CompressResult
from romcomp.compression.runner import RunClock, whole_run
from romcomp.errors import BadInputError, RomcompError
from romcomp.model.checkpoint import LazyCheckpoint
from romcomp.model.shell import is_encoder

DATA_DRIVEN = {"auto": allocate_auto, "v2": allocate_v2, "asvd": allocate_asvd}
"""Allocations that need the dense pre-pass's spectra (``asvd``: its sensitivities too)."""


def run_spec(spec: RunSpec, announce: Callable[[RunPlan], None] | None = None) -> list[CompressResult]:
    """Every ratio of ``spec`` in one pass: one output directory per ratio, sharing the dense pre-pass,
    each block's load and the dense activation stream (the error-aware fit's targets).

    ``announce`` receives the run's plan with its time estimate once the outputs are opened (a refusal
    there comes first), before the first pass; the estimate (a probe of block 0, seconds) is made when it
    is announced or a progress bar shows the whole run's ETA.

    Launched by ``torchrun`` as one of several processes, the run is data-parallel
    (:mod:`romcomp.compression.distributed`): rank 0 announces, shows progress, writes the outputs and
    returns their records; the other ranks return an empty list."""
    with distributed.session() as world:
        if not world.writer:
            spec, announce = replace(spec, progress=False), None
        return _run(spec, announce, world)


def _run(spec: RunSpec, announce: Callable[[RunPlan], None] | None,
         world: distributed.World) -> list[CompressResult]:  # fmt: skip
    t_start = time.perf_counter()
    if world.writer:
        for path in spec.out_paths():
            check_out_dir(path, spec.overwrite)
    p = prepare(spec, streams=streams(spec))
    targets: list[Target] = []
    try:
        open_targets(p, targets)
        with whole_run(run_clock(p, announce)):
            io = block_io(p, out_dtype=source_dtype(p))
            if any(not t.ranks for t in targets):
                data_driven_ranks(p, targets, io)
            gradients = None
            if p.spec.method.gradients is not None:
                gradients = gradient_pass(io, targets[0].output.work, p.windows, p.n_blocks,
                                          p.spec.progress, p.spec.method.gradients == "full")  # fmt: skip
            ctx = FitContext(io, p.spec.method, dict(p.spec.options), p.spec.sequential,
                             p.spec.calib_stream, gradients, cross_outputs=p.spec.narrow_outputs,
                             expert_chunk=p.mem.expert_chunk)  # fmt: skip
            resumed = [len(t.manifest.blocks_done) for t in targets]
            times = compress_blocks(ctx, p.spec.fit, targets, world.shard(p.windows),
                                    p.mem.activations_in_ram, p.n_blocks, p.spec.progress)  # fmt: skip
            if not world.writer:
                for t in targets:
                    t.output.remove()
            world.barrier()  # every rank done (and cleaned up) before the outputs look complete
            if world.writer:
                finalize(p, targets, io)
    finally:
        for t in targets:
            t.output.close()
    if not world.writer:
        return []
    cost = (time.perf_counter() - t_start, peak_rss(), unfactorized_weights(p.shell, p.arch))
    return [result(p, t, r, n, times, *cost) for t, r, n in zip(targets, p.spec.ratios, resumed, strict=True)]


def run_clock(p: Prepared, announce: Callable[[RunPlan], None] | None) -> RunClock | None:
    """Plan the run, announce the plan, and start the whole run's clock from its estimate; nothing (no
    probe) when neither an announcement nor a progress bar would show it."""
    if announce is None and not p.spec.progress:
        return None
    planned = plan_run(p)
    if announce is not None:
        announce(planned)
    return RunClock(planned.time.seconds())


def streams(spec: RunSpec) -> int:
    """Activation streams a run keeps: one compressed per ratio, plus the dense one (error-aware fit)."""
    return len(spec.ratios) + int(spec.fit == "error-aware")


def dry_run(spec: RunSpec) -> RunPlan | None:
    """``--dry-run``: check the outputs and prepare (model resolved, headers verified, memory planned,
    calibration tokenized), probe block 0 for the time estimate, and return the plan; nothing is written
    and no pass runs. A budget too small is refused here, as a real run would be. Under ``torchrun`` the
    plan is one rank's (its share of the windows), returned on rank 0 (None on the others)."""
    with distributed.session() as world:
        if world.writer:
            for path in spec.out_paths():
                check_out_dir(path, spec.overwrite)
        p = prepare(spec, streams=streams(spec))
        return plan_run(p) if world.writer else None


def plan_run(p: Prepared) -> RunPlan:
    """The plan of the prepared run ``p`` with its time estimate (block 0 probed: seconds)."""
    spec, world = p.spec, distributed.current()
    estimate = estimate_time(run_model(p), probe(block_io(p, source_dtype(p)), p.windows))
    return RunPlan(
        source=p.source.description, calibration=p.calib_desc, method=spec.method.name, fit=spec.fit,
        allocation=spec.allocation_name, ratios=spec.ratios, calib_stream=spec.calib_stream,
        n_blocks=p.n_blocks, n_samples=world.largest_shard(spec.n_samples), mem=p.mem,
        budget_given=spec.budget is not None,
        outputs=tuple(spec.out_paths()), time=estimate, fallback=spec.fallback, workers=world.size,
    )  # fmt: skip


def run_model(p: Prepared) -> RunModel:
    """What the time estimate needs to know about the run ``p``: sizes, passes, fit, block linears (and
    one rank's share of the windows, in a distributed run)."""
    spec, world = p.spec, distributed.current()
    prefix = p.arch.block_prefix(0)
    alone = {prefix + g[0] for g in p.arch.groups if len(g) == 1}
    linears = tuple(
        LinearCost(s.d_in, s.d_out, s.count, s.name in alone and outputs_narrower(s.d_in, s.d_out, s.bias))
        for s in p.shapes
        if s.name.startswith(prefix)
    )
    fixed = [fixed_ranks(p, ratio) for ratio in spec.ratios]
    share = 1.0 if fixed[0] is None else len(fixed[0]) / len(p.shapes)
    return RunModel(
        n_blocks=p.n_blocks, windows=world.largest_shard(spec.n_samples), seq_len=spec.seq_len,
        linears=linears, fit=spec.fit,
        n_ratios=len(spec.ratios), calib_stream=spec.calib_stream,
        stages=len(p.arch.groups) if spec.sequential else 1, profile=fixed[0] is None,
        prepass_windows=None if spec.prepass_samples is None else world.largest_shard(spec.prepass_samples),
        sensitivity=fixed[0] is None and spec.allocation == "asvd",
        gradients=spec.method.gradients is not None, output_stats=spec.method.decompose_outputs is not None,
        cross_outputs=spec.narrow_outputs, compressed=share,
    )  # fmt: skip


def source_dtype(p: Prepared) -> torch.dtype:
    """The checkpoint's dtype (of the first block linear): factors and shards are rounded to it."""
    return p.ckpt.get(f"{p.arch.block_prefix(0)}{p.arch.linears[0]}.weight").dtype


def block_io(p: Prepared, out_dtype: torch.dtype = torch.float32) -> BlockIO:
    """Block I/O over ``p``'s shell and checkpoint, batched as the memory plan says."""
    return BlockIO(p.shell, p.arch, p.ckpt, p.mem.batch_size, out_dtype, getattr(torch, p.spec.compute_dtype))


def open_targets(p: Prepared, targets: list[Target]) -> None:
    """One output directory per ratio, opened (or reopened to resume) with its manifest and rank map,
    appended to ``targets`` as it is opened (the caller closes them all, also after a refusal).

    Distributed, rank 0 opens the outputs and hands every other rank the manifests (or its refusal);
    those keep their boundaries in work directories of their own (:class:`WorkerDir`)."""
    world = distributed.current()
    fixed = [fixed_ranks(p, ratio) for ratio in p.spec.ratios]  # None: chosen after the dense pre-pass
    news = [new_manifest(p.spec, ratio, p.mem, p.calib_desc, p.source, ranks)
            for ratio, ranks in zip(p.spec.ratios, fixed, strict=True)]  # fmt: skip
    opened: list[tuple[Manifest, bool]] | RomcompError = []
    if world.writer:
        try:
            for new, path, ranks in zip(news, p.spec.out_paths(), fixed, strict=True):
                output = OutputDir(path, p.n_blocks)
                targets.append(Target(output, None, {}))  # closed by the caller if the next line refuses
                manifest = output.open(new, p.spec.overwrite)
                targets[-1].manifest, targets[-1].ranks = manifest, manifest.ranks or ranks or {}
                opened.append((manifest, manifest is new))
        except RomcompError as refused:
            world.broadcast_object(refused)  # every worker stops with rank 0's line
            raise
    opened = world.broadcast_object(opened)
    if isinstance(opened, RomcompError):
        raise opened
    if not world.writer:
        for new, path, (manifest, fresh) in zip(news, p.spec.out_paths(), opened, strict=True):
            if _without_threads(new.args) != _without_threads(manifest.args):
                raise BadInputError(
                    f"worker {world.rank} was started with other arguments than worker 0 "
                    f"({', '.join(k for k in manifest.args if manifest.args[k] != new.args.get(k))}); "
                    "run the same command on every worker"
                )
            output = WorkerDir(path, p.n_blocks, world.rank)
            targets.append(Target(output, output.join(manifest, fresh), manifest.ranks))


def _without_threads(args: dict) -> dict:
    """A run's arguments but its thread count, which may differ between machines (rank 0's is kept)."""
    return {k: v for k, v in args.items() if k != "threads"}


def fixed_ranks(p: Prepared, ratio: float) -> dict[str, int] | None:
    """An explicit map checked against the model's linears, a shape-only allocation, or None when the
    allocation needs the dense pre-pass (``auto``, ``v2``, ``asvd``)."""
    spec, shapes = p.spec, p.shapes
    if spec.ranks is None:
        if spec.allocation == "uniform":
            return allocate_uniform(shapes, ratio)
        if spec.allocation == "last-n":
            block_of = {s.name: p.arch.block_index(s.name) for s in shapes}
            return allocate_last_n(shapes, ratio, p.n_blocks, spec.last_n, block_of)
        return None
    known = {s.name: s for s in shapes}
    unknown = sorted(set(spec.ranks) - set(known))
    if unknown:
        raise BadInputError(f"rank map names unknown linears: {', '.join(unknown[:5])}")
    top = {n: min(s.d_in + int(s.bias), s.d_out) for n, s in known.items()}  # the outputs' possible rank
    bad = [n for n, r in spec.ranks.items() if not 1 <= r <= top[n]]
    if bad:
        raise BadInputError(f"rank out of range for {', '.join(bad[:5])}")
    return {n: int(r) for n, r in spec.ranks.items()}


def data_driven_ranks(p: Prepared, targets: list[Target], io: BlockIO) -> None:
    """Ranks from the dense pre-pass's spectra (``auto``, ``v2``) or sensitivities (``asvd``), one pre-pass
    for every ratio, fixed in each manifest once chosen: a resumed run reuses them (and the cached
    spectra) instead of profiling."""
    from romcomp.compression.profile import profile, profile_times

    t0 = time.perf_counter()
    world = distributed.current()
    spectra = profile(io, targets[0].output, world.shard(p.windows[: p.spec.prepass_samples]),
                      p.mem.activations_in_ram, p.n_blocks, p.spec.progress, p.spec.allocation == "asvd",
                      p.mem.expert_chunk)  # fmt: skip
    seconds = round(time.perf_counter() - t0, 3)
    per_block = profile_times(targets[0].output.work, p.n_blocks)
    allocate = DATA_DRIVEN[p.spec.allocation]
    if p.spec.allocation == "auto":
        allocate = partial(allocate_auto, encoder=is_encoder(p.hf_config))
    for t in targets:
        t.manifest.profile_seconds = seconds
        t.manifest.profile_times = per_block
        if not t.ranks:
            t.ranks = allocate(p.shapes, t.manifest.args["ratio"], spectra)
            t.ranks = world.broadcast_object(t.ranks)  # rank 0's, should another machine round otherwise
            t.manifest.ranks = t.ranks
            t.output.save_manifest(t.manifest)


def finalize(p: Prepared, targets: list[Target], io: BlockIO) -> None:
    """The top-level tensors, config, index and tokenizer of every output not finished before."""
    for t, ratio in zip(targets, p.spec.ratios, strict=True):
        if t.manifest.status != "complete":
            t.output.copy_shard(p.n_blocks, io.top_level_names(p.tied), p.ckpt)
            config = output_config(p.hf_config, p.spec, ratio, t.ranks, p.calib_desc, p.source.description)
            t.output.finalize(config, p.source.path, t.manifest)


def result(p: Prepared, t: Target, ratio: float, resumed: int, times: dict[int, BlockTimes], seconds: float,
           peak: int, dense_other: tuple[str, ...]) -> CompressResult:  # fmt: skip
    """The record of one output, read back from what was written."""
    after = LazyCheckpoint(t.output.out)
    dense, kept = linear_params(p.shapes, t.ranks)
    return CompressResult(
        out=t.output.out, source=p.source.description, source_dir=p.source.path, calibration=p.calib_desc,
        ratio=ratio, method=p.spec.method.name, ranks=t.ranks, shapes=p.shapes,
        params_before=p.ckpt.num_params(), params_after=after.num_params(),
        bytes_before=p.ckpt.weight_bytes(), bytes_after=after.weight_bytes(), linear_before=dense,
        linear_after=kept, seconds=seconds, peak_rss=peak, plan=p.mem, block_times=times,
        notes=t.manifest.notes, resumed_blocks=resumed, allocation=p.spec.allocation_name, fit=p.spec.fit,
        ratios=p.spec.ratios, dense_other=dense_other,
    )  # fmt: skip
