"""Any decoder family, found by discovery (no per-family table): tiny random models of each family.

Full rank reproduces the dense logits; compressed at 0.3 the output reloads in a fresh process (plain
transformers + ``trust_remote_code``, romcomp not imported) with no missing or unexpected keys and
generates; every block receives its own layer's masks (sliding-window layers differ from full ones); a
layout discovery cannot handle is refused in one line before anything is written.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import romcomp
from romcomp.api import run
from romcomp.compression.activations import Boundary
from romcomp.compression.blocks import BlockIO
from romcomp.compression.config import CompressConfig
from romcomp.compression.prepare import block_shapes
from romcomp.model.checkpoint import LazyCheckpoint
from romcomp.model.discovery import discover
from romcomp.model.shell import build_shell
from tests.conftest import make_tokenizer, romcomp_cli
from tests.families import FAMILIES, HIDDEN, make_family_model, tiny_config

SMALL = {"n_samples": 8, "seq_len": 32, "progress": False, "threads": 1}
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: make_family_model(root / f, f) for f in FAMILIES}


def full_ranks(src: Path) -> dict[str, int]:
    """Rank min(d_in (+1 with bias), d_out) for every linear and fused expert projection discovery finds:
    the fit is then exact."""
    model = AutoModelForCausalLM.from_pretrained(src)
    arch = discover(model, model.config)
    shapes = block_shapes(model, arch, len(model.get_submodule(arch.blocks)))
    return {s.name: min(s.d_in + int(s.bias), s.d_out) for s in shapes}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_rank_reproduces_dense_logits(family, sources, tmp_path, calib_text):
    src = sources[family]
    out = tmp_path / "out"
    run(
        CompressConfig(
            model=str(src), ratio=0.3, ranks=full_ranks(src), out=out, calib=str(calib_text), **SMALL
        )
    )
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    assert romcomp.__version__  # registered quantization method: no trust_remote_code
    with torch.inference_mode():
        dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert any(type(m).__name__ == "LowRankLinear" for m in model.modules())
        experts = [m for m in model.modules() if type(m).__name__ == "LowRankExperts"]
        assert len(experts) == (2 * 3 if family in MOE else 0), family
        compressed = model(ids).logits
    torch.testing.assert_close(compressed, dense, rtol=1e-4, atol=2e-4)


RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
report = {}
for family, out in json.loads(sys.argv[1]).items():
    model, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    low = sum(type(m).__name__ in ("LowRankLinear", "LowRankExperts") for m in model.modules())
    experts = sum(type(m).__name__ == "LowRankExperts" for m in model.modules())
    ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    report[family] = {"class": type(model).__name__, "low_rank": low, "tokens": ids.shape[1],
                      "experts": experts, "experts_implementation": model.config._experts_implementation,
                      **{k: sorted(info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}}
print(json.dumps(report))
"""


def test_compressed_families_reload_in_a_fresh_process_and_generate(sources, tmp_path, calib_text):
    outs = {}
    for family, src in sources.items():
        result = run(CompressConfig(model=str(src), ratio=0.3, out=tmp_path / family, calib=str(calib_text),
                                    **SMALL))  # fmt: skip
        assert abs(result.linear_ratio_removed - 0.3) < 0.03, family
        outs[family] = str(result.out)
    proc = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(outs)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for family in sources:
        got = report[family]
        assert got["missing_keys"] == got["unexpected_keys"] == got["mismatched_keys"] == [], (family, got)
        assert got["low_rank"] > 0 and got["tokens"] == 8, (family, got)
        if family in MOE:  # experts factored (auto allocation may keep some dense), run by romcomp's experts
            assert got["experts"] > 0 and got["experts_implementation"] == "romcomp", (family, got)
        assert not got["class"].startswith("Romcomp"), got  # the family's own class, low-rank leaves


def _boundaries_through_engine(src: Path, windows: torch.Tensor, tmp_path: Path, wrong: bool) -> list:
    """Block outputs computed the way the engine does (captured calls, one block at a time)."""
    cfg = AutoConfig.from_pretrained(src)
    shell, ckpt = build_shell(cfg), LazyCheckpoint(src)
    engine = BlockIO(model=shell, arch=discover(shell, cfg, ckpt), ckpt=ckpt, batch_size=2)  # fmt: skip
    shape = (*windows.shape, HIDDEN)
    source = Boundary.create(tmp_path / "a0", shape, in_ram=True)
    engine.capture_inputs(windows, [source])
    if wrong:  # every block gets block 0's arguments (its sliding-window mask)
        for index, size in list(engine.block_calls):
            engine.block_calls[(index, size)] = engine.block_calls[(0, size)]
    outs = []
    for i in range(cfg.num_hidden_layers):
        sink = Boundary.create(tmp_path / f"a{i + 1}", shape, in_ram=True)
        engine.forward(i, engine.load_block(i), source, sink)
        engine.free_block(i)
        outs.append(sink.ram.clone())
        source = sink
    return outs


@pytest.mark.parametrize("family", ["gemma2", "qwen2"])
def test_each_block_gets_its_own_layers_mask(family, sources, tmp_path):
    """Sliding-window layers alternate with full-attention ones: the engine's block outputs equal the
    model's hidden states only with each layer's own mask (checked to matter: block 0's everywhere is
    measurably wrong)."""
    src = sources[family]
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        hidden = AutoModelForCausalLM.from_pretrained(src)(windows, output_hidden_states=True).hidden_states
    right = _boundaries_through_engine(src, windows, tmp_path / "right", wrong=False)
    wrong = _boundaries_through_engine(src, windows, tmp_path / "wrong", wrong=True)
    for i in range(len(right) - 1):  # the last hidden state is after the final norm
        torch.testing.assert_close(right[i], hidden[i + 1], rtol=1e-5, atol=1e-5)
    assert (wrong[1] - hidden[2]).abs().max() > 1e-3  # block 1 is a full-attention layer


def test_unknown_layout_is_refused_in_one_line(tmp_path, calib_text):
    """GPT-2 builds its projections from ``Conv1D``, not ``nn.Linear``: exit 2, one line, nothing written."""
    from transformers import GPT2Config, GPT2LMHeadModel

    src = tmp_path / "gpt2"
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=258, n_positions=128, bos_token_id=256,
                        eos_token_id=257)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(src)
    make_tokenizer(src)
    out = tmp_path / "out"
    proc = romcomp_cli(
        str(src), "--ratio", "0.3", "--calib", str(calib_text), "--seq-len", "32", "--out", str(out)
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nn.Linear" in lines[0] and "Conv1D" in lines[0], proc.stderr
    assert not out.exists()


def test_moe_experts_are_factored_per_expert_and_starved_experts_reported(tmp_path, calib_text, capsys):
    """Fused 3-D experts (per-expert tensors on disk, merged by transformers' conversion mapping) are
    factored expert by expert and counted in the ratio; the router stays dense. An expert the router never
    picks (top-1 routing; router rows 0 and 1 opposite, so one of them always scores ≥ 0, and row 3 zero)
    has no statistics: it is fitted by plain SVD of its weight — the best rank-k approximation — and the
    summary says so. The output runs under transformers' own ``eager`` experts too, in bfloat16, and
    generates. (The command runs through the CLI's entry point in this process: a fresh interpreter would
    cost more than the compression.)"""
    from safetensors.torch import load_file

    from romcomp.cli import main

    config = tiny_config("mixtral")
    config.num_experts_per_tok = 1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
        for layer in model.model.layers:
            router = layer.mlp.gate.weight
            router[1], router[3] = -router[0], 0.0
    src = tmp_path / "src"
    model.save_pretrained(src)
    make_tokenizer(src)
    dense = model.model.layers[1].mlp.experts.down_proj[3].detach().double()
    out = tmp_path / "out"
    args = ("--ratio", "0.3", "--allocation", "uniform", "--calib", str(calib_text), "--seq-len", "32",
            "--n-samples", "16", "--out", str(out))  # fmt: skip
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main([str(src), *args])
    proc = capsys.readouterr()
    assert exited.value.code in (0, None), proc.err[-2000:]
    assert "kept dense   mlp.gate.weight in every block" in proc.out
    assert re.search(r"down_proj×4 +128→64", proc.out), proc.out
    manifest = json.loads((out / ".romcomp" / "manifest.json").read_text())
    starved = [n for notes in manifest["notes"].values() for n in notes if "plain SVD" in n]
    assert len(starved) == 6 and all(re.search(r": (\d+ \(\d+\), )*3 \(0\)$", n) for n in starved), starved
    fits = sum(len(n.rpartition(": ")[2].split(", ")) for n in starved)
    assert f"experts      {fits} expert fit(s) saw too few routed tokens" in proc.out, proc.out
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    k = config["ranks"]["model.layers.1.mlp.experts.down_proj"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.experts.down_proj"
    factors = {p: load_file(out / index[f"{name}.{p}"])[f"{name}.{p}"].double() for p in ("down", "up")}
    assert factors["down"].shape == (4, k, 128) and factors["up"].shape == (4, 64, k)
    u, sv, vh = torch.linalg.svd(dense)
    best = (u[:, :k] * sv[:k]) @ vh[:k]
    got = factors["up"][3] @ factors["down"][3]
    assert (got - best).norm() < 0.02 * dense.norm()  # bfloat16 factors of the best rank-k approximation
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert model.config._experts_implementation == "romcomp"
        ours = model(ids).logits
        model.set_experts_implementation("eager")  # transformers' loop, indexing dense expert matrices
        torch.testing.assert_close(model(ids).logits, ours, rtol=1e-4, atol=1e-4)
        half = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
        assert half.generate(ids[:1, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)


def test_checkpoint_conversion_romcomp_cannot_stream_is_refused_before_work(sources, tmp_path, calib_text,
                                                                            monkeypatch):  # fmt: skip
    """A family whose registered conversion needs an operation the lazy reader does not apply (here the
    Mixtral mapping with a ``Transpose`` appended) is refused in one line, naming the tensor and the
    operation, and nothing is written."""
    import transformers.conversion_mapping as cm
    from transformers.core_model_loading import Concatenate, MergeModulelist, Transpose, WeightConverter

    from romcomp.errors import BadInputError

    original = cm.get_model_conversion_mapping

    def with_transpose(model, *args, **kwargs):
        unstreamable = WeightConverter(
            source_patterns=[".experts.*.w2.weight"],
            target_patterns=".experts.down_proj",
            operations=[MergeModulelist(dim=0), Concatenate(dim=1), Transpose(1, 2)],
        )  # first, so it claims the down-projection tensors before the registered converter does
        return [unstreamable, *original(model, *args, **kwargs)]

    monkeypatch.setattr(cm, "get_model_conversion_mapping", with_transpose)
    out = tmp_path / "out"
    with pytest.raises(BadInputError, match=r"experts\.down_proj' needs transformers' Transpose conversion"):
        run(CompressConfig(model=str(sources["mixtral"]), ratio=0.3, out=out, calib=str(calib_text), **SMALL))
    assert not out.exists()


def test_measured_signal_sees_through_a_post_norm(tmp_path, calib_text, monkeypatch):
    """Gemma 2 normalizes each sublayer's output before adding it to the residual stream, so scaling a
    block's down_proj by 0.03 changes nothing the model computes. The proxy signal reads the linear's own
    output energy and cuts the scaled matrix to almost nothing; the measured signal (``SIGNAL = "block"``:
    the block's output under each cut) allocates it as before."""
    from safetensors.torch import load_file, save_file

    from romcomp.compression import allocation

    src = make_family_model(tmp_path / "src", "gemma2", layers=3)
    scaled = tmp_path / "scaled"
    shutil.copytree(src, scaled)
    target = "model.layers.1.mlp.down_proj"
    for shard in scaled.glob("*.safetensors"):
        tensors = load_file(shard)
        if f"{target}.weight" in tensors:
            tensors[f"{target}.weight"] = tensors[f"{target}.weight"] * 0.03
            save_file(tensors, shard, metadata={"format": "pt"})
    ranks = {}
    for signal in ("proxy", "block"):
        monkeypatch.setattr(allocation, "SIGNAL", signal)
        for name, model in (("dense", src), ("scaled", scaled)):
            out = tmp_path / f"{signal}-{name}"
            cfg = CompressConfig(model=str(model), ratio=0.3, out=out, calib=str(calib_text), n_samples=8,
                                 seq_len=64, progress=False, max_ram="2GB")  # fmt: skip
            result = run(cfg)
            ranks[signal, name] = result.ranks.get(target, 10**6)  # absent: dense
    assert ranks["proxy", "scaled"] <= 2 < ranks["proxy", "dense"], ranks
    assert abs(ranks["block", "scaled"] - ranks["block", "dense"]) <= 2, ranks
