"""The streaming engine end to end on tiny random checkpoints: exactness, loading, resume, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import romcomp
from romcomp.api import run
from romcomp.compression.config import CompressConfig
from romcomp.errors import BadInputError, RomcompError
from tests.conftest import interrupt_after_freeing

SMALL = {"n_samples": 8, "seq_len": 64, "progress": False}


@pytest.fixture
def calib(calib_text: Path) -> str:
    """The generated calibration text (conftest): tiny-model runs do not need ../shared/data."""
    return str(calib_text)


def logits(model_dir: Path, ids: torch.Tensor, **kw) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw)
    with torch.inference_mode():
        return model(ids).logits


def full_ranks(model_dir: Path) -> dict[str, int]:
    """Rank min(d_in (+1 with bias), d_out) for every linear: ROM is then exact."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ranks = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            ranks[name] = min(mod.in_features + int(mod.bias is not None), mod.out_features)
    return ranks


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_full_rank_rom_reproduces_logits(fixture, request, tmp_path, calib):
    src = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    result = run(CompressConfig(model=str(src), ratio=0.5, out=out, calib=calib, ranks=full_ranks(src),
                                fit="local", **SMALL))  # fmt: skip
    # an explicit map is honoured as given, past break-even too, and counted as it is: more than dense
    assert result.linear_after > result.linear_before and result.ranks == full_ranks(src)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    dense = logits(src, ids)
    compressed = logits(out, ids, trust_remote_code=True)
    # float32 factors of float64 projections: agreement to ~1e-5 relative to logits of magnitude ~1.
    torch.testing.assert_close(compressed, dense, rtol=1e-4, atol=2e-4)


def test_output_loads_without_missing_keys_and_generates(tiny_qwen2, tmp_path, calib):
    out = tmp_path / "out"
    result = run(
        CompressConfig(model=str(tiny_qwen2), ratio=0.4, out=out, calib=calib, allocation="uniform", **SMALL)
    )
    model, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.num_parameters() == result.params_after < result.params_before
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "LowRankLinear" and layer.up.bias is not None  # Qwen2 q/k/v bias kept
    config = json.loads((out / "config.json").read_text())
    record = config["quantization_config"]
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert record["quant_method"] == "romcomp" and record["ranks"] == result.ranks
    assert "calib-english.txt" in record["calibration"]
    generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 8)
    assert abs(result.linear_ratio_removed - 0.4) < 0.02


def test_plain_transformers_loading_warns_loudly(tiny_llama, tmp_path, calib):
    """Without romcomp and without ``trust_remote_code`` transformers cannot build the low-rank leaves: it
    must say so (unknown quantization method, missing weights), never load quietly."""
    out = tmp_path / "out"
    run(CompressConfig(model=str(tiny_llama), ratio=0.3, out=out, calib=calib, **SMALL))
    code = f"from transformers import AutoModelForCausalLM as M; M.from_pretrained({str(out)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "Unknown quantization type, got romcomp" in proc.stderr and "MISSING" in proc.stderr


def test_registered_auto_classes_load_without_remote_code(tiny_llama, tmp_path, calib):
    out = tmp_path / "out"
    run(CompressConfig(model=str(tiny_llama), ratio=0.3, out=out, calib=calib, **SMALL))
    assert romcomp.__version__
    model = AutoModelForCausalLM.from_pretrained(out)  # `import romcomp` registered the quantizer
    assert type(model).__name__ == "LlamaForCausalLM"
    assert type(model.model.layers[1].mlp.down_proj).__name__ == "LowRankLinear"


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def test_interrupted_run_resumes_bit_identically(tiny_llama, tmp_path, calib, monkeypatch):
    # uniform ranks: no dense pre-pass, so free_block counts main-pass blocks (kill tests cover the default)
    cfg = dict(model=str(tiny_llama), ratio=0.3, calib=calib, allocation="uniform", **SMALL)
    run(CompressConfig(out=tmp_path / "a", **cfg))
    interrupt_after_freeing(monkeypatch, 3)  # blocks 0 and 1 are recorded; block 2 is freed, not recorded
    with pytest.raises(KeyboardInterrupt):
        run(CompressConfig(out=tmp_path / "b", **cfg))
    assert not (tmp_path / "b" / "config.json").exists()  # incomplete output does not look complete
    manifest = json.loads((tmp_path / "b" / ".romcomp" / "manifest.json").read_text())
    assert manifest["blocks_done"] == [0, 1] and manifest["status"] == "running"
    monkeypatch.undo()
    result = run(CompressConfig(out=tmp_path / "b", **cfg))
    assert result.resumed_blocks == 2
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert not list((tmp_path / "b" / ".romcomp").glob("acts-*"))  # work files cleaned up


def test_rerun_with_other_arguments_is_refused(tiny_llama, tmp_path, calib):
    out = tmp_path / "out"
    run(CompressConfig(model=str(tiny_llama), ratio=0.3, out=out, calib=calib, **SMALL))
    again = run(CompressConfig(model=str(tiny_llama), ratio=0.3, out=out, calib=calib, **SMALL))
    assert again.resumed_blocks == 3  # complete: nothing recomputed
    with pytest.raises(BadInputError, match="different arguments .*ratio"):
        run(CompressConfig(model=str(tiny_llama), ratio=0.4, out=out, calib=calib, **SMALL))
    run(CompressConfig(model=str(tiny_llama), ratio=0.4, out=out, calib=calib, overwrite=True, **SMALL))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["ratio"] == 0.4


def test_foreign_directory_is_never_overwritten(tiny_llama, tmp_path, calib):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(BadInputError, match="not a romcomp output"):
        run(CompressConfig(model=str(tiny_llama), ratio=0.3, out=out, calib=calib, overwrite=True, **SMALL))
    assert (out / "notes.txt").read_text() == "precious"


def test_source_change_refuses_resume(tmp_path, calib, monkeypatch):
    from tests.conftest import make_tiny_model

    src = make_tiny_model(tmp_path / "src", "llama")
    out = tmp_path / "out"
    from romcomp.compression.blocks import BlockIO

    monkeypatch.setattr(BlockIO, "free_block", lambda self, i: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run(CompressConfig(model=str(src), ratio=0.3, out=out, calib=calib, **SMALL))
    monkeypatch.undo()
    make_tiny_model(src, "llama", seed=1)  # rewrite the checkpoint with other weights
    with pytest.raises(RomcompError, match="source checkpoint changed"):
        run(CompressConfig(model=str(src), ratio=0.3, out=out, calib=calib, **SMALL))


def test_spilled_activations_give_identical_output(tiny_llama, tmp_path, calib, monkeypatch):
    """The disk-spilling plan computes exactly what the in-RAM plan computes."""
    import romcomp.compression.prepare as prepare
    from romcomp.compression import memory

    cfg = dict(model=str(tiny_llama), ratio=0.3, calib=calib, **SMALL)
    run(CompressConfig(out=tmp_path / "ram", **cfg))
    real_plan = memory.plan

    def spill(*args, **kw):
        p = real_plan(*args, **kw)
        return memory.MemoryPlan(p.budget, p.estimate, p.batch_size, False, p.parts)

    monkeypatch.setattr(prepare, "plan", spill)
    result = run(CompressConfig(out=tmp_path / "disk", **cfg))
    assert not result.plan.activations_in_ram
    assert _files(tmp_path / "ram") == _files(tmp_path / "disk")
    assert not list((tmp_path / "disk").rglob("tap-*"))  # the dense taps' scratch files are gone


def _qwen15b_dims(narrow_outputs: bool):
    """Qwen2.5-Coder-1.5B's sizes (hidden 1536, intermediate 8960, 12 heads, 2 KV heads, 151936 words)."""
    from romcomp.compression.memory import ModelDims

    h, i, kv = 1536, 8960, 256
    down = i + 1 if not narrow_outputs else h  # the paired moments of down_proj: inputs, or outputs
    shapes = ((h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h))
    regressed = shapes if not narrow_outputs else shapes[:-1]
    return ModelDims(hidden=h, intermediate=i, heads=12, vocab=151936, block_params=46_797_824,
                     linear_shapes=shapes, cov_dims=(h, h, h, h), linear_inputs=(h, h, h, down - 1),
                     shared_inputs=(h, h), cross_shapes=regressed)  # fmt: skip


def test_default_fit_steps_down_under_a_tight_cap_instead_of_refusing():
    """Qwen2.5-Coder-1.5B at 16 × 512 under 4 GB: the full error-aware fit does not fit (its down_proj
    regression holds 8961² float64 squares), the error-aware fit with down_proj from paired outputs does;
    a cap below even the local fit's needs is refused naming the local fit's minimum; a fit the user
    named is never changed."""
    from dataclasses import replace

    from romcomp.compression.prepare import plan_or_fall_back

    spec = CompressConfig(model="m", ratio=0.2, n_samples=16, seq_len=512, max_ram="4GB").resolve()
    assert spec.fit == "error-aware" and not spec.fit_chosen
    with pytest.raises(BadInputError):
        plan_or_fall_back(replace(spec, fit_chosen=True), _qwen15b_dims, 2)
    stepped, mem = plan_or_fall_back(spec, _qwen15b_dims, 2)
    assert stepped.fit == "error-aware" and stepped.narrow_outputs and mem.estimate <= 4 * 10**9
    assert "more than --max-ram 3.73 GiB: narrow linears fitted from their outputs" in stepped.fallback
    from romcomp.compression.memory import estimate, peak_bytes

    leanest = {n: peak_bytes(estimate(_qwen15b_dims(n), 16, 512, 1, False, 2, True)) for n in (False, True)}
    local_min = peak_bytes(estimate(_qwen15b_dims(False), 16, 512, 1, False, 1, False))
    assert local_min < leanest[True] < leanest[False]  # each step needs less
    between = int((local_min + leanest[True]) / 2 * 1.05)  # the plan's margin
    local, _ = plan_or_fall_back(replace(spec, budget=between), _qwen15b_dims, 2)
    assert local.fit == "local" and "every linear fitted locally" in local.fallback
    with pytest.raises(BadInputError, match="the smallest plan needs about"):
        plan_or_fall_back(replace(spec, budget=10**9), _qwen15b_dims, 2)
    roomy = replace(spec, budget=64 * 10**9)
    assert plan_or_fall_back(roomy, _qwen15b_dims, 2)[0] == roomy  # room enough: nothing changes


def test_fallback_runs_end_to_end_and_is_recorded(tiny_llama, tmp_path, calib, monkeypatch):
    """A cap the full error-aware plan does not fit (simulated: the planner refuses it): the run completes
    with down_proj fitted from paired outputs, the manifest and the header say so, and the model loads."""
    import romcomp.compression.prepare as prepare
    from romcomp.compression import memory
    from romcomp.compression.pipeline import run_spec

    real_plan = memory.plan

    def tight(dims, n_samples, seq_len, budget, streams, cross, *args):
        if cross and len(dims.cross_shapes) == len(dims.linear_shapes):  # down_proj regressed on inputs
            raise memory.PlanRefused("--max-ram too small (simulated)", 3 << 30)
        return real_plan(dims, n_samples, seq_len, budget, streams, cross, *args)

    monkeypatch.setattr(prepare, "plan", tight)
    headers = []
    spec = CompressConfig(model=str(tiny_llama), ratio=0.3, calib=calib, out=tmp_path / "o", **SMALL)
    spec = spec.resolve()
    (result,) = run_spec(spec, announce=lambda plan: headers.append(plan.header()))
    manifest = json.loads((tmp_path / "o" / ".romcomp" / "manifest.json").read_text())
    assert "narrow linears fitted from their outputs" in manifest["plan"]["fallback"]
    assert manifest["args"]["narrow_outputs"] is True
    assert "fallback: the error-aware fit needs about 3.00 GiB" in headers[0]  # the refusal's own number
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_disk_full_while_writing_a_block_loses_nothing(tiny_llama, tmp_path, calib, monkeypatch):
    """ENOSPC in the middle of a shard write: clear OSError, the block is not recorded, the run resumes."""
    import errno

    import romcomp.model.checkpoint as checkpoint

    cfg = dict(model=str(tiny_llama), ratio=0.3, calib=calib, allocation="uniform", **SMALL)  # no pre-pass
    run(CompressConfig(out=tmp_path / "a", **cfg))
    real_save, calls = checkpoint.save_file, []

    def save_then_fill_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the second block shard: write part of it, then the disk is full
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_then_fill_disk)
    with pytest.raises(OSError, match="No space left"):
        run(CompressConfig(out=tmp_path / "b", **cfg))
    manifest = json.loads((tmp_path / "b" / ".romcomp" / "manifest.json").read_text())
    assert manifest["blocks_done"] == [0]
    assert not list((tmp_path / "b").glob("*.tmp")) and not (tmp_path / "b" / "config.json").exists()
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    run(CompressConfig(out=tmp_path / "b", **cfg))
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
