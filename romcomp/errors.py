"""Error types. Each maps to a CLI exit code so scripts can tell bad input (2) from a failed run (1)."""

from __future__ import annotations


class RomcompError(Exception):
    """A run failed for a reason worth one clear line to the user (exit code 1)."""

    exit_code = 1


class BadInputError(RomcompError):
    """The user's input is wrong; raised before any expensive work starts (exit code 2)."""

    exit_code = 2
