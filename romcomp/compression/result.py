"""What a run produced and what it cost: the CLI prints it, tests and benchmarks read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from romcomp.compression.fit import BlockTimes
from romcomp.compression.memory import MemoryPlan
from romcomp.compression.ranks import LinearShape


@dataclass
class CompressResult:
    """One output of a run (one ratio)."""

    out: Path
    source: str
    source_dir: Path
    calibration: str
    ratio: float
    method: str
    ranks: dict[str, int]
    shapes: list[LinearShape]
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    linear_before: int
    linear_after: int
    seconds: float
    peak_rss: int
    plan: MemoryPlan
    block_times: dict[int, BlockTimes] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    resumed_blocks: int = 0
    allocation: str = "uniform"
    fit: str = "local"
    ratios: tuple[float, ...] = ()  # every ratio of the run that produced this output
    dense_other: tuple[str, ...] = ()  # block weights that are not nn.Linear (fused experts): kept dense

    @property
    def linear_ratio_removed(self) -> float:
        return 1 - self.linear_after / self.linear_before
