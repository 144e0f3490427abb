"""Calibration data for romcomp: named sets or user files, and deterministic token windows."""

from calib.datasets import (
    CalibSource,
    calibration_tokens_description,
    calibration_windows,
    known_datasets,
    load_calibration,
    resolve_data_dir,
)

__all__ = [
    "CalibSource",
    "calibration_tokens_description",
    "calibration_windows",
    "known_datasets",
    "load_calibration",
    "resolve_data_dir",
]
