"""PNG plots of a multi-model ``romcomp eval`` report: perplexity, accuracy and throughput vs ratio.

The x axis is the compression ratio each model was built with (``romcomp.ratio`` in a romcomp output's
``config.json``; 0 for a model romcomp did not write). Models are grouped into one line per *base*
model (same hidden size, layer count and vocabulary), so a report holding SmolLM2 and Qwen outputs draws
one line for each. Plots are derived from the JSON only, like the markdown, so they can be redrawn from an
old report with :func:`write_plots`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from romcomp.errors import BadInputError

PLOTS = ("ppl", "acc", "throughput")


def require_matplotlib() -> None:
    """Plots need matplotlib (the ``eval`` extra); say so before any model is loaded."""
    if importlib.util.find_spec("matplotlib") is None:
        raise BadInputError("plots need matplotlib: pip install 'romcomp[eval]' (or pass --no-plots)")


def base_key(model: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(model.get("shape", {}).get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size"))


def lines(report: dict[str, Any], value: Callable[[dict[str, Any]], float | None]) -> dict[str, list]:
    """``{base label: [(ratio, value), ...]}`` sorted by ratio, skipping models without the value."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for model in report["models"]:
        groups.setdefault(base_key(model), []).append(model)
    out: dict[str, list] = {}
    for members in groups.values():
        dense = [m for m in members if m.get("romcomp") is None]
        label = (dense[0] if dense else members[0])["base_label"]
        points = [(m["ratio"], v) for m in members if (v := value(m)) is not None]
        if points:
            out[label] = sorted(points)
    return out


def _series(report: dict[str, Any], kind: str) -> dict[str, dict[str, list]]:
    """Panel title -> lines, for one of :data:`PLOTS`."""
    from romcomp.evaluation.report import mean_acc, seven_task_acc

    if kind == "ppl":
        names = dict.fromkeys(n for m in report["models"] for n in m.get("perplexity", {}))
        return {f"{n} perplexity": lines(report, lambda m, n=n: m.get("perplexity", {}).get(n, {}).get("ppl"))
                for n in names}  # fmt: skip
    if kind == "acc":
        return {
            "7-task zero-shot mean acc": lines(report, seven_task_acc),
            "zero-shot mean acc (all tasks run)": lines(report, mean_acc),
            "MMLU 5-shot macro acc": lines(report, lambda m: m.get("mmlu", {}).get("macro_acc")),
        }
    return {
        f"decode tokens/s, batch {b}": lines(
            report, lambda m, b=b: m.get("efficiency", {}).get(f"decode_b{b}_tokens_per_s")
        )
        for b in (1, 8)
    } | {"prefill tokens/s": lines(report, lambda m: m.get("efficiency", {}).get("prefill_tokens_per_s"))}


def write_plots(report: dict[str, Any], prefix: Path) -> list[Path]:
    """Write ``<prefix>-{ppl,acc,throughput}.png`` for the kinds with data; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    written = []
    for kind in PLOTS:
        panels = {title: data for title, data in _series(report, kind).items() if data}
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
        for ax, (title, data) in zip(axes[0], panels.items(), strict=True):
            for label, points in data.items():
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("compression ratio (fraction of block-linear params removed)", fontsize=8)
            ax.grid(alpha=0.3)
            if kind == "ppl":
                ax.set_yscale("log")
            ax.legend(fontsize=7)
        fig.suptitle(_subtitle(report), fontsize=8)
        fig.tight_layout()
        path = Path(f"{prefix}-{kind}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _subtitle(report: dict[str, Any]) -> str:
    s = report["settings"]
    partial = "PARTIAL (--limit) " if report.get("partial") else ""
    knobs = f"seq len {s.get('seq_len')}, threads {s.get('threads')}, dtype {s.get('dtype')}"
    return f"{partial}romcomp eval, {knobs}"
