"""The files of ``romcomp analyze``: ``analysis.json``, ``spectra.safetensors``, ``report.md`` and PNGs.

Everything but the spectra file is derived from the JSON rows, so a report can be redrawn from an old
JSON; the spectra file holds the full singular values (weight and feature space) per linear for plots and
for anyone who wants more than the summaries.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from romcomp.compression.memory import fmt_bytes
from romcomp.model.checkpoint import atomic_save_safetensors

PLOTS = ("heatmap.png", "spectra.png", "energy.png")


def write_report(result, linears) -> None:
    """All outputs of one analysis into ``result.out`` (written atomically, the JSON last)."""
    out = Path(result.out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for a in linears:
        tensors[f"{a.name}.feature"] = a.feature.contiguous()
        if a.weight is not None:
            tensors[f"{a.name}.weight"] = a.weight.contiguous()
    atomic_save_safetensors(tensors, out / "spectra.safetensors")
    doc = result.as_dict()
    plots(doc, tensors, out)
    (out / "report.md").write_text(markdown(doc))
    tmp = out / "analysis.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out / "analysis.json")


def kinds(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["kind"] for r in rows))


def grid(rows: list[dict[str, Any]], space: str, key: str = "effective_rank_fraction") -> dict[tuple, float]:
    """``{(block, kind): value}`` of one summary across the model."""
    return {(r["block"], r["kind"]): r[space][key] for r in rows if space in r}


def low_rank_ranking(rows: list[dict[str, Any]], space: str = "feature") -> list[dict[str, Any]]:
    """Linears ordered from the most to the least intrinsically low-rank (effective rank over the largest
    possible rank, in ``space``)."""
    return sorted(
        (r for r in rows if space in r), key=lambda r: (r[space]["effective_rank_fraction"], r["name"])
    )


def by_kind(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per matrix type, the means over blocks of what the report compares."""
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        a = acc[r["kind"]]
        a["feature eff. rank / max"].append(r["feature"]["effective_rank_fraction"])
        a["feature energy kept (uniform)"].append(r["feature"]["energy_kept_uniform"])
        a["feature energy kept (auto)"].append(r["feature"]["energy_kept_auto"])
        if "weight" in r:
            a["weight eff. rank / max"].append(r["weight"]["effective_rank_fraction"])
            a["weight energy kept (uniform)"].append(r["weight"]["energy_kept_uniform"])
            a["weight excess kurtosis"].append(r["weight"]["excess_kurtosis"])
    return {k: {n: sum(v) / len(v) for n, v in cols.items()} for k, cols in acc.items()}


def markdown(doc: dict[str, Any]) -> str:
    rows = doc["linears"]
    ks = kinds(rows)
    blocks = sorted({r["block"] for r in rows})
    lines = [
        f"# romcomp analyze: {doc['source']}",
        "",
        f"Calibration: {doc['calibration']}. Ranks at ratio {doc['ratio']:g} (uniform, and the `auto` "
        f"allocation romcomp compress would choose on this calibration). {doc['seconds']:.0f} s, peak RSS "
        f"{fmt_bytes(doc['peak_rss_bytes'])} (plan {fmt_bytes(doc['plan_bytes'])} of "
        f"{fmt_bytes(doc['budget_bytes'])}).",
        "",
        "Effective rank: exp of the entropy of the normalized singular values (Roy & Vetterli), shown as a "
        "fraction of the largest possible rank; feature space: the spectrum of the linear's outputs on the "
        "calibration tokens (what ROM truncates); weight space: the singular values of W.",
        "",
        "## Per matrix type (means over blocks)",
        "",
    ]
    summary = by_kind(rows)
    cols = list(dict.fromkeys(c for v in summary.values() for c in v))
    lines += ["| type | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for k in ks:
        lines.append(f"| {k} | " + " | ".join(f"{summary[k].get(c, float('nan')):.3f}" for c in cols) + " |")
    for space in ("feature", "weight"):
        values = grid(rows, space)
        if not values:
            continue
        lines += ["", f"## {space.capitalize()}-space effective rank / max, blocks × types", ""]
        lines += ["| block | " + " | ".join(ks) + " |", "|---" * (len(ks) + 1) + "|"]
        for b in blocks:
            cells = [f"{values[(b, k)]:.2f}" if (b, k) in values else "–" for k in ks]
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += ["", "## Most intrinsically low-rank (feature space)", "",
              "| # | linear | eff. rank | of max | rank 90% | rank 95% | rank 99% | weight eff. rank / max | "
              "energy kept at uniform rank (feature / weight) |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for i, r in enumerate(low_rank_ranking(rows)[:15], 1):
        f, w = r["feature"], r.get("weight")
        weight = f"{w['effective_rank_fraction']:.3f}" if w else "–"
        kept = f"{f['energy_kept_uniform']:.3f} / " + (f"{w['energy_kept_uniform']:.3f}" if w else "–")
        lines.append(
            f"| {i} | {r['name']} | {f['effective_rank']:.1f} | {f['effective_rank_fraction']:.3f} | "
            f"{f['rank_90']} | {f['rank_95']} | {f['rank_99']} | {weight} | {kept} |"
        )
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in PLOTS) + "; every number per linear in "
              "`analysis.json`, full spectra in `spectra.safetensors`.", ""]  # fmt: skip
    return "\n".join(lines)


def plots(doc: dict[str, Any], tensors: dict[str, torch.Tensor], out: Path) -> None:
    """``heatmap.png`` (effective rank per block and kind), ``spectra.png`` (three blocks' normalized
    singular values) and ``energy.png`` (energy kept vs rank, mean per kind) in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["linears"]
    ks = kinds(rows)
    blocks = sorted({r["block"] for r in rows})
    spaces = [s for s in ("feature", "weight") if grid(rows, s)]
    _heatmap(plt, rows, ks, blocks, spaces, out / "heatmap.png")
    _spectra(plt, rows, tensors, blocks, out / "spectra.png")
    _energy(plt, rows, tensors, ks, spaces, out / "energy.png")


def _heatmap(plt: Any, rows: list[dict[str, Any]], ks: list[str], blocks: list[int], spaces: list[str],
             path: Path) -> None:  # fmt: skip
    fig, axes = plt.subplots(
        1, len(spaces), figsize=(4 + 1.2 * len(ks) * len(spaces), 2 + 0.25 * len(blocks))
    )
    axes = axes if len(spaces) > 1 else [axes]
    for ax, space in zip(axes, spaces, strict=True):
        values = grid(rows, space)
        data = [[values.get((b, k), float("nan")) for k in ks] for b in blocks]
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(ks)), ks, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
        ax.set_ylabel("block")
        ax.set_title(f"{space} space: effective rank / max", fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spectra(plt: Any, rows: list[dict[str, Any]], tensors: dict[str, torch.Tensor], blocks: list[int],
             path: Path) -> None:  # fmt: skip
    chosen = sorted({blocks[0], blocks[len(blocks) // 2], blocks[-1]})
    fig, axes = plt.subplots(1, len(chosen), figsize=(5 * len(chosen), 4), squeeze=False)
    for ax, b in zip(axes[0], chosen, strict=True):
        for i, r in enumerate(r for r in rows if r["block"] == b):
            color = f"C{i % 10}"
            for space, style in (("feature", "-"), ("weight", "--")):
                s = tensors.get(f"{r['name']}.{space}")
                if s is not None and float(s[0]) > 0:
                    x = torch.arange(1, s.numel() + 1) / s.numel()
                    ax.plot(x, (s / s[0]).clamp_min(1e-8), style, color=color,
                            label=r["kind"] if space == "feature" else None)  # fmt: skip
        ax.set_yscale("log")
        ax.set_title(f"block {b}: σ/σ₁ (solid feature, dashed weight)", fontsize=9)
        ax.set_xlabel("rank / max rank")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _energy(plt: Any, rows: list[dict[str, Any]], tensors: dict[str, torch.Tensor], ks: list[str],
            spaces: list[str], path: Path) -> None:  # fmt: skip
    fig, axes = plt.subplots(1, len(spaces), figsize=(5.5 * len(spaces), 4), squeeze=False)
    for ax, space in zip(axes[0], spaces, strict=True):
        for i, k in enumerate(ks):
            curves = [
                tensors[f"{r['name']}.{space}"]
                for r in rows
                if r["kind"] == k and f"{r['name']}.{space}" in tensors
            ]
            if not curves:
                continue
            grid_x = torch.linspace(0, 1, 101, dtype=torch.float64)
            mean = sum(_energy_curve(s, grid_x) for s in curves) / len(curves)
            ax.plot(grid_x, mean, color=f"C{i % 10}", label=k)
        ax.axhline(0.9, color="grey", linestyle=":")
        ax.set_xlabel("rank / max rank")
        ax.set_ylabel("energy kept (mean over blocks)")
        ax.set_title(f"{space} space", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _energy_curve(singular: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Cumulative energy share at rank fractions ``at`` (step function of the rank)."""
    energy = singular.double().pow(2)
    cumulative = torch.cat(
        [torch.zeros(1, dtype=torch.float64), energy.cumsum(0) / energy.sum().clamp_min(1e-300)]
    )
    index = (at * singular.numel()).floor().long().clamp(0, singular.numel())
    return cumulative[index]
