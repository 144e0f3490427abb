"""The README's loading snippet, as written, in a fresh process with stdin closed: no custom-code prompt,
no warning, nothing on stdout or stderr but the generated text. Also after ``import romcomp`` without
``trust_remote_code``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from romcomp.api import run
from romcomp.config import CompressConfig
from tests.conftest import REPO

README_OUT = "smollm2-135m-r0.3"


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Loading the output") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README has no python block under 'Loading the output'"
    snippet = match.group(1)
    assert f'"{README_OUT}"' in snippet
    return snippet


@pytest.fixture(scope="module")
def output(tiny_llama, tmp_path_factory, calib_text) -> Path:
    out = tmp_path_factory.mktemp("snippet") / "out"
    small = {"n_samples": 8, "seq_len": 32, "progress": False}
    run(CompressConfig(model=str(tiny_llama), ratio=0.3, out=out, calib=str(calib_text), **small))
    return out


def run_fresh(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd,
                          stdin=subprocess.DEVNULL)  # fmt: skip


@pytest.mark.parametrize("route", ["as written", "import romcomp"])
def test_readme_loading_snippet_prints_only_the_result(route, output, tmp_path):
    code = readme_snippet().replace(f'"{README_OUT}"', repr(str(output)))
    if route == "import romcomp":
        code = "import romcomp\n" + code.replace(", trust_remote_code=True", "")
        assert "trust_remote_code" not in code
    proc = run_fresh(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0], proc.stdout  # the decoded generation, nothing else
