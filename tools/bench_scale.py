"""Scale benchmark: romcomp on random-weight Llama-2-7B / 13B-shaped checkpoints under a hard RAM cap.

Usage (from the repository root; fixtures from ``tools/make_scale_fixture.py``)::

    python tools/bench_scale.py --model /tmp/scale/llama2-7b --max-ram 12GB --n-samples 8 --blocks 4
    python tools/bench_scale.py --model /tmp/scale/llama2-13b --max-ram 16GB --n-samples 8 --blocks 2

Runs the ``romcomp`` CLI as a child process, samples its RSS every 0.2 s, and stops it with SIGKILL after
``--blocks`` blocks (0 = run to completion) — the kill doubles as a resume point for a later run. Reports
the planned peak (from the manifest), the child's measured high-water mark (``wait4`` ``ru_maxrss``: resident
anonymous memory plus file pages mapped while resident, i.e. the mmap'ed safetensors pages being read
count; page cache of files read with ``read()``/written with ``write()`` does not), RSS after every block
(flatness), seconds per block split into forward+covariance / decomposition / write, and the projected
time of a full run at the standard 128 x 512 calibration (forward+covariance scale with tokens,
decomposition does not). The random weights test memory and speed, not quality.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
STANDARD_TOKENS = 128 * 512
PHASES = ("forward", "decompose", "write")


def sample_rss(pid: int, samples: list[int], stop: threading.Event) -> None:
    """VmRSS of ``pid`` every 0.2 s until ``stop`` (the child's RSS curve, for flatness)."""
    status = Path(f"/proc/{pid}/status")
    while not stop.is_set():
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    samples.append(int(line.split()[1]) * 1024)
        except OSError:
            return
        stop.wait(0.2)


TRACER = r"""
import json, os, runpy, sys, threading, time

def _fields():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out

def _label(frame):
    names = []
    while frame is not None:
        code = frame.f_code
        if "/romcomp/" in code.co_filename and "/cli/" not in code.co_filename:
            names.append(code.co_name)
        frame = frame.f_back
    return ">".join(reversed(names[:4])) or "(start-up)"

def _sample(path, main):
    phases, hwm, peak_label, t0, last_dump = {}, 0, "", time.time(), 0.0
    while True:
        f = _fields()
        frame = sys._current_frames().get(main)
        label = _label(frame) if frame is not None else "(exit)"
        del frame
        ph = phases.setdefault(label, {"rss": 0, "anon": 0, "n": 0, "first_s": round(time.time() - t0, 1)})
        ph["rss"], ph["anon"] = max(ph["rss"], f["VmRSS"]), max(ph["anon"], f["RssAnon"])
        ph["n"] += 1
        if f["VmHWM"] > hwm:
            hwm, peak_label = f["VmHWM"], label
        if time.time() - last_dump > 1.0:
            tmp = path + ".tmp"
            with open(tmp, "w") as out:
                json.dump({"hwm": hwm, "hwm_label": peak_label, "phases": phases}, out, indent=1)
            os.replace(tmp, path)
            last_dump = time.time()
        time.sleep(0.05)

threading.Thread(target=_sample, args=(sys.argv[1], threading.main_thread().ident), daemon=True).start()
sys.argv = ["romcomp", *sys.argv[2:]]
runpy.run_module("romcomp.cli", run_name="__main__")
"""
"""``--trace``: the child runs the CLI under a sampler thread that records, every 0.05 s, the RSS and the
innermost romcomp functions of the main thread's stack: the maximum RSS of every phase, and the phase in
which the high-water mark (``VmHWM``) last grew (the peak's phase), written to ``<out>-trace.json``."""


def manifest(out: Path) -> dict[str, Any]:
    path = out / ".romcomp" / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run(args: argparse.Namespace) -> dict[str, Any]:
    trace = args.out.parent / f"{args.out.name}-trace.json"
    child = [sys.executable, "-m", "romcomp.cli"]
    child = [sys.executable, "-c", TRACER, str(trace)] if args.trace else child
    cmd = [*child, str(args.model), "--ratio", str(args.ratio), "--out",
           str(args.out), "--max-ram", args.max_ram, "--n-samples", str(args.n_samples), "--seq-len",
           str(args.seq_len), "--no-progress", "--overwrite", *shlex.split(args.extra)]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    log = open(args.out.parent / f"{args.out.name}.log", "w")  # noqa: SIM115 - closed below
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    samples: list[int] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(proc.pid, samples, stop), daemon=True)
    sampler.start()
    killed = False
    while True:  # wait4 (not Popen.poll, which would reap the child and lose its rusage)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if args.blocks and len(manifest(args.out).get("blocks_done", [])) >= args.blocks:
            os.kill(proc.pid, signal.SIGKILL)
            _, status, usage = os.wait4(proc.pid, 0)
            killed = True
            break
        time.sleep(0.5)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    log.close()
    code = proc.returncode
    if not killed and code != 0:
        sys.exit(f"romcomp exited {code}; see {log.name}")
    traced = json.loads(trace.read_text()) if args.trace and trace.exists() else None
    return {"cmd": cmd, "seconds": seconds, "peak_rss": usage.ru_maxrss * 1024, "rss_samples": samples,
            "killed": killed, "manifest": manifest(args.out), "trace": traced}  # fmt: skip


def matmul_gflops(dtype: str = "float32", n: int = 4096, reps: int = 3) -> float:
    """This machine's dense matmul speed (GFLOP/s), measured before the run starts (no contention)."""
    import torch

    a = torch.randn(n, n, dtype=getattr(torch, dtype))
    a @ a  # warm-up
    start = time.perf_counter()
    for _ in range(reps):
        a @ a
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def linear_shapes(config: dict[str, Any]) -> list[tuple[int, int]]:
    """(d_out, d_in) of one block's linears (Llama layout, grouped-query k/v): q, k, v, o, gate, up, down."""
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = h * config.get("num_key_value_heads", config["num_attention_heads"]) // config["num_attention_heads"]
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]


def block_flops(config: dict[str, Any], ratio: float, tokens: int) -> tuple[float, float, float]:
    """(forward, covariance, decomposition) FLOPs of one block with the compressed stream.

    Forwards: the dense block and then the compressed block (``(1 - ratio)`` of the linear parameters)
    over every token, 2 FLOPs per parameter per token (attention scores omitted: small at 512 tokens).
    Covariances: one ``syrk`` (d² FLOPs per token) per accumulator: the q/k/v, o and gate/up inputs and the
    down_proj outputs, all hidden wide. Decomposition (ROM as implemented, uniform ranks): per shared input
    a Cholesky (n³/3); per linear ``M = W L`` (2·d_out·d_in²), the Gram ``syrk`` of the smaller side, a
    symmetric eigensolve counted as 4m³ (textbook: 4/3 m³ reduction + 8/3 m³ for the vectors), for tall
    ``M`` the map-back ``M u`` and its QR, and ``Bᵀ W``; down_proj from its output second moment.
    """
    h, i = config["hidden_size"], config["intermediate_size"]
    shapes = linear_shapes(config)
    params = sum(d_out * d_in for d_out, d_in in shapes)
    forward = 2 * params * tokens * (2 - ratio)
    covariance = 4 * h * h * tokens
    decompose = 3 * h**3 / 3  # Cholesky of the q/k/v, o and gate/up input covariances
    for d_out, d_in in shapes[:-1]:  # down_proj (last) from its output moment, below
        k = int((1 - ratio) * d_in * d_out / (d_in + d_out))
        small, big = min(d_in, d_out), max(d_in, d_out)
        decompose += 2 * d_out * d_in * d_in + small * small * big + 4 * small**3 + 2 * k * d_out * d_in
        if d_out > d_in:
            decompose += 2 * d_out * d_in * k + 4 * d_out * k * k - 4 * k**3 / 3
    k_down = int((1 - ratio) * h * i / (h + i))
    decompose += 4 * h**3 + 2 * k_down * h * i
    return forward, covariance, decompose


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    m = result["manifest"]
    config = json.loads((Path(args.model) / "config.json").read_text())
    n_blocks = config["num_hidden_layers"]
    times = [m["block_times"][k] for k in sorted(m.get("block_times", {}), key=int)]
    if not times:
        sys.exit("no block finished; nothing to report")
    steady = times[1:] or times  # block 0 also pays for first-touch allocations
    mean = {k: sum(t[k] for t in steady) / len(steady) for k in PHASES}
    tokens = args.n_samples * args.seq_len
    per_block_std = mean["forward"] * STANDARD_TOKENS / tokens + mean["decompose"] + mean["write"]
    plan = m.get("plan", {})
    in_ram = plan.get("activations_in_ram")
    print(f"| model | {args.model} ({n_blocks} blocks, hidden {config['hidden_size']}, "
          f"intermediate {config['intermediate_size']}) |")  # fmt: skip
    print("|---|---|")
    rows = [
        ("budget (--max-ram)", args.max_ram),
        ("calibration", f"{args.n_samples} x {args.seq_len} tokens (c4)"),
        ("blocks run", f"{len(times)} of {n_blocks}" + (" (then SIGKILL)" if result["killed"] else "")),
        ("planned peak", f"{gib(plan.get('estimate', 0))}, activations in RAM: {in_ram}"),
        ("measured peak RSS (ru_maxrss)", gib(result["peak_rss"])),
        ("RSS after each block (all / anonymous)", ", ".join(
            f"{t['rss'] / 2**30:.2f}/{t['rss_anon'] / 2**30:.2f}" for t in times) + " GiB"),
        ("options", shlex.join(result["cmd"][result["cmd"].index("--overwrite") + 1 :]) or "defaults"),
        ("s/block fwd+cov / decomp / write", " / ".join(f"{mean[k]:.1f}" for k in PHASES)),
        ("dense pre-pass (auto allocation)", f"{m.get('profile_seconds', 0.0):.1f} s for all blocks"),
        ("wall time (incl. start-up)", f"{result['seconds']:.0f} s"),
        ("projected full run, this calibration",
         f"{n_blocks * sum(mean.values()) / 60:.0f} min"),
        ("projected full run, 128 x 512", f"{n_blocks * per_block_std / 3600:.1f} h"),
    ]  # fmt: skip
    forward, covariance, decompose = block_flops(config, args.ratio, tokens)
    peak = result["matmul_gflops"]
    local = "--fit local" in args.extra and "--allocation uniform" in args.extra
    for label, flops, seconds in (
        ()
        if not local
        else (
            ("fwd+cov", forward + covariance, mean["forward"]),
            ("decomposition", decompose, mean["decompose"]),
            ("whole block", forward + covariance + decompose, sum(mean.values())),
        )
    ):
        achieved = flops / seconds / 1e9
        rows.append((f"{label} achieved", f"{flops / 1e12:.1f} TFLOP in {seconds:.1f} s = "
                     f"{achieved:.0f} GFLOP/s = {achieved / peak:.0%} of the measured {peak:.0f} GFLOP/s "
                     "fp32 matmul"))  # fmt: skip
    for label, value in rows:
        print(f"| {label} | {value} |")
    if result.get("trace"):
        print(phase_table(plan, result["trace"], result["peak_rss"]))
    under = result["peak_rss"] <= (plan.get("budget") or float("inf"))
    print(f"\npeak within the cap: {under}")
    print(machine_lines("bench_scale.py"))


def phase_table(plan: dict[str, Any], trace: dict[str, Any], peak: int) -> str:
    """The plan's parts beside the measured RSS of every traced phase (largest first)."""
    lines = ["", "| plan part | GiB |", "|---|---|"]
    lines += [f"| {k} | {v / 2**30:.2f} |" for k, v in plan.get("parts", {}).items()]
    estimate = plan.get("estimate", 0)
    lines.append(f"| **plan (with margin)** | {estimate / 2**30:.2f} ({estimate / max(peak, 1) - 1:+.0%} "
                 f"of the measured peak {peak / 2**30:.2f}) |")  # fmt: skip
    lines += ["", f"peak grew last in: {trace['hwm_label']}", "", "| phase (romcomp frames) | max RSS | "
              "max anon | first at s | samples |", "|---|---|---|---|---|"]  # fmt: skip
    phases = sorted(trace["phases"].items(), key=lambda kv: -kv[1]["rss"])
    lines += [f"| {k} | {v['rss'] / 2**30:.2f} | {v['anon'] / 2**30:.2f} | {v['first_s']} | {v['n']} |"
              for k, v in phases[:20]]  # fmt: skip
    return "\n".join(lines)


def machine_lines(script: str) -> str:
    """The machine and the exact command, printed under every benchmark table."""
    return (f"machine: {platform.machine()}, {os.cpu_count()} CPUs; {platform.platform()}\n"
            f"command: python tools/{script} {shlex.join(sys.argv[1:])}")  # fmt: skip


def run_parser(doc: str, max_ram: str, n_samples: int) -> argparse.ArgumentParser:
    """The options every romcomp-running benchmark shares: model, cap, ratio and calibration shape."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--max-ram", default=max_ram)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--n-samples", type=int, default=n_samples)
    parser.add_argument("--seq-len", type=int, default=512)
    return parser


def main() -> None:
    parser = run_parser(__doc__, "12GB", 8)
    parser.add_argument("--blocks", type=int, default=0, help="SIGKILL after this many blocks (0: all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--trace", action="store_true", help="record the RSS of every phase (TRACER)")
    parser.add_argument(
        "--extra", default="", help="more romcomp options, e.g. '--allocation uniform --fit local'"
    )
    args = parser.parse_args()
    args.out = args.out or args.model.parent / f"{args.model.name}-r{args.ratio}"
    gflops = matmul_gflops()
    result = run(args)
    result["matmul_gflops"] = gflops
    report(args, result)
    (args.out.parent / f"{args.out.name}-bench.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
