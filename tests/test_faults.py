"""Faults in the input and around the run end in one clear error, before expensive work where detectable,
with nothing recorded as done that is not: corrupt/truncated shards, index errors, dtypes, shapes,
NaN/Inf in weights or activations, a concurrent run on the same ``--out``, degenerate covariances."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from romcomp.api import run
from romcomp.compression.config import CompressConfig
from romcomp.errors import RomcompError

SMALL = {"n_samples": 8, "seq_len": 64, "progress": False}
INDEX = "model.safetensors.index.json"


@pytest.fixture
def src(tiny_llama: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny sharded checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny_llama, tmp_path / "src"))


def _shard_of(src: Path, name: str) -> Path:
    return src / json.loads((src / INDEX).read_text())["weight_map"][name]


def _rewrite(shard: Path, edit) -> None:
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def _no_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    """Header checks must fail before the calibration text is even tokenized."""
    import calib

    monkeypatch.setattr(calib, "calibration_windows", lambda *a, **k: pytest.fail("calibration started"))


def _compress(src: Path, out: Path, calib_text: Path, **kw) -> None:
    run(CompressConfig(model=str(src), ratio=0.3, out=out, calib=str(calib_text), **{**SMALL, **kw}))


NAME = "model.layers.1.mlp.up_proj.weight"


def _truncate(src: Path) -> str:
    shard = _shard_of(src, NAME)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return shard.name


def _garbage_header(src: Path) -> str:
    shard = _shard_of(src, NAME)
    shard.write_bytes(b"\xff" * 64 + shard.read_bytes()[64:])
    return shard.name


def _drop_index_entry(src: Path) -> str:
    index = json.loads((src / INDEX).read_text())
    del index["weight_map"][NAME]
    (src / INDEX).write_text(json.dumps(index))
    return NAME


def _misroute_index_entry(src: Path) -> str:
    index = json.loads((src / INDEX).read_text())
    other = next(s for s in sorted(set(index["weight_map"].values())) if s != index["weight_map"][NAME])
    index["weight_map"][NAME] = other
    (src / INDEX).write_text(json.dumps(index))
    return "does not contain it"


def _int_dtype(src: Path) -> str:
    _rewrite(_shard_of(src, NAME), lambda t: t.__setitem__(NAME, t[NAME].to(torch.int32)))
    return "has dtype I32"


def _wrong_shape(src: Path) -> str:
    _rewrite(_shard_of(src, NAME), lambda t: t.__setitem__(NAME, t[NAME][:, :-1].contiguous()))
    return "config.json implies (160, 64)"


@pytest.mark.parametrize(
    "damage",
    [_truncate, _garbage_header, _drop_index_entry, _misroute_index_entry, _int_dtype, _wrong_shape],
    ids=["truncated", "garbage-header", "missing-index-entry", "misrouted-entry", "int-dtype", "shape"],
)
def test_damaged_checkpoint_is_refused_before_calibration(
    damage, src: Path, tmp_path: Path, calib_text: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = damage(src)
    _no_calibration(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(RomcompError) as err:
        _compress(src, out, calib_text)
    message = str(err.value)
    assert expected in message and "\n" not in message
    assert not (out / "config.json").exists() and not list(out.glob("*.safetensors"))


@pytest.mark.parametrize("allocation,done", [("uniform", [0]), ("auto", [])])
def test_nan_weight_stops_at_its_block_and_nothing_later_is_recorded(
    src: Path, tmp_path: Path, calib_text: Path, allocation: str, done: list[int]
) -> None:
    """Uniform ranks: the main pass stops at block 1 with block 0 done. Auto: the dense pre-pass meets the
    NaN first, so no rank map is fixed and no block is recorded."""
    _rewrite(_shard_of(src, NAME), lambda t: t[NAME].__setitem__((3, 5), float("nan")))
    out = tmp_path / "out"
    with pytest.raises(RomcompError, match=rf"tensor '{NAME}' in .* contains NaN or Inf"):
        _compress(src, out, calib_text, allocation=allocation)
    manifest = json.loads((out / ".romcomp" / "manifest.json").read_text())
    assert manifest["blocks_done"] == done and manifest["status"] != "complete"
    assert bool(manifest["ranks"]) == (allocation == "uniform")
    assert not (out / "config.json").exists()


def test_overflowing_activations_are_reported(src: Path, tmp_path: Path, calib_text: Path) -> None:
    """Finite weights whose product overflows float32: the block output check names the samples."""
    norm = "model.layers.0.post_attention_layernorm.weight"
    _rewrite(_shard_of(src, norm), lambda t: t[norm].fill_(3e38))
    with pytest.raises(RomcompError, match="non-finite activations after block"):
        _compress(src, tmp_path / "out", calib_text)


def test_second_run_while_the_first_is_writing_is_refused(
    src: Path, tmp_path: Path, calib_text: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a run is between blocks, the same command from a second process exits with the lock error
    and writes nothing; the first run then finishes normally."""
    from romcomp.compression.blocks import BlockIO
    from tests.conftest import romcomp_cli

    out = tmp_path / "out"
    original, second = BlockIO.free_block, []

    def start_second_run(self, index):
        original(self, index)
        if not second:
            before = sorted(p.name for p in out.iterdir())
            second.append(
                romcomp_cli(
                    str(src),
                    "--ratio",
                    "0.3",
                    "--out",
                    str(out),
                    "--calib",
                    str(calib_text),
                    "--n-samples",
                    "8",
                    "--seq-len",
                    "64",
                    "--no-progress",
                )
            )
            assert sorted(p.name for p in out.iterdir()) == before  # fmt: skip

    monkeypatch.setattr(BlockIO, "free_block", start_second_run)
    _compress(src, out, calib_text)
    (proc,) = second
    assert proc.returncode == 1 and "another romcomp run is writing to" in proc.stderr, proc.stderr
    assert (out / "config.json").exists()


def test_degenerate_covariances_give_finite_factors_and_manifest_notes(
    src: Path, tmp_path: Path, calib_text: Path
) -> None:
    """8 calibration tokens for 64/160-wide inputs (rank <= 8) and zeroed weight columns: the ranks (~30)
    exceed the data's rank; the singular covariances get a recorded Cholesky jitter, factors finite."""
    up = "model.layers.0.mlp.down_proj.weight"
    _rewrite(_shard_of(src, up), lambda t: t[up][:, :7].zero_())
    out = tmp_path / "out"
    _compress(src, out, calib_text, n_samples=1, seq_len=8)
    manifest = json.loads((out / ".romcomp" / "manifest.json").read_text())
    notes = [note for block in manifest["notes"].values() for note in block]
    assert any("singular input covariance: added" in note for note in notes), manifest["notes"]
    for shard in out.glob("*.safetensors"):
        for name, tensor in load_file(shard).items():
            assert torch.isfinite(tensor).all(), name


def test_streamed_shard_equals_save_file(tmp_path: Path) -> None:
    """The tensor-by-tensor writer of the top-level shard gives a file safetensors reads back exactly."""
    from romcomp.model.checkpoint import atomic_stream_safetensors

    tensors = {"b.weight": torch.randn(7, 5), "a.weight": torch.randn(3).to(torch.bfloat16),
               "c.bias": torch.randn(2, 3, 4).half()}  # fmt: skip
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    specs = {n: (names[t.dtype], tuple(t.shape)) for n, t in tensors.items()}
    loaded: list[str] = []
    atomic_stream_safetensors(tmp_path / "s.safetensors", specs, lambda n: loaded.append(n) or tensors[n])
    back = load_file(tmp_path / "s.safetensors")
    assert loaded == sorted(tensors) and set(back) == set(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert not list(tmp_path.glob("*.tmp"))
