"""The compressed block's first sublayer (attention) is computed once after it is fitted and replayed by the
later forwards of the block: the outputs are the bytes a run without the replay writes, with fewer
attention forwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM
from transformers.models.llama import modeling_llama

from romcomp.api import run
from romcomp.compression import replay
from romcomp.compression.activations import Scratch
from romcomp.compression.config import CompressConfig
from romcomp.model.discovery import discover
from tests.conftest import make_tiny_model
from tests.families import make_bert, tiny_config

SMALL = {"n_samples": 8, "seq_len": 64, "progress": False, "max_ram": "2GB"}


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny3") / "src", "llama", layers=3)


@pytest.mark.parametrize(("family", "expected"), [("llama", "self_attn"), ("qwen2_moe", "self_attn"),
                                                  ("phi3", "self_attn")])  # fmt: skip
def test_first_sublayer_is_found_from_the_layout(family, expected):
    model = AutoModelForCausalLM.from_config(tiny_config(family, 2))
    arch = discover(model, model.config)
    assert replay.first_sublayer(arch) == expected


def test_first_sublayer_of_an_encoder(tmp_path):
    model = AutoModel.from_pretrained(make_bert(tmp_path / "bert"))
    arch = discover(model, model.config)
    assert replay.first_sublayer(arch) == "attention"


def test_no_first_sublayer_when_its_module_holds_other_linears():
    """A layout whose only common ancestor of the attention's linears also holds the MLP's: no replay."""
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 2))
    arch = discover(model, model.config)
    merged = type(arch)(arch.blocks, (("self_attn.q_proj",), ("self_attn.o_proj", "self_attn.mlp_proj")),
                        sublayers=((0,), (1,)))  # fmt: skip
    assert replay.first_sublayer(merged) is None


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


@pytest.mark.parametrize("fit", ["error-aware", "local"])
def test_replay_writes_the_same_bytes_with_fewer_attention_forwards(tiny3, tmp_path, calib_text,
                                                                    monkeypatch, fit):  # fmt: skip
    """Each fitted copy's attention runs once after ``o_proj`` is fitted (the gate/up statistics forward)
    and is replayed by the ``down_proj`` statistics forward and the propagation: two fewer attention
    passes per block and copy; the shards are bit-identical to a run without the replay."""
    calls = [0]
    original = modeling_llama.LlamaAttention.forward

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", counting)
    cfg = {"model": str(tiny3), "calib": str(calib_text), "ratio": 0.3, "fit": fit, "allocation": "uniform",
           **SMALL}  # fmt: skip
    with_replay = run(CompressConfig(out=tmp_path / "replay", **cfg))
    counted = calls[0]
    calls[0] = 0
    monkeypatch.setattr(replay, "first_sublayer", lambda *_: None)
    without = run(CompressConfig(out=tmp_path / "plain", **cfg))
    assert _shards(with_replay.out) == _shards(without.out)
    batches = SMALL["n_samples"] // with_replay.plan.batch_size
    assert calls[0] - counted == 2 * batches * 3  # uniform: every linear of the 3 blocks compressed


class _Doubler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, None]:
        self.calls += 1
        return 2 * hidden_states, None


def test_replay_computes_a_batch_it_does_not_recognize(tmp_path):
    """Recorded over the windows in order, then replayed — except for a batch whose input differs from the
    recorded one (the guard against a module called otherwise than once per block forward): computed."""
    inner = _Doubler()
    x = torch.randn(4, 3, 5)
    r = replay.Replay(inner, Scratch.create(tmp_path / "r.bin", (4, 3, 5), True), 4)
    for start in (0, 2):
        out, none = r(hidden_states=x[start : start + 2])
        assert none is None and torch.equal(out, 2 * x[start : start + 2])
    assert r.recorded and inner.calls == 2
    torch.testing.assert_close(r(hidden_states=x[:2])[0], 2 * x[:2], rtol=0, atol=0)
    assert inner.calls == 2  # replayed
    changed = x[2:] + 1
    torch.testing.assert_close(r(hidden_states=changed)[0], 2 * changed, rtol=0, atol=0)
    assert inner.calls == 3  # not recognized: computed
