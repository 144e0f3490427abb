"""Every compress option the README lists, run end to end through the real CLI on a tiny random Llama.

Each test compresses with one option changed against an explicit baseline (``--method rom --calib-stream
compressed --no-sequential --compute-dtype float32``, plus ``--fit local --allocation uniform`` where those
options exist, so a change of defaults cannot make both sides the same run) and checks what the option must
change: the ``config.json`` record or the manifest, which factors differ and which stay bit-identical, and
that the output loads with ``AutoModelForCausalLM`` after ``import romcomp`` with no missing keys.

The runs go through the CLI's entry point, ``romcomp.cli.main`` (argument parsing, option checks, exit
codes: what ``python -m romcomp.cli`` runs), in this process: a fresh interpreter per run would import torch
and transformers seven times, most of this module's time. ``tests/test_cli.py`` runs the command itself.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import romcomp
from romcomp.compression.config import CompressConfig
from tests.conftest import calibration_text

SMALL = ["--ratio", "0.3", "--n-samples", "4", "--seq-len", "32", "--threads", "2", "--no-progress",
         "--max-ram", "4GB"]  # fmt: skip
BASELINE = {"method": "rom", "calib_stream": "compressed", "sequential": False, "compute_dtype": "float32"}
# Options added later (error-aware fit, data-driven allocation) are pinned where they exist: the comparisons
# below are about one option at a time, on the same fit and the same ranks.
PINNED = {
    key: value
    for key, value in {"fit": "local", "allocation": "uniform"}.items()
    if key in {f.name for f in dataclasses.fields(CompressConfig)}
}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def cli_options(**overrides: str | bool) -> list[str]:
    """``--key value`` (``--flag`` / ``--no-flag`` for booleans) for the baseline with ``overrides``."""
    args: list[str] = []
    for key, value in {**BASELINE, **PINNED, **overrides}.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            args.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            args += [f"--{flag}", str(value)]
    return args


@pytest.fixture(scope="module")
def compress(tiny_llama: Path, calib_text: Path, tmp_path_factory):
    """``compress(**overrides)``: the output directory of the baseline with ``overrides`` (run once)."""
    from romcomp.cli import main

    root = tmp_path_factory.mktemp("options")
    done: dict[str, Path] = {}

    def run(**overrides: str | bool) -> Path:
        name = "-".join(f"{key}-{value}" for key, value in sorted(overrides.items())) or "baseline"
        if name not in done:
            args = [str(tiny_llama), *SMALL, "--calib", str(calib_text), *cli_options(**overrides)]
            try:
                main([*args, "--out", str(root / name)])
                code = 0
            except SystemExit as exc:  # main always exits; its error line is in the captured stderr
                code = 0 if exc.code is None else exc.code
            assert code == 0, (args, code)
            done[name] = root / name
        return done[name]

    return run


def load(out: Path) -> torch.nn.Module:
    """The output through the registered Auto classes (no ``trust_remote_code``), every key accounted for."""
    assert romcomp.__version__  # the import registers the "romcomp" quantization method
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(model).__name__ == "LlamaForCausalLM"
    return model.eval()


def record(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())["quantization_config"]


def manifest_args(out: Path) -> dict:
    return json.loads((out / ".romcomp" / "manifest.json").read_text())["args"]


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def products(out: Path) -> dict[str, torch.Tensor]:
    """``up @ down`` (float64) of every factored linear, by module name (``model.layers.0.mlp.up_proj``)."""
    t = tensors(out)
    ups = [key.removesuffix(".up.weight") for key in t if key.endswith(".up.weight")]
    return {name: t[f"{name}.up.weight"].double() @ t[f"{name}.down.weight"].double() for name in ups}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def block_of(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def logits(model: torch.nn.Module, out: Path) -> torch.Tensor:
    """Logits on two 64-token windows of calibration-like text (another seed than the calibration file)."""
    text = calibration_text(n_bytes=1000, seed=1)
    ids = AutoTokenizer.from_pretrained(out)(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.inference_mode():
        return model(ids[:, :128].view(2, 64)).logits


def test_baseline_records_its_explicit_options(compress) -> None:
    out = compress()
    load(out)
    rec = record(out)
    assert (rec["method"], rec["calib_stream"], rec["sequential"]) == ("rom", "compressed", False)
    assert manifest_args(out)["compute_dtype"] == "float32"
    assert "calib-english.txt" in rec["calibration"] and rec["ratio"] == 0.3


def test_method_svd_is_the_data_free_truncated_svd(compress, tiny_llama: Path) -> None:
    """Every linear's ``up @ down`` is the best rank-k approximation of the source weight (Eckart-Young),
    whatever the calibration data; and it is not what ROM writes."""
    out = compress(method="svd")
    load(out)
    rec = record(out)
    assert rec["method"] == "svd" and manifest_args(out)["method"] == "svd"
    rom, svd = products(compress()), products(out)
    source = tensors(tiny_llama)
    assert set(svd) == set(rom) and len(svd) == 3 * 7
    for name, product in svd.items():
        weight = source[f"{name}.weight"].double()
        k = rec["ranks"][name]
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        best = (u[:, :k] * s[:k]) @ vh[:k]
        # float32 factors (the tiny model saves float32): ~1e-7 relative; a wrong rank or basis is ~1e-1.
        assert rel(product, best) < 1e-5, (name, rel(product, best))
        assert torch.linalg.matrix_rank(product.float()) == k < min(weight.shape), name
        assert rel(product, rom[name]) > 0.1, name  # measured 0.64-0.79: the calibration data matter to ROM


def test_method_svd_llm_is_roms_subspace_in_its_own_float32_arithmetic(compress, tiny_llama: Path) -> None:
    """Uniform ranks and the local fit (the baseline's) are SVD-LLM's own setting: its whitened SVD spans
    ROM's subspace, so every product agrees with ROM's to round-off — far below what truncation discards
    (a wrong rank or whitening would differ by ~1 of it) — and the record names the method."""
    out = compress(method="svd-llm")
    load(out)
    assert record(out)["method"] == "svd-llm" and record(out)["fit"] == "local"
    rom, ours, source = products(compress()), products(out), tensors(tiny_llama)
    assert set(ours) == set(rom) and len(ours) == 3 * 7
    for name, product in ours.items():
        discarded = (source[f"{name}.weight"].double() - rom[name]).norm()
        assert (product - rom[name]).norm() < 1e-2 * discarded, name


def test_method_asvd_scales_by_activations(compress, tiny_llama: Path) -> None:
    """ASVD is neither the data-free SVD nor ROM: its products differ from both, at the same ranks."""
    out = compress(method="asvd")
    load(out)
    assert record(out)["method"] == "asvd"
    ours, svd, rom = products(out), products(compress(method="svd")), products(compress())
    assert set(ours) == set(svd) and len(ours) == 3 * 7
    for name, product in ours.items():
        assert rel(product, svd[name]) > 1e-2 and rel(product, rom[name]) > 1e-2, name


def test_calib_stream_dense_changes_every_block_but_the_first(compress) -> None:
    """Block 0's inputs are the embeddings either way, so its factors are bit-identical; every later block is
    calibrated on the dense model's activations instead of the compressed model's."""
    base, dense = compress(), compress(calib_stream="dense")
    load(dense)
    assert record(dense)["calib_stream"] == "dense" and manifest_args(dense)["calib_stream"] == "dense"
    base_t, dense_t = tensors(base), tensors(dense)
    for key, value in base_t.items():
        if key.startswith("model.layers.0."):
            assert torch.equal(dense_t[key], value), key
    base_p = products(base)
    for name, product in products(dense).items():
        if block_of(name) > 0:
            assert rel(product, base_p[name]) > 1e-2, name  # measured 0.27-0.45


def test_sequential_refits_the_later_groups_on_compressed_outputs(compress) -> None:
    """The first group (q/k/v) of block 0 sees the same inputs either way and is bit-identical; o_proj,
    gate/up and down are fitted to the outputs of the already compressed groups, and so differ."""
    out = compress(sequential=True)
    load(out)
    assert record(out)["sequential"] is True and manifest_args(out)["sequential"] is True
    base, seq = products(compress()), products(out)
    for name, product in seq.items():
        if block_of(name) == 0 and name.endswith(QKV):
            assert torch.equal(product, base[name]), name
        else:
            assert rel(product, base[name]) > 1e-2, name  # measured 0.32-0.54


def test_compute_dtype_bfloat16_changes_the_factors_slightly(compress) -> None:
    """bfloat16 calibration forwards: the statistics move a little, so the factors differ by ~1e-2 (not 0,
    not the ~0.3-1 of another method or stream) and the logits stay close to the float32 run's."""
    base_dir, bf16_dir = compress(), compress(compute_dtype="bfloat16")
    assert manifest_args(bf16_dir)["compute_dtype"] == "bfloat16"
    base, bf16 = products(base_dir), products(bf16_dir)
    diffs = {name: rel(bf16[name], base[name]) for name in base}
    assert max(diffs.values()) < 0.25, diffs  # measured at most 0.06
    assert sum(d > 1e-4 for d in diffs.values()) >= len(diffs) // 2, diffs  # it did run in bfloat16
    float32_logits, bf16_logits = logits(load(base_dir), base_dir), logits(load(bf16_dir), bf16_dir)
    # compression itself moves these logits by ~1 relative (a random tiny model at ratio 0.3)
    assert 1e-4 < rel(bf16_logits, float32_logits) < 0.1
