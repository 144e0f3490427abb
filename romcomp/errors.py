"""Error types. Each maps to a CLI exit code so scripts can tell bad input (2) from a failed run (1).

calib (which imports nothing from romcomp) raises its own :class:`~calib.errors.CalibError` (exit code 1)
and :class:`~calib.errors.CalibInputError` (exit code 2). They are not RomcompErrors, and ``except``
matches real subclasses only (an ABC ``register`` would satisfy ``isinstance`` but not ``except``), so a
place that reports errors as one line catches :data:`USER_ERRORS`, not RomcompError alone.
"""

from __future__ import annotations

from calib.errors import CalibError, CalibInputError


class RomcompError(Exception):
    """A run failed for a reason worth one clear line to the user (exit code 1)."""

    exit_code = 1


class BadInputError(RomcompError):
    """The user's input is wrong; raised before any expensive work starts (exit code 2)."""

    exit_code = 2


USER_ERRORS: tuple[type[Exception], ...] = (RomcompError, CalibError)
"""Every error reported as one line with its ``exit_code``: romcomp's and calib's."""

__all__ = ["USER_ERRORS", "BadInputError", "CalibError", "CalibInputError", "RomcompError"]
