"""``romcomp analyze``: effective ranks of planted spectra, the report's files round-trip, and the feature
spectra and ``auto`` ranks are the allocator's own (same pre-pass, same numbers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from romcomp.studies.analyze import (
    effective_rank,
    energy_kept,
    energy_rank,
    spectrum_summary,
    weight_statistics,
)
from tests.conftest import make_tiny_model, romcomp_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_effective_rank_and_energy_ranks_of_planted_spectra() -> None:
    assert effective_rank(torch.ones(37)) == pytest.approx(37)
    assert effective_rank(torch.tensor([5.0, 0, 0, 0])) == pytest.approx(1)
    two = effective_rank(torch.tensor([1.0, 1.0, 1e-9, 1e-9]))
    assert two == pytest.approx(2, rel=1e-6)
    # squared singular values 0.5, 0.3, 0.15, 0.05 of the energy
    s = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64).sqrt()
    assert [energy_rank(s, q) for q in (0.5, 0.8, 0.9, 0.95, 0.99)] == [1, 2, 3, 3, 4]
    assert energy_kept(s, 2) == pytest.approx(0.8) and energy_kept(s, None) == 1.0
    summary = spectrum_summary(torch.ones(10))
    assert (summary["rank_90"], summary["rank_99"], summary["effective_rank_fraction"]) == (
        9,
        10,
        pytest.approx(1),
    )
    planted = torch.zeros(1000)
    planted[:10] = 50.0
    stats = weight_statistics(planted.view(10, 100))
    assert stats["zeros"] == pytest.approx(0.99) and stats["excess_kurtosis"] > 50


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory, calib_text) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("analyze")
    src = make_tiny_model(root / "src", layers=3)
    common = ["--calib", str(calib_text), "--n-samples", "4", "--seq-len", "32", "--no-progress"]
    proc = romcomp_cli("analyze", str(src), "--out", str(root / "an"), "--ratio", "0.3", *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "most low-rank" in proc.stdout and "peak RSS" in proc.stdout
    return src, root / "an", common


def test_report_json_spectra_and_plots_round_trip(analyzed) -> None:
    _, out, _ = analyzed
    doc = json.loads((out / "analysis.json").read_text())
    rows = doc["linears"]
    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert sorted((r["block"], r["kind"]) for r in rows) == sorted((b, k) for b in range(3) for k in kinds)
    spectra = load_file(str(out / "spectra.safetensors"))
    for r in rows:  # every summary recomputes from the saved spectra
        for space in ("feature", "weight"):
            again = spectrum_summary(spectra[f"{r['name']}.{space}"])
            for key, value in again.items():
                assert r[space][key] == pytest.approx(value), (r["name"], space, key)
        assert r["weight"]["energy_kept_uniform"] == pytest.approx(
            energy_kept(spectra[f"{r['name']}.weight"], r["uniform_rank"])
        )
        assert (
            0 < r["feature"]["effective_rank_fraction"] <= 1
            and 0 < r["weight"]["effective_rank_fraction"] <= 1
        )
    report = (out / "report.md").read_text()
    for k in kinds:
        assert f"| {k} |" in report
    assert "| 2 |" in report  # the last block's row of the blocks × types tables
    for name in ("heatmap.png", "spectra.png", "energy.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
        from PIL import Image

        with Image.open(out / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200


def test_feature_spectra_and_auto_ranks_are_the_allocators(analyzed, tmp_path) -> None:
    """``romcomp compress --allocation auto`` on the same calibration caches bit-identical spectra and
    chooses exactly the ranks the analysis reports for ``auto``; a rerun with other arguments is refused."""
    from romcomp.compression.profile import load_spectra

    src, out, common = analyzed
    comp = tmp_path / "comp"
    proc = romcomp_cli(str(src), "--ratio", "0.3", "--allocation", "auto", "--out", str(comp), *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs, ours = load_spectra(comp / ".romcomp", 3), load_spectra(out / ".romcomp", 3)
    assert set(theirs) == set(ours)
    for name in theirs:
        assert torch.equal(theirs[name].eigvals, ours[name].eigvals), name
    ranks = json.loads((comp / "config.json").read_text())["quantization_config"]["ranks"]
    doc = json.loads((out / "analysis.json").read_text())
    assert {r["name"]: r["auto_rank"] for r in doc["linears"] if r["auto_rank"] is not None} == ranks
    proc = romcomp_cli("analyze", str(src), "--out", str(out), "--ratio", "0.2", *common)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
