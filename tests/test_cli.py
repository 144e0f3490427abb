"""Bad input: one line on stderr, exit code 2, nothing written — before any expensive work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "ROMCOMP_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    import os

    env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-m", "romcomp.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)  # fmt: skip


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


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_llama, gpt2_dir, tmp_path, calib_text):
    for args, message in bad_cases(tiny_llama, gpt2_dir):
        out = tmp_path / "out"
        # a valid calibration file first, so that only the bad argument can fail (a later --calib wins)
        proc = cli(args[0], "--calib", str(calib_text), *args[1:], "--out", str(out), cwd=REPO)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("romcomp: error:") and message in lines[0], (
            args,
            lines,
        )
        assert not out.exists(), args


def test_missing_ratio_is_a_usage_error(tmp_path):
    proc = cli("smollm2-135m", cwd=tmp_path)
    assert proc.returncode == 2 and "--ratio" in proc.stderr


def test_help_shows_examples(tmp_path):
    proc = cli("compress", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "romcomp smollm2-135m --ratio 0.3 --max-ram 4GB" in proc.stdout
    top = cli("--help", cwd=tmp_path)
    assert top.returncode == 0 and "compress" in top.stdout


def test_cli_compresses_tiny_model_and_second_run_is_refused(tiny_llama, tmp_path, calib_text):
    out = tmp_path / "out"
    common = ["--out", str(out), "--calib", str(calib_text), "--n-samples", "4", "--seq-len", "32"]
    ok = cli(str(tiny_llama), "--ratio", "0.3", *common, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["ratio"] == 0.3
    again = cli(str(tiny_llama), "--ratio", "0.5", *common, cwd=tmp_path)
    assert again.returncode == 2 and "different arguments" in again.stderr
