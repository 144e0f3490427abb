"""Know before you run: the memory plan by phase, a time estimate, and the header a run prints first.

The time estimate is a model of the run scaled by a short measured probe:

- **probe** (:func:`probe`): block 0 materialized and run on the first calibration window (then, when
  that is quick, on the first two, a few times) under the run's compute dtype and threads, after its
  calls were captured from the embeddings like a pass does; then a float64 matrix product, timed, for the
  decompositions' rate;
- **model** (:func:`estimate_time`, a pure function of :class:`RunModel` and :class:`Probe`): per pass, the
  block forwards it runs, in *forward-equivalents* (:data:`FORWARDS`: one dense block forward over every
  calibration window, statistics accumulation included) × the calibration tokens over the probe's × the
  probe's forward time; plus each block's decompositions (multiply-adds per linear,
  :func:`decompose_macs`, over the measured rate) and block loads; × the blocks.

Not modelled: spilled activations' disk I/O, shard writes, the block-0 capture of each pass and the final
top-level copy (seconds against a run's minutes to hours); the progress bar's whole-run ETA
(:class:`romcomp.compression.runner.RunClock`) corrects the estimate by the measured pace as blocks finish.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from romcomp.compression.activations import Boundary
from romcomp.compression.allocation import ASVD_CANDIDATES
from romcomp.compression.blocks import BlockIO
from romcomp.compression.memory import (
    BATCH_CHOICES,
    GRADIENTS,
    PLAN_MARGIN,
    TEMPORARIES,
    TOP_LEVEL,
    WORKSPACE,
    MemoryPlan,
    fmt_bytes,
)
from romcomp.compression.sensitivity import WINDOWS as SENSITIVITY_WINDOWS

PASSES = ("profile", "gradients", "blocks")
"""The passes in run order, named by their progress bars' labels (``ProfilePass``, the gradient sweeps,
``CompressPass``)."""


@dataclass(frozen=True)
class Forwards:
    """Forward-equivalents per block of one pass: ``fixed`` once, ``per_ratio`` for every ratio (output),
    ``per_ratio_stage`` for every ratio and fit stage (``--sequential``: one per linear group)."""

    fixed: float = 0.0
    per_ratio: float = 0.0
    per_ratio_stage: float = 0.0


FORWARDS: dict[str, Forwards] = {
    "profile": Forwards(fixed=1.2),  # the dense pre-pass (--allocation auto, v2, asvd), statistics included
    "gradients": Forwards(fixed=4.0),  # forward sweep 1; reverse: recomputed forward 1 + backward ~2
    "error-aware": Forwards(fixed=1.0, per_ratio=1.85),  # one dense forward (DenseTaps); each ratio's
    "local compressed": Forwards(per_ratio=0.72, per_ratio_stage=0.35),  # stopped statistics, propagation
    "local dense": Forwards(per_ratio=0.37, per_ratio_stage=0.35),  # the first stage runs on (the sinks)
    "local dense shared": Forwards(fixed=1.0),  # the ratios share one forward (dense stream, one stage)
}
"""Every pass's block forwards, the numbers to recalibrate against measured runs (``block_times`` of the
manifest, ``profile_times``). Measured (``tools/bench_speed.py``, Llama-2-7B shape, 2 blocks, C4 32 × 512,
one plain float32 forward = 75 s a block): the dense pre-pass 1.18 forwards with its statistics; the
error-aware pass 3.33 at one ratio (one dense forward, then the compressed partial forwards, the paired
statistics — 11008² pairs at ``down_proj`` — and the propagation); the local pass 2.37; the local fit's
statistics forward of a stage stops after the stage's last leader (Llama: 0, 0.25, 0.33, 0.78 of a block
for q/k/v, o, gate/up, down: ~0.35 a stage), plus the propagation (1.0; on the dense stream the first
stage's forward runs on to fill the sinks); the gradient pass 4.0 (counted, not measured). Since then (same
benchmark, another day: one plain forward 48.9 s a block) ``down_proj``'s paired statistics from the dense
outputs and the replayed attention (:mod:`romcomp.compression.replay`) brought the error-aware pass to 2.87
and the local one to 2.09: ``per_ratio`` lowered by those differences (0.46, 0.28). The header's estimate
of that run: +29% (default) and -11% (uniform local) before this change, whose 7B probe (one cold window)
reads a forward 1.4× slower than the plain one."""

LOADS = {"profile": 1, "gradients": 2, "blocks": 1}
"""Block loads per block of each pass (the gradient pass loads every block on the way up and down)."""

EIGH = 1.5
"""A symmetric eigensolve with eigenvectors (LAPACK ``syevd``), in n³ multiply-adds at the float64 product
rate: 4096² took 6.7 s on the 2-core reference machine (``romcomp.methods.linalg``)."""
EIGVALS = 1.0
"""Eigenvalues only (the pre-pass's spectra), in n³ multiply-adds (0.5 estimated 42 s a 7B block against 89 s
measured by ``tools/bench_speed.py``)."""

PROBE_WINDOWS = 2
"""Calibration windows the probe forwards: the first alone once (the warm-up; a 7B block on 512 tokens takes
seconds, and then that is the measurement), then, when that was quick (under :data:`PROBE_QUICK` seconds),
all of them, repeated while the repeats take under :data:`PROBE_QUICK` in all (at most
:data:`PROBE_REPEATS`), the fastest counting: a small block's forward is short enough for a busy machine's
scheduling to dominate one measurement."""
PROBE_QUICK = 0.5
PROBE_REPEATS = 5
MATMUL_SIZE = 1024
"""Side of the float64 product timed for the decompositions' rate."""


@dataclass(frozen=True)
class LinearCost:
    """One compressible linear of a block, as the decomposition count sees it; ``narrow``: a one-linear
    group whose outputs' moment is the smaller (statistics on the output side where the method can)."""

    d_in: int
    d_out: int
    count: int = 1
    narrow: bool = False


@dataclass(frozen=True)
class RunModel:
    """What a run's time depends on, besides the machine."""

    n_blocks: int
    windows: int
    seq_len: int
    linears: tuple[LinearCost, ...]  # one block's
    fit: str  # "error-aware" or "local"
    n_ratios: int = 1
    calib_stream: str = "compressed"
    stages: int = 1  # fit stages per block (linear groups with --sequential)
    profile: bool = True  # a data-driven allocation: the dense pre-pass
    prepass_windows: int | None = None  # the windows the pre-pass reads (None: all)
    sensitivity: bool = False  # --allocation asvd: sensitivities measured in the pre-pass
    gradients: bool = False  # a gradient method's streamed gradient pass
    output_stats: bool = True  # the local fit decomposes from the outputs' moment where that is narrower
    cross_outputs: bool = False  # so does the error-aware fit (paired output moments)
    compressed: float = 1.0  # share of the block linears factored (uniform/last-n/explicit maps: fewer)

    @property
    def tokens(self) -> int:
        return self.windows * self.seq_len

    @property
    def shared(self) -> bool:
        """The ratios share their statistics (passes.shares_statistics: dense stream, one stage)."""
        return self.n_ratios > 1 and self.calib_stream == "dense" and self.stages == 1


@dataclass(frozen=True)
class Probe:
    """What the probe measured: one dense block forward over ``tokens`` calibration tokens, one block's
    load, and the float64 product rate in multiply-adds per second."""

    forward_seconds: float
    tokens: int
    load_seconds: float
    macs_per_second: float


@dataclass(frozen=True)
class PassTime:
    """One pass's estimated seconds."""

    forward: float
    decompose: float
    load: float

    @property
    def total(self) -> float:
        return self.forward + self.decompose + self.load


@dataclass(frozen=True)
class TimeEstimate:
    """Every pass's estimated seconds, in run order, and the probe they are scaled from."""

    passes: dict[str, PassTime]
    probe: Probe

    @property
    def total(self) -> float:
        return sum(p.total for p in self.passes.values())

    def seconds(self) -> dict[str, float]:
        """Seconds by pass label (what the whole-run clock needs)."""
        return {name: p.total for name, p in self.passes.items()}


def forward_equivalents(run: RunModel) -> dict[str, float]:
    """Forward-equivalents per block of every pass the run makes, in run order (:data:`FORWARDS`)."""
    out: dict[str, float] = {}
    if run.profile:
        out["profile"] = (
            _count(FORWARDS["profile"], run)
            * min(run.prepass_windows or run.windows, run.windows)
            / run.windows
        )
        if run.sensitivity:  # every linear at every candidate, on the first WINDOWS windows, + the reference
            candidates = len(run.linears) * len(ASVD_CANDIDATES) + 1
            out["profile"] += candidates * min(SENSITIVITY_WINDOWS, run.windows) / run.windows
    if run.gradients:
        out["gradients"] = _count(FORWARDS["gradients"], run)
    if run.fit == "error-aware":
        kind = "error-aware"
    else:
        kind = "local compressed" if run.calib_stream == "compressed" else "local dense"
        kind += " shared" if run.shared else ""
    out["blocks"] = _count(FORWARDS[kind], run)
    return out


def _count(f: Forwards, run: RunModel) -> float:
    return f.fixed + run.n_ratios * (f.per_ratio + run.stages * f.per_ratio_stage)


def decompose_macs(kind: str, d_in: int, d_out: int, narrow: bool = False) -> float:
    """Multiply-adds of one linear's decomposition (float64-product equivalents).

    - ``error-aware``: the ridge regression and the whitened solve, ``3 d_out d_in² + 2 d_in³/3``;
    - ``local`` (ROM-like, one rank): whitening root ``d_in³/6``, whitened product ``d_out d_in²/2``, the
      smaller Gram ``small² big/2`` and its eigenvectors (:data:`EIGH` ``small³``);
    - ``spectra`` (the pre-pass): as ``local`` with eigenvalues only (:data:`EIGVALS`);
    - ``narrow`` (any kind): the eigenproblem of the outputs' ``d_out²`` moment alone.
    """
    solve = {"error-aware": EIGH, "local": EIGH, "spectra": EIGVALS}[kind]
    if narrow:
        return solve * d_out**3
    if kind == "error-aware":
        return 3 * d_out * d_in**2 + 2 * d_in**3 / 3
    small, big = min(d_in, d_out), max(d_in, d_out)
    return d_in**3 / 6 + d_out * d_in**2 / 2 + small**2 * big / 2 + solve * small**3


def block_macs(run: RunModel) -> dict[str, float]:
    """Decomposition multiply-adds per block of every pass."""

    def total(kind: str, narrow_ok: bool) -> float:
        return sum(
            c.count * decompose_macs(kind, c.d_in, c.d_out, c.narrow and narrow_ok) for c in run.linears
        )

    out: dict[str, float] = {}
    if run.profile:
        out["profile"] = total("spectra", True)
        if run.sensitivity:  # ROM's local factors at every candidate (the root memoized, the rest redone)
            out["profile"] += len(ASVD_CANDIDATES) * total("local", True)
    if run.gradients:
        out["gradients"] = 0.0
    if run.fit == "error-aware":
        out["blocks"] = run.n_ratios * run.compressed * total("error-aware", run.cross_outputs)
    else:
        out["blocks"] = run.n_ratios * run.compressed * total("local", run.output_stats)
    return out


def estimate_time(run: RunModel, probe: Probe) -> TimeEstimate:
    """Every pass's seconds: forwards scaled from the probe by tokens, decompositions by multiply-adds,
    loads by count; each × the blocks."""
    per_token = probe.forward_seconds / probe.tokens
    macs = block_macs(run)
    passes = {
        name: PassTime(
            forward=fe * run.tokens * per_token * run.n_blocks,
            decompose=macs[name] / probe.macs_per_second * run.n_blocks,
            load=LOADS[name] * probe.load_seconds * run.n_blocks,
        )
        for name, fe in forward_equivalents(run).items()
    }
    return TimeEstimate(passes, probe)


def probe(io: BlockIO, windows: torch.Tensor) -> Probe:
    """Measure block 0: its load, and its forward on the first calibration windows (:data:`PROBE_WINDOWS`)
    under ``io``'s compute dtype and the threads set now; then the float64 product rate. Nothing is
    written: the block's inputs stay in memory, the block is freed afterwards."""
    ids = windows[:PROBE_WINDOWS]
    io = BlockIO(io.model, io.arch, io.ckpt, 1, io.out_dtype, io.compute_dtype)  # its own captured calls
    source = Boundary.create(Path("probe"), io.stream_shape(ids), in_ram=True)  # in RAM: no file
    io.capture_inputs(ids, [source])
    t0 = time.perf_counter()
    block = io.load_block(0)
    load = time.perf_counter() - t0
    try:
        seconds, tokens = _forward_seconds(io, block, source, 1), ids.shape[1]  # also the warm-up
        if seconds < PROBE_QUICK:
            runs = [_forward_seconds(io, block, source, ids.shape[0])]
            while sum(runs) < PROBE_QUICK and len(runs) < PROBE_REPEATS:
                runs.append(_forward_seconds(io, block, source, ids.shape[0]))
            seconds, tokens = min(runs), ids.numel()
    finally:
        io.free_block(0)
    return Probe(seconds, tokens, load, matmul_rate())


def _forward_seconds(io: BlockIO, block: torch.nn.Module, source: Boundary, n: int) -> float:
    part = Boundary(source.path, (n, *source.shape[1:]), in_ram=True)
    part.ram = source.ram[:n]
    t0 = time.perf_counter()
    io.forward(0, block, part, None)
    return time.perf_counter() - t0


def matmul_rate(n: int = MATMUL_SIZE, repeats: int = 2) -> float:
    """Float64 multiply-adds per second of an n × n product (the best of ``repeats``)."""
    a = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # global RNG kept
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return n**3 / max(best, 1e-9)


BLOCK_PHASE, TOP_PHASE, GRADIENT_PHASE = "block phase", "top-level phase", "gradient phase"


def memory_phases(parts: dict[str, int]) -> dict[str, dict[str, int]]:
    """The parts of the memory plan each phase holds at once (:func:`romcomp.compression.memory.
    peak_bytes`'s grouping): the block phase holds everything but the top-level copy and the gradient
    pass, and the larger of the decomposition workspace and the forward temporaries; the top-level phase
    the runtime, the activation cache and the copy; the gradient phase (a gradient method's) the runtime
    and its larger step. The largest phase's sum is the peak."""
    special = (WORKSPACE, TEMPORARIES, TOP_LEVEL, GRADIENTS)
    block = {k: v for k, v in parts.items() if k not in special}
    larger = WORKSPACE if parts[WORKSPACE] >= parts[TEMPORARIES] else TEMPORARIES
    block[larger] = parts[larger]
    top = {k: parts[k] for k in ("runtime", "activation cache", TOP_LEVEL)}
    phases = {BLOCK_PHASE: block, TOP_PHASE: top}
    if parts.get(GRADIENTS):
        phases[GRADIENT_PHASE] = {"runtime": parts["runtime"], GRADIENTS: parts[GRADIENTS]}
    return phases


@dataclass(frozen=True)
class RunPlan:
    """What a run will do and cost, known before it starts: ``--dry-run`` prints it, a real run prints
    it before its first pass (:meth:`header`)."""

    source: str
    calibration: str
    method: str
    fit: str
    allocation: str
    ratios: tuple[float, ...]
    calib_stream: str
    n_blocks: int
    n_samples: int  # the windows one process holds (a distributed run's rank: its share)
    mem: MemoryPlan
    budget_given: bool  # --max-ram (else the default, 80% of the memory available)
    outputs: tuple[Path, ...]
    time: TimeEstimate | None = None
    fallback: str = ""  # why the fit is not the method's default (the memory cap), one line
    workers: int = 1  # processes of a distributed run (torchrun), each planned for its share

    def header(self) -> str:
        """The lines printed before the first pass (and by ``--dry-run``)."""
        ratios = ", ".join(f"{r:g}" for r in self.ratios)
        dense = self.calib_stream == "dense"
        stream = ", calibrated on the dense stream" if dense else ""
        lines = [
            f"source       {self.source}",
            f"calibration  {self.calibration}",
            f"method       {self.method} ({self.fit} fit), ratio{'s' if len(self.ratios) > 1 else ''} "
            f"{ratios} ({self.allocation} ranks){stream}; {self.n_blocks} blocks",
            *self._memory(),
            *self._time(),
            "output       " + ", ".join(str(p) for p in self.outputs),
        ]
        return "\n".join(lines)

    def _memory(self) -> list[str]:
        mem = self.mem
        phases = memory_phases(mem.parts)
        sums = {name: sum(parts.values()) for name, parts in phases.items()}
        peak = max(sums, key=sums.get)
        budget = f"--max-ram {fmt_bytes(mem.budget)}"
        if not self.budget_given:
            budget = f"{fmt_bytes(mem.budget)} (no --max-ram: 80% of available)"
        lines = [
            f"memory       plan {fmt_bytes(mem.estimate)} = peak {fmt_bytes(sums[peak])} ({peak}) + "
            f"{PLAN_MARGIN:.0%}, within {budget}"
        ]
        for name, parts in phases.items():
            lines.append(f"  {name:<17} {fmt_bytes(sums[name]):>12}")
            lines += [f"    {part:<58} {fmt_bytes(value):>12}" for part, value in parts.items()]
        comfortable = min(BATCH_CHOICES[0], self.n_samples)
        batch = f"batch {mem.batch_size}"
        if mem.batch_size < comfortable:
            batch += f" (not {comfortable}: the budget)"
        acts = "activations in RAM" if mem.activations_in_ram else "activations spilled to disk (the budget)"
        fit = f"{self.fit} fit" + (f" (fallback: {self.fallback})" if self.fallback else "")
        workers = f", {self.workers} workers ({self.n_samples} windows each)" if self.workers > 1 else ""
        lines.append(f"config       {batch}, {acts}, {fit}{workers}")
        return lines

    def _time(self) -> list[str]:
        if self.time is None:
            return []
        t, p = self.time, self.time.probe
        lines = [f"time         ~{fmt_duration(t.total)} estimated in all"]
        for name, pt in t.passes.items():
            lines.append(
                f"  {name:<17} {'~' + fmt_duration(pt.total):>12}  (forwards {fmt_duration(pt.forward)}, "
                f"decompositions {fmt_duration(pt.decompose)}, block loads {fmt_duration(pt.load)})"
            )
        lines.append(
            f"  probe: block 0 load {p.load_seconds:.2f} s, forward of {p.tokens} tokens "
            f"{p.forward_seconds:.3f} s; float64 products {p.macs_per_second / 1e9:.1f} GMAC/s"
        )
        return lines


def fmt_duration(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``2.1 h``."""
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
