"""Typer option types shared by the commands that calibrate (``compress``, ``analyze``): one help each."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

MaxRam = Annotated[
    str | None, typer.Option(help="Memory budget, e.g. 4GB or 24GiB (default: 80% of available).")
]
Calib = Annotated[str, typer.Option(help="Calibration set: c4, wikitext2, ptb or a .txt/.jsonl path.")]
NSamples = Annotated[
    int | None, typer.Option(help="Calibration windows [default: 128; 512 for encoders].", show_default=False)
]
SeqLen = Annotated[
    int | None,
    typer.Option(help="Tokens per calibration window [default: 512; 64 for encoders].", show_default=False),
]
Seed = Annotated[int, typer.Option(help="Calibration sampling seed.")]
DataDir = Annotated[
    Path | None, typer.Option(help="Data directory (default: $ROMCOMP_DATA_DIR, then ../shared/data).")
]
ComputeDtype = Annotated[
    str,
    typer.Option(
        help="Calibration forwards in float32 or bfloat16 (autocast; ~4x matmul speed "
        "on AVX-512-BF16 CPUs). Statistics and decompositions stay float32/float64."
    ),
]
Threads = Annotated[
    int | None, typer.Option(help="CPU threads for torch and BLAS/LAPACK (default: their own choice).")
]
Progress = Annotated[bool, typer.Option(help="Show the progress bar.")]
