"""Benchmark romcomp on SmolLM2-135M: perplexity, time and peak memory per compression ratio.

Usage (from the repository root, ``ROMCOMP_CACHE`` pointing at a cache that holds the model)::

    python tools/bench_smollm2.py --ratios 0.1,0.2,0.3 --calib-stream both --json bench.json

Every compression runs in a fresh subprocess of this script (hidden ``--one`` mode) that prints its
numbers as one JSON line, so ``ru_maxrss`` is the peak of that run alone, not of the whole benchmark.
Perplexities are measured in subprocesses too (hidden ``--ppl-of`` mode) so that the parent never holds
a model and each evaluation starts from the same clean state. The result is one Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # runnable as `python tools/bench_smollm2.py` without installing
    sys.path.insert(0, str(REPO_ROOT))

MARKER = "BENCH_JSON "  # prefix of the one machine-readable line a child prints on stdout
STREAMS = ("compressed", "dense")


@dataclass
class Run:
    """One (ratio, calibration stream) compression and its perplexity."""

    ratio: float
    stream: str
    compress: dict[str, Any]
    ppl: dict[str, Any] | None = None
    process_seconds: float = 0.0


@dataclass
class Bench:
    """Everything the table and the JSON file are made of."""

    machine: dict[str, Any]
    command: str
    dense_ppl: dict[str, Any] | None = None
    runs: list[Run] = field(default_factory=list)
    total_seconds: float = 0.0

    def calibration(self) -> str:
        return self.runs[0].compress["calibration"] if self.runs else "(no run)"


# --------------------------------------------------------------------------- child modes


def child_compress(args: argparse.Namespace) -> dict[str, Any]:
    """Hidden ``--one RATIO``: one compression in this (fresh) process; the numbers as a dict."""
    import torch

    from romcomp.api import run
    from romcomp.compression.config import CompressConfig

    cfg = CompressConfig(
        model=args.model, ratio=args.one, out=Path(args.out), calib=args.calib, n_samples=args.n_samples,
        seq_len=args.seq_len, seed=args.seed, calib_stream=args.stream, sequential=args.sequential,
        threads=args.threads, overwrite=True, progress=False,
    )  # fmt: skip
    result = run(cfg)
    times = list(result.block_times.values())
    n = max(len(times), 1)
    return {
        "ratio": result.ratio,
        "calib_stream": args.stream,
        "sequential": args.sequential,
        "out": str(result.out),
        "source": result.source,
        "source_dir": str(result.source_dir),
        "calibration": result.calibration,
        "seconds": result.seconds,
        "peak_rss": result.peak_rss,
        "blocks": len(times),
        "forward_per_block": sum(t.forward for t in times) / n,
        "decompose_per_block": sum(t.decompose for t in times) / n,
        "write_per_block": sum(t.write for t in times) / n,
        "params_before": result.params_before,
        "params_after": result.params_after,
        "linear_ratio_removed": result.linear_ratio_removed,
        "plan_estimate": result.plan.estimate,
        "batch_size": result.plan.batch_size,
        "torch_threads": torch.get_num_threads(),
        "notes": sum(len(v) for v in result.notes.values()),
    }


def child_ppl(args: argparse.Namespace) -> dict[str, Any]:
    """Hidden ``--ppl-of SPEC``: WikiText-2 test perplexity of a model directory or alias."""
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from romcomp.evaluation.perplexity import wikitext2_test_ids
    from romcomp.evaluation.quality import model_ppl
    from romcomp.model.sources import resolve_model

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # keep the benchmark log readable
    t0 = time.perf_counter()
    path = resolve_model(args.ppl_of).path
    ids = wikitext2_test_ids(AutoTokenizer.from_pretrained(path))
    r = model_ppl(path, ids, args.ppl_windows, args.seq_len)
    return {
        "model": str(path),
        "ppl": r.ppl,
        "nll": r.nll,
        "windows": r.windows,
        "tokens_scored": r.tokens_scored,
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- parent side


def spawn(mode_args: list[str], args: argparse.Namespace) -> tuple[dict[str, Any], float]:
    """Run this script in a child mode; its stderr flows through, its JSON line is returned."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *mode_args, *shared_args(args)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=False)
    elapsed = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout)
        raise SystemExit(f"bench: child failed (exit {proc.returncode}): {shlex.join(cmd)}")
    return json.loads(lines[-1][len(MARKER) :]), elapsed


def shared_args(args: argparse.Namespace) -> list[str]:
    """The options every child needs to reproduce the parent's settings."""
    out = ["--model", args.model, "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len)]
    out += ["--calib", args.calib, "--threads", str(args.threads), "--ppl-windows", str(args.ppl_windows)]
    out += ["--seed", str(args.seed)] + (["--sequential"] if args.sequential else [])
    return out


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, core count and torch threads, so a table is never quoted without its hardware."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
    }


def log(msg: str) -> None:
    """Progress to stderr, keeping stdout for the header and the table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_one(ratio: float, stream: str, out_root: Path, args: argparse.Namespace) -> Run:
    """Compress in a child, evaluate the output in another child, then drop it unless ``--keep``."""
    out = out_root / f"smollm2-r{ratio:g}-{stream}"
    log(f"compress ratio {ratio:g}, calib stream {stream} -> {out}")
    numbers, elapsed = spawn(["--one", str(ratio), "--stream", stream, "--out", str(out)], args)
    log(f"  {numbers['seconds']:.1f} s, peak RSS {numbers['peak_rss'] / 2**20:.0f} MiB; perplexity ...")
    ppl, _ = spawn(["--ppl-of", str(out)], args)
    log(f"  ppl {ppl['ppl']:.2f} ({ppl['seconds']:.1f} s)")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return Run(ratio, stream, numbers, ppl, elapsed)


def streams_for(choice: str) -> list[str]:
    return list(STREAMS) if choice == "both" else [choice]


def bench(args: argparse.Namespace, ratios: list[float]) -> Bench:
    """Dense perplexity once, then every (ratio, stream) compression in its own process."""
    t0 = time.perf_counter()
    result = Bench(machine_info(args.threads), shlex.join([sys.executable, *sys.argv]))
    made_tmp = args.out_dir is None
    out_root = Path(tempfile.mkdtemp(prefix="bench-smollm2-")) if made_tmp else Path(args.out_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    try:
        log(f"dense perplexity of {args.model} ({args.ppl_windows} windows)")
        result.dense_ppl, _ = spawn(["--ppl-of", args.model], args)
        log(f"  dense ppl {result.dense_ppl['ppl']:.2f}")
        for ratio in ratios:
            for stream in streams_for(args.calib_stream):
                result.runs.append(run_one(ratio, stream, out_root, args))
    finally:
        if made_tmp and not args.keep:
            shutil.rmtree(out_root, ignore_errors=True)
    result.total_seconds = time.perf_counter() - t0
    return result


def table(b: Bench, show_stream: bool) -> list[str]:
    """The Markdown table: one row per run."""
    head = ["ratio"] + (["calib stream"] if show_stream else [])
    head += ["params", "dense ppl", "compressed ppl", "compress time (s)", "fwd+cov s/block",
             "decomp s/block", "write s/block", "peak RSS (MiB)"]  # fmt: skip
    rows = [head, ["---" if h == "calib stream" else "---:" for h in head]]
    dense = b.dense_ppl["ppl"] if b.dense_ppl else float("nan")
    for r in b.runs:
        c = r.compress
        row = [f"{r.ratio:g}"] + ([r.stream] if show_stream else [])
        row += [f"{c['params_after'] / 1e6:.1f} M", f"{dense:.2f}", f"{r.ppl['ppl']:.2f}" if r.ppl else "-",
                f"{c['seconds']:.1f}", f"{c['forward_per_block']:.2f}", f"{c['decompose_per_block']:.2f}",
                f"{c['write_per_block']:.3f}", f"{c['peak_rss'] / 2**20:.0f}"]  # fmt: skip
        rows.append(row)
    return ["| " + " | ".join(row) + " |" for row in rows]


def report(b: Bench, args: argparse.Namespace) -> str:
    """Header (machine, command, calibration, total time) and the table, ready to paste."""
    m = b.machine
    dense = b.dense_ppl or {}
    lines = [
        "## romcomp benchmark: SmolLM2-135M",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}",
        f"- command: `{b.command}`",
        f"- calibration: {b.calibration()}" + (", sequential groups" if args.sequential else ""),
        f"- perplexity: WikiText-2 test, first {dense.get('windows', args.ppl_windows)} windows of "
        f"{args.seq_len} tokens ({dense.get('tokens_scored', 0):,} tokens scored)",
        f"- total time: {b.total_seconds / 60:.1f} min ({b.total_seconds:.0f} s)",
        "",
        *table(b, show_stream=args.calib_stream == "both"),
    ]
    return "\n".join(lines)


def to_json(b: Bench) -> dict[str, Any]:
    return {
        "machine": b.machine,
        "command": b.command,
        "calibration": b.calibration(),
        "total_seconds": b.total_seconds,
        "dense_ppl": b.dense_ppl,
        "runs": [r.__dict__ for r in b.runs],
    }


def parse_ratios(text: str) -> list[float]:
    """``"0.1,0.2"`` → ``[0.1, 0.2]``, rejecting anything outside (0, 1) before any work starts."""
    try:
        ratios = [float(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad --ratios '{text}'") from e
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise argparse.ArgumentTypeError(f"--ratios must be values in (0, 1), got '{text}'")
    return ratios


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--ratios", type=parse_ratios, default=parse_ratios("0.1,0.2,0.3"))
    p.add_argument("--model", default="smollm2-135m", help="alias or directory (default smollm2-135m)")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib", default="c4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ppl-windows", type=int, default=40)
    p.add_argument("--calib-stream", choices=[*STREAMS, "both"], default="compressed")
    p.add_argument("--sequential", action="store_true", help="passed through to the compression")
    p.add_argument("--out-dir", help="where compressed models go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the compressed models")
    p.add_argument("--json", type=Path, help="also write every number to this file")
    p.add_argument("--one", type=float, help=argparse.SUPPRESS)
    p.add_argument("--stream", choices=STREAMS, default="compressed", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--ppl-of", help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = parser().parse_args()
    if args.one is not None:
        print(MARKER + json.dumps(child_compress(args)), flush=True)
        return
    if args.ppl_of is not None:
        print(MARKER + json.dumps(child_ppl(args)), flush=True)
        return
    b = bench(args, args.ratios)
    print(report(b, args), flush=True)
    if args.json:
        args.json.write_text(json.dumps(to_json(b), indent=2) + "\n")
        log(f"numbers written to {args.json}")


if __name__ == "__main__":
    main()
