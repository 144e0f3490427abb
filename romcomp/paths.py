"""Where romcomp looks for data and keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """The converted-checkpoint / download cache: ``ROMCOMP_CACHE`` or ``~/.cache/romcomp``."""
    env = os.environ.get("ROMCOMP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "romcomp"


def offline() -> bool:
    """True when the hub must not be contacted (``HF_HUB_OFFLINE`` / ``ROMCOMP_OFFLINE``)."""
    return any(
        os.environ.get(v, "").lower() in {"1", "true", "yes"} for v in ("HF_HUB_OFFLINE", "ROMCOMP_OFFLINE")
    )
