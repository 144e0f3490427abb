"""Results table for the README: dense and ROM at several ratios, quality + speed, one model per run.

Usage (from the repository root)::

    python tools/bench_quality.py --model smollm2-135m --ratios 0.1,0.2,0.3,0.4 --out-dir /tmp/bq
    python tools/bench_quality.py --model qwen2.5-coder-1.5b --ratios 0.2 --n-samples 32 --max-ram 4GB

Each compression is a ``romcomp`` CLI subprocess (so its peak RSS, from ``wait4``, is its own); finished
outputs in ``--out-dir`` are reused, so an interrupted benchmark continues where it stopped. Then one
``romcomp eval`` subprocess measures the dense model and every output side by side: WikiText-2, PTB and
held-out C4 perplexity, the 7 zero-shot tasks of SVD-LLM's tables, MMLU 5-shot and prefill/decode speed.
``--limit``/``--mmlu-limit``/``--ppl-windows`` make it a partial (clearly marked) run. The eval JSON,
markdown and plots land in ``--out-dir``; this script prints one summary table and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SEVEN = "piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq,openbookqa"


def run_child(cmd: list[str], log: Path) -> tuple[int, float, int]:
    """(exit code, seconds, peak RSS bytes of that child alone) with its output appended to ``log``."""
    start = time.perf_counter()
    with log.open("a") as handle:
        handle.write(f"$ {shlex.join(cmd)}\n")
        handle.flush()
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss * 1024


def finished(out: Path) -> bool:
    config = out / "config.json"
    return (
        config.is_file()
        and json.loads(config.read_text()).get("quantization_config", {}).get("quant_method") == "romcomp"
    )


def compress(args: argparse.Namespace, ratio: float, log: Path) -> dict[str, Any]:
    out = args.out_dir / f"{Path(args.model).name}-r{ratio}"
    if finished(out):
        return {"ratio": ratio, "out": str(out), "reused": True}
    cmd = [sys.executable, "-m", "romcomp.cli", args.model, "--ratio", str(ratio), "--out", str(out),
           "--max-ram", args.max_ram, "--n-samples", str(args.n_samples),
           "--seq-len", str(args.calib_seq_len), "--no-progress"]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    code, seconds, rss = run_child(cmd, log)
    if code != 0:
        sys.exit(f"compression at ratio {ratio} failed (exit {code}); see {log}")
    return {"ratio": ratio, "out": str(out), "seconds": seconds, "peak_rss_bytes": rss, "reused": False}


def evaluate(args: argparse.Namespace, outs: list[str], log: Path) -> dict[str, Any]:
    report = args.out_dir / f"{Path(args.model).name}-eval"
    cmd = [sys.executable, "-m", "romcomp.cli", "eval", args.model, *outs,
           "--tasks", f"wikitext2,ptb,c4,{SEVEN},mmlu,speed", "--seq-len", str(args.seq_len),
           "--json", f"{report}.json", "--report", f"{report}.md"]  # fmt: skip
    for flag, value in (("--limit", args.limit), ("--mmlu-limit", args.mmlu_limit),
                        ("--ppl-windows", args.ppl_windows), ("--threads", args.threads)):  # fmt: skip
        if value:
            cmd += [flag, str(value)]
    code, seconds, _ = run_child(cmd, log)
    if code != 0:
        sys.exit(f"romcomp eval failed (exit {code}); see {log}")
    doc = json.loads(Path(f"{report}.json").read_text())
    doc["bench_eval_seconds"] = seconds
    return doc


def table(doc: dict[str, Any], runs: dict[str, dict[str, Any]]) -> str:
    from romcomp.compression.memory import fmt_bytes
    from romcomp.evaluation.report import seven_task_acc

    head = ["model", "ratio", "params", "WikiText-2", "PTB", "C4", "7-task acc", "MMLU", "decode tok/s b1",
            "decode tok/s b8", "compress s", "compress peak RSS"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for m in doc["models"]:
        ppl = {k: f"{v['ppl']:.2f}" for k, v in m.get("perplexity", {}).items()}
        acc7 = seven_task_acc(m)
        eff = m.get("efficiency", {})
        run = runs.get(m["path"], {})
        cells = [
            Path(m["spec"]).name, f"{m['ratio']:.2f}", f"{m['parameters']:,}",
            ppl.get("wikitext2", "–"), ppl.get("ptb", "–"), ppl.get("c4", "–"),
            f"{acc7:.4f}" if acc7 is not None else "–",
            f"{m['mmlu']['macro_acc']:.4f}" if "mmlu" in m else "–",
            f"{eff.get('decode_b1_tokens_per_s', 0):.1f}", f"{eff.get('decode_b8_tokens_per_s', 0):.1f}",
            f"{run['seconds']:.0f}" if "seconds" in run else ("reused" if run else "–"),
            fmt_bytes(run["peak_rss_bytes"]) if "peak_rss_bytes" in run else "–",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.4")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--n-samples", type=int, default=128, help="calibration windows (C4)")
    parser.add_argument("--calib-seq-len", type=int, default=512, help="calibration window length")
    parser.add_argument("--max-ram", default="4GB")
    parser.add_argument("--limit", type=int, default=None, help="zero-shot documents per task")
    parser.add_argument("--mmlu-limit", type=int, default=None, help="MMLU questions per subject")
    parser.add_argument("--ppl-windows", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = Path(args.model).name
    log = args.out_dir / f"{name}-bench.log"
    start = time.perf_counter()
    runs = [compress(args, float(r), log) for r in args.ratios.split(",")]
    doc = evaluate(args, [r["out"] for r in runs], log)
    by_path = {str(Path(r["out"]).resolve()): r for r in runs}
    print(table(doc, {m["path"]: by_path.get(str(Path(m["path"]).resolve()), {}) for m in doc["models"]}))
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{doc['settings']['threads']} threads; {platform.platform()}")  # fmt: skip
    print(f"calibration: {doc['models'][-1].get('romcomp', {}).get('calibration')}")
    print(f"command: python tools/bench_quality.py {shlex.join(sys.argv[1:])}")
    print(f"total {time.perf_counter() - start:.0f} s; eval report {args.out_dir}/{name}-eval.md")
    (args.out_dir / f"{name}-bench.json").write_text(json.dumps({"runs": runs, "eval": doc}, indent=2))


if __name__ == "__main__":
    main()
