"""The dense pre-pass made cheaper: on the first ``--prepass-samples`` calibration windows (default for
``--allocation auto``: :data:`~romcomp.compression.config.PREPASS_TOKENS` tokens' worth, or all), its spectra
in :data:`~romcomp.compression.profile.SPECTRA_DTYPE`. Tiny random models only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import load_file

import romcomp.compression.config as config
import romcomp.compression.profile as prof
from romcomp.api import run
from romcomp.compression.allocation import allocate_auto
from romcomp.compression.config import PREPASS_TOKENS, CompressConfig
from romcomp.compression.output import args_hash
from romcomp.errors import BadInputError
from tests.conftest import interrupt_after_freeing, make_tiny_model, romcomp_cli

SMALL = {"n_samples": 8, "seq_len": 32, "progress": False, "max_ram": "2GB", "threads": 1}


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny4") / "src", "llama", layers=4)


def spectra_files(out: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(p) for p in sorted((out / ".romcomp" / "spectra").glob("block-*.safetensors"))]


def manifest_args(out: Path) -> dict:
    return json.loads((out / ".romcomp" / "manifest.json").read_text())["args"]


# -- the default and the option, resolved ------------------------------------------------------------------


def prepass(**kw) -> int | None:
    return CompressConfig(model="m", ratio=0.2, **kw).resolve().with_calibration(False).prepass_samples


def test_default_prepass_windows(monkeypatch):
    default = 128 if PREPASS_TOKENS is None else min(128, max(1, -(-PREPASS_TOKENS // 512)))
    assert prepass() == default  # the decoder default 128 x 512
    assert prepass(allocation="v2") == 128 and prepass(allocation="asvd", method="asvd", fit="local") == 128
    assert prepass(allocation="uniform") is None and prepass(ranks={"x": 1}) is None  # no pre-pass at all
    assert prepass(prepass_samples=64) == 64 and prepass(prepass_samples=500) == 128
    assert prepass(allocation="v2", prepass_samples=16) == 16
    monkeypatch.setattr(config, "PREPASS_TOKENS", 32 * 512)  # the default, pinned: a token count
    assert prepass() == 32 and prepass(n_samples=16) == 16  # never more than the calibration has
    assert prepass(seq_len=2048) == 8 and prepass(seq_len=128) == 128 and prepass(seq_len=100_000) == 1
    assert prepass(allocation="v2") == 128 and prepass(prepass_samples=64) == 64
    monkeypatch.setattr(config, "PREPASS_TOKENS", None)
    assert prepass() == 128 and prepass(n_samples=16) == 16


def test_prepass_samples_is_a_resume_argument():
    spec = CompressConfig(model="m", ratio=0.2, prepass_samples=32).resolve().with_calibration(False)
    assert spec.resume_args(2)["prepass_samples"] == 32
    other = CompressConfig(model="m", ratio=0.2, prepass_samples=64).resolve().with_calibration(False)
    assert other.resume_args(2) != spec.resume_args(2)


@pytest.mark.parametrize(
    ("kw", "message"),
    [({"prepass_samples": 0}, "--prepass-samples must be positive"),
     ({"prepass_samples": 4, "allocation": "uniform"}, "--prepass-samples needs --allocation")],
)  # fmt: skip
def test_bad_prepass_samples(kw, message):
    with pytest.raises(BadInputError, match=message):
        CompressConfig(model="m", ratio=0.2, **kw).resolve()


# -- the pre-pass reads exactly the chosen windows -----------------------------------------------------


def test_prepass_reads_the_first_windows_only(tiny4, calib_text, tmp_path, monkeypatch):
    """``prepass_samples=3`` of 8: every block's pre-pass sees 3 windows (3 x 32 tokens), the main pass
    all 8; the spectra are those of a run calibrated on just those 3 windows (the calibration sampler
    draws windows in order, so the first 3 of 8 are the 3 of a 3-window run)."""
    seen: list[int] = []
    real = prof.profile_block

    def counting(io, index, block, source, sink, *a, **k):
        seen.append(source.shape[0])
        return real(io, index, block, source, sink, *a, **k)

    monkeypatch.setattr(prof, "profile_block", counting)
    cfg = {"model": str(tiny4), "calib": str(calib_text), "ratio": 0.3}
    three = run(CompressConfig(out=tmp_path / "three", prepass_samples=3, **cfg, **SMALL))
    assert seen == [3] * 4
    assert manifest_args(three.out)["prepass_samples"] == 3 and manifest_args(three.out)["n_samples"] == 8
    files = spectra_files(three.out)
    assert len(files) == 4 and all(float(f["tokens"]) == 3 * 32 for f in files)

    alone = run(CompressConfig(out=tmp_path / "alone", **cfg, **{**SMALL, "n_samples": 3}))
    assert seen == [3] * 8
    for a, b in zip(files, spectra_files(alone.out), strict=True):
        for key in (k for k in a if k.endswith(".eigvals")):
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-9 * float(b[key].max()))
    assert three.ranks == alone.ranks  # the same spectra steer the same allocation

    every = run(CompressConfig(out=tmp_path / "every", prepass_samples=8, **cfg, **SMALL))
    assert seen == [3] * 8 + [8] * 4
    key = next(k for k in files[0] if k.endswith(".eigvals"))
    assert not torch.equal(spectra_files(every.out)[0][key], files[0][key])  # other windows, other spectra


def test_changed_prepass_samples_refuses_to_resume(tiny4, calib_text, tmp_path, monkeypatch):
    """A run killed after its pre-pass and resumed with another window count must not reuse the cached
    spectra: the count is a resume argument, so the resume is refused (and --overwrite starts over)."""
    out = tmp_path / "out"
    cfg = {"model": str(tiny4), "calib": str(calib_text), "ratio": 0.3, "out": out, **SMALL}

    def killed(*a, **k):
        raise KeyboardInterrupt

    import romcomp.compression.pipeline as pipeline

    monkeypatch.setattr(pipeline, "compress_blocks", killed)
    with pytest.raises(KeyboardInterrupt):
        run(CompressConfig(prepass_samples=3, **cfg))
    assert len(spectra_files(out)) == 4
    monkeypatch.undo()
    with pytest.raises(BadInputError, match="prepass_samples"):
        run(CompressConfig(prepass_samples=5, **cfg))
    again = run(CompressConfig(prepass_samples=5, overwrite=True, **cfg))
    assert all(float(f["tokens"]) == 5 * 32 for f in spectra_files(again.out))


def test_cli_prepass_samples(tiny4, calib_text, tmp_path):
    """``--prepass-samples`` end to end through the CLI: recorded, read; a bad use is one line (exit 2)."""
    common = [str(tiny4), "--calib", str(calib_text), "--n-samples", "6", "--seq-len", "32", "--no-progress",
              "--threads", "1", "--ratio", "0.3"]  # fmt: skip
    out = tmp_path / "cli"
    proc = romcomp_cli(*common, "--prepass-samples", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert manifest_args(out)["prepass_samples"] == 2
    assert all(float(f["tokens"]) == 2 * 32 for f in spectra_files(out))
    record = json.loads((out / "config.json").read_text())["quantization_config"]
    assert record["allocation"] == "auto" and record["ranks"]
    bad = romcomp_cli(
        *common, "--prepass-samples", "2", "--allocation", "uniform", "--out", str(tmp_path / "x")
    )
    assert bad.returncode == 2 and "--prepass-samples needs --allocation" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


# -- float32 spectra --------------------------------------------------------------------------------------


def test_float32_spectra_agree_with_float64_on_a_tiny_model(tiny4, calib_text, tmp_path, monkeypatch):
    """The pre-pass with its spectra in float32 and in float64: every eigenvalue within 1e-5 of the linear's
    largest (float32 round-off is ~1e-7 relative; a wrong Gram or a missed scale would be O(1)), the traces
    (and so the sublayer weights) within 1e-5, and the auto allocation's ranks identical at 0.2, 0.3, 0.4."""
    solved: list[torch.dtype] = []
    real = prof.eigvals_desc
    monkeypatch.setattr(
        prof, "eigvals_desc", lambda sym, dtype=torch.float64: solved.append(dtype) or real(sym, dtype)
    )
    results, spectra = {}, {}
    for dtype in (torch.float64, torch.float32):
        monkeypatch.setattr(prof, "SPECTRA_DTYPE", dtype)
        results[dtype] = run(CompressConfig(model=str(tiny4), calib=str(calib_text), ratio=0.3,
                                            out=tmp_path / str(dtype), **SMALL))  # fmt: skip
        spectra[dtype] = prof.load_spectra(results[dtype].out / ".romcomp", 4)
    assert solved == [torch.float64] * 28 + [torch.float32] * 28  # 7 linears x 4 blocks, each run its dtype
    assert set(spectra[torch.float32]) == set(spectra[torch.float64])
    for name, s64 in spectra[torch.float64].items():
        s32 = spectra[torch.float32][name]
        e64, e32 = s64.eigvals, s32.eigvals
        assert e32.dtype == torch.float64 and bool(torch.isfinite(e32).all()), name
        assert float((e32 - e64).abs().max()) <= 1e-5 * float(e64.max()), name
        assert abs(float(e32.sum() - e64.sum())) <= 1e-5 * float(e64.sum()), name
        assert s32.sublayer == pytest.approx(s64.sublayer, rel=1e-5), name
    assert results[torch.float32].ranks == results[torch.float64].ranks
    shapes = results[torch.float64].shapes
    for ratio in (0.2, 0.4):
        assert allocate_auto(shapes, ratio, spectra[torch.float32]) == allocate_auto(
            shapes, ratio, spectra[torch.float64]
        ), ratio


def test_eigvals_desc_float32_is_scaled_and_falls_back(monkeypatch):
    """Float32 on a matrix far outside float32's range (1e60) still gives the float64 eigenvalues to
    ~1e-6 (it is scaled first); a LAPACK failure or a non-finite result falls back to torch's float64."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(80, 60, generator=g, dtype=torch.float64)
    sym = a.T @ a * 1e60
    ref = torch.linalg.eigvalsh(sym).flip(0)
    got = prof.eigvals_desc(sym, torch.float32)
    assert got.dtype == torch.float64 and float((got - ref).abs().max()) < 1e-5 * float(ref[0])
    assert bool((got[:-1] >= got[1:]).all()) and float(got.min()) >= 0

    def failing(*a, **k):
        raise np.linalg.LinAlgError("no convergence")

    monkeypatch.setattr(scipy.linalg, "eigh", failing)
    torch.testing.assert_close(
        prof.eigvals_desc(sym, torch.float32), ref.clamp_min(0), rtol=1e-9, atol=1e-12 * float(ref[0])
    )
    monkeypatch.setattr(scipy.linalg, "eigh", lambda x, **k: np.full(x.shape[0], np.nan, dtype=x.dtype))
    torch.testing.assert_close(
        prof.eigvals_desc(sym, torch.float32), ref.clamp_min(0), rtol=1e-9, atol=1e-12 * float(ref[0])
    )
    assert not bool(prof.eigvals_desc(torch.zeros(4, 4), torch.float32).any())  # zero stays zero, no NaN


def test_a_manifest_older_than_prepass_samples_resumes(tiny4, calib_text, tmp_path, monkeypatch):
    """A run started before ``prepass_samples`` was recorded read every window: killed after block 1 and
    its manifest stripped of the key, the same command resumes to the bytes of an uninterrupted run, and
    records the key; a count other than every window is still refused."""
    cfg = {"model": str(tiny4), "calib": str(calib_text), "ratio": 0.3, **SMALL}
    whole = run(CompressConfig(out=tmp_path / "whole", **cfg))
    out = tmp_path / "old"
    interrupt_after_freeing(monkeypatch, 4 + 2)  # the pre-pass frees 4 blocks; main-pass block 0 recorded
    with pytest.raises(KeyboardInterrupt):
        run(CompressConfig(out=out, **cfg))
    monkeypatch.undo()
    path = out / ".romcomp" / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["args"].pop("prepass_samples") == 8 and manifest["blocks_done"] == [0]
    manifest["args_hash"] = args_hash(manifest["args"])
    path.write_text(json.dumps(manifest))
    with pytest.raises(BadInputError, match="prepass_samples"):
        run(CompressConfig(out=out, prepass_samples=3, **cfg))
    resumed = run(CompressConfig(out=out, **cfg))
    assert manifest_args(resumed.out)["prepass_samples"] == 8
    for name in sorted(p.name for p in whole.out.glob("*.safetensors")):
        assert (whole.out / name).read_bytes() == (resumed.out / name).read_bytes(), name
