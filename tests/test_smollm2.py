"""Integration on the real SmolLM2-135M: the CLI end to end, reload, logits, parameters, quality, SIGKILL.

The calibration set is reduced to 16 x 512 C4 tokens to keep CI short; quality bounds are set for that.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ARGS, REPO, romcomp_cli

pytestmark = pytest.mark.slow  # every test here runs a real model


def reported(stdout: str, label: str) -> tuple[int, int]:
    m = re.search(rf"{re.escape(label)}\s+([\d,]+)\s+([\d,]+)", stdout)
    assert m, stdout
    return int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))


def test_summary_reports_ranks_params_and_memory(compressed):
    _, stdout = compressed
    before, after = reported(stdout, "parameters (model)")
    lin_before, lin_after = reported(stdout, "parameters (linears)")
    assert before - after == lin_before - lin_after > 0
    assert 0.195 < 1 - lin_after / lin_before < 0.21  # the ratio convention: block linear params removed
    assert "(error-aware fit)" in stdout and "(auto ranks)" in stdout  # the defaults
    spans = re.findall(r"(\w+_proj)\s+\d+→\d+\s+(\S+)", stdout)
    assert len(spans) == 7 and len({span for _, span in spans}) > 1  # ranks differ by type and depth
    assert re.search(r"down_proj\s+[0-9D]{30}\n", stdout)  # the allocation map: one cell per block
    assert "peak RSS" in stdout and "c4" in stdout


FRESH_LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model, info = AutoModelForCausalLM.from_pretrained(
    sys.argv[1], trust_remote_code=True, output_loading_info=True, dtype=torch.float32
)
ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 1178, 30, 2, 5]])
torch.save(model(ids).logits, sys.argv[2])
out = model.generate(ids[:, :6], max_new_tokens=8, do_sample=False)
print(json.dumps({"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
                  "params": model.num_parameters(), "generated": out.shape[1]}))
"""


def test_fresh_process_reload_matches_dense_reconstruction(compressed, smol_dir, tmp_path):
    """Load with remote code in a clean interpreter (no romcomp import); its logits must equal the dense
    architecture running the reconstructed weights ``up @ down`` from the output shards."""
    out, stdout = compressed
    logits_file = tmp_path / "logits.pt"
    proc = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(out), str(logits_file)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["missing"] == [] and info["unexpected"] == []
    assert info["params"] == reported(stdout, "parameters (model)")[1]
    assert info["generated"] == 14

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32)
    ranks = json.loads((out / "config.json").read_text())["quantization_config"]["ranks"]
    tensors = {}
    for shard in out.glob("model-*.safetensors"):
        tensors.update(load_file(shard))
    with torch.no_grad():
        for name in ranks:
            dense.get_submodule(name).weight.copy_(
                tensors[f"{name}.up.weight"] @ tensors[f"{name}.down.weight"]
            )
        ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 1178, 30, 2, 5]])
        expected = dense(ids).logits
    torch.testing.assert_close(torch.load(logits_file), expected, rtol=1e-3, atol=1e-3)


def test_perplexity_stays_within_bound(compressed, smol_dir):
    """16 x 512 C4 calibration, first 10 x 512 WikiText-2 test windows: measured dense 34.1, ROM 289 (8.5x).

    Uniform ROM at 0.2 with so little off-domain calibration hurts a 135M model badly (the issue's reference:
    ~205 on 40 windows with 32 x 512 C4 tokens); the bound catches a broken pipeline (ppl in the thousands)
    while leaving room for platform rounding."""
    from romcomp.evaluation.quality import before_after

    out, _ = compressed
    ba = before_after(smol_dir, out, windows=10)
    assert ba.dense.tokens_scored == ba.compressed.tokens_scored == 10 * 511
    assert ba.dense.ppl < ba.compressed.ppl < 12 * ba.dense.ppl


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def test_sigkill_then_rerun_is_bit_identical(compressed, tmp_path):
    """A real SIGKILL of the CLI after a few blocks; the rerun resumes and writes identical bytes."""
    reference, _ = compressed
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "romcomp.cli", "smollm2-135m", *ARGS, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    manifest = out / ".romcomp" / "manifest.json"
    deadline = time.time() + 600
    done: list[int] = []
    while time.time() < deadline and proc.poll() is None:
        try:
            done = json.loads(manifest.read_text())["blocks_done"]
        except (FileNotFoundError, ValueError):
            done = []
        if len(done) >= 4:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "config.json").exists() and not (out / "model.safetensors.index.json").exists()
    rerun = romcomp_cli("smollm2-135m", *ARGS, "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert re.search(r"\((\d+) blocks resumed", rerun.stdout)
    assert _shards(out) == _shards(reference)


@pytest.mark.skipif(os.environ.get("ROMCOMP_SLOW") != "1", reason="set ROMCOMP_SLOW=1 (downloads ~0.5 GB)")
def test_qwen2_real_model_compresses_loads_and_generates(tmp_path):
    """Qwen2 architecture (q/k/v bias, GQA, untied head) on the real Qwen2.5-Coder-0.5B-Instruct."""
    out = tmp_path / "qwen-r0.2"
    proc = romcomp_cli("qwen2.5-coder-0.5b", "--ratio", "0.2", "--max-ram", "6GB", "--n-samples", "8",
                       "--no-progress", "--out", str(out), timeout=3000)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
    text = tok.decode(model.generate(ids, max_new_tokens=16, do_sample=False)[0])
    assert text.startswith("def fibonacci(n):") and len(text) > len("def fibonacci(n):") + 10
