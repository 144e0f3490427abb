"""calib's own error types; romcomp maps them to its exit codes, calib knows nothing of romcomp.

Each carries ``exit_code`` for a command line that reports it as one line: 1 when calibration text cannot
be had (a missing file, no hub), 2 when the request itself is wrong (a test split, an unknown name, a
malformed file, windows that cannot fit).
"""

from __future__ import annotations


class CalibError(Exception):
    """Calibration text cannot be had, for a reason worth one clear line (exit code 1)."""

    exit_code = 1


class CalibInputError(CalibError, ValueError):
    """The caller's calibration request is wrong; raised before any tokenization (exit code 2)."""

    exit_code = 2
