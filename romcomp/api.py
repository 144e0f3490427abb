"""The Python API: one call compresses a model (``romcomp.compress``); :func:`run_many` writes one output
per ratio in one pass. Every option of :class:`~romcomp.compression.config.CompressConfig` is a keyword."""

from __future__ import annotations

from pathlib import Path

from romcomp.compression.config import CompressConfig
from romcomp.compression.pipeline import run_spec
from romcomp.compression.result import CompressResult
from romcomp.errors import BadInputError

__all__ = ["CompressConfig", "CompressResult", "compress", "run", "run_many"]


def compress(
    model: str, ratio: float, max_ram: str | None = None, out: str | Path | None = None, **kwargs
) -> CompressResult | None:
    """Compress ``model`` (local dir, .gguf, alias or hub id) to ``out``; see :class:`CompressConfig`."""
    cfg = CompressConfig(model=model, ratio=ratio, max_ram=max_ram, out=Path(out) if out else None, **kwargs)
    return run(cfg)


def run(cfg: CompressConfig) -> CompressResult | None:
    """One ratio: validate everything cheap first, then stream the blocks; resumable from the manifest.
    Under ``torchrun`` the workers other than rank 0 return None (rank 0 writes and reports)."""
    spec = cfg.resolve()
    if len(spec.ratios) != 1:
        raise BadInputError("several ratios give several outputs: call romcomp.api.run_many")
    results = run_spec(spec)
    return results[0] if results else None


def run_many(cfg: CompressConfig) -> list[CompressResult]:
    """Every ratio of ``cfg`` in one pass: one output directory per ratio, sharing the dense pre-pass,
    each block's load and the dense activation stream (the error-aware fit's targets)."""
    return run_spec(cfg.resolve())
