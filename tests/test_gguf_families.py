"""GGUF input for every family transformers' GGUF loader reads, converted tensor by tensor.

Each tiny random model is written as llama.cpp would write it (``tests/gguf_writer.py``); romcomp's streamed
conversion must give exactly the logits of transformers' own (whole-model, in-RAM) GGUF loader, and a GGUF
path compresses end to end. Real llama.cpp files (SmolLM2, Qwen2.5-Coder: llama and qwen2) are checked in
``tests/test_sources.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from romcomp.api import run
from romcomp.compression.config import CompressConfig
from romcomp.model import gguf as gguf_convert
from romcomp.model.sources import resolve_model
from tests.families import tiny_config
from tests.gguf_writer import GGUF_READABLE, write_gguf

GGUF_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "starcoder2",
                 "stablelm", "qwen2_moe", "qwen3_moe"]  # fmt: skip


def tiny_gguf(root: Path, family: str) -> Path:
    from tests.conftest import save_random

    config = tiny_config(family)
    for key, value in GGUF_READABLE.get(family, {}).items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    save_random(model, root / "hf")  # the larger random weights of the other family tests
    return write_gguf(model.eval(), root / f"{family}.gguf")


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_conversion_equals_transformers_gguf_loader(family: str, tmp_path: Path) -> None:
    path = tiny_gguf(tmp_path, family)
    gguf_convert.convert_gguf(path, tmp_path / "converted")
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
        converted = AutoModelForCausalLM.from_pretrained(tmp_path / "converted", dtype=torch.float32)
        assert type(converted) is type(ref)
        assert torch.equal(converted(ids).logits, ref(ids).logits), family
    if family in ("llama", "gemma2", "qwen2_moe"):  # configs GGUF metadata carries in full: the source itself
        source = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
        with torch.inference_mode():
            torch.testing.assert_close(converted(ids).logits, source(ids).logits, rtol=0, atol=1e-5)


def test_a_gguf_path_compresses_end_to_end(tmp_path: Path, calib_text: Path) -> None:
    """A Qwen2-MoE GGUF (fused experts assembled from llama.cpp's gate/up stacks): resolved into the cache
    once, compressed (its experts factored), and the output loads and runs."""
    path = tiny_gguf(tmp_path, "qwen2_moe")
    resolved = resolve_model(str(path), cache=tmp_path / "cache")
    cfg = CompressConfig(model=str(resolved.path), ratio=0.3, out=tmp_path / "out", calib=str(calib_text),
                         n_samples=8, seq_len=32, progress=False, threads=1)  # fmt: skip
    result = run(cfg)
    assert abs(result.linear_ratio_removed - 0.3) < 0.03
    model = AutoModelForCausalLM.from_pretrained(result.out, dtype=torch.float32)
    assert any(type(m).__name__ == "LowRankExperts" for m in model.modules())  # the experts are factored
    with torch.inference_mode():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
