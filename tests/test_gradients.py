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

import romcomp.gradients as gradients
from romcomp.checkpoint import LazyCheckpoint
from romcomp.discovery import discover
from romcomp.engine import Engine, build_shell
from romcomp.methods import get_method
from tests.conftest import make_tiny_model, romcomp_cli

WINDOWS, TOKENS = 3, 24


def engine_for(src) -> Engine:
    cfg = AutoConfig.from_pretrained(src)
    shell, ckpt = build_shell(cfg), LazyCheckpoint(src)
    return Engine(model=shell, arch=discover(shell, cfg, ckpt), ckpt=ckpt, method=get_method("rom"),
                  out_dtype=torch.float32, batch_size=2)  # fmt: skip


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
def test_streamed_gradients_equal_whole_model_autograd(tmp_path, tied: bool) -> None:
    src = make_tiny_model(tmp_path / "src", layers=4, tied=tied)
    windows = torch.randint(0, 256, (WINDOWS, TOKENS), generator=torch.Generator().manual_seed(0))
    got = gradients.gradient_pass(engine_for(src), tmp_path / "work", windows, 4, False, full=True)
    want = reference(src, windows)
    assert set(got) == set(want) and len(got) == 2 * 7 * 4
    for key, value in want.items():
        torch.testing.assert_close(
            got[key].double(), value.double(), rtol=2e-4, atol=1e-9 * value.abs().max()
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
