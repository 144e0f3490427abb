"""MoE experts' statistics in chunks: one calibration pass per chunk of experts holds only that chunk's
moments, and gives the factors of the one-pass fit bit for bit."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM

import romcomp.hf  # noqa: F401 - registers the romcomp experts implementation
from romcomp.compression.experts import fit_experts
from romcomp.hf.modeling_romcomp import QUANT_METHOD, LowRankExperts
from romcomp.methods import get_method
from romcomp.model.discovery import StopForward, discover
from tests.families import tiny_config


def _fit(block, arch, ranks, x, rotary, chunk):
    passes, held = [0], []

    def run(stats: dict) -> None:
        passes[0] += 1
        try:
            block(x, position_embeddings=rotary)
        except StopForward:
            pass
        held.append(len({e for _, e in stats}))

    notes = fit_experts(block, list(arch.experts), ranks, arch.block_prefix(0), run, get_method("rom"),
                        torch.float32, chunk)  # fmt: skip
    return notes, passes[0], held


def test_chunked_expert_statistics_give_the_same_factors():
    """Chunks of 1 and 3 experts (of 4): one pass per chunk, never more than the chunk's experts' moments
    held, and factors identical to the single pass — every pass sees the dense experts, so the order of
    the fits cannot leak into another expert's statistics (swapping factors in before the last pass fails
    this)."""
    config = tiny_config("mixtral", 1)
    config.num_experts_per_tok = 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.set_experts_implementation(QUANT_METHOD)
    arch = discover(model, model.config)
    assert arch.experts
    x = torch.randn(2, 48, config.hidden_size)
    rotary = model.model.rotary_emb(x, torch.arange(48)[None].expand(2, -1))
    ranks = {arch.block_prefix(0) + n: 8 for n in arch.experts}
    results = {}
    for chunk in (None, 1, 3):
        block = copy.deepcopy(model.get_submodule(arch.blocks)[0])
        with torch.inference_mode():
            notes, passes, held = _fit(block, arch, ranks, x, rotary, chunk)
        assert passes == {None: 1, 1: 4, 3: 2}[chunk]
        assert max(held) <= (chunk or 4)
        results[chunk] = {n: block.get_submodule(n) for n in arch.experts}
        assert all(isinstance(m, LowRankExperts) for m in results[chunk].values())
    for chunk in (1, 3):
        for n in arch.experts:
            assert torch.equal(results[chunk][n].down, results[None][n].down)
            assert torch.equal(results[chunk][n].up, results[None][n].up)


def test_plan_splits_the_expert_moments_before_spilling_activations():
    """60 experts (Qwen1.5-MoE's count) with two projections' moments each (1024 and 512 wide), 0.62 GiB
    at once: under a cap short of half of them the plan keeps activations in RAM at batch 8 and holds 15
    experts' moments per pass, also in the pre-pass phase, which holds a chunk beside every linear's."""
    from romcomp.compression.memory import ModelDims, estimate, expert_chunks, peak_bytes, plan

    dims = ModelDims(hidden=1024, intermediate=512, heads=8, vocab=1000, block_params=2_000_000,
                     linear_shapes=((1024, 1024),) * 4, cov_dims=(1024, 1024), linear_inputs=(1024, 1024),
                     expert_covs=(1024,) * 60 + (512,) * 60, n_experts=60)  # fmt: skip
    assert expert_chunks(60) == [None, 30, 15, 7, 3, 1]
    every = sum((d + 1) ** 2 for d in dims.expert_covs) * 8
    whole = estimate(dims, 8, 128, 8, True, profile=True)
    assert whole["covariances (float64)"] >= every
    budget = peak_bytes(whole) - every // 2  # the whole set does not fit, a quarter does
    chosen = plan(dims, 8, 128, budget, profile=True)
    assert (chosen.expert_chunk, chosen.batch_size, chosen.activations_in_ram) == (15, 8, True)
    assert chosen.parts["covariances (float64)"] == 2 * (1025**2 * 8) + -(-every * 15 // 60)


def test_a_run_in_expert_chunks_writes_the_bytes_of_one_pass(tmp_path, calib_text, monkeypatch):
    """End to end on a tiny Mixtral with the default allocation (the pre-pass's expert spectra and the
    experts' fit both chunked): the plan's chunk of one expert reaches the manifest and the shards equal
    an unchunked run's."""
    from romcomp.api import run
    from romcomp.compression import memory
    from romcomp.compression.config import CompressConfig
    from tests.families import make_family_model

    src = make_family_model(tmp_path / "src", "mixtral", layers=2)
    cfg = {"model": str(src), "calib": str(calib_text), "ratio": 0.3, "n_samples": 8, "seq_len": 64,
           "progress": False, "max_ram": "2GB"}  # fmt: skip
    whole = run(CompressConfig(out=tmp_path / "whole", **cfg))
    assert whole.plan.expert_chunk is None
    monkeypatch.setattr(memory, "expert_chunks", lambda n: [1])
    chunked = run(CompressConfig(out=tmp_path / "chunked", **cfg))
    assert chunked.plan.expert_chunk == 1
    assert whole.ranks == chunked.ranks

    def shards(out):
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}

    assert shards(whole.out) == shards(chunked.out)
