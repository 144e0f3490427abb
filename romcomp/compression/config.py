"""One typed configuration for a compression run, and the frozen specification it resolves to.

The CLI and the Python API build a :class:`CompressConfig` (what the user said); :meth:`CompressConfig.
resolve` checks it without I/O and returns a :class:`RunSpec` (what will run: parsed ratios, the method's
descriptor, the fit, the method's options with their defaults, the memory budget). The calibration shape
a user left unset depends on the model (decoder or encoder) and is filled once the model's config is read
(:meth:`RunSpec.with_calibration`). Nothing mutates either object afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType

from romcomp.compression.allocation import check_asvd_ratio
from romcomp.compression.memory import parse_size
from romcomp.errors import BadInputError
from romcomp.methods import DEFAULT_METHOD, Method, get_method
from romcomp.methods.registry import methods_with, option_names

CALIB_STREAMS = ("compressed", "dense")
FITS = ("error-aware", "local")
ALLOCATIONS = ("auto", "uniform", "v2", "last-n", "asvd")
COMPUTE_DTYPES = ("float32", "bfloat16")
CALIB_DEFAULTS = {"decoder": (128, 512), "encoder": (512, 64)}  # (windows, tokens per window)
PREPASS_ALLOCATIONS = ("auto", "v2", "asvd")  # the allocations that run the dense pre-pass


@dataclass(frozen=True)
class CompressConfig:
    """Everything that defines a run. Calibration defaults (:data:`CALIB_DEFAULTS`): 128 × 512 C4 tokens
    for decoders (the SVD-LLM / GPTQ convention), 512 × 64 for encoders (sentence-length windows)."""

    model: str
    ratio: float | str | Sequence[float]  # several (or "0.1,0.3"): one output per ratio (see RunSpec)
    out: Path | None = None
    max_ram: str | None = None
    method: str = DEFAULT_METHOD
    calib: str = "c4"
    n_samples: int | None = None  # None: CALIB_DEFAULTS for the model's kind
    seq_len: int | None = None
    seed: int = 0
    data_dir: Path | None = None
    calib_stream: str = "compressed"
    sequential: bool = True
    fit: str | None = None  # None: the method's default (error-aware where it has one, else local)
    allocation: str = "auto"
    last_n: int | None = None  # for allocation last-n: compress only the last N blocks (default: fewest)
    density: float | None = None  # a method option (lpaf): fraction of weights its pruning keeps
    compute_dtype: str = "float32"  # calibration forwards; statistics and decompositions stay float32/64
    threads: int | None = None
    overwrite: bool = False
    progress: bool = True
    ranks: dict[str, int] | None = None  # explicit rank map (module name -> rank); overrides allocation,
    # honoured as given: a rank at or past break-even is factored anyway (it costs more than the dense
    # matrix, and the result's linear_after says so); the allocations never go there
    prepass_samples: int | None = None  # calibration windows the dense pre-pass reads (None: the default)

    def resolve(self) -> RunSpec:
        """Check everything that needs no I/O and return the run's frozen specification."""
        ratios = _ratios(self.ratio)
        if len(ratios) > 1 and self.ranks is not None:
            raise BadInputError("an explicit rank map fixes one output: give one ratio")
        method = get_method(self.method)
        fit = self.fit or method.fits[0]
        _check_choices(self, fit, method)
        if self.allocation == "asvd" and self.ranks is None:
            check_asvd_ratio(max(ratios))
        for name in ("n_samples", "seq_len", "prepass_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise BadInputError(f"--{name.replace('_', '-')} must be positive")
        if self.threads is not None and self.threads < 1:
            raise BadInputError("--threads must be positive")
        skip = ("ratio", "fit", "method", "max_ram", *option_names())
        given = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        return RunSpec(**given, ratios=ratios, method=method, fit=fit, options=_options(self, method),
                       budget=parse_size(self.max_ram) if self.max_ram else None,
                       fit_chosen=self.fit is not None)  # fmt: skip


def _ratios(ratio: float | str | Sequence[float]) -> tuple[float, ...]:
    values = parse_ratios(ratio) if isinstance(ratio, str) else ratio
    values = list(values) if isinstance(values, Sequence) else [values]
    for r in values:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0 < r < 1:
            raise BadInputError(f"--ratio must be in (0, 1), got {r}")
    if not values or len(set(values)) != len(values):
        raise BadInputError(f"--ratio needs distinct values, got {ratio}")
    return tuple(float(r) for r in values)


def _check_choices(cfg: CompressConfig, fit: str, method: Method) -> None:
    """The enumerated options, and the combinations a method or fit does not support."""
    if fit not in FITS:
        raise BadInputError(f"--fit must be one of {', '.join(FITS)}, got {fit}")
    if fit not in method.fits:
        able = methods_with(lambda m: fit in m.fits)
        raise BadInputError(f"--fit {fit} needs --method {' or '.join(able)}")
    if fit == "error-aware" and cfg.calib_stream != "compressed":
        raise BadInputError("--calib-stream dense calibrates without the compressed stream; use --fit local")
    for value, name, choices in ((cfg.allocation, "allocation", ALLOCATIONS),
                                 (cfg.calib_stream, "calib-stream", CALIB_STREAMS),
                                 (cfg.compute_dtype, "compute-dtype", COMPUTE_DTYPES)):  # fmt: skip
        if value not in choices:
            raise BadInputError(f"--{name} must be one of {', '.join(choices)}, got {value}")
    if cfg.last_n is not None and (cfg.allocation != "last-n" or cfg.last_n < 1):
        raise BadInputError("--last-n takes a positive number of blocks and needs --allocation last-n")
    if cfg.prepass_samples is not None and cfg.allocation not in PREPASS_ALLOCATIONS:
        raise BadInputError(f"--prepass-samples needs --allocation {', '.join(PREPASS_ALLOCATIONS)}")


def _options(cfg: CompressConfig, method: Method) -> Mapping[str, float]:
    """The method's options, each given or its default; an option of another method is bad input."""
    values = {}
    for name in option_names():
        given, own = getattr(cfg, name), method.option(name)
        if own is None and given is not None:
            able = methods_with(lambda m, n=name: m.option(n) is not None)
            raise BadInputError(f"--{name.replace('_', '-')} needs --method {' or '.join(able)}")
        if own is not None:
            if given is not None:
                own.check(given)
            values[name] = own.default if given is None else float(given)
    return MappingProxyType(values)


@dataclass(frozen=True)
class RunSpec:
    """A resolved run: every choice made, nothing left to default (but the calibration shape until the
    model is known: :meth:`with_calibration`)."""

    model: str
    ratios: tuple[float, ...]
    method: Method
    fit: str
    options: Mapping[str, float]
    budget: int | None  # --max-ram in bytes (None: 80% of what is available when the run is planned)
    out: Path | None = None
    calib: str = "c4"
    n_samples: int | None = None
    seq_len: int | None = None
    seed: int = 0
    data_dir: Path | None = None
    calib_stream: str = "compressed"
    sequential: bool = True
    allocation: str = "auto"
    last_n: int | None = None
    compute_dtype: str = "float32"
    threads: int | None = None
    overwrite: bool = False
    progress: bool = True
    ranks: dict[str, int] | None = field(default=None, hash=False)
    fit_chosen: bool = True  # the user named the fit (else the method's default, which may fall back)
    prepass_samples: int | None = None  # the dense pre-pass's windows, resolved by with_calibration
    narrow_outputs: bool = False  # error-aware fit: narrow linears from paired outputs (memory fallback)
    fallback: str = ""  # why the run fits otherwise than the default (the memory cap), one line

    @property
    def allocation_name(self) -> str:
        """``explicit`` for a given rank map, else the allocation strategy."""
        return "explicit" if self.ranks is not None else self.allocation

    def with_calibration(self, encoder: bool) -> RunSpec:
        """The calibration shape the user left unset, filled with the default for the model's kind.

        Why two defaults: a sentence encoder sees short inputs; calibrating all-MiniLM-L6-v2 on 64-token
        windows kept its embeddings closer to the dense model's on held-out sentences than 128- or
        256-token windows did (docs/results.md, encoders)."""
        n_samples, seq_len = CALIB_DEFAULTS["encoder" if encoder else "decoder"]
        n_samples, seq_len = self.n_samples or n_samples, self.seq_len or seq_len
        prepass = None  # no pre-pass: an explicit rank map or a shape-only allocation
        if self.ranks is None and self.allocation in PREPASS_ALLOCATIONS:
            prepass = min(
                n_samples, self.prepass_samples or prepass_windows(self.allocation, n_samples, seq_len)
            )
        return replace(self, n_samples=n_samples, seq_len=seq_len, prepass_samples=prepass)

    def out_paths(self) -> list[Path]:
        """One ratio: ``--out`` (default ``<model>-r<ratio>``). Several: ``<out>/<model>-r<ratio>`` each,
        ``--out`` then naming the parent directory (default: the working directory)."""
        if len(self.ratios) == 1:
            return [Path(self.out) if self.out else self.default_out(self.ratios[0])]
        parent = Path(self.out) if self.out else Path(".")
        return [parent / self.default_out(r) for r in self.ratios]

    def default_out(self, ratio: float) -> Path:
        """``<model name>-r<ratio>`` in the working directory."""
        stem = Path(self.model.rstrip("/")).name or "model"
        return Path(f"{stem}-r{ratio:g}")

    def resume_args(self, threads: int) -> dict:
        """The arguments that determine the output bytes (the resume check), ``threads`` included: torch's
        reductions split by thread count, so a resume with other threads would not be bit-identical."""
        skip = ("model", "out", "budget", "data_dir", "overwrite", "progress", "ratios", "method", "options",
                "threads", "fit_chosen", "fallback")  # fmt: skip
        args = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        return {"method": self.method.name, **args, "fit": self.fit, **self.options, "ranks": self.ranks,
                "ratios": list(self.ratios), "threads": threads}  # fmt: skip


def _legacy_prepass(args: Mapping) -> int | None:
    """Before ``--prepass-samples``, the pre-pass read every window wherever it ran."""
    runs = args.get("ranks") is None and args.get("allocation") in PREPASS_ALLOCATIONS
    return args.get("n_samples") if runs else None


ARGS_ADDED: Mapping[str, object] = MappingProxyType(
    {"prepass_samples": _legacy_prepass, "world_size": lambda _args: 1}
)
"""Resume arguments added after manifests without them were written, each with the function giving the
value such a run used (from its other arguments): a run started by an older romcomp resumes."""


def with_added_args(args: Mapping) -> dict:
    """``args`` (a manifest's) with every argument it predates filled in as it ran."""
    return {**{k: f(args) for k, f in ARGS_ADDED.items() if k not in args}, **args}


PREPASS_TOKENS: int | None = 32 * 512
"""Calibration tokens the dense pre-pass of ``--allocation auto`` reads by default (the first windows, at
least one); ``None``: every window. Its spectra only steer the allocation, so fewer do if the allocation
they steer is as good. Chosen on validation text (docs/results.md, "Pre-pass speed"): SmolLM2-135M, default
configuration, C4 128 × 512, WikiText-2 *validation* 40 × 512 — pre-pass on all 128 windows vs the first 32:
36.368 vs 36.323 at ratio 0.2, 61.034 vs 59.510 at 0.3 (the ranks move by 10-18%, the perplexity does not
get worse), for a quarter of the pre-pass's forwards and statistics."""


def prepass_windows(allocation: str, n_samples: int, seq_len: int) -> int:
    """The default number of calibration windows the dense pre-pass reads: for ``auto``, the first
    :data:`PREPASS_TOKENS` tokens' worth (every window while it is ``None``); ``v2`` and ``asvd`` (the
    peers' own recipes, whose truncation losses and sensitivities are measured over the calibration set)
    read every window."""
    if allocation != "auto" or PREPASS_TOKENS is None:
        return n_samples
    return min(n_samples, max(1, math.ceil(PREPASS_TOKENS / seq_len)))


def parse_ratios(text: str) -> float | tuple[float, ...]:
    """``"0.3"`` or ``"0.1,0.2,0.3"`` (the CLI's ``--ratio``); a malformed list is bad input."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise BadInputError(f"--ratio takes a number or a comma list of numbers, got '{text}'") from None
    return values[0] if len(values) == 1 else values
