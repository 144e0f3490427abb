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
