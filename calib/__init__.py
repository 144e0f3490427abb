"""Calibration data for romcomp: named sets or user files, and deterministic token windows.

A standalone package: it imports nothing from romcomp (romcomp imports it), and reports failures with
its own :class:`CalibError` / :class:`CalibInputError`, which carry the exit code romcomp's CLI uses.
"""

from calib.datasets import (
    CalibSource,
    calibration_tokens_description,
    calibration_windows,
    known_datasets,
    load_calibration,
)
from calib.errors import CalibError, CalibInputError
from calib.paths import resolve_data_dir

__all__ = [
    "CalibError",
    "CalibInputError",
    "CalibSource",
    "calibration_tokens_description",
    "calibration_windows",
    "known_datasets",
    "load_calibration",
    "resolve_data_dir",
]
