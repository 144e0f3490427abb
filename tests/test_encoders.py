"""Encoders (BERT family) through the same engine: a tiny random BERT, and all-MiniLM-L6-v2 for real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

import romcomp
from romcomp.api import run
from romcomp.compression.config import CompressConfig
from romcomp.model.discovery import discover
from tests.families import make_bert

SMALL = {"n_samples": 8, "seq_len": 32, "progress": False, "threads": 1}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return make_bert(tmp_path_factory.mktemp("bert") / "tiny-bert")


def padded_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # a padded sentence: its padding must not leak into the others' outputs
    mask[2, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_discovery_finds_the_bert_layout(tiny_bert):
    model = AutoModel.from_pretrained(tiny_bert)
    arch = discover(model, model.config)
    assert arch.blocks == "encoder.layer" and arch.base == "" and arch.lm_head is None
    assert arch.groups == (
        ("attention.self.query", "attention.self.key", "attention.self.value"),
        ("attention.output.dense",),
        ("intermediate.dense",),
        ("output.dense",),
    )
    assert arch.sublayers == ((0, 1), (2, 3))


def test_full_rank_bert_reproduces_dense_outputs(tiny_bert, tmp_path, calib_text):
    model = AutoModel.from_pretrained(tiny_bert)
    arch = discover(model, model.config)
    ranks = {}
    for i, layer in enumerate(model.get_submodule(arch.blocks)):
        for name in arch.linears:
            lin = layer.get_submodule(name)
            ranks[arch.block_prefix(i) + name] = min(lin.in_features + 1, lin.out_features)
    out = tmp_path / "out"
    run(CompressConfig(model=str(tiny_bert), ratio=0.3, ranks=ranks, out=out, calib=str(calib_text), **SMALL))
    assert romcomp.__version__
    batch = padded_batch()
    with torch.inference_mode():
        dense = model.eval()(**batch).last_hidden_state
        compressed = AutoModel.from_pretrained(out).eval()(**batch).last_hidden_state
    torch.testing.assert_close(compressed, dense, rtol=1e-4, atol=2e-4)


RELOAD = """
import json, sys, torch
from transformers import AutoModel
model, info = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, output_loading_info=True)
ids = torch.tensor([[1, 2, 3, 4, 257, 257]]); mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
out = model(input_ids=ids, attention_mask=mask).last_hidden_state
keys = {k: sorted(info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
finite = bool(out.isfinite().all())
print(json.dumps({"class": type(model).__name__, "shape": list(out.shape), "finite": finite, **keys}))
"""


def test_compressed_bert_reloads_with_automodel_in_a_fresh_process(tiny_bert, tmp_path, calib_text):
    out = tmp_path / "out"
    result = run(CompressConfig(model=str(tiny_bert), ratio=0.3, out=out, calib=str(calib_text), **SMALL))
    assert abs(result.linear_ratio_removed - 0.3) < 0.03
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert" and config["auto_map"] == {
        "AutoModel": "modeling_romcomp.RomcompModel"
    }
    cmd = [sys.executable, "-c", RELOAD, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"class": "BertModel", "shape": [1, 6, 64], "finite": True, "missing_keys": [],
                   "unexpected_keys": [], "mismatched_keys": []}  # fmt: skip


def test_encoder_calibration_defaults_to_sentence_windows(tiny_bert, tmp_path, calib_text):
    result = run(CompressConfig(model=str(tiny_bert), ratio=0.3, out=tmp_path / "o", calib=str(calib_text),
                                progress=False, threads=1))  # fmt: skip
    assert "512 x 64 tokens" in result.calibration


@pytest.mark.slow
def test_minilm_at_0_2_keeps_sentence_embeddings(tmp_path, data_dir, minilm_dir):
    """all-MiniLM-L6-v2 (PyPI), 20% of its block linears removed with the defaults (C4, 512 × 64): the
    mean-pooled embeddings of held-out sentences (SNLI test) and documents (held-out C4) keep a mean
    cosine of at least 0.9 with the dense model's, and SNLI by a head on its frozen features stays well
    above the majority class and within 0.05 of the dense model's."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from bench_encoder import embedding_cosines

    out = tmp_path / "minilm-r0.2"
    run(CompressConfig(model="all-minilm-l6-v2", ratio=0.2, out=out, progress=False, data_dir=data_dir))
    cosines = embedding_cosines("all-minilm-l6-v2", out, data_dir)
    for name, values in cosines.items():
        assert values.mean() >= 0.9, (name, float(values.mean()))
    # SNLI by the frozen-feature head (romcomp eval's encoder path), first 600 pairs: measured dense 0.513,
    # compressed 0.550, majority 0.340 (one standard error ~0.02)
    from tests.conftest import romcomp_cli

    report = tmp_path / "snli.json"
    args = ["--tasks", "snli", "--limit", "600", "--data-dir", str(data_dir), "--json", str(report)]
    proc = romcomp_cli("eval", "all-minilm-l6-v2", str(out), *args, "--no-plots", "--threads", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dense, small = (m["nli_head"]["snli_head"] for m in json.loads(report.read_text())["models"])
    assert dense["pairs"] == small["pairs"] == 600
    assert dense["acc"] > dense["majority_acc"] + 0.1 and small["acc"] > dense["acc"] - 0.05, (dense, small)


def test_perplexity_option_is_refused_for_an_encoder(tiny_bert, tmp_path, calib_text):
    from tests.conftest import romcomp_cli

    out = tmp_path / "out"
    proc = romcomp_cli(str(tiny_bert), "--ratio", "0.3", "--calib", str(calib_text), "--ppl-windows", "2",
                       "--out", str(out))  # fmt: skip
    assert (
        proc.returncode == 2 and "is an encoder" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    )
    assert not out.exists()


def test_encoders_price_dense_by_their_own_constant(tiny_bert, tmp_path, calib_text, monkeypatch):
    """``auto`` on an encoder reads :data:`AUTO_DENSE_ENCODER` (chosen on MiniLM's validation text), not the
    decoders' :data:`AUTO_DENSE`: changing the decoders' pricing leaves an encoder's ranks alone, changing
    the encoders' moves them."""
    from romcomp.compression import allocation

    def ranks(name: str) -> dict[str, int]:
        out = tmp_path / name
        run(CompressConfig(model=str(tiny_bert), ratio=0.3, out=out, calib=str(calib_text), **SMALL))
        return json.loads((out / ".romcomp" / "manifest.json").read_text())["ranks"]

    default = ranks("default")
    monkeypatch.setattr(allocation, "AUTO_DENSE", "bundle" if allocation.AUTO_DENSE == "step" else "step")
    assert ranks("decoder-pricing-changed") == default
    monkeypatch.setattr(allocation, "AUTO_DENSE_ENCODER", "step")
    by_step = ranks("encoder-step")
    assert by_step != default, default
