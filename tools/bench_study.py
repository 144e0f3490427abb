"""Issue-12 study: what uniform and targeted compression do to the linguistic information in hidden states,
to NLI accuracy and to the Winogender gap, across ratios ("probing the pitfalls", reproduced or refuted).

Usage (from the repository root)::

    python tools/bench_study.py --model smollm2-135m --ratios 0.1,0.2,0.3,0.4 --out-dir /tmp/study --threads 2
    python tools/bench_study.py --model all-minilm-l6-v2 --ratios 0.1,0.2,0.3,0.4 --out-dir /tmp/study-minilm

Each configuration (``uniform+local``: SVD-LLM-style uniform ROM; ``default``: auto allocation,
error-aware fit) is one ``romcomp`` subprocess writing every ratio in one pass (outputs reused when
finished). Then one ``romcomp probe`` over the dense model and every output (seven tasks, selectivity per
layer) and, for decoders, one ``romcomp eval --tasks nli,winogender`` (RTE, SNLI, Winogender female/male).
Prints one table (best selectivity per task, its mean over tasks, NLI accuracies and the gap per model)
and writes ``study.png`` (mean best selectivity and SNLI accuracy vs ratio per configuration).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import bench_targeted  # tools/ is the script's directory, so on sys.path

CONFIGS = {
    "uniform+local": ["--allocation", "uniform", "--fit", "local", "--no-sequential"],
    "default": [],
}


def run(cmd: list[str], log: Path) -> None:
    with log.open("a") as handle:
        handle.write("$ " + " ".join(cmd) + "\n")
        handle.flush()
        code = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=bench_targeted.REPO_ROOT)
    if code != 0:
        sys.exit(f"failed (exit {code}): {' '.join(cmd)}; see {log}")


def table(
    probe: dict[str, Any], nli: dict[str, Any] | None, where: dict[str, tuple[str, float]]
) -> list[dict]:
    from romcomp.evaluation.report import winogender_gap
    from romcomp.probing.run import best

    scores = {}
    if nli:
        for m in nli["models"]:
            zs = m.get("zeroshot", {})
            scores[str(Path(m["path"]).resolve())] = {
                "rte": zs.get("rte", {}).get("metrics", {}).get("acc"),
                "snli": zs.get("snli", {}).get("metrics", {}).get("acc"),
                "gap": winogender_gap(m),
            }
    rows = []
    for m in probe["models"]:
        config, ratio = where.get(str(Path(m["path"]).resolve()), ("dense", 0.0))
        sel = {t: best(m["tasks"][t])["selectivity"] for t in probe["tasks"]}
        rows.append({"config": config, "ratio": ratio, "selectivity": sel,
                     "mean_selectivity": sum(sel.values()) / len(sel),
                     **scores.get(str(Path(m["path"]).resolve()), {})})  # fmt: skip
    return rows


def markdown(rows: list[dict], tasks: list[str]) -> str:
    head = ["configuration", "ratio", *tasks, "mean sel.", "RTE", "SNLI", "Winogender gap"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in sorted(rows, key=lambda r: (r["ratio"], r["config"])):
        fmt = [f"{r['selectivity'][t]:+.3f}" for t in tasks]
        extra = [f"{r[k]:.3f}" if r.get(k) is not None else "–" for k in ("rte", "snli")]
        gap = f"{r['gap']:+.3f}" if r.get("gap") is not None else "–"
        lines.append(f"| {r['config']} | {r['ratio']:g} | " + " | ".join(fmt)
                     + f" | {r['mean_selectivity']:+.3f} | " + " | ".join(extra) + f" | {gap} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("mean_selectivity", "mean best selectivity")] + (
        [("snli", "SNLI accuracy")] if any(r.get("snli") is not None for r in rows) else []
    )
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    dense = next(r for r in rows if r["config"] == "dense")
    for ax, (key, label) in zip(axes[0], keys, strict=True):
        for config in CONFIGS:
            pts = sorted(
                (r["ratio"], r[key]) for r in rows if r["config"] == config and r.get(key) is not None
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=config)
        if dense.get(key) is not None:
            ax.axhline(dense[key], color="grey", linestyle=":", label="dense")
        ax.set_xlabel("ratio")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench_targeted.add_run_arguments(parser, CONFIGS)
    args = parser.parse_args()
    log, ratios, start = bench_targeted.prepare_run(args, CONFIGS)
    from transformers import AutoConfig

    from romcomp.engine import is_encoder
    from romcomp.sources import resolve_model

    runs = [bench_targeted.compress(args, name, ratios, log) for name in args.configs.split(",")]
    outs = [o for r in runs for o in r["outs"].values()]
    where = {str(Path(o).resolve()): (r["config"], float(k)) for r in runs for k, o in r["outs"].items()}
    threads = ["--threads", str(args.threads)] if args.threads else []
    py = [sys.executable, "-m", "romcomp.cli"]
    run([*py, "probe", args.model, *outs, "--out", str(args.out_dir / "probe"), *threads], log)
    probe = json.loads((args.out_dir / "probe" / "probe.json").read_text())
    nli = None
    if not is_encoder(AutoConfig.from_pretrained(resolve_model(args.model).path)):
        report = args.out_dir / "nli"
        run([*py, "eval", args.model, *outs, "--tasks", "nli,winogender", "--json", f"{report}.json",
             "--report", f"{report}.md", "--no-plots", *threads], log)  # fmt: skip
        nli = json.loads(Path(f"{report}.json").read_text())
    rows = table(probe, nli, where)
    print(markdown(rows, probe["tasks"]))
    plot(rows, args.out_dir / "study.png")
    (args.out_dir / "study.json").write_text(json.dumps({"runs": runs, "rows": rows}, indent=1))
    print(f"\nplot: {args.out_dir / 'study.png'}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
