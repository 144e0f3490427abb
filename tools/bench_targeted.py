"""Issue-9 acceptance benchmark: targeted compression (allocation × fit) against today's uniform ROM.

Usage (from the repository root)::

    python tools/bench_targeted.py --model smollm2-135m --ratios 0.1,0.2,0.3,0.4 --out-dir /tmp/bt \\
        --limit 100 --threads 2
    python tools/bench_targeted.py --model qwen2.5-coder-1.5b --ratios 0.2,0.3 --out-dir /tmp/bt-qwen \\
        --n-samples 32 --max-ram 8GB --configs uniform+local,auto+error-aware --limit 50

Each configuration is one ``romcomp`` CLI subprocess that writes every ratio in one pass (its time and
peak RSS, from ``wait4``, are its own; the planned peak is read from the manifest). Finished outputs are
reused. Then one ``romcomp eval`` subprocess scores the dense model and every output side by side:
WikiText-2 raw test and held-out C4 perplexity on the first ``--ppl-windows`` × 512 tokens, and the mean
accuracy of the seven zero-shot tasks of SVD-LLM's tables on the first ``--limit`` documents each. The
script prints one table, the issue's targets checked against it, the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bench_quality import run_child  # tools/ is the script's directory, so on sys.path

REPO_ROOT = Path(__file__).resolve().parent.parent
SEVEN = "piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq,openbookqa"
CONFIGS = {
    "uniform+local": ["--allocation", "uniform", "--fit", "local", "--no-sequential"],  # before issue 9
    "uniform+error-aware": ["--allocation", "uniform", "--fit", "error-aware"],
    "v2+error-aware": ["--allocation", "v2", "--fit", "error-aware"],
    "auto+local": ["--allocation", "auto", "--fit", "local", "--no-sequential"],
    "auto+error-aware": [],  # the default
}
TARGETS = {0.1: 38.0, 0.2: 50.0, 0.3: 95.0}  # SmolLM2-135M WikiText-2, first 40 x 512 windows


def add_run_arguments(parser: argparse.ArgumentParser, configs: dict[str, list[str]]) -> None:
    """The options every multi-configuration benchmark shares (model, ratios, configurations, calibration,
    memory cap, threads, output directory)."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.4")
    parser.add_argument("--configs", default=",".join(configs), help=f"comma list of {', '.join(configs)}")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--n-samples", type=int, default=64, help="calibration windows (C4)")
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--max-ram", default="8GB")
    parser.add_argument("--threads", type=int, default=None)


def prepare_run(args: argparse.Namespace, configs: dict[str, list[str]]) -> tuple[Path, list[float], float]:
    """Register ``configs``, create the output directory; (log file, ratios, start time)."""
    sys.path.insert(0, str(REPO_ROOT))
    CONFIGS.update(configs)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    return args.out_dir / "bench.log", [float(r) for r in args.ratios.split(",")], time.perf_counter()


def compress(args: argparse.Namespace, name: str, ratios: list[float], log: Path) -> dict[str, Any]:
    """One multi-ratio run of configuration ``name`` (reused when every output is finished)."""
    parent = args.out_dir / name
    outs = {r: parent / f"{Path(args.model).name}-r{r:g}" for r in ratios}
    record = parent / "bench-run.json"
    if record.exists() and all((o / "config.json").exists() for o in outs.values()):
        return {**json.loads(record.read_text()), "reused": True}
    out = parent if len(ratios) > 1 else outs[ratios[0]]  # one ratio: --out names the output itself
    cmd = [sys.executable, "-m", "romcomp.cli", args.model, "--ratio", ",".join(f"{r:g}" for r in ratios),
           "--out", str(out), "--max-ram", args.max_ram, "--n-samples", str(args.n_samples),
           "--seq-len", str(args.calib_seq_len), "--no-progress", "--overwrite", *CONFIGS[name]]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    code, seconds, rss = run_child(cmd, log)
    if code != 0:
        sys.exit(f"configuration {name} failed (exit {code}); see {log}")
    manifest = json.loads((outs[ratios[0]] / ".romcomp" / "manifest.json").read_text())
    run = {"config": name, "outs": {f"{r:g}": str(o) for r, o in outs.items()}, "seconds": seconds,
           "peak_rss_bytes": rss, "plan_bytes": manifest["plan"]["estimate"],
           "command": shlex.join(cmd)}  # fmt: skip
    record.write_text(json.dumps(run, indent=2))
    return run


def evaluate(args: argparse.Namespace, outs: list[str], log: Path) -> dict[str, Any]:
    report = args.out_dir / "eval"
    tasks = args.ppl_sets + (f",{SEVEN}" if args.limit else "")
    cmd = [sys.executable, "-m", "romcomp.cli", "eval", args.model, *outs, "--tasks", tasks,
           "--seq-len", "512", "--ppl-windows", str(args.ppl_windows),
           *(["--limit", str(args.limit)] if args.limit else []),
           "--json", f"{report}.json", "--report", f"{report}.md", "--no-plots"]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    code, _, _ = run_child(cmd, log)
    if code != 0:
        sys.exit(f"romcomp eval failed (exit {code}); see {log}")
    return json.loads(Path(f"{report}.json").read_text())


def rows(doc: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from romcomp.evaluation.report import seven_task_acc

    where = {str(Path(o).resolve()): (run, float(r)) for run in runs for r, o in run["outs"].items()}
    table = []
    for m in doc["models"]:
        run, ratio = where.get(str(Path(m["path"]).resolve()), ({"config": "dense"}, 0.0))
        ppl = {k: v["ppl"] for k, v in m.get("perplexity", {}).items()}
        sets = {k: ppl.get(k) for k in ("wikitext2", "ptb", "c4")}
        table.append({"config": run["config"], "ratio": ratio, **sets, "acc7": seven_task_acc(m), "run": run})
    return table


def markdown(table: list[dict[str, Any]]) -> str:
    from romcomp.compression.memory import fmt_bytes

    head = ["configuration", "ratio", "WikiText-2", "C4 (held out)", "7-task mean", "compress s (all ratios)",
            "peak RSS", "plan"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in table:
        run = row["run"]
        cells = [row["config"], f"{row['ratio']:g}" if row["ratio"] else "–", f"{row['wikitext2']:.2f}",
                 f"{row['c4']:.2f}" if row["c4"] else "–",
                 f"{row['acc7']:.4f}" if row["acc7"] is not None else "–",
                 f"{run['seconds']:.0f}" if "seconds" in run else "–",
                 fmt_bytes(run["peak_rss_bytes"]) if "peak_rss_bytes" in run else "–",
                 fmt_bytes(run["plan_bytes"]) if "plan_bytes" in run else "–"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(table: list[dict[str, Any]], smollm2: bool) -> list[str]:
    """The issue's acceptance checks, each line PASS or MISS with the numbers."""
    dense = next(r["wikitext2"] for r in table if r["config"] == "dense")
    by = {(r["config"], r["ratio"]): r for r in table}
    lines = []
    for ratio in sorted({r["ratio"] for r in table if r["ratio"]}):
        best = by.get(("auto+error-aware", ratio))
        if best is None:
            continue
        inc = best["wikitext2"] - dense
        if smollm2 and ratio in TARGETS:
            ok = best["wikitext2"] <= TARGETS[ratio]
            lines.append(
                f"{'PASS' if ok else 'MISS'} ppl at {ratio:g}: {best['wikitext2']:.2f} <= {TARGETS[ratio]}"
            )
        base = by.get(("uniform+local", ratio))
        if base:
            share = inc / (base["wikitext2"] - dense)
            base_inc = base["wikitext2"] - dense
            lines.append(f"{'PASS' if share <= 0.4 else 'MISS'} increase at {ratio:g}: {share:.1%} of "
                         f"uniform+local's ({inc:.2f} vs {base_inc:.2f}; target <= 40%)")  # fmt: skip
        v2 = by.get(("v2+error-aware", ratio))
        if v2:
            ok = best["wikitext2"] < v2["wikitext2"]
            lines.append(f"{'PASS' if ok else 'MISS'} below v2 at {ratio:g}: {best['wikitext2']:.2f} vs "
                         f"{v2['wikitext2']:.2f}")  # fmt: skip
    runs = {r["config"]: r["run"] for r in table if "seconds" in r["run"]}
    if "auto+error-aware" in runs and "uniform+local" in runs:
        factor = runs["auto+error-aware"]["seconds"] / runs["uniform+local"]["seconds"]
        lines.append(
            f"{'PASS' if factor <= 2 else 'MISS'} time: {factor:.2f}x uniform+local's (target <= 2x)"
        )
    for name, run in runs.items():
        ok = run["peak_rss_bytes"] <= run["plan_bytes"]
        lines.append(f"{'PASS' if ok else 'MISS'} {name}: peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB "
                     f"within plan {run['plan_bytes'] / 2**30:.2f} GiB")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.4", help="for uniform+local, v2 and the default")
    parser.add_argument(
        "--side-ratios", default=None, help="for the other configurations (default: --ratios)"
    )
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--n-samples", type=int, default=128, help="calibration windows (C4)")
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--max-ram", default="8GB")
    parser.add_argument(
        "--limit", type=int, default=100, help="zero-shot documents per task (0: no zero-shot)"
    )
    parser.add_argument("--ppl-windows", type=int, default=40)
    parser.add_argument("--ppl-sets", default="wikitext2,c4", help="perplexity sets (wikitext2 first)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log = args.out_dir / "bench.log"
    ratios = [float(r) for r in args.ratios.split(",")]
    side = [float(r) for r in (args.side_ratios or args.ratios).split(",")]
    start = time.perf_counter()
    key = ("uniform+local", "v2+error-aware", "auto+error-aware")
    runs = [compress(args, name, ratios if name in key else side, log) for name in args.configs.split(",")]
    doc = evaluate(args, [o for run in runs for o in run["outs"].values()], log)
    table = rows(doc, runs)
    print(markdown(table))
    print()
    print("\n".join(targets(table, "smollm2" in args.model)))
    footer(args, doc, {"runs": runs, "table": table}, start, "bench_targeted.py")


def footer(args: argparse.Namespace, doc: dict[str, Any], record: dict[str, Any], start: float,
           script: str) -> None:  # fmt: skip
    """Machine, calibration, zero-shot scope, the command and the total time; ``record`` to bench.json."""
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{args.threads or 'default'} threads; {platform.platform()}")  # fmt: skip
    print(f"calibration: {doc['models'][-1].get('romcomp', {}).get('calibration')}")
    print(
        f"zero-shot: first {args.limit} documents of each of {SEVEN} (PARTIAL)"
        if args.limit
        else "zero-shot: not run"
    )
    print(f"command: python tools/{script} {shlex.join(sys.argv[1:])}")
    print(f"total {time.perf_counter() - start:.0f} s")
    (args.out_dir / "bench.json").write_text(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
