"""A method is one descriptor: a toy method in one file plus one registration runs end to end through the
CLI; the configuration, the CLI help and the engine read the descriptor; a resume with other threads is
refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from romcomp.api import run
from romcomp.compression.config import CompressConfig
from romcomp.errors import BadInputError
from romcomp.methods import METHODS, Method, get_method
from romcomp.methods.registry import register
from tests.conftest import REPO, interrupt_after_freeing

TOY_FILE = '''
"""A toy method: the weight's truncated SVD with the factors scaled by ``gain`` and ``1/gain`` (the same
product), counting its calls in a file so the test can see it ran."""
import os

import torch

from romcomp.methods.base import Factors
from romcomp.methods.registry import Method, register


def decompose(weight, bias, stats, rank):
    with open(os.environ["TOY_CALLS"], "a") as f:
        f.write("call\\n")
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return Factors(down=(vh[:rank] * 2.0).float().contiguous(), up=(u[:, :rank] * s[:rank] / 2.0).float(),
                   bias=None if bias is None else bias.float().clone(), notes=[])


METHOD = register(Method(name="toy", help="a toy truncated SVD", decompose=decompose, needs="none"))
'''

CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
import toy_method  # the one registration line
from romcomp.cli import main
main(sys.argv[2:])
"""


def romcomp_with_toy(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    plugin = tmp_path / "plugin"
    plugin.mkdir(exist_ok=True)
    (plugin / "toy_method.py").write_text(TOY_FILE)
    env = {**__import__("os").environ, "TOY_CALLS": str(tmp_path / "calls.txt")}
    return subprocess.run([sys.executable, "-c", CHILD, str(plugin), *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=env)  # fmt: skip


def test_a_toy_method_in_one_file_runs_end_to_end_through_the_cli(tiny_llama, tmp_path, calib_text):
    common = [str(tiny_llama), "--ratio", "0.3", "--calib", str(calib_text), "--n-samples", "4", "--seq-len",
              "32", "--allocation", "uniform", "--no-progress"]  # fmt: skip
    helped = romcomp_with_toy(tmp_path, "compress", "--help")
    text = " ".join(helped.stdout.replace("│", " ").split())  # rich wraps the help inside a box
    assert helped.returncode == 0 and "toy (a toy truncated SVD)" in text
    refused = romcomp_with_toy(tmp_path, *common, "--method", "toy", "--fit", "error-aware", "--out",
                               str(tmp_path / "no"))  # fmt: skip
    assert refused.returncode == 2 and "--fit error-aware needs --method rom" in refused.stderr
    assert not (tmp_path / "no").exists()
    proc = romcomp_with_toy(tmp_path, *common, "--method", "toy", "--out", str(tmp_path / "toy"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "toy" / "config.json").read_text())["quantization_config"]
    assert (record["method"], record["fit"]) == ("toy", "local")  # local: the toy has no error-aware fit
    calls = (tmp_path / "calls.txt").read_text().count("call")
    assert calls == len(record["ranks"]) > 0  # one decomposition per compressed linear
    # the toy's factors are SVD's up to a scale moved between them: the product is plain SVD's
    from transformers import AutoModelForCausalLM

    small = dict(calib=str(calib_text), n_samples=4, seq_len=32, allocation="uniform", progress=False)
    svd = run(CompressConfig(model=str(tiny_llama), ratio=0.3, method="svd", out=tmp_path / "svd", **small))
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        toy = AutoModelForCausalLM.from_pretrained(tmp_path / "toy")(ids).logits
        ref = AutoModelForCausalLM.from_pretrained(svd.out)(ids).logits
    assert float((toy - ref).norm() / ref.norm()) < 1e-2


def test_configuration_reads_the_descriptor() -> None:
    """Defaults and refusals come from the registry, not from a list of names."""
    spec = CompressConfig(model="m", ratio=0.2, method="lpaf").resolve()
    assert (spec.fit, dict(spec.options)) == ("local", {"density": 0.5})
    assert CompressConfig(model="m", ratio=0.2).resolve().fit == "error-aware"
    with pytest.raises(BadInputError, match="--density needs --method lpaf"):
        CompressConfig(model="m", ratio=0.2, method="svd", density=0.5).resolve()
    with pytest.raises(BadInputError, match=r"--density takes a value in \(0, 1\]"):
        CompressConfig(model="m", ratio=0.2, method="lpaf", density=1.5).resolve()
    toy = Method(name="toy-local", help="toy", decompose=get_method("svd").decompose, needs="none")
    register(toy)
    try:
        with pytest.raises(BadInputError, match="--fit error-aware needs --method rom$"):
            CompressConfig(model="m", ratio=0.2, method="toy-local", fit="error-aware").resolve()
        assert CompressConfig(model="m", ratio=0.2, method="toy-local").resolve().method is toy
    finally:
        del METHODS["toy-local"]
    with pytest.raises(ValueError, match="registered twice"):
        register(get_method("rom"))


def test_resume_with_other_threads_is_refused_in_one_line(tiny_llama, tmp_path, calib_text, monkeypatch):
    """Thread count is part of the resume check: torch splits its reductions by thread, so another count
    would not continue the same bytes. The same count resumes to an uninterrupted run's bytes."""
    cfg = dict(model=str(tiny_llama), ratio=0.3, calib=str(calib_text), allocation="uniform", n_samples=4,
               seq_len=32, progress=False)  # fmt: skip
    before = torch.get_num_threads()
    try:
        whole = run(CompressConfig(out=tmp_path / "whole", threads=1, **cfg))
        interrupt_after_freeing(monkeypatch, 2)
        with pytest.raises(KeyboardInterrupt):
            run(CompressConfig(out=tmp_path / "cut", threads=1, **cfg))
        monkeypatch.undo()
        with pytest.raises(BadInputError, match=r"different arguments \(threads\)"):
            run(CompressConfig(out=tmp_path / "cut", threads=2, **cfg))
        resumed = run(CompressConfig(out=tmp_path / "cut", threads=1, **cfg))
        assert resumed.resumed_blocks == 1
        for name in ("model-00001-of-00004.safetensors", "model-00004-of-00004.safetensors"):
            assert (resumed.out / name).read_bytes() == (whole.out / name).read_bytes()
    finally:
        torch.set_num_threads(before)
