"""Issue-12 study: what uniform and targeted compression do to the linguistic information in hidden states,
to NLI accuracy and to the Winogender gap, across ratios ("probing the pitfalls", reproduced or refuted).

Usage (from the repository root)::

    python tools/bench_study.py --model smollm2-135m --ratios 0.1,0.2,0.3,0.4 --out-dir /tmp/study \
        --threads 2 --reuse /tmp/bm,/tmp/bm2 --layer-step 3
    python tools/bench_study.py --model all-minilm-l6-v2 --ratios 0.1,0.2,0.3,0.4 --out-dir /tmp/study-minilm

The two configurations are ``tools/bench_methods.py``'s: ``svd-llm+uniform`` (uniform ranks, local fit,
statistics of the dense model's activations: the uniform whitened SVD of SVD-LLM and of the seed study's
"uniform" arm) and ``rom+auto`` (romcomp's default: global allocation, error-aware fit). Outputs already
written by ``bench_methods.py`` under a ``--reuse`` directory (``DIR/CONFIG/MODEL-rRATIO``, same default
64 × 512 C4 calibration) are used as they are; the missing ratios of a configuration are written in one
``romcomp`` subprocess. Then one ``romcomp probe`` over the dense model and every output (seven tasks,
selectivity per probed layer) and one ``romcomp eval``: for decoders RTE and SNLI by prompt and by a
frozen-feature head, and Winogender female/male; for encoders RTE and SNLI by the head. Prints one table
(best selectivity per task, its mean over tasks, NLI accuracies and the gap per model) and writes
``study.png`` (mean best selectivity and SNLI accuracy vs ratio per configuration).
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
from bench_methods import CONFIGS as METHOD_CONFIGS

CONFIGS = {name: METHOD_CONFIGS[name] for name in ("svd-llm+uniform", "rom+auto")}


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
    from romcomp.studies.probing.run import best

    scores = {}
    if nli:
        for m in nli["models"]:
            zs, heads = m.get("zeroshot", {}), m.get("nli_head", {})
            scores[str(Path(m["path"]).resolve())] = {
                "rte": zs.get("rte", {}).get("metrics", {}).get("acc"),
                "snli": zs.get("snli", {}).get("metrics", {}).get("acc"),
                "rte_head": heads.get("rte_head", {}).get("acc"),
                "snli_head": heads.get("snli_head", {}).get("acc"),
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
    scores = ("rte", "snli", "rte_head", "snli_head")
    head = [
        "configuration",
        "ratio",
        *tasks,
        "mean sel.",
        "RTE",
        "SNLI",
        "RTE head",
        "SNLI head",
        "Winogender gap",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in sorted(rows, key=lambda r: (r["ratio"], r["config"])):
        fmt = [f"{r['selectivity'][t]:+.3f}" for t in tasks]
        extra = [f"{r[k]:.3f}" if r.get(k) is not None else "–" for k in scores]
        gap = f"{r['gap']:+.3f}" if r.get("gap") is not None else "–"
        lines.append(f"| {r['config']} | {r['ratio']:g} | " + " | ".join(fmt)
                     + f" | {r['mean_selectivity']:+.3f} | " + " | ".join(extra) + f" | {gap} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = (("snli", "SNLI accuracy (prompt)"), ("snli_head", "SNLI accuracy (head)"))
    keys = [("mean_selectivity", "mean best selectivity")]
    keys += [(key, label) for key, label in labels if any(r.get(key) is not None for r in rows)]
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


def outputs(args: argparse.Namespace, name: str, ratios: list[float], log: Path) -> dict[str, Any]:
    """Configuration ``name``'s outputs: those under a ``--reuse`` directory as they are, the missing
    ratios written in one ``romcomp`` run (itself reused when finished)."""
    found = {}
    for r in ratios:
        for root in [Path(d) for d in args.reuse.split(",") if d]:
            candidate = root / name / f"{Path(args.model).name}-r{r:g}"
            if (candidate / "config.json").is_file() and r not in found:
                found[r] = str(candidate)
    missing = [r for r in ratios if r not in found]
    run = bench_targeted.compress(args, name, missing, log) if missing else {"config": name, "outs": {}}
    return {
        **run,
        "outs": {**{f"{r:g}": o for r, o in found.items()}, **run["outs"]},
        "reused": sorted(found),
    }


def combine(files: list[Path], out_dir: Path) -> None:
    """One table and plot from several studies of the same model (their dense rows must agree: the same
    probes and evaluation); the first file's row wins where two share a configuration and ratio."""
    studies = [json.loads(path.read_text())["rows"] for path in files]
    if any(study[0]["mean_selectivity"] != studies[0][0]["mean_selectivity"] for study in studies):
        raise SystemExit("the studies' dense rows differ: not the same model, probes or evaluation")
    rows: dict[tuple[str, float], dict] = {}
    for study in studies:
        for row in study:
            rows.setdefault((row["config"], row["ratio"]), row)
    ordered = list(rows.values())  # markdown() sorts by ratio and configuration
    print(markdown(ordered, list(ordered[0]["selectivity"])))
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(ordered, out_dir / "study.png")
    (out_dir / "study.json").write_text(
        json.dumps({"combined": [str(p) for p in files], "rows": ordered}, indent=1)
    )
    print(f"\nplot: {out_dir / 'study.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench_targeted.add_run_arguments(parser, CONFIGS)
    parser.add_argument("--reuse", default="", help="comma list of bench_methods.py output directories")
    parser.add_argument("--layer-step", type=int, default=1, help="probe every N-th layer (and the last)")
    parser.add_argument(
        "--combine", default="", help="comma list of earlier study.json files (other ratios): one table and "
        "plot of their rows in --out-dir; nothing is run",
    )  # fmt: skip
    args = parser.parse_args()
    if args.combine:
        combine([Path(p) for p in args.combine.split(",") if p], args.out_dir)
        return
    log, ratios, start = bench_targeted.prepare_run(args, CONFIGS)
    from transformers import AutoConfig

    from romcomp.model.shell import is_encoder
    from romcomp.model.sources import resolve_model

    runs = [outputs(args, name, ratios, log) for name in args.configs.split(",")]
    outs = [o for r in runs for o in r["outs"].values()]
    where = {str(Path(o).resolve()): (r["config"], float(k)) for r in runs for k, o in r["outs"].items()}
    threads = ["--threads", str(args.threads)] if args.threads else []
    py = [sys.executable, "-m", "romcomp.cli"]
    run([*py, "probe", args.model, *outs, "--out", str(args.out_dir / "probe"), "--layer-step",
         str(args.layer_step), *threads], log)  # fmt: skip
    probe = json.loads((args.out_dir / "probe" / "probe.json").read_text())
    encoder = is_encoder(AutoConfig.from_pretrained(resolve_model(args.model).path))
    report = args.out_dir / "nli"
    run([*py, "eval", args.model, *outs, "--tasks", "nli" if encoder else "nli,nli_head,winogender",
         "--json", f"{report}.json", "--report", f"{report}.md", "--no-plots", *threads], log)  # fmt: skip
    nli = json.loads(Path(f"{report}.json").read_text())
    rows = table(probe, nli, where)
    print(markdown(rows, probe["tasks"]))
    plot(rows, args.out_dir / "study.png")
    (args.out_dir / "study.json").write_text(json.dumps({"runs": runs, "rows": rows}, indent=1))
    print(f"\nplot: {args.out_dir / 'study.png'}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
