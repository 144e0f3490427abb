"""``--dry-run`` and the run header: the plan (memory by phase, configuration, time estimate) known before a
run, printed by ``--dry-run`` without writing anything and by a real run before its first pass; the time
model's pure functions; the whole-run ETA clock.

The CLI runs go through ``romcomp.cli.main`` in this process (what ``python -m romcomp.cli`` runs), stdout
and stderr captured into one stream where their order matters.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import replace
from pathlib import Path

import pytest

from romcomp.compression import estimate as est
from romcomp.compression.memory import ModelDims, peak_bytes
from romcomp.compression.memory import estimate as memory_parts
from romcomp.compression.runner import RunClock

SMALL = ["--ratio", "0.3", "--n-samples", "4", "--seq-len", "32", "--threads", "2", "--max-ram", "4GB"]


def cli(*argv: str) -> tuple[int, str, str, str]:
    """``romcomp ARGV`` in this process: exit code, stdout, stderr, and both interleaved as written."""
    from romcomp.cli import main

    both = io.StringIO()

    class Tee(io.StringIO):
        def write(self, s: str) -> int:
            both.write(s)
            return super().write(s)

    out, err = Tee(), Tee()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
            code = 0
        except SystemExit as exc:
            code = 0 if exc.code is None else exc.code
    return code, out.getvalue(), err.getvalue(), both.getvalue()


HEADER_LABELS = ("source ", "calibration ", "method ", "memory ", "config ", "time ", "output ")


def header_lines(text: str) -> list[str]:
    """The header: from its ``source`` line to its ``output`` line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("source "))
    stop = next(i for i, line in enumerate(lines) if i > start and line.startswith("output "))
    return lines[start : stop + 1]


@pytest.fixture(scope="module")
def runs(tiny_llama: Path, calib_text: Path, tmp_path_factory) -> dict[str, tuple]:
    """A dry run (passes and loads counted), then the same command for real with the progress bars."""
    from romcomp.compression.blocks import BlockIO
    from romcomp.compression.runner import Runner

    root = tmp_path_factory.mktemp("dry")
    args = [str(tiny_llama), *SMALL, "--calib", str(calib_text), "--out", str(root / "out")]
    loads, passes = [], []
    real_load, real_run = BlockIO.load_block, Runner.run
    mp = pytest.MonkeyPatch()
    mp.setattr(BlockIO, "load_block", lambda self, i: loads.append(i) or real_load(self, i))

    def counted_run(self, work, *args, **kwargs):
        passes.append(work.label)
        return real_run(self, work, *args, **kwargs)

    mp.setattr(Runner, "run", counted_run)
    try:
        dry = cli(*args, "--dry-run")
        dry_counts = (list(loads), list(passes))
        written = root / "out"
        dry_wrote = written.exists()
        real = cli(*args, "--progress")
    finally:
        mp.undo()
    return {"dry": dry, "dry_counts": dry_counts, "dry_wrote": dry_wrote, "real": real, "out": written}


def test_dry_run_prints_the_plan_and_writes_nothing(runs) -> None:
    code, out, err, _ = runs["dry"]
    assert code == 0, err[-2000:]
    assert not runs["dry_wrote"]
    loads, passes = runs["dry_counts"]
    assert loads == [0] and passes == []  # the probe's one block, no pass
    lines = header_lines(out)
    for label in HEADER_LABELS:
        assert any(line.startswith(label) for line in lines), (label, out)
    memory = r"^memory +plan [\d.]+ \w+ = peak [\d.]+ \w+ \(block phase\) \+ 5%, within --max-ram 3\.73 GiB$"
    assert re.search(memory, out, re.M), out
    for part in ("block phase", "top-level phase", "runtime", "activation cache", "covariances (float64)"):
        assert part in out, part
    assert re.search(r"^config +batch 4, activations in RAM, error-aware fit$", out, re.M), out
    assert re.search(r"^time +~[\d.]+ (s|min|h) estimated in all$", out, re.M), out
    assert re.search(r"^  profile .*forwards", out, re.M) and re.search(r"^  blocks .*forwards", out, re.M)
    assert out.rstrip().endswith("dry run: nothing written")


def test_real_run_prints_the_same_header_before_its_first_pass(runs) -> None:
    code, out, err, both = runs["real"]
    assert code == 0, err[-2000:]
    assert (runs["out"] / "config.json").exists()
    header = header_lines(out)
    first_bar = both.index("profile:")
    assert both.index(header[0]) < both.index(header[-1]) < first_bar < both.index("parameters (model)")
    # the same header as the dry run's, but the measured numbers of the probe and the estimate
    timed = ("time ", "  profile ", "  blocks ", "  probe: ")
    dry = [line for line in header_lines(runs["dry"][1]) if not line.startswith(timed)]
    assert [line for line in header if not line.startswith(timed)] == dry
    # each pass's bar shows the whole run's time: elapsed and what is left across passes
    assert re.search(r"profile: .*run \d:\d\d:\d\d elapsed, ~\d:\d\d:\d\d left", err), err[-1500:]
    assert re.search(r"blocks: .*run \d:\d\d:\d\d elapsed, ~0:00:00 left", err), err[-1500:]


def test_dry_run_with_too_small_a_budget_is_refused_in_one_line(tiny_llama, calib_text, tmp_path) -> None:
    out = tmp_path / "out"
    code, stdout, stderr, _ = cli(str(tiny_llama), "--ratio", "0.3", "--calib", str(calib_text), "--max-ram",
                                  "100MB", "--seq-len", "64", "--dry-run", "--out", str(out))  # fmt: skip
    lines = stderr.strip().splitlines()
    assert code == 2 and stdout == "" and not out.exists()
    assert len(lines) == 1 and lines[0].startswith("romcomp: error: --max-ram"), lines
    assert "smallest plan" in lines[0]


# --- the time model: pure functions -------------------------------------------------------------------

LLAMA7B = tuple(
    est.LinearCost(d_in, d_out, narrow=narrow)
    for d_in, d_out, narrow in [(4096, 4096, False)] * 4 + [(4096, 11008, False)] * 2 + [(11008, 4096, True)]
)
PROBE = est.Probe(forward_seconds=2.0, tokens=512, load_seconds=1.0, macs_per_second=2e10)


def test_doubling_the_tokens_doubles_the_forwards_only() -> None:
    run = est.RunModel(n_blocks=32, windows=64, seq_len=512, linears=LLAMA7B, fit="error-aware")
    one, two = est.estimate_time(run, PROBE), est.estimate_time(replace(run, windows=128), PROBE)
    for name in ("profile", "blocks"):
        assert two.passes[name].forward == pytest.approx(2 * one.passes[name].forward)
        assert two.passes[name].decompose == one.passes[name].decompose > 0
        assert two.passes[name].load == one.passes[name].load == 32 * PROBE.load_seconds
    # forward-equivalents × tokens over the probe's × the probe's seconds × blocks
    blocks = est.forward_equivalents(run)["blocks"]
    assert one.passes["blocks"].forward == pytest.approx(blocks * 64 * 512 / PROBE.tokens * 2.0 * 32)
    assert one.total == pytest.approx(sum(p.forward + p.decompose + p.load for p in one.passes.values()))


def test_forward_equivalents_follow_fit_allocation_and_ratios() -> None:
    """The structure around :data:`FORWARDS` (its numbers are recalibrated against measured runs)."""
    f = est.FORWARDS
    ea, local, dense = f["error-aware"], f["local compressed"], f["local dense"]
    base = est.RunModel(n_blocks=4, windows=8, seq_len=64, linears=LLAMA7B, fit="error-aware")
    assert est.forward_equivalents(base) == {
        "profile": f["profile"].fixed,
        "blocks": pytest.approx(ea.fixed + ea.per_ratio),
    }
    three = est.forward_equivalents(replace(base, n_ratios=3))["blocks"]
    assert three == pytest.approx(ea.fixed + 3 * ea.per_ratio)  # the dense stream's share paid once
    one_stage = replace(base, fit="local", profile=False)
    assert list(est.forward_equivalents(one_stage)) == ["blocks"]  # no pre-pass
    assert est.forward_equivalents(one_stage)["blocks"] == local.per_ratio + local.per_ratio_stage
    sequential = est.forward_equivalents(replace(one_stage, stages=4, n_ratios=2))["blocks"]
    assert sequential == 2 * (local.per_ratio + 4 * local.per_ratio_stage)  # statistics per stage
    shared = replace(one_stage, calib_stream="dense", n_ratios=3)
    assert est.forward_equivalents(shared)["blocks"] == f["local dense shared"].fixed  # one forward for all
    unshared = est.forward_equivalents(replace(shared, stages=4))["blocks"]
    assert unshared == pytest.approx(3 * (dense.per_ratio + 4 * dense.per_ratio_stage))
    grads = est.forward_equivalents(replace(base, gradients=True))
    assert list(grads) == ["profile", "gradients", "blocks"] == list(est.PASSES)
    asvd = est.forward_equivalents(replace(base, sensitivity=True))["profile"]
    assert asvd == pytest.approx(f["profile"].fixed + 7 * 6 + 1)  # 7 linears × 6 candidates on 8 windows


def test_decompositions_scale_with_ratios_and_fit() -> None:
    run = est.RunModel(n_blocks=32, windows=128, seq_len=512, linears=LLAMA7B, fit="error-aware")
    macs = est.block_macs(run)
    assert est.block_macs(replace(run, n_ratios=2))["blocks"] == pytest.approx(2 * macs["blocks"])
    assert est.block_macs(replace(run, n_ratios=2))["profile"] == macs["profile"]  # one pre-pass for all
    local = est.block_macs(replace(run, fit="local"))["blocks"]
    assert local < macs["blocks"]  # the error-aware fit's regressions cost more (3.5x measured at 7B)
    assert est.block_macs(replace(run, fit="local", compressed=0.5))["blocks"] == pytest.approx(local / 2)
    outputs = est.block_macs(replace(run, cross_outputs=True))["blocks"]
    assert outputs < macs["blocks"]  # down_proj from its d_out² paired output moments: no d_in² solve
    assert est.decompose_macs("error-aware", 11008, 4096) == 3 * 4096 * 11008**2 + 2 * 11008**3 / 3
    assert est.decompose_macs("local", 11008, 4096, narrow=True) == est.EIGH * 4096**3


def test_memory_phases_add_up_to_the_plans_peak() -> None:
    dims = ModelDims(hidden=64, intermediate=160, heads=4, vocab=50_000, block_params=50_000,
                     linear_shapes=((64, 64), (64, 160), (160, 64)), cov_dims=(64, 64, 160),
                     linear_inputs=(64, 64, 160), shared_inputs=(64,))  # fmt: skip
    for batch, in_ram, cross, gradients in [(8, True, True, 0), (1, False, False, 0), (4, True, False, 2)]:
        parts = memory_parts(dims, 64, 512, batch, in_ram, 2, cross, True, gradients)
        phases = est.memory_phases(parts)
        assert max(sum(p.values()) for p in phases.values()) == peak_bytes(parts)
        assert (est.GRADIENT_PHASE in phases) == bool(gradients)


def test_header_shows_what_the_cap_changed() -> None:
    from romcomp.compression.memory import MemoryPlan

    dims = ModelDims(hidden=64, intermediate=160, heads=4, vocab=258, block_params=50_000,
                     linear_shapes=((64, 64), (64, 160), (160, 64)), cov_dims=(64, 64, 160))  # fmt: skip
    parts = memory_parts(dims, 16, 32, 2, False, 1, False, True, 0)
    mem = MemoryPlan(budget=10**9, estimate=int(peak_bytes(parts) * 1.05), batch_size=2,
                     activations_in_ram=False, parts=parts)  # fmt: skip
    time = est.TimeEstimate({"blocks": est.PassTime(100.0, 20.0, 5.0)}, PROBE)
    plan = est.RunPlan(source="tiny", calibration="c4: 16 x 32 tokens", method="rom", fit="local",
                       allocation="uniform", ratios=(0.2, 0.3), calib_stream="compressed", n_blocks=3,
                       n_samples=16, mem=mem, budget_given=True, outputs=(Path("a"), Path("b")), time=time,
                       fallback="the error-aware fit needs about 2 GiB")  # fmt: skip
    text = plan.header()
    config = ("config       batch 2 (not 8: the budget), activations spilled to disk (the budget), "
              "local fit (fallback: the error-aware fit needs about 2 GiB)")  # fmt: skip
    assert config in text.splitlines()
    assert "ratios 0.2, 0.3 (uniform ranks); 3 blocks" in text and text.endswith("output       a, b")
    assert "\ntime         ~2.1 min estimated in all\n" in text
    assert "  blocks" in text and "(forwards 1.7 min, decompositions 20 s, block loads 5.0 s)" in text


def test_run_clock_scales_the_estimate_by_the_measured_pace() -> None:
    now = [0.0]
    clock = RunClock({"profile": 10.0, "blocks": 30.0}, now=lambda: now[0])
    assert clock.left() is None and clock.describe() == "run 0:00:00 elapsed"
    clock.advance("profile", 0.0)
    assert clock.left() == 40.0  # nothing measured yet: the estimate
    now[0] = 10.0
    clock.advance("profile", 0.5)  # half the pre-pass (5 estimated seconds) took 10: twice as slow
    assert clock.left() == pytest.approx((5 + 30) * 2)
    now[0] = 20.0
    clock.advance("profile", 1.0)
    clock.advance("blocks", 0.0)
    assert clock.left() == pytest.approx(30 * 2)
    now[0] = 35.0
    clock.advance("blocks", 0.5)  # 25 estimated seconds done in 35
    assert clock.left() == pytest.approx(15 * 35 / 25)
    assert clock.describe() == "run 0:00:35 elapsed, ~0:00:21 left"


def test_resumed_pass_counts_only_the_work_done_now() -> None:
    now = [0.0]
    clock = RunClock({"profile": 10.0, "blocks": 30.0}, now=lambda: now[0])
    clock.advance("blocks", 0.5)  # resumed half way: the done half is not this process's work
    now[0] = 3.0
    clock.advance("blocks", 0.6)
    assert clock.left() == pytest.approx(30 * 0.4 * 1.0)  # 3 estimated seconds in 3


def test_probe_runs_one_forward_when_it_is_slow(tiny_llama, calib_text, monkeypatch) -> None:
    from romcomp.compression.blocks import BlockIO
    from romcomp.compression.config import CompressConfig
    from romcomp.compression.pipeline import block_io, plan_run, streams
    from romcomp.compression.prepare import prepare

    spec = CompressConfig(model=str(tiny_llama), ratio=0.3, calib=str(calib_text), n_samples=4, seq_len=32,
                          progress=False).resolve()  # fmt: skip
    p = prepare(spec, streams=streams(spec))
    forwards = []
    real = BlockIO.forward
    monkeypatch.setattr(BlockIO, "forward", lambda self, *a: forwards.append(a[2].shape) or real(self, *a))
    monkeypatch.setattr(est, "PROBE_QUICK", 0.0)  # every forward counts as slow: the first is the measure
    measured = est.probe(block_io(p), p.windows)
    assert forwards == [(1, 32, 64)] and measured.tokens == 32
    forwards.clear()
    monkeypatch.setattr(est, "PROBE_QUICK", 1e9)  # every forward is quick: the windows, repeated
    measured = est.probe(block_io(p), p.windows)
    assert forwards == [(1, 32, 64)] + [(2, 32, 64)] * est.PROBE_REPEATS and measured.tokens == 64
    assert p.shell.get_submodule(p.arch.blocks)[0].mlp.up_proj.weight.is_meta  # block 0 freed
    plan = plan_run(p)
    assert plan.time is not None and plan.time.total > 0 and list(plan.time.passes) == ["profile", "blocks"]
