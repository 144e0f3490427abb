"""``romcomp analyze``: which parts of a model are intrinsically low-rank, in weight and in feature space.

The "structure analysis" study of the seeds, for the user's own model: per block and linear, the weight's
singular values (weight space) and the spectrum of its outputs on the calibration set (feature space,
``W̃ Σ̃ W̃ᵀ``: what ROM truncates), their effective ranks, the energy the rank a ratio would assign keeps,
and weight statistics. The feature spectra come from the dense pre-pass the ``auto`` allocation runs
(:func:`romcomp.compression.profile.profile`)
— the same code and the same numbers, not a copy — so the ranks reported
for ``auto`` are the ones ``romcomp compress`` would choose on this calibration. Streamed like compression:
one block in memory, under ``--max-ram``; the pre-pass is cached and resumes after a kill.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from romcomp.compression.allocation import LinearSpectrum, allocate_auto
from romcomp.compression.config import CompressConfig, RunSpec
from romcomp.compression.ranks import LinearShape, allocate_uniform
from romcomp.errors import BadInputError
from romcomp.model.archs import ArchSpec

ENERGIES = (0.90, 0.95, 0.99)
"""Energy levels of the energy ranks (the smallest rank keeping that share of the squared spectrum)."""


def effective_rank(singular: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank ``exp(H(p))``, ``p_i = σ_i / Σσ``: n for a flat spectrum of n, 1
    for a single direction, and in between without a threshold."""
    s = singular.double().clamp_min(0)
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def energy_rank(singular: torch.Tensor, share: float) -> int:
    """The smallest k whose top-k squared singular values hold ``share`` of the total energy."""
    energy = singular.double().pow(2)
    total = float(energy.sum())
    if total <= 0:
        return 0
    cumulative = energy.cumsum(0) / total
    return int(torch.searchsorted(cumulative, torch.tensor([share - 1e-12], dtype=torch.float64))) + 1


def energy_kept(singular: torch.Tensor, rank: int | None) -> float:
    """The share of the squared spectrum the top ``rank`` directions keep (1.0 for a dense matrix)."""
    energy = singular.double().pow(2)
    total = float(energy.sum())
    if rank is None or total <= 0:
        return 1.0
    return float(energy[:rank].sum()) / total


def spectrum_summary(singular: torch.Tensor) -> dict[str, float]:
    """Effective rank, energy ranks, and both as fractions of the spectrum's length."""
    n = int(singular.numel())
    found: dict[str, float] = {"effective_rank": effective_rank(singular)}
    for share in ENERGIES:
        found[f"rank_{round(share * 100)}"] = energy_rank(singular, share)
    found["effective_rank_fraction"] = found["effective_rank"] / n if n else 0.0
    return found


def weight_statistics(weight: torch.Tensor) -> dict[str, float]:
    """Sparsity and spread of the entries: exact zeros, entries under 1% of the standard deviation (a
    Gaussian has 0.8% there), mean, standard deviation, excess kurtosis and the largest entry in standard
    deviations (outliers concentrate energy in few directions)."""
    w = weight.double().flatten()
    mean, std = float(w.mean()), float(w.std())
    z = (w - mean) / std if std > 0 else torch.zeros_like(w)
    return {
        "zeros": float((w == 0).double().mean()),
        "near_zero": float((w.abs() < 0.01 * std).double().mean()) if std > 0 else 1.0,
        "mean": mean,
        "std": std,
        "excess_kurtosis": float(z.pow(4).mean()) - 3.0,
        "max_abs_over_std": float(w.abs().max()) / std if std > 0 else 0.0,
    }


@dataclass
class LinearAnalysis:
    """One linear (or fused expert projection, feature space only) of one block."""

    name: str
    block: int
    kind: str
    d_in: int
    d_out: int
    feature: torch.Tensor  # output singular values per token, sqrt of the pre-pass's eigenvalues
    weight: torch.Tensor | None  # singular values of W (None for fused experts)
    stats: dict[str, float] = field(default_factory=dict)

    def record(self, uniform: int | None, auto: int | None) -> dict[str, Any]:
        row: dict[str, Any] = {"name": self.name, "block": self.block, "kind": self.kind,
                               "d_in": self.d_in, "d_out": self.d_out, "max_rank": min(self.d_in, self.d_out),
                               "feature": spectrum_summary(self.feature)}  # fmt: skip
        row["feature"]["energy_kept_uniform"] = energy_kept(self.feature, uniform)
        row["feature"]["energy_kept_auto"] = energy_kept(self.feature, auto)
        if self.weight is not None:
            row["weight"] = spectrum_summary(self.weight)
            row["weight"]["energy_kept_uniform"] = energy_kept(self.weight, uniform)
            row["weight"].update(self.stats)
        row["uniform_rank"], row["auto_rank"] = uniform, auto
        return row


@dataclass
class AnalyzeResult:
    out: Path
    source: str
    calibration: str
    ratio: float
    rows: list[dict[str, Any]]
    seconds: float
    peak_rss: int
    plan_estimate: int
    budget: int

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "calibration": self.calibration, "ratio": self.ratio,
                "seconds": self.seconds, "peak_rss_bytes": self.peak_rss, "plan_bytes": self.plan_estimate,
                "budget_bytes": self.budget, "linears": self.rows}  # fmt: skip


@dataclass
class WorkDir:
    """Where the pre-pass caches its spectra and boundaries (``<out>/.romcomp``), as ``profile`` expects."""

    out: Path

    @property
    def work(self) -> Path:
        return self.out / ".romcomp"

    def acts_path(self, boundary: int, stream: str = "profile") -> Path:
        return self.work / f"acts-{stream}-{boundary:05d}.bin"


ARGS_FILE = "analyze-args.json"
SPECTRA_FILE = "spectra.safetensors"


def analyze(cfg: CompressConfig) -> AnalyzeResult:
    """Stream the dense pre-pass over ``cfg``'s calibration, read every weight once, and write the
    analysis (JSON, spectra, markdown, PNGs) to ``cfg.out``; ``cfg.ratio`` is the ratio whose ranks the
    energies are reported at (one ratio)."""
    from romcomp.compression.blocks import BlockIO
    from romcomp.compression.memory import peak_rss
    from romcomp.compression.prepare import prepare
    from romcomp.compression.profile import profile
    from romcomp.evaluation.plots import require_matplotlib
    from romcomp.model.shell import is_encoder
    from romcomp.studies.analyze_report import write_report

    t0 = time.perf_counter()
    require_matplotlib()
    # the pre-pass only gathers statistics: plan no fit's workspace
    spec = replace(cfg, fit="local", sequential=False).resolve()
    if len(spec.ratios) != 1:
        raise BadInputError("romcomp analyze reports the ranks of one --ratio")
    out = Path(spec.out) if spec.out else Path(f"{Path(spec.model).name}-analysis")
    p = prepare(spec)
    workdir = WorkDir(out)
    _open(workdir, spec, p.calib_desc, p.source.description)
    io = BlockIO(p.shell, p.arch, p.ckpt, p.mem.batch_size)
    spectra = profile(io, workdir, p.windows, p.mem.activations_in_ram, p.n_blocks, spec.progress)
    ratio = spec.ratios[0]
    linears = collect(p.ckpt, p.arch, p.shapes, spectra)
    uniform = allocate_uniform(p.shapes, ratio)
    auto = allocate_auto(p.shapes, ratio, spectra, encoder=is_encoder(p.hf_config))
    rows = [a.record(uniform.get(a.name), auto.get(a.name)) for a in linears]
    seconds = round(time.perf_counter() - t0, 1)
    result = AnalyzeResult(
        out,
        p.source.description,
        p.calib_desc,
        ratio,
        rows,
        seconds,
        peak_rss(),
        p.mem.estimate,
        p.mem.budget,
    )
    write_report(result, linears)
    return result


def _open(workdir: WorkDir, cfg: RunSpec, calib: str, source: str) -> None:
    """Reuse a previous run's cached pre-pass only when it was made with the same arguments."""
    args = {"model": source, "calibration": calib, "compute_dtype": cfg.compute_dtype, "ratio": cfg.ratios[0]}
    record = workdir.work / ARGS_FILE
    if record.exists():
        if cfg.overwrite:
            shutil.rmtree(workdir.work)
        elif json.loads(record.read_text()) != args:
            raise BadInputError(f"{workdir.out} holds an analysis with other arguments; pass --overwrite")
    workdir.work.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(args))


def collect(
    ckpt, arch: ArchSpec, shapes: list[LinearShape], spectra: dict[str, LinearSpectrum]
) -> list[LinearAnalysis]:
    """Every linear's feature spectrum (from the pre-pass) and weight spectrum and statistics (each weight
    read from the checkpoint once, one at a time)."""
    found = []
    for s in shapes:
        block_index = arch.block_index(s.name)
        feature = spectra[s.name].eigvals.clamp_min(0).sqrt()
        weight, stats = None, {}
        if s.count == 1:
            w = ckpt.get(f"{s.name}.weight").float()
            weight = torch.linalg.svdvals(w).double()
            stats = weight_statistics(w)
            del w
        found.append(LinearAnalysis(s.name, block_index, s.name.rsplit(".", 1)[1], s.d_in, s.d_out,
                                    feature, weight, stats))  # fmt: skip
    return found
