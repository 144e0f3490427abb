"""Issue-11 comparison: every method × {uniform, auto} allocation × ratios, on one calibration, side by side.

Usage (from the repository root)::

    python tools/bench_methods.py --model smollm2-135m --ratios 0.1,0.2,0.3,0.4 --out-dir /tmp/bm \\
        --threads 2 --limit 0
    python tools/bench_methods.py --configs svd-llm+uniform --ratios 0.1,0.2,0.3 --out-dir /tmp/bm

Each configuration is one ``romcomp`` CLI subprocess writing every ratio in one pass (its time and peak
RSS are its own), all on the same C4 calibration (``--n-samples`` × 512, 64 by default: SVD-LLM's own
setting). ``svd-llm+uniform`` is SVD-LLM's published setting (uniform ranks, local fit, statistics of the
dense model's activations); the other uniform configurations use the local fit on the compressed stream;
``+auto`` adds the global allocation, and ``rom+auto`` is romcomp's default (error-aware fit). One
``romcomp eval`` subprocess then scores the dense model and every output: WikiText-2 (raw test file), PTB
and held-out C4 perplexity on the first ``--ppl-windows`` × 512 tokens, and (``--limit`` > 0) the mean of
the seven zero-shot tasks of SVD-LLM's tables on the first ``--limit`` documents each. Prints one table, the
issue's checks, machine and command, and writes ``perplexity.png`` (WikiText-2 vs ratio per configuration).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import bench_targeted  # tools/ is the script's directory, so on sys.path

LOCAL = ["--fit", "local", "--no-sequential"]
CONFIGS = {
    "svd+uniform": ["--method", "svd", "--allocation", "uniform", *LOCAL],
    "asvd+uniform": ["--method", "asvd", "--allocation", "uniform", *LOCAL],
    "fwsvd+uniform": ["--method", "fwsvd", "--allocation", "uniform", *LOCAL],
    "lpaf+uniform": ["--method", "lpaf", "--allocation", "uniform", *LOCAL],
    "svd-llm+uniform": ["--method", "svd-llm", "--allocation", "uniform", "--calib-stream", "dense", *LOCAL],
    "rom+uniform": ["--method", "rom", "--allocation", "uniform", *LOCAL],
    "asvd+auto": ["--method", "asvd", "--allocation", "auto", *LOCAL],
    "asvd+asvd": ["--method", "asvd", "--allocation", "asvd", *LOCAL],  # ASVD's own search (paper setting)
    "svd-llm+auto": ["--method", "svd-llm", "--allocation", "auto", *LOCAL],
    "rom+auto": [],  # the default: auto allocation, error-aware fit
}
OFFICIAL_SVD_LLM = {0.1: 107.3, 0.2: 177.6, 0.3: 342.9}
"""The official SVD-LLM code on SmolLM2-135M (patched only to run on CPU with GQA), first 40 × 512 windows
of the raw WikiText-2 test file (dense 28.69): the issue's reference numbers."""


def markdown(table: list[dict[str, Any]]) -> str:
    from romcomp.compression.memory import fmt_bytes

    def num(v: float | None, fmt: str = ".2f") -> str:
        return "–" if v is None else format(v, fmt)

    head = ["configuration", "ratio", "WikiText-2", "PTB", "C4 (held out)", "7-task mean",
            "compress s (all ratios)", "peak RSS"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in sorted(table, key=lambda r: (r["ratio"], r["config"])):
        run = row["run"]
        cells = [row["config"], f"{row['ratio']:g}" if row["ratio"] else "–", num(row["wikitext2"]),
                 num(row["ptb"]), num(row["c4"]), num(row["acc7"], ".4f"),
                 f"{run['seconds']:.0f}" if "seconds" in run else "–",
                 fmt_bytes(run["peak_rss_bytes"]) if "peak_rss_bytes" in run else "–"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checks(table: list[dict[str, Any]], smollm2: bool) -> list[str]:
    """The issue's acceptance checks, each line PASS or MISS with the numbers (the official SVD-LLM
    comparison only for SmolLM2 on 40 windows, its protocol's length)."""
    by = {(r["config"], r["ratio"]): r for r in table}
    lines = []
    for ratio in sorted({r["ratio"] for r in table if r["ratio"]}):
        ref = OFFICIAL_SVD_LLM.get(ratio)
        ours = by.get(("svd-llm+uniform", ratio))
        if smollm2 and ref and ours:
            gap = ours["wikitext2"] / ref - 1
            lines.append(f"{'PASS' if abs(gap) <= 0.15 else 'MISS'} svd-llm (own setting) at {ratio:g}: "
                         f"{ours['wikitext2']:.2f} vs official {ref} ({gap:+.1%}; target ±15%)")  # fmt: skip
        at = {r["config"]: r["wikitext2"] for r in table if r["ratio"] == ratio}
        if len(at) < 2:
            continue
        worst, best = max(at, key=at.get), min(at, key=at.get)
        lines.append(f"{'PASS' if worst == 'svd+uniform' else 'MISS'} worst at {ratio:g}: {worst} "
                     f"({at[worst]:.2f})")  # fmt: skip
        lines.append(
            f"{'PASS' if best == 'rom+auto' else 'MISS'} best at {ratio:g}: {best} ({at[best]:.2f})"
            + (f"; rom+auto {at['rom+auto']:.2f}" if best != "rom+auto" and "rom+auto" in at else "")
        )
    return lines


def plot(table: list[dict[str, Any]], path: Path, dense: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for config in dict.fromkeys(r["config"] for r in table if r["config"] != "dense"):
        points = sorted((r["ratio"], r["wikitext2"]) for r in table if r["config"] == config)
        ax.plot(*zip(*points, strict=True), marker="o", label=config)
    ax.axhline(dense, color="grey", linestyle=":", label=f"dense {dense:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("ratio (fraction of block-linear parameters removed)")
    ax.set_ylabel("WikiText-2 perplexity (log)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench_targeted.add_run_arguments(parser, CONFIGS)
    parser.add_argument("--max-ram-for", default="", help="per-configuration caps, e.g. fwsvd+uniform=4GB")
    parser.add_argument("--limit", type=int, default=0, help="zero-shot documents per task (0: none)")
    parser.add_argument("--ppl-windows", type=int, default=40)
    parser.add_argument("--ppl-sets", default="wikitext2,ptb,c4", help="perplexity sets (wikitext2 first)")
    args = parser.parse_args()
    log, ratios, start = bench_targeted.prepare_run(args, CONFIGS)
    caps = dict(item.split("=", 1) for item in args.max_ram_for.split(",") if item)
    runs = [
        bench_targeted.compress(
            argparse.Namespace(**{**vars(args), "max_ram": caps.get(name, args.max_ram)}), name, ratios, log
        )  # fmt: skip
        for name in args.configs.split(",")
    ]
    doc = bench_targeted.evaluate(args, [o for run in runs for o in run["outs"].values()], log)
    table = bench_targeted.rows(doc, runs)
    print(markdown(table))
    print()
    print("\n".join(checks(table, "smollm2" in args.model and args.ppl_windows == 40)))
    dense = next(r["wikitext2"] for r in table if r["config"] == "dense")
    plot(table, args.out_dir / "perplexity.png", dense)
    print(f"plot: {args.out_dir / 'perplexity.png'}")
    bench_targeted.footer(args, doc, {"runs": runs, "table": table}, start, "bench_methods.py")


if __name__ == "__main__":
    main()
