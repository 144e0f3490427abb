"""Data-parallel calibration under ``torchrun`` (gloo on loopback), on a tiny model.

Tolerance against one process. The statistics all-reduce is exact up to float64 summation order (each
rank's sum over its windows added to the others' instead of one running sum): checked at 1e-12 below.
A whole run differs by more than that, and the bound is stated here: each rank runs its windows in
batches of its own size (the memory plan's, from its share), so the float32 forwards and the float32
per-batch moments round differently — measured 7.5e-5 on a reconstructed weight, 2.6e-5 on the logits;
the tests hold both under 1e-3. Two distributed runs with the same world size and threads are the same
bytes, whether launched as two processes of one launcher or as two "machines" (``--nnodes 2``).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from romcomp.compression import distributed
from tests.conftest import REPO, make_tiny_model, romcomp_cli

ARGS = ["--ratio", "0.3", "--n-samples", "8", "--seq-len", "64", "--no-progress"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

SUMS = """
import sys, torch
from romcomp.compression import distributed
from romcomp.compression.stats import accumulate, accumulate_cross
from romcomp.methods.base import CrossStats, InputStats
torch.manual_seed(0)
x, x_hat = torch.randn(6, 40, 24) * 3 + 1, torch.randn(6, 40, 24)  # six windows, the same on every rank
with distributed.session() as world:
    start, stop = world.bounds(6)
    st, cross = InputStats.zeros(24), CrossStats.zeros(24)
    for w in range(start, stop):
        accumulate(st, x[w])
        accumulate_cross(cross, x[w], x_hat[w])
    world.reduce_stats({"a": st}, {"b": cross})
    first = world.agree_min(10 + world.rank)
    if world.writer:
        torch.save({"st": st, "cross": cross, "first": first}, sys.argv[1])
"""

KILL = """
import os, signal, sys
nth, argv = int(sys.argv[1]), sys.argv[2:]
import romcomp.compression.stats as stats
real, calls = stats.accumulate, [0]
def accumulate(*a, **k):
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == nth:  # the second worker dies mid-block, like an OOM kill
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
stats.accumulate = accumulate
from romcomp.cli import main
main(argv)
"""


def torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("romcomp: error:")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, calib_text) -> dict[str, Path]:
    """One tiny model compressed by one process and by two (``--nproc-per-node 2``)."""
    root = tmp_path_factory.mktemp("dist")
    src = make_tiny_model(root / "src", "llama", layers=4)
    args = [str(src), *ARGS, "--calib", str(calib_text)]
    single = romcomp_cli(*args, "--threads", "1", "--out", str(root / "single"))
    assert single.returncode == 0, single.stderr[-2000:]
    two = torchrun("-m", "romcomp", *args, "--out", str(root / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    return {"root": root, "src": src, "args": args, "single": root / "single", "two": root / "two"}


def test_statistics_all_reduce_equals_the_single_process_sums(tmp_path) -> None:
    script = tmp_path / "sums.py"
    script.write_text(SUMS)
    proc = torchrun(str(script), str(tmp_path / "sums.pt"), nproc=3)  # 6 windows: 2 per rank
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "sums.pt", weights_only=False)
    from romcomp.compression.stats import accumulate, accumulate_cross
    from romcomp.methods.base import CrossStats, InputStats

    torch.manual_seed(0)
    x, x_hat = torch.randn(6, 40, 24) * 3 + 1, torch.randn(6, 40, 24)
    st, cross = InputStats.zeros(24), CrossStats.zeros(24)
    for w in range(6):
        accumulate(st, x[w])
        accumulate_cross(cross, x[w], x_hat[w])
    upper = torch.ones(24, 24, dtype=torch.bool).triu()
    assert got["st"].count == st.count == 240 and got["cross"].count == 240
    g, c = got["st"], got["cross"]
    pairs = [(g.xtx[upper], st.xtx[upper]), (g.xsum, st.xsum), (g.abs_sum, st.abs_sum),
             (c.cross, cross.cross), (c.xsum, cross.xsum),
             (c.hat.xtx[upper], cross.hat.xtx[upper])]  # fmt: skip
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert got["first"] == 10  # agree_min: the rank furthest behind


def test_two_processes_match_one_and_load(runs) -> None:
    from transformers import AutoModelForCausalLM

    def load(path: Path):
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, torch_dtype=torch.float32)

    one, two = load(runs["single"]).eval(), load(runs["two"]).eval()
    pairs = [(n, m, two.get_submodule(n)) for n, m in one.named_modules() if hasattr(m, "down")]
    assert len(pairs) >= 10  # compressed linears, with the same ranks in both
    for name, a, b in pairs:
        wa, wb = a.up.weight.double() @ a.down.weight.double(), b.up.weight.double() @ b.down.weight.double()
        assert (wa - wb).norm() / wa.norm() < 1e-3, name
    ids = torch.randint(0, 250, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        la, lb = one(ids).logits, two(ids).logits
        generated = two.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert 0 < (la - lb).norm() / la.norm() < 1e-3  # not the same run, and within the stated bound
    assert generated.shape == (1, 12)
    work = sorted(p.name for p in (runs["two"] / ".romcomp").iterdir())
    assert work == ["lock", "manifest.json", "spectra"]  # rank 1's work directory is gone


def test_two_machines_on_one_host_write_the_same_bytes(runs) -> None:
    """``--nnodes 2`` (two launchers, static rendezvous on loopback) against ``--nproc-per-node 2``."""
    out = runs["root"] / "nodes"
    port = str(free_port())
    launch = [*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
              "--master-port", port]  # fmt: skip
    procs = [
        subprocess.Popen([*launch, "--node-rank", str(rank), "-m", "romcomp", *runs["args"], "--threads",
                          "1", "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for rank in (0, 1)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert files(out) == files(runs["two"])


def test_a_killed_worker_stops_every_worker_and_a_rerun_resumes_to_the_same_bytes(runs, tmp_path) -> None:
    script = tmp_path / "kill.py"
    script.write_text(KILL)
    out = tmp_path / "out"
    t0 = time.monotonic()
    killed = torchrun(str(script), "22", *runs["args"], "--out", str(out))  # rank 1, main pass, block 2
    assert killed.returncode != 0
    assert time.monotonic() - t0 < 120  # no worker waits for the dead one
    lines = errors(killed.stderr)
    assert len(lines) == 1 and "worker 0 of 2: another worker stopped" in lines[0], killed.stderr[-3000:]
    assert not (out / "config.json").exists()
    # another world size cannot resume it: each rank's activations are on its own disk
    alone = romcomp_cli(*runs["args"], "--threads", "1", "--out", str(out))
    assert alone.returncode == 2 and errors(alone.stderr) == [
        f"romcomp: error: --out {out} was started by 2 worker process(es), this run has 1: resume with as "
        "many (each holds its share of the activations), or pass --overwrite to start over"
    ]
    rerun = torchrun("-m", "romcomp", *runs["args"], "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from a previous run" in rerun.stdout
    assert files(out) == files(runs["two"])


def test_what_does_not_run_distributed_is_refused_before_any_work(runs, tmp_path) -> None:
    out = tmp_path / "fw"
    proc = torchrun("-m", "romcomp", *runs["args"], "--method", "fwsvd", "--out", str(out))
    assert proc.returncode != 0
    lines = errors(proc.stderr)
    assert len(lines) == 2 and all("streams gradients, which are not all-reduced yet" in x for x in lines)
    assert not out.exists()


@pytest.mark.slow
def test_svd_llm_at_two_ratios_runs_distributed(runs, tmp_path) -> None:
    """A method that fits locally from input moments, two outputs in one run (the shared statistics)."""
    args = [*runs["args"][:1], *runs["args"][3:], "--ratio", "0.2,0.4", "--method", "svd-llm"]
    single = romcomp_cli(*args, "--threads", "1", "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-2000:]
    two = torchrun("-m", "romcomp", *args, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    from safetensors.torch import load_file

    for ratio in ("0.2", "0.4"):
        a_dir, b_dir = (tmp_path / side / f"src-r{ratio}" for side in ("one", "two"))
        for shard in sorted(a_dir.glob("*.safetensors")):
            a, b = load_file(str(shard)), load_file(str(b_dir / shard.name))
            assert a.keys() == b.keys()
            for key in (k for k in a if k.endswith("down.weight")):
                up = key.replace("down.weight", "up.weight")
                wa, wb = a[up].double() @ a[key].double(), b[up].double() @ b[key].double()
                assert (wa - wb).norm() / wa.norm() < 1e-3, (ratio, key)


def test_the_memory_plan_counts_one_shard_of_the_activations(runs) -> None:
    """Each rank plans for its own windows (the largest share), not the whole calibration set: the plan
    of 8 windows on 2 workers holds what one process plans for 4."""
    assert distributed.World(0, 3).largest_shard(128) == 43
    assert [distributed.World(r, 3).bounds(8) for r in range(3)] == [(0, 2), (2, 5), (5, 8)]
    two = torchrun("-m", "romcomp", *runs["args"], "--dry-run")
    args = [a if a != "8" else "4" for a in runs["args"]]  # --n-samples 4
    one = romcomp_cli(*args, "--threads", "1", "--dry-run")
    assert two.returncode == 0 and one.returncode == 0, two.stderr[-2000:] + one.stderr[-2000:]
    assert two.stdout.count("dry run: nothing written") == 1  # rank 0 alone prints the plan

    def cache(text: str) -> str:
        return next(line for line in text.splitlines() if "activation cache" in line)

    assert cache(two.stdout) == cache(one.stdout)
    assert ", 2 workers (4 windows each)" in two.stdout and "batch 4," in two.stdout
