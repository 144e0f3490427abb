"""The one resumable block loop every pass runs: the dense pre-pass, the gradient sweep (forward, then in
reverse) and the compression pass.

Per block: open the boundaries the pass reads (carried over from the block before, or loaded from disk)
and create those it writes, materialize the block, let the pass do its work, make the written boundaries
durable, free the block, and only then let the pass record the block as done. A pass is a small object
(:class:`BlockPass`); what makes a block *done* (a manifest entry, a cache file) is its own business, and
so is resuming: it hands the runner the indices still to do and the boundaries to start from.

Each pass's bar counts its own blocks; a :class:`RunClock` (set for the whole run by :func:`whole_run`)
adds the whole run's elapsed time and what is left across passes, from the run's estimate corrected by
the measured pace.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm import tqdm

from romcomp.compression import distributed
from romcomp.compression.activations import Boundary
from romcomp.compression.blocks import BlockIO

Streams = dict[str, Boundary]
"""Boundaries by stream name (``compressed-0``, ``dense``, ``acts``, ``grad``…)."""


@dataclass
class RunClock:
    """The whole run's ETA across passes: ``passes`` are the estimated seconds of each pass by its bar's
    label, in run order (:meth:`romcomp.compression.estimate.TimeEstimate.seconds`). What is left is the
    estimate of the work not done yet, scaled by the measured pace: the seconds elapsed since the clock
    started over the estimated seconds of the work finished since (1 until a block is done)."""

    passes: dict[str, float]
    now: Callable[[], float] = time.monotonic
    started: float = field(init=False)
    _done: float = field(init=False, default=0.0)  # estimated seconds of the work finished since start
    _at: tuple[str, float] | None = field(init=False, default=None)  # the current pass and its fraction

    def __post_init__(self) -> None:
        self.started = self.now()

    def advance(self, label: str, fraction: float) -> None:
        """Pass ``label`` is ``fraction`` done (a pass starting, or resumed part done, counts nothing)."""
        if self._at is not None and self._at[0] == label:
            self._done += self.passes.get(label, 0.0) * max(0.0, fraction - self._at[1])
        self._at = (label, fraction)

    def elapsed(self) -> float:
        return self.now() - self.started

    def left(self) -> float | None:
        """Seconds still to go, or None before any pass or in a pass the estimate does not know."""
        if self._at is None or self._at[0] not in self.passes:
            return None
        label, fraction = self._at
        names = list(self.passes)
        later = names[names.index(label) + 1 :]
        ahead = self.passes[label] * (1 - fraction) + sum(self.passes[n] for n in later)
        pace = self.elapsed() / self._done if self._done > 0 else 1.0
        return ahead * pace

    def describe(self) -> str:
        """``run 0:12:03 elapsed, ~1:40:00 left`` (the bar's postfix)."""
        left = self.left()
        text = f"run {_clock(self.elapsed())} elapsed"
        return text if left is None else f"{text}, ~{_clock(left)} left"


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


_RUN_CLOCK: ContextVar[RunClock | None] = ContextVar("romcomp_run_clock", default=None)


@contextmanager
def whole_run(clock: RunClock | None) -> Iterator[None]:
    """Every :class:`Runner` created inside shows ``clock`` beside its own pass's progress."""
    token = _RUN_CLOCK.set(clock)
    try:
        yield
    finally:
        _RUN_CLOCK.reset(token)


class BlockPass(Protocol):
    """The per-block work of one pass."""

    label: str  # the progress bar's

    def sources(self, index: int) -> dict[str, Path]:
        """The committed boundaries block ``index`` reads."""

    def sinks(self, index: int) -> dict[str, Path]:
        """The boundaries block ``index`` writes (none for a pass's last block that feeds nothing)."""

    def process(self, index: int, block: nn.Module, sources: Streams, sinks: Streams) -> None:
        """The block's work: read ``sources``, fill ``sinks`` (the runner commits them afterwards)."""

    def finish(self, index: int, sources: Streams) -> None:
        """Record block ``index`` as done once its sinks are durable and it is freed; delete what is no
        longer needed (``sources`` are released, their files still there)."""


@dataclass
class Runner:
    """Drives a :class:`BlockPass` over blocks; ``in_ram`` keeps boundaries in memory too."""

    io: BlockIO
    shape: tuple[int, int, int]
    in_ram: bool
    progress: bool
    clock: RunClock | None = field(default_factory=_RUN_CLOCK.get)

    def start(self, windows: torch.Tensor, paths: dict[str, Path], fresh: bool) -> Streams:
        """The boundaries a pass starts from: block 0's inputs computed from the embeddings into every
        stream (``fresh``), or the committed boundaries of a resumed run. Either way the blocks' calls
        are captured (:meth:`BlockIO.capture_inputs`)."""
        if not fresh:
            self.io.capture_inputs(windows, [])
            return {name: Boundary.load(p, self.shape, self.in_ram) for name, p in paths.items()}
        streams = {name: Boundary.create(p, self.shape, self.in_ram) for name, p in paths.items()}
        self.io.capture_inputs(windows, list(streams.values()))
        for b in streams.values():
            b.commit()
        return streams

    def run(self, work: BlockPass, indices: Sequence[int], carry: Streams | None = None,
            total: int | None = None, done: int = 0) -> None:  # fmt: skip
        """Run ``work`` on block ``indices`` in order; ``carry``: boundaries already open (from
        :meth:`start`), reused where a block reads the same file; the bar counts ``done`` of ``total``."""
        carry = dict(carry or {})
        total = total or len(indices)
        bar = tqdm(total=total, initial=done, desc=work.label, unit="block",
                   disable=not self.progress, file=sys.stderr)  # fmt: skip
        self._tick(bar, work.label, done / max(total, 1))
        try:
            for index in indices:
                sources = self._open(work.sources(index), carry)
                sinks = {n: Boundary.create(p, self.shape, self.in_ram) for n, p in work.sinks(index).items()}
                work.process(index, self.io.load_block(index), sources, sinks)
                for b in sinks.values():
                    b.commit()
                distributed.current().barrier()  # every rank's outputs durable before any records the block
                self.io.free_block(index)
                for b in sources.values():
                    b.release()
                work.finish(index, sources)
                carry = sinks
                done += 1
                self._tick(bar, work.label, done / max(total, 1))
                bar.update(1)
        finally:
            bar.close()
            for b in carry.values():
                b.release()

    def _tick(self, bar: tqdm, label: str, fraction: float) -> None:
        if self.clock is not None:
            self.clock.advance(label, fraction)
            bar.set_postfix_str(self.clock.describe(), refresh=False)

    def _open(self, paths: dict[str, Path], carry: Streams) -> Streams:
        by_path = {b.path: b for b in carry.values()}
        return {n: by_path.get(p) or Boundary.load(p, self.shape, self.in_ram) for n, p in paths.items()}
