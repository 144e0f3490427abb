"""Data-parallel calibration on ``torch.distributed`` (gloo), launched by ``torchrun``.

Calibration statistics are float64 sums over tokens, so they split across processes exactly: each rank
(process, on this machine or another) takes a contiguous shard of the calibration windows, runs it
through every pass — the dense pre-pass, the error-aware fit's two streams, the local fit — and the sums
are all-reduced where a stage's statistics are complete, before anything is computed from them. Every
rank then holds the same sums (gloo's all-reduce hands every rank the same reduced bits). The linears of
a stage are split between the ranks: each decomposes its share and broadcasts the factors, so every rank
applies the same factors to its copy of the block and propagates its own shard of activations.

Rank 0 writes the output (shards, manifest, final files); every other rank keeps its activation
boundaries in a work directory of its own (``<out>/.romcomp/rank-N``, on its own disk when the machines
share none). Resuming follows rank 0's manifest; a block is recorded only after every rank's next
boundary is durable (a barrier), and no rank deletes a boundary before the block is recorded everywhere
(another barrier), so whatever block the ranks agree to resume from, each still has its input.

Against a single-process run: the all-reduced statistics equal its sums up to float64 summation order
(each rank's sum added to the others' instead of one running sum). The run as a whole may differ by
more: each rank batches its own windows (the memory plan's batch for its share), so the float32 forwards
and per-batch moment products round differently where the batch sizes differ; the factors are rounded to
the checkpoint's dtype afterwards (Qwen2.5-Coder-1.5B in bfloat16: the same bytes as one process). Two
distributed runs with the same world size and threads are bit-identical to each other.
"""

from __future__ import annotations

import math
import os
import re
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from romcomp.errors import BadInputError, RomcompError
from romcomp.methods.base import CrossStats, Factors, InputStats

TIMEOUT_ENV = "ROMCOMP_DIST_TIMEOUT"
TIMEOUT_S = 1800
"""Seconds a collective waits for a silent peer before failing (a peer that *dies* closes its sockets and
fails the others at once; this bounds a hung or unreachable one). ``$ROMCOMP_DIST_TIMEOUT`` overrides."""

SLAB_ROWS = 256
"""Rows of an upper-triangular second moment all-reduced per call: only the upper triangle is read (the
accumulators fill just that half), so it is sent in contiguous row slabs — half the bytes of the square,
at the cost of one slab's copy (256 × d float64)."""


@dataclass
class Traffic:
    """What this rank sent through collectives: bytes all-reduced and broadcast, and the seconds spent."""

    reduced_bytes: int = 0
    broadcast_bytes: int = 0
    seconds: float = 0.0

    def since(self, before: Traffic) -> dict[str, float]:
        """What was sent after the snapshot ``before`` (``replace(traffic)``): seconds in collectives
        (``comm``), bytes all-reduced and broadcast — one block's, as its records keep them."""
        return {"comm": self.seconds - before.seconds,
                "reduced_bytes": self.reduced_bytes - before.reduced_bytes,
                "broadcast_bytes": self.broadcast_bytes - before.broadcast_bytes}  # fmt: skip


@dataclass
class World:
    """This process's place in the run: ``rank`` of ``size`` (a single process: 0 of 1, and every
    collective is a no-op)."""

    rank: int = 0
    size: int = 1
    traffic: Traffic = field(default_factory=Traffic)

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def writer(self) -> bool:
        """Rank 0 writes the output and its manifest; the others only their own boundaries."""
        return self.rank == 0

    def bounds(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share ``[start, stop)`` of ``n`` windows."""
        return self.rank * n // self.size, (self.rank + 1) * n // self.size

    def shard(self, windows: torch.Tensor) -> torch.Tensor:
        start, stop = self.bounds(windows.shape[0])
        return windows[start:stop]

    def owner(self, linears: Sequence[str], name: str) -> int:
        """The rank that computes linear ``name`` of a block whose linears, in forward order, are
        ``linears``: dealt round the ranks (q, k, v, o… on 0, 1, 0, 1…), so a group's linears and
        consecutive one-linear stages alternate."""
        return linears.index(name) % self.size

    def largest_shard(self, n: int) -> int:
        """The most windows any rank holds: what each rank's memory plan counts."""
        return math.ceil(n / self.size)

    # -- collectives (no-ops for a single process) ---------------------------------------------------
    def all_reduce_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum each tensor over the ranks, in place."""
        if not self.active:
            return
        for t in tensors:
            self._collective(lambda t=t: torch.distributed.all_reduce(t))
            self.traffic.reduced_bytes += t.numel() * t.element_size()

    def reduce_upper_(self, square: torch.Tensor) -> None:
        """Sum the upper triangle (diagonal included) of a square over the ranks, in place."""
        if not self.active:
            return
        n = square.shape[0]
        for start in range(0, n, SLAB_ROWS):
            slab = square[start : start + SLAB_ROWS, start:].contiguous()
            self.all_reduce_([slab])
            square[start : start + SLAB_ROWS, start:] = slab

    def reduce_stats(self, *groups: Mapping[Any, InputStats | CrossStats]) -> None:
        """All-reduce every statistic in ``groups`` (dicts of :class:`InputStats` / :class:`CrossStats`)
        in place: moments, sums, token counts and whether the paired streams were equal on every rank."""
        if not self.active:
            return
        for stats in groups:
            for st in stats.values():
                inputs = st.hat if isinstance(st, CrossStats) else st
                if isinstance(st, CrossStats):
                    self.all_reduce_([st.cross, st.xsum])
                    st.identical = self.agree_min(int(st.identical)) == 1  # equal on every rank
                self.reduce_upper_(inputs.xtx)
                sums = [inputs.xsum] + ([inputs.abs_sum] if inputs.abs_sum is not None else [])
                self.all_reduce_(sums)
                inputs.count = self.total(inputs.count)

    def total(self, value: float) -> float | int:
        """``value`` summed over the ranks (exact for counts: float64)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        self.all_reduce_([t])
        return type(value)(t.item())

    def agree_min(self, value: int) -> int:
        """The smallest ``value`` any rank holds (where to resume: the rank furthest behind)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        self._collective(lambda: torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN))
        return int(t.item())

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank (small things: manifests, rank maps, notes)."""
        if not self.active:
            return obj
        box = [obj]
        self._collective(lambda: torch.distributed.broadcast_object_list(box, src=src))
        return box[0]

    def broadcast_factors(self, factors: Factors | None, src: int) -> Factors:
        """Rank ``src``'s factors on every rank: shapes and notes as an object, the tensors in place."""
        if not self.active:
            return factors
        meta = None
        if factors is not None:
            bias = None if factors.bias is None else tuple(factors.bias.shape)
            down, up = tuple(factors.down.shape), tuple(factors.up.shape)
            meta = (down, up, bias, factors.down.dtype, factors.notes)
        down_shape, up_shape, bias_shape, dtype, notes = self.broadcast_object(meta, src)
        if factors is None:
            bias = None if bias_shape is None else torch.empty(bias_shape, dtype=dtype)
            factors = Factors(torch.empty(down_shape, dtype=dtype), torch.empty(up_shape, dtype=dtype),
                              bias, list(notes))  # fmt: skip
        for t in (factors.down, factors.up, factors.bias):
            if t is not None:
                self._collective(lambda t=t: torch.distributed.broadcast(t, src=src))
                self.traffic.broadcast_bytes += t.numel() * t.element_size()
        return factors

    def barrier(self) -> None:
        if self.active:
            self._collective(torch.distributed.barrier)

    def _collective(self, call) -> Any:
        """Run one collective; a peer that stopped becomes one clear line, not a traceback."""
        t0 = time.perf_counter()
        try:
            return call()
        except (RuntimeError, ValueError) as e:
            first = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip().splitlines() or [""])[0])[:160]
            raise RomcompError(
                f"worker {self.rank} of {self.size}: another worker stopped or cannot be reached ({first}); "
                "rerun the same command on every worker to resume"
            ) from None
        finally:
            self.traffic.seconds += time.perf_counter() - t0


_SINGLE = World()
_WORLD: ContextVar[World | None] = ContextVar("romcomp_world", default=None)


def current() -> World:
    """The world of the run in progress (a single process outside :func:`session`)."""
    return _WORLD.get() or _SINGLE


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def session() -> Iterator[World]:
    """The run's world: a gloo process group when launched as one of several processes (joined here,
    left on exit), else a single process. A group the caller initialized already is used as it is."""
    if current().active or not launched():
        yield current()
        return
    own = not torch.distributed.is_initialized()
    if own:
        timeout = float(os.environ.get(TIMEOUT_ENV, TIMEOUT_S))
        try:
            torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as e:
            raise RomcompError(f"cannot join the worker group: {str(e).splitlines()[0][:200]}") from None
    world = World(torch.distributed.get_rank(), torch.distributed.get_world_size())
    token = _WORLD.set(world)
    previous = _handle_sigterm(_stopped_by_launcher(world))
    try:
        yield world
    finally:
        _handle_sigterm(previous)
        _WORLD.reset(token)
        if own:
            torch.distributed.destroy_process_group()


def _handle_sigterm(handler):
    """Install ``handler`` for SIGTERM (torchrun's stop for the surviving workers); returns the previous
    one (None outside the main thread, where signals cannot be handled)."""
    try:
        return signal.signal(signal.SIGTERM, handler) if handler is not None else None
    except ValueError:
        return None


def _stopped_by_launcher(world: World):
    def handler(_signum: int, _frame) -> None:
        raise RomcompError(
            f"worker {world.rank} of {world.size}: stopped by the launcher (another worker failed); "
            "rerun the same command on every worker to resume"
        )

    return handler


def check_supported(spec, arch) -> None:
    """Refuse, before any work, what does not run distributed yet: passes whose statistics are not
    all-reduced (the streamed gradients of FWSVD/LPAF, ASVD's sensitivities, MoE experts' routed
    moments)."""
    world = current()
    if not world.active:
        return
    why = None
    if spec.method.gradients is not None:
        why = f"--method {spec.method.name} streams gradients, which are not all-reduced yet"
    elif spec.allocation == "asvd" and spec.ranks is None:
        why = "--allocation asvd measures sensitivities on the first windows, which are not shared yet"
    elif arch.experts:
        why = "this model has fused MoE experts, whose routed statistics are not all-reduced yet"
    if why:
        raise BadInputError(f"{why}; run it in one process (without torchrun)")
    if spec.n_samples < world.size:
        raise BadInputError(f"--n-samples {spec.n_samples} is fewer than the {world.size} workers")
    if spec.prepass_samples is not None and spec.prepass_samples < world.size:
        raise BadInputError(
            f"--prepass-samples {spec.prepass_samples} is fewer than the {world.size} workers"
        )
