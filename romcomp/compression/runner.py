"""The one resumable block loop every pass runs: the dense pre-pass, the gradient sweep (forward, then in
reverse) and the compression pass.

Per block: open the boundaries the pass reads (carried over from the block before, or loaded from disk)
and create those it writes, materialize the block, let the pass do its work, make the written boundaries
durable, free the block, and only then let the pass record the block as done. A pass is a small object
(:class:`BlockPass`); what makes a block *done* (a manifest entry, a cache file) is its own business, and
so is resuming: it hands the runner the indices still to do and the boundaries to start from.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm import tqdm

from romcomp.compression.activations import Boundary
from romcomp.compression.blocks import BlockIO

Streams = dict[str, Boundary]
"""Boundaries by stream name (``compressed-0``, ``dense``, ``acts``, ``grad``…)."""


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
        bar = tqdm(total=total or len(indices), initial=done, desc=work.label, unit="block",
                   disable=not self.progress, file=sys.stderr)  # fmt: skip
        try:
            for index in indices:
                sources = self._open(work.sources(index), carry)
                sinks = {n: Boundary.create(p, self.shape, self.in_ram) for n, p in work.sinks(index).items()}
                work.process(index, self.io.load_block(index), sources, sinks)
                for b in sinks.values():
                    b.commit()
                self.io.free_block(index)
                for b in sources.values():
                    b.release()
                work.finish(index, sources)
                carry = sinks
                bar.update(1)
        finally:
            bar.close()
            for b in carry.values():
                b.release()

    def _open(self, paths: dict[str, Path], carry: Streams) -> Streams:
        by_path = {b.path: b for b in carry.values()}
        return {n: by_path.get(p) or Boundary.load(p, self.shape, self.in_ram) for n, p in paths.items()}
