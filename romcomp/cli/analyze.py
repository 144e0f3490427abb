"""``romcomp analyze MODEL``: the thin CLI over :func:`romcomp.studies.analyze.analyze`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from romcomp.cli import options as opt

EXAMPLES = """
Examples:

  romcomp analyze smollm2-135m --out smollm2-analysis

  romcomp analyze qwen2.5-coder-1.5b --max-ram 4GB --n-samples 32
"""


def analyze_command(
    model: Annotated[str, typer.Argument(help="Local HF directory, .gguf file, alias or hub id.")],
    out: Annotated[Path | None, typer.Option(help="Report directory (default: <model>-analysis).")] = None,
    ratio: Annotated[
        float, typer.Option(help="Report the energy kept at the ranks this ratio assigns (uniform and auto).")
    ] = 0.2,
    max_ram: opt.MaxRam = None,
    calib: opt.Calib = "c4",
    n_samples: opt.NSamples = None,
    seq_len: opt.SeqLen = None,
    seed: opt.Seed = 0,
    data_dir: opt.DataDir = None,
    compute_dtype: opt.ComputeDtype = "float32",
    threads: opt.Threads = None,
    overwrite: Annotated[bool, typer.Option(help="Discard a previous analysis in --out.")] = False,
    progress: opt.Progress = True,
) -> None:
    """Weight- and feature-space spectra, effective ranks and energies of every block linear: report.md,
    analysis.json, spectra.safetensors and PNGs."""
    from romcomp.compression.config import CompressConfig
    from romcomp.compression.memory import fmt_bytes
    from romcomp.studies.analyze import analyze
    from romcomp.studies.analyze_report import low_rank_ranking

    cfg = CompressConfig(
        model=model, ratio=ratio, out=out, max_ram=max_ram, calib=calib, n_samples=n_samples, seq_len=seq_len,
        seed=seed, data_dir=data_dir, compute_dtype=compute_dtype, threads=threads, overwrite=overwrite,
        progress=progress,
    )  # fmt: skip
    result = analyze(cfg)
    lowest = low_rank_ranking(result.rows)[:3]
    typer.echo(f"analysis     {result.out} (report.md, analysis.json, spectra.safetensors, PNGs)")
    names = ", ".join(f"{r['name']} {r['feature']['effective_rank_fraction']:.3f}" for r in lowest)
    typer.echo(f"linears      {len(result.rows)}; most low-rank (feature space): {names}")
    typer.echo(f"memory       peak RSS {fmt_bytes(result.peak_rss)} (plan {fmt_bytes(result.plan_estimate)})")
    typer.echo(f"time         {result.seconds:.0f} s")


def register(app: typer.Typer) -> None:
    """Add ``romcomp analyze`` (the caller lists "analyze" in its SUBCOMMANDS)."""
    app.command(name="analyze", epilog=EXAMPLES)(analyze_command)
