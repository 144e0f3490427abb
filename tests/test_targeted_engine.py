"""Targeted compression end to end on tiny random models: allocations, the error-aware fit in the engine,
several ratios per run (equal to separate runs, killed and resumed bit-identically), the CLI options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import romcomp  # noqa: F401 - registers the romcomp Auto classes
from romcomp.api import run, run_many
from romcomp.compression.config import CompressConfig
from romcomp.compression.ranks import linear_params
from romcomp.errors import BadInputError
from tests.conftest import REPO, make_tiny_model, romcomp_cli

SMALL = {"n_samples": 8, "seq_len": 64, "progress": False, "max_ram": "2GB"}


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny4") / "src", "llama", layers=4)


def shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.inference_mode():
        return model(ids).logits


def test_several_ratios_equal_separate_runs_bit_for_bit(tiny4, tmp_path, calib_text):
    """One pass for 0.2 and 0.4 shares the pre-pass, the block loads and the dense stream, and writes
    exactly the bytes of two separate runs (same batch size, same spectra, same arithmetic)."""
    cfg = {"model": str(tiny4), "calib": str(calib_text), **SMALL}
    many = run_many(CompressConfig(ratio=(0.2, 0.4), out=tmp_path / "many", **cfg))
    assert [r.out.name for r in many] == ["src-r0.2", "src-r0.4"]
    for result in many:
        single = run(CompressConfig(ratio=result.ratio, out=tmp_path / f"one-{result.ratio}", **cfg))
        assert single.plan.batch_size == result.plan.batch_size
        assert single.ranks == result.ranks
        assert shards(result.out) == shards(single.out)
        record = json.loads((result.out / "config.json").read_text())["quantization_config"]
        assert (record["ratio"], record["fit"], record["allocation"]) == (result.ratio, "error-aware", "auto")
        dense, kept = linear_params(result.shapes, result.ranks)
        assert result.ratio <= 1 - kept / dense < result.ratio + 0.02
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    ref = logits(tiny4, ids)
    err = [float((logits(r.out, ids) - ref).norm() / ref.norm()) for r in many]
    assert err[0] < err[1]  # more removed, further from the dense model


@pytest.mark.parametrize("method", ["svd-llm", "rom"])
def test_ratios_on_the_dense_stream_share_statistics_bit_for_bit(
    tiny4, tmp_path, calib_text, method, monkeypatch
):
    """Local fit on the dense stream in one stage (SVD-LLM's own setting): every ratio's linears see the
    same inputs, so one forward and one set of statistics serve both ratios (and SVD-LLM's inverse and
    SVD are computed once per linear) — and the outputs are the bytes of two separate runs."""
    from romcomp.compression.blocks import BlockIO

    cfg = {"model": str(tiny4), "calib": str(calib_text), "method": method, "allocation": "uniform",
           "fit": "local", "calib_stream": "dense", "sequential": False, **SMALL}  # fmt: skip
    forwards, svds = [], []
    real_forward, real_svd = BlockIO.forward, torch.linalg.svd
    monkeypatch.setattr(BlockIO, "forward", lambda self, *a: forwards.append(a[0]) or real_forward(self, *a))
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: svds.append(1) or real_svd(*a, **k))
    many = run_many(CompressConfig(ratio=(0.2, 0.4), out=tmp_path / "many", **cfg))
    n_blocks = AutoModelForCausalLM.from_pretrained(tiny4).config.num_hidden_layers
    assert sorted(forwards) == list(range(n_blocks))  # one forward per block, not one per ratio
    if method == "svd-llm":  # one whitened SVD per compressed linear, shared by both ratios
        assert len(svds) == len(set(many[0].ranks) | set(many[1].ranks))
    for result in many:
        single = run(CompressConfig(ratio=result.ratio, out=tmp_path / f"one-{result.ratio}", **cfg))
        assert single.ranks == result.ranks
        assert shards(result.out) == shards(single.out)
    assert shards(many[0].out) != shards(many[1].out)


def test_error_aware_full_rank_reproduces_the_model(tiny4, tmp_path, calib_text):
    """Full rank everywhere: the compressed stream equals the dense one, so the fit is exact."""
    model = AutoModelForCausalLM.from_pretrained(tiny4)
    ranks = {n: min(m.in_features, m.out_features) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ".layers." in n}  # fmt: skip
    out = tmp_path / "full"
    run(CompressConfig(model=str(tiny4), ratio=0.5, out=out, calib=str(calib_text), ranks=ranks, **SMALL))
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    got, ref = logits(out, ids), logits(tiny4, ids)
    # float32 factors: round-off-sized differences between the streams are regressed on too; with the
    # default ridge (DAMP = 1) they stay at round-off size: measured 2.7e-6 of the logits' norm (local ROM:
    # 2.0e-6; DAMP = 1e-2 would give 8e-5). A wrong regression would be off by orders of magnitude.
    assert float((got - ref).norm() / ref.norm()) < 2e-5


def test_error_aware_and_auto_beat_uniform_local_on_held_out_text(tiny4, tmp_path, calib_text):
    """On the tiny model's own calibration text (held-out windows) the default configuration's logits
    stay closer to the dense model's than uniform local ROM's at the same ratio."""
    cfg = {"model": str(tiny4), "calib": str(calib_text), "ratio": 0.4, **SMALL}
    base = run(
        CompressConfig(out=tmp_path / "base", allocation="uniform", fit="local", sequential=False, **cfg)
    )
    best = run(CompressConfig(out=tmp_path / "best", **cfg))
    text = calib_text.read_text()[-4000:].encode()
    ids = torch.tensor([list(text[i : i + 64]) for i in range(0, 3200, 64)])
    ref = logits(tiny4, ids)
    errs = [float((logits(r.out, ids) - ref).norm() / ref.norm()) for r in (base, best)]
    assert errs[1] < 0.9 * errs[0], errs


def test_cli_options_allocation_fit_last_n_and_ratio_list(tiny4, tmp_path, calib_text):
    common = [str(tiny4), "--calib", str(calib_text), "--n-samples", "4", "--seq-len", "32", "--no-progress"]
    cases = {
        "v2": ["--ratio", "0.3", "--allocation", "v2"],
        "lastn": ["--ratio", "0.2", "--allocation", "last-n", "--last-n", "2", "--fit", "local"],
        "uniform": ["--ratio", "0.3", "--allocation", "uniform", "--fit", "error-aware"],
    }
    for name, opts in cases.items():
        proc = romcomp_cli(*common, *opts, "--out", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr[-2000:]
        record = json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]
        assert record["allocation"] == opts[opts.index("--allocation") + 1]
        assert "kept/10" in proc.stdout  # the allocation at a glance
    lastn = json.loads((tmp_path / "lastn" / "config.json").read_text())["quantization_config"]
    assert lastn["fit"] == "local" and {n.split(".")[2] for n in lastn["ranks"]} == {"2", "3"}
    proc = romcomp_cli(*common, "--ratio", "0.1,0.3", "--out", str(tmp_path / "many"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for r in ("0.1", "0.3"):
        record = json.loads((tmp_path / "many" / f"src-r{r}" / "config.json").read_text())[
            "quantization_config"
        ]
        assert record["ratio"] == float(r)
    assert proc.stdout.count("output       ") == 3  # the header names both outputs, the summary each


def test_allocation_asvd_measures_every_linear_and_meets_the_budget(tiny4, tmp_path, calib_text):
    """``--allocation asvd``: a sensitivity per linear and candidate in the pre-pass cache, rising as the
    candidate keeps less (the block's output error of a smaller projection is larger); ranks that differ
    between linears of one shape; the ratio's budget met; the output loads and runs."""
    from romcomp.compression.allocation import ASVD_CANDIDATES
    from romcomp.compression.profile import load_spectra

    out = tmp_path / "asvd"
    proc = romcomp_cli(str(tiny4), "--calib", str(calib_text), "--n-samples", "4", "--seq-len", "32",
                       "--no-progress", "--ratio", "0.3", "--allocation", "asvd", "--method", "asvd",
                       "--fit", "local", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (record["allocation"], record["method"]) == ("asvd", "asvd")
    spectra = load_spectra(out / ".romcomp", 4)
    assert len(spectra) == 4 * 7
    for name, spec in spectra.items():
        damage = spec.sensitivity
        assert damage is not None and damage.numel() == len(ASVD_CANDIDATES), name
        assert bool((damage[:-1] >= damage[1:] * (1 - 1e-6)).all()) and damage[0] > damage[-1] > 0, name
    model = AutoModelForCausalLM.from_pretrained(str(tiny4))
    shapes = {
        n: m.weight.shape
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in n
    }
    dense = sum(o * i for o, i in shapes.values())
    kept = dense - sum(o * i - k * (o + i) for n, k in record["ranks"].items() for o, i in [shapes[n]])
    assert 0.6 * dense < kept <= 0.7 * dense
    by_kind: dict[str, set] = {}
    for n in shapes:
        by_kind.setdefault(n.rsplit(".", 1)[1], set()).add(record["ranks"].get(n))
    assert any(len(r) > 1 for r in by_kind.values())  # not a uniform allocation
    logits = AutoModelForCausalLM.from_pretrained(out)(torch.tensor([[1, 2, 3]])).logits
    assert logits.isfinite().all()


@pytest.mark.parametrize(
    "opts,message",
    [
        (["--ratio", "0.1,x"], "comma list"),
        (["--ratio", "0.2,0.2"], "distinct"),
        (["--ratio", "0.2", "--fit", "nearest"], "--fit must be one of"),
        (["--ratio", "0.2", "--allocation", "best"], "--allocation must be one of"),
        (["--ratio", "0.2", "--last-n", "2"], "needs --allocation last-n"),
        (["--ratio", "0.2", "--method", "svd", "--fit", "error-aware"], "error-aware needs"),
        (["--ratio", "0.2", "--calib-stream", "dense"], "use --fit local"),
        (["--ratio", "0.9", "--allocation", "last-n", "--last-n", "1", "--seq-len", "64"], "cannot remove"),
        (["--ratio", "0.2,0.7", "--allocation", "asvd"], "removes at most 0.6"),
    ],
)
def test_bad_targeted_options_are_one_line_and_write_nothing(tiny4, tmp_path, calib_text, opts, message):
    out = tmp_path / "out"
    proc = romcomp_cli(str(tiny4), "--calib", str(calib_text), *opts, "--out", str(out), "--no-progress")
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (out / "config.json").exists()


def test_api_refuses_ambiguous_single_result(tiny4, tmp_path, calib_text):
    with pytest.raises(BadInputError, match="run_many"):
        run(CompressConfig(model=str(tiny4), ratio=(0.1, 0.2), out=tmp_path, calib=str(calib_text), **SMALL))


KILL_CHILD = """
import os, signal, sys
nth, argv = int(sys.argv[1]), sys.argv[2:]
calls = [0]
import dataclasses
import romcomp.methods as methods
rom = methods.METHODS["rom"]
def dying(*a, **k):
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return rom.decompose_cross(*a, **k)
methods.METHODS["rom"] = dataclasses.replace(rom, decompose_cross=dying)
from romcomp.cli import main
main(argv)
"""


@pytest.mark.parametrize("nth", [3, 12])  # block 0 of the first ratio; a later block
def test_multi_ratio_run_killed_and_resumed_is_bit_identical(tiny4, tmp_path, calib_text, nth):
    args = [str(tiny4), "--calib", str(calib_text), "--ratio", "0.2,0.4", "--n-samples", "8", "--seq-len",
            "64", "--no-progress"]  # fmt: skip
    ref = tmp_path / "ref"
    assert romcomp_cli(*args, "--out", str(ref)).returncode == 0
    out = tmp_path / "out"
    child = subprocess.run([sys.executable, "-c", KILL_CHILD, str(nth), *args, "--out", str(out)],
                           capture_output=True, text=True, timeout=600, cwd=REPO)  # fmt: skip
    assert child.returncode == -9, child.stderr[-1500:]
    rerun = romcomp_cli(*args, "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    for name in ("src-r0.2", "src-r0.4"):
        assert shards(out / name) == shards(ref / name)
        assert (out / name / "config.json").read_bytes() == (ref / name / "config.json").read_bytes()


def test_cli_seed_and_overwrite(tiny4, tmp_path, calib_text):
    """``--seed`` picks other calibration windows (other factors, recorded); ``--overwrite`` replaces a
    finished output that a different command is refused to resume into."""
    common = [str(tiny4), "--calib", str(calib_text), "--n-samples", "4", "--seq-len", "32", "--no-progress",
              "--allocation", "uniform"]  # fmt: skip
    runs = {}
    for seed in ("0", "1"):
        out = tmp_path / f"seed{seed}"
        proc = romcomp_cli(*common, "--ratio", "0.3", "--seed", seed, "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[seed] = out
        assert (
            f"seed {seed}"
            in json.loads((out / "config.json").read_text())["quantization_config"]["calibration"]
        )
    assert shards(runs["0"]) != shards(runs["1"])
    refused = romcomp_cli(*common, "--ratio", "0.4", "--out", str(runs["0"]))
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    again = romcomp_cli(*common, "--ratio", "0.4", "--out", str(runs["0"]), "--overwrite")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((runs["0"] / "config.json").read_text())["quantization_config"]["ratio"] == 0.4


def test_first_stage_of_the_first_block_fits_as_local_rom(tiny4, tmp_path, calib_text, monkeypatch):
    """The compressed stream equals the dense one until the first linear is replaced: the engine's paired
    statistics see it, so block 0's first group (q/k/v) skips the regression, and nothing later does."""
    from romcomp.methods import error_aware

    seen: list[bool] = []
    original = error_aware.target_map

    def recording(weight, bias, stats):
        seen.append(stats.identical)
        return original(weight, bias, stats)

    monkeypatch.setattr(error_aware, "target_map", recording)
    run(CompressConfig(model=str(tiny4), ratio=0.3, out=tmp_path / "o", calib=str(calib_text),
                       allocation="uniform", **SMALL))  # fmt: skip
    per_block = len(seen) // 4
    assert seen[:3] == [True, True, True] and not any(seen[3:]), (per_block, seen)
