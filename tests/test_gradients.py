"""The streamed gradient pass (one block in memory) against autograd on the whole model in memory.

For a tiny model of several blocks — untied head, and a tied one (the head then reuses the embedding) —
every linear's per-window squared gradients summed over its output rows (FWSVD's importance) and its
summed gradients equal those of ``torch.autograd`` on the full model, window by window; a pass killed in
the middle of its reverse sweep resumes to the same numbers; FWSVD and LPAF (``--density``) run end to end
through the CLI, and are refused for fused MoE experts before any work.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import romcomp.compression.gradients as gradients
from romcomp.compression.blocks import BlockIO
from romcomp.model.checkpoint import LazyCheckpoint
from romcomp.model.discovery import discover
from romcomp.model.shell import build_shell
from tests.conftest import make_tiny_model, romcomp_cli

WINDOWS, TOKENS = 3, 24


def engine_for(src) -> BlockIO:
    cfg = AutoConfig.from_pretrained(src)
    shell, ckpt = build_shell(cfg), LazyCheckpoint(src)
    return BlockIO(model=shell, arch=discover(shell, cfg, ckpt), ckpt=ckpt, batch_size=2)  # fmt: skip


def reference(src, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Whole-model autograd, one window at a time (each window's mean next-token loss)."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    found: dict[str, torch.Tensor] = {}
    for w in range(windows.shape[0]):
        logits = model(windows[w : w + 1]).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], windows[w, 1:])
        grads = torch.autograd.grad(loss, [m.weight for m in linears.values()])
        for name, g in zip(linears, grads, strict=True):
            fisher = g.double().pow(2).sum(0)
            found[f"{name}.fisher_in"] = found.get(f"{name}.fisher_in", 0) + fisher
            found[f"{name}.grad"] = found.get(f"{name}.grad", 0) + g
    return found


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_gradients_equal_whole_model_autograd(tmp_path, monkeypatch, tied: bool) -> None:
    """Also with the output head run on chunks of positions (5 of the 23 predicted, the last one short)."""
    monkeypatch.setattr(gradients, "HEAD_CHUNK", 5)
    src = make_tiny_model(tmp_path / "src", layers=4, tied=tied)
    windows = torch.randint(0, 256, (WINDOWS, TOKENS), generator=torch.Generator().manual_seed(0))
    got = gradients.gradient_pass(engine_for(src), tmp_path / "work", windows, 4, False, full=True)
    want = reference(src, windows)
    assert set(got) == set(want) and len(got) == 2 * 7 * 4
    for key, value in want.items():
        torch.testing.assert_close(
            got[key].double(),
            value.double(),
            rtol=2e-4,
            atol=1e-6 * value.abs().max(),  # float32 sums
        )
    assert all(float(got[k].abs().max()) > 0 for k in got)  # every linear of every block receives gradient
    assert not list((tmp_path / "work" / gradients.GRAD_DIR).glob("*.bin"))  # boundaries cleaned up


def test_a_pass_killed_in_the_reverse_sweep_resumes_to_the_same_numbers(tmp_path, monkeypatch) -> None:
    src = make_tiny_model(tmp_path / "src", layers=4)
    windows = torch.randint(0, 256, (WINDOWS, TOKENS), generator=torch.Generator().manual_seed(1))
    whole = gradients.gradient_pass(engine_for(src), tmp_path / "whole", windows, 4, False)
    original = gradients.block_gradients

    def dies_at_block_1(engine, index, *args, **kwargs):
        if index == 1:
            raise KeyboardInterrupt
        return original(engine, index, *args, **kwargs)

    monkeypatch.setattr(gradients, "block_gradients", dies_at_block_1)
    with pytest.raises(KeyboardInterrupt):
        gradients.gradient_pass(engine_for(src), tmp_path / "killed", windows, 4, False)
    done = sorted(p.name for p in (tmp_path / "killed" / gradients.GRAD_DIR).glob("block-*"))
    assert done == ["block-00002.safetensors", "block-00003.safetensors"]
    monkeypatch.setattr(gradients, "block_gradients", original)
    resumed = gradients.gradient_pass(engine_for(src), tmp_path / "killed", windows, 4, False)
    assert set(resumed) == set(whole)
    for key, value in whole.items():
        assert torch.equal(resumed[key], value), key


def test_fwsvd_and_lpaf_run_end_to_end_and_are_refused_for_fused_experts(
    tmp_path, tiny_llama, calib_text
) -> None:
    from tests.families import make_family_model

    common = ["--ratio", "0.3", "--calib", str(calib_text), "--seq-len", "32", "--n-samples", "4",
              "--no-progress", "--allocation", "uniform"]  # fmt: skip
    out = tmp_path / "fw"
    proc = romcomp_cli(str(tiny_llama), *common, "--method", "fwsvd", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["method"] == "fwsvd"
    out = tmp_path / "lpaf"
    proc = romcomp_cli(str(tiny_llama), *common, "--method", "lpaf", "--density", "0.7", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (record["method"], record["density"]) == ("lpaf", 0.7)
    assert AutoModelForCausalLM.from_pretrained(out)(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    proc = romcomp_cli(str(tiny_llama), *common, "--density", "0.7", "--out", str(tmp_path / "no"))
    assert proc.returncode == 2 and "--density" in proc.stderr and not (tmp_path / "no").exists()
    moe = make_family_model(tmp_path / "moe", "mixtral")
    proc = romcomp_cli(str(moe), *common, "--method", "fwsvd", "--out", str(tmp_path / "no"))
    assert proc.returncode == 2 and "fused MoE experts" in proc.stderr and not (tmp_path / "no").exists()


def test_the_gradient_pass_is_in_the_memory_plan(tmp_path, calib_text) -> None:
    """A tiny model with a 100k-word untied head: FWSVD's gradient head (the logits of 128 positions, the
    loss's temporaries) is its run's peak, far above anything SVD holds. The plan counts that phase: the
    measured peak stays within it, and the plan grows by at least the peak's measured growth."""
    import subprocess
    import sys

    from transformers import LlamaConfig

    from tests.conftest import save_random

    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100_000, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=256, eos_token_id=257)  # fmt: skip
    torch.manual_seed(0)
    src = save_random(AutoModelForCausalLM.from_config(config), tmp_path / "src")

    def run(method: str) -> tuple[int, int]:
        code = (
            "import json; from romcomp.api import compress; "
            f"r = compress({str(src)!r}, 0.3, out={str(tmp_path / method)!r}, method={method!r}, "
            f"allocation='uniform', fit='local', calib={str(calib_text)!r}, n_samples=4, seq_len=256, "
            "progress=False); print(json.dumps([r.peak_rss, r.plan.estimate]))"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peak, planned = json.loads(proc.stdout.splitlines()[-1])
        return peak, planned

    svd_peak, svd_plan = run("svd")
    fw_peak, fw_plan = run("fwsvd")
    assert fw_peak - svd_peak > 100 << 20  # the head step is real: 128 × 100k float32 = 49 MiB each
    assert fw_peak <= fw_plan
    assert fw_plan - svd_plan >= fw_peak - svd_peak
