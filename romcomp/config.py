"""One typed configuration object for a compression run; the CLI and the Python API both build it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from romcomp.errors import BadInputError
from romcomp.memory import parse_size
from romcomp.methods import get_method

CALIB_STREAMS = ("compressed", "dense")
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclass
class CompressConfig:
    """Everything that defines a run. Defaults: 128 × 512 C4 tokens (the SVD-LLM / GPTQ convention)."""

    model: str
    ratio: float
    out: Path | None = None
    max_ram: str | None = None
    method: str = "rom"
    calib: str = "c4"
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    data_dir: Path | None = None
    calib_stream: str = "compressed"
    sequential: bool = False
    compute_dtype: str = "float32"  # calibration forwards; statistics and decompositions stay float32/64
    threads: int | None = None
    overwrite: bool = False
    progress: bool = True
    ranks: dict[str, int] | None = None  # explicit rank map (module name -> rank); overrides allocation

    def validate(self) -> int | None:
        """Check everything that needs no I/O; returns the parsed ``max_ram`` in bytes (or None)."""
        if (
            not isinstance(self.ratio, (int, float))
            or not math.isfinite(self.ratio)
            or not 0 < self.ratio < 1
        ):
            raise BadInputError(f"--ratio must be in (0, 1), got {self.ratio}")
        get_method(self.method)
        if self.calib_stream not in CALIB_STREAMS:
            raise BadInputError(
                f"--calib-stream must be one of {', '.join(CALIB_STREAMS)}, got {self.calib_stream}"
            )
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise BadInputError(
                f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype}"
            )
        for name in ("n_samples", "seq_len"):
            if getattr(self, name) < 1:
                raise BadInputError(f"--{name.replace('_', '-')} must be positive")
        if self.threads is not None and self.threads < 1:
            raise BadInputError("--threads must be positive")
        return parse_size(self.max_ram) if self.max_ram else None

    def default_out(self) -> Path:
        """``<model name>-r<ratio>`` in the working directory."""
        stem = Path(self.model.rstrip("/")).name or "model"
        return Path(f"{stem}-r{self.ratio:g}")

    def result_args(self) -> dict:
        """The arguments that determine the output bytes (for the resume check)."""
        d = asdict(self)
        for k in ("model", "out", "max_ram", "data_dir", "threads", "overwrite", "progress"):
            d.pop(k)
        return d
