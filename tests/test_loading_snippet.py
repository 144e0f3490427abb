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
from romcomp.compression.config import CompressConfig
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


def test_output_works_like_a_dense_model_bf16_device_map_cache_and_save(output, tmp_path):
    """What a user does next with the loaded output: bfloat16 with ``device_map="auto"``, generation with
    the KV cache (same tokens as without it), ``save_pretrained`` and reload (same logits)."""
    import torch
    from transformers import AutoModelForCausalLM

    import romcomp

    assert romcomp.__version__
    model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.bfloat16, device_map="auto")
    low = [m for m in model.modules() if type(m).__name__ == "LowRankLinear"]
    assert low and all(m.down.weight.dtype == torch.bfloat16 for m in low)
    ids = torch.tensor([[5, 6, 7, 8]])
    cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (1, 12) and torch.equal(cached, uncached)
    model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32)
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, again(ids).logits)
