"""Bad input: one line on stderr, exit code 2, nothing written — before any expensive work.

The runs that stop before compressing (bad inputs, a missing ``--ratio``, the help pages) go through the
CLI's entry point one after another in one fresh interpreter (``romcomp_cli_batch``): importing torch and
transformers once instead of thirteen times is most of this module's time. A real ``python -m romcomp.cli``
process still compresses and refuses a second run with other arguments.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, romcomp_cli_batch


def _env() -> dict[str, str]:
    env = {"HF_HUB_OFFLINE": "1", "ROMCOMP_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    return {**os.environ, **env}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "romcomp.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=_env())  # fmt: skip


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(path)
    return path


def bad_cases(tiny: Path, gpt2: Path) -> list[tuple[list[str], str]]:
    return [
        ([str(tiny), "--ratio", "0"], "--ratio must be in (0, 1)"),
        ([str(tiny), "--ratio", "1.5"], "--ratio must be in (0, 1)"),
        (["no-such-model", "--ratio", "0.3"], "unknown model 'no-such-model'"),
        ([str(tiny), "--ratio", "0.3", "--calib", "nosuch"], "nosuch"),
        (
            [str(tiny), "--ratio", "0.3", "--calib", "../shared/data/wikitext2_raw/wiki.test.raw"],
            "test split",
        ),
        ([str(tiny), "--ratio", "0.3", "--max-ram", "lots"], "cannot parse memory size"),
        ([str(tiny), "--ratio", "0.3", "--max-ram", "100MB", "--seq-len", "64"], "smallest plan needs about"),
        (
            [str(gpt2), "--ratio", "0.3"],
            "no ModuleList of 1 blocks with nn.Linear leaves (found: transformer.h[1] of Conv1D/Dropout/",
        ),
        ([str(tiny), "--ratio", "0.3", "--method", "magic"], "unknown method 'magic'"),
        ([str(tiny), "--ratio", "0.3", "--seq-len", "100000"], "exceeds the model's context"),
    ]


@pytest.fixture(scope="module")
def quick_runs(tiny_llama, gpt2_dir, calib_text, tmp_path_factory) -> dict[str, object]:
    """The module's runs that stop before compressing, in one ``romcomp_cli_batch``: each bad case (with its
    own ``--out``), a missing ``--ratio``, ``compress --help`` and ``--help``."""
    root = tmp_path_factory.mktemp("quick")
    bad = []
    for i, (args, message) in enumerate(bad_cases(tiny_llama, gpt2_dir)):
        # a valid calibration file first, so that only the bad argument can fail (a later --calib wins)
        argv = [args[0], "--calib", str(calib_text), *args[1:], "--out", str(root / f"out{i}")]
        bad.append((argv, message))
    others = {"missing ratio": ["smollm2-135m"], "compress help": ["compress", "--help"], "help": ["--help"]}
    procs = romcomp_cli_batch([argv for argv, _ in bad] + list(others.values()), cwd=root, env=_env())
    return {
        "bad": [(argv, message, proc) for (argv, message), proc in zip(bad, procs, strict=False)],
        **dict(zip(others, procs[len(bad) :], strict=True)),
    }


def test_bad_input_is_one_line_exit_2_and_writes_nothing(quick_runs):
    assert len(quick_runs["bad"]) == 10
    for argv, message, proc in quick_runs["bad"]:
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (argv, proc.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("romcomp: error:") and message in lines[0], (
            argv,
            lines,
        )
        assert proc.stdout == "", (argv, proc.stdout)
        assert not Path(argv[-1]).exists(), argv


def test_missing_ratio_is_a_usage_error(quick_runs):
    proc = quick_runs["missing ratio"]
    assert proc.returncode == 2 and "--ratio" in proc.stderr


def test_help_shows_examples(quick_runs):
    proc = quick_runs["compress help"]
    assert proc.returncode == 0 and "romcomp smollm2-135m --ratio 0.3 --max-ram 4GB" in proc.stdout
    top = quick_runs["help"]
    assert top.returncode == 0 and "compress" in top.stdout


def test_cli_compresses_tiny_model_and_second_run_is_refused(tiny_llama, tmp_path, calib_text):
    out = tmp_path / "out"
    common = ["--out", str(out), "--calib", str(calib_text), "--n-samples", "4", "--seq-len", "32"]
    ok = cli(str(tiny_llama), "--ratio", "0.3", *common, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["ratio"] == 0.3
    again = cli(str(tiny_llama), "--ratio", "0.5", *common, cwd=tmp_path)
    assert again.returncode == 2 and "different arguments" in again.stderr
