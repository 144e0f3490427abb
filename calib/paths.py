"""Where calibration (and evaluation) text is found, and whether the hub may be contacted."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR_ENV = "ROMCOMP_DATA_DIR"


def resolve_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """The data directory: ``--data-dir``, then ``$ROMCOMP_DATA_DIR``, then ``<repo>/../shared/data``.

    An explicit directory is returned even when it does not exist, so that the caller's error names
    the path the user asked for instead of silently falling back to another one.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV, "")
    if env:
        return Path(env).expanduser()
    default = REPO_ROOT.parent / "shared" / "data"
    return default if default.is_dir() else None


def offline() -> bool:
    """True when the hub must not be contacted (``HF_HUB_OFFLINE`` / ``ROMCOMP_OFFLINE``)."""
    return any(
        os.environ.get(v, "").lower() in {"1", "true", "yes"} for v in ("HF_HUB_OFFLINE", "ROMCOMP_OFFLINE")
    )
