"""One typed configuration object for a compression run; the CLI and the Python API both build it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from romcomp.compress.allocation import check_asvd_ratio
from romcomp.compress.memory import parse_size
from romcomp.errors import BadInputError
from romcomp.methods import CROSS_METHODS, get_method

CALIB_STREAMS = ("compressed", "dense")
FITS = ("error-aware", "local")
ALLOCATIONS = ("auto", "uniform", "v2", "last-n", "asvd")
COMPUTE_DTYPES = ("float32", "bfloat16")
CALIB_DEFAULTS = {"decoder": (128, 512), "encoder": (512, 64)}  # (windows, tokens per window)
LPAF_DENSITY = 0.5
"""``--method lpaf`` without ``--density``: half of each matrix's entries (the least salient) are pruned
to "don't care" before the factorization."""


@dataclass
class CompressConfig:
    """Everything that defines a run. Calibration defaults (:data:`CALIB_DEFAULTS`): 128 × 512 C4 tokens
    for decoders (the SVD-LLM / GPTQ convention), 512 × 64 for encoders (sentence-length windows)."""

    model: str
    ratio: float | Sequence[float]  # several: one output per ratio (see :meth:`out_paths`)
    out: Path | None = None
    max_ram: str | None = None
    method: str = "rom"
    calib: str = "c4"
    n_samples: int | None = None  # None: CALIB_DEFAULTS for the model's kind, set by resolve_calibration
    seq_len: int | None = None
    seed: int = 0
    data_dir: Path | None = None
    calib_stream: str = "compressed"
    sequential: bool = True
    fit: str | None = None  # error-aware (default for methods that support it) or local
    allocation: str = "auto"
    last_n: int | None = None  # for allocation last-n: compress only the last N blocks (default: fewest)
    density: float | None = None  # for method lpaf: fraction of weights its pruning keeps (default 0.5)
    compute_dtype: str = "float32"  # calibration forwards; statistics and decompositions stay float32/64
    threads: int | None = None
    overwrite: bool = False
    progress: bool = True
    ranks: dict[str, int] | None = None  # explicit rank map (module name -> rank); overrides allocation

    @property
    def ratios(self) -> list[float]:
        return [float(r) for r in (self.ratio if isinstance(self.ratio, Sequence) else [self.ratio])]

    def out_paths(self) -> list[Path]:
        """One ratio: ``--out`` (default ``<model>-r<ratio>``). Several: ``<out>/<model>-r<ratio>`` each,
        ``--out`` then naming the parent directory (default: the working directory)."""
        if len(self.ratios) == 1:
            return [Path(self.out) if self.out else self.default_out(self.ratios[0])]
        parent = Path(self.out) if self.out else Path(".")
        return [parent / self.default_out(r) for r in self.ratios]

    def validate(self) -> int | None:
        """Check everything that needs no I/O; returns the parsed ``max_ram`` in bytes (or None)."""
        if isinstance(self.ratio, str):
            self.ratio = parse_ratios(self.ratio)
        ratios = self.ratio if isinstance(self.ratio, Sequence) else [self.ratio]
        for r in ratios:
            if (
                isinstance(r, bool)
                or not isinstance(r, (int, float))
                or not math.isfinite(r)
                or not 0 < r < 1
            ):
                raise BadInputError(f"--ratio must be in (0, 1), got {r}")
        if not ratios or len(set(ratios)) != len(ratios):
            raise BadInputError(f"--ratio needs distinct values, got {self.ratio}")
        if len(ratios) > 1 and self.ranks is not None:
            raise BadInputError("an explicit rank map fixes one output: give one ratio")
        if isinstance(self.ratio, Sequence):
            self.ratio = tuple(float(r) for r in self.ratio) if len(ratios) > 1 else float(ratios[0])
        get_method(self.method)
        if self.fit is None:
            self.fit = "error-aware" if self.method in CROSS_METHODS else "local"
        if self.fit not in FITS:
            raise BadInputError(f"--fit must be one of {', '.join(FITS)}, got {self.fit}")
        if self.fit == "error-aware" and self.method not in CROSS_METHODS:
            raise BadInputError(f"--fit error-aware needs --method {' or '.join(CROSS_METHODS)}")
        if self.fit == "error-aware" and self.calib_stream != "compressed":
            raise BadInputError(
                "--calib-stream dense calibrates without the compressed stream; use --fit local"
            )
        if self.allocation not in ALLOCATIONS:
            raise BadInputError(
                f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation}"
            )
        if self.density is not None and (self.method != "lpaf" or not 0 < self.density <= 1):
            raise BadInputError("--density takes a fraction in (0, 1] and needs --method lpaf")
        if self.method == "lpaf" and self.density is None:
            self.density = LPAF_DENSITY
        if self.allocation == "asvd" and self.ranks is None:
            check_asvd_ratio(max(self.ratios))
        if self.last_n is not None and (self.allocation != "last-n" or self.last_n < 1):
            raise BadInputError("--last-n takes a positive number of blocks and needs --allocation last-n")
        if self.calib_stream not in CALIB_STREAMS:
            raise BadInputError(
                f"--calib-stream must be one of {', '.join(CALIB_STREAMS)}, got {self.calib_stream}"
            )
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise BadInputError(
                f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype}"
            )
        for name in ("n_samples", "seq_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise BadInputError(f"--{name.replace('_', '-')} must be positive")
        if self.threads is not None and self.threads < 1:
            raise BadInputError("--threads must be positive")
        return parse_size(self.max_ram) if self.max_ram else None

    def resolve_calibration(self, encoder: bool) -> None:
        """Fill the calibration shape the user left unset with the default for the model's kind.

        Why two defaults: a sentence encoder sees short inputs; calibrating all-MiniLM-L6-v2 on 64-token
        windows kept its embeddings closer to the dense model's on held-out sentences than 128- or
        256-token windows did (README, encoders)."""
        n_samples, seq_len = CALIB_DEFAULTS["encoder" if encoder else "decoder"]
        self.n_samples = self.n_samples or n_samples
        self.seq_len = self.seq_len or seq_len

    def default_out(self, ratio: float) -> Path:
        """``<model name>-r<ratio>`` in the working directory."""
        stem = Path(self.model.rstrip("/")).name or "model"
        return Path(f"{stem}-r{ratio:g}")

    def result_args(self) -> dict:
        """The arguments that determine the output bytes (for the resume check)."""
        d = asdict(self)
        d["ratios"] = self.ratios
        for k in ("ratio", "model", "out", "max_ram", "data_dir", "threads", "overwrite", "progress"):
            d.pop(k)
        return d


def parse_ratios(text: str) -> float | tuple[float, ...]:
    """``"0.3"`` or ``"0.1,0.2,0.3"`` (the CLI's ``--ratio``); a malformed list is bad input."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise BadInputError(f"--ratio takes a number or a comma list of numbers, got '{text}'") from None
    return values[0] if len(values) == 1 else values
