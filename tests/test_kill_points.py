"""Real SIGKILLs at fixed points of a run (the CI share of ``tools/bench_kill_loop.py``'s random loop).

The child process patches one call site to ``SIGKILL`` itself on its n-th call — no cleanup, no ``finally``,
exactly like the OOM killer — then a plain rerun must resume and produce the bytes of an uninterrupted run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, make_tiny_model, romcomp_cli

CHILD = """
import os, signal, sys
point, nth, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
calls = [0]

def count_and_maybe_die():
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)

def counting(fn):
    def wrapper(*a, **k):
        count_and_maybe_die()
        return fn(*a, **k)
    return wrapper

import dataclasses
import romcomp.methods as methods, romcomp.compression.profile as profile, romcomp.compression.stats as stats
if point == "calibration":
    stats.accumulate = counting(stats.accumulate)
elif point == "decomposition":  # the default error-aware fit (and local ROM, for other options)
    rom = methods.METHODS["rom"]
    methods.METHODS["rom"] = dataclasses.replace(rom, decompose=counting(rom.decompose),
                                                 decompose_cross=counting(rom.decompose_cross))
elif point == "profile":  # the dense pre-pass of the auto allocation
    profile.output_spectrum = counting(profile.output_spectrum)
else:  # a rename: the file is fully written under its temporary name, the rename never happens
    suffix = {"shard": ".safetensors", "index": ".index.json", "config": "/config.json"}[point]
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        if str(dst).endswith(suffix):
            count_and_maybe_die()
        return real_replace(src, dst, *a, **k)
    os.replace = replace
from romcomp.cli import main
main(argv)
"""

ARGS = ["--ratio", "0.3", "--n-samples", "8", "--seq-len", "64", "--no-progress"]


@pytest.fixture(scope="module")
def killable(tmp_path_factory, calib_text) -> tuple[Path, list[str], dict[str, bytes]]:
    """A 4-block tiny model, the CLI arguments, and the bytes of its uninterrupted output."""
    root = tmp_path_factory.mktemp("kill")
    src = make_tiny_model(root / "src", "llama", layers=4)
    args = [str(src), *ARGS, "--calib", str(calib_text)]
    ref = root / "reference"
    proc = romcomp_cli(*args, "--out", str(ref))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return src, args, _files(ref)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.mark.parametrize(
    "point,nth",
    [
        # the fast tier keeps one kill in the fit and one in a write; the full suite runs all six
        pytest.param("profile", 10, marks=pytest.mark.slow),  # the dense pre-pass, block 1 (seven linears)
        pytest.param("calibration", 22, marks=pytest.mark.slow),  # main pass, block 2 (pre-pass: 16 batches)
        ("decomposition", 7),  # main pass, block 2 (blocks 0 and 1 fit six compressed linears)
        ("shard", 3),  # block 2's shard written under .tmp, not renamed
        pytest.param("index", 1, marks=pytest.mark.slow),  # every shard done, the index not renamed
        pytest.param("config", 1, marks=pytest.mark.slow),  # the very last rename
    ],
)
def test_sigkill_at_fixed_point_then_rerun_is_bit_identical(killable, tmp_path, point, nth):
    _, args, reference = killable
    out = tmp_path / "out"
    child = subprocess.run([sys.executable, "-c", CHILD, point, str(nth), *args, "--out", str(out)],
                           capture_output=True, text=True, timeout=600, cwd=REPO)  # fmt: skip
    assert child.returncode == -9, f"not killed at {point} #{nth}: {child.returncode} {child.stderr[-1500:]}"
    assert not (out / "config.json").exists()  # a killed run never looks complete
    rerun = romcomp_cli(*args, "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _files(out) == reference
