"""Where romcomp looks for data and keeps its caches.

The data directory and the offline switch are calib's (:mod:`calib.paths`, one definition for both
packages); the model cache is romcomp's own.
"""

from __future__ import annotations

import os
from pathlib import Path

from calib.paths import REPO_ROOT, offline

__all__ = ["REPO_ROOT", "cache_dir", "offline"]


def cache_dir() -> Path:
    """The converted-checkpoint / download cache: ``ROMCOMP_CACHE`` or ``~/.cache/romcomp``."""
    env = os.environ.get("ROMCOMP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "romcomp"
