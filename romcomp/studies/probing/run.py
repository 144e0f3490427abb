"""``romcomp probe``: every model, every task, every layer; then ``probe.json``, ``report.md`` and a PNG.

Models are probed one at a time (each loaded, its features extracted, freed), on the same sentences,
splits and control labels, so dense and compressed columns compare like for like.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from romcomp.errors import BadInputError

TITLE = "Linear probes on frozen hidden states (task, control, selectivity)"


def run_probes(models: list[str], out: Path, data_dir: Path | None, tasks: list[str], seed: int = 0,
               threads: int | None = None, layer_step: int = 1) -> dict[str, Any]:  # fmt: skip
    """Probe each model on ``tasks`` at every ``layer_step``-th layer (and the last); writes and returns
    the JSON document."""
    import torch

    from calib.paths import resolve_data_dir
    from romcomp.compression.memory import peak_rss
    from romcomp.evaluation.features import sentence_features
    from romcomp.evaluation.plots import require_matplotlib
    from romcomp.model.sources import resolve_model
    from romcomp.studies.probing.probe import load_probe_model, probe_layers, probed_layers
    from romcomp.studies.probing.tasks import SNLI_FILE, TASKS, build_task, control_labels, load_sentences

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise BadInputError(f"unknown probing task {unknown[0]!r}; known: {', '.join(TASKS)}")
    if layer_step < 1:
        raise BadInputError(f"--layer-step must be >= 1, got {layer_step}")
    require_matplotlib()
    root = resolve_data_dir(data_dir)
    if root is None or not (root / SNLI_FILE).is_file():
        raise BadInputError(f"probing data missing: {root / SNLI_FILE} (set --data-dir)")
    resolved = [resolve_model(m) for m in models]  # every name checked before any model is loaded
    if threads:
        torch.set_num_threads(threads)
    trees = load_sentences(root)
    data = {t: build_task(t, trees, seed) for t in tasks}
    controls = {t: control_labels(x, y, seed) for t, (x, y) in data.items()}
    texts = list(dict.fromkeys(text for x, _ in data.values() for text in x))
    index = {text: i for i, text in enumerate(texts)}
    doc: dict[str, Any] = {
        "data": str(root / SNLI_FILE), "seed": seed, "tasks": tasks, "layer_step": layer_step, "models": [],
    }  # fmt: skip
    for spec, source in zip(models, resolved, strict=True):
        t0 = time.perf_counter()
        model, tokenizer = load_probe_model(str(source.path))
        features = sentence_features(model, tokenizer, texts)  # every sentence once, for all tasks
        del model
        layers = probed_layers(features.shape[0], layer_step)
        features = features[layers]
        results = {}
        for task in tasks:
            rows = [index[t] for t in data[task][0]]
            results[task] = probe_layers(features[:, rows], data[task][1], controls[task], seed, layers)
        doc["models"].append({"name": spec, "path": str(source.path), "ratio": _ratio(source.path),
                              "seconds": round(time.perf_counter() - t0, 1), "tasks": results})  # fmt: skip
    doc["peak_rss_bytes"] = peak_rss()
    write(doc, out)
    return doc


def _ratio(path: Path) -> float | None:
    config = json.loads((Path(path) / "config.json").read_text())
    record = config.get("quantization_config") or {}
    return record.get("ratio") if record.get("quant_method") == "romcomp" else None


def best(task: dict[str, Any], key: str = "selectivity") -> dict[str, Any]:
    return max(task["layers"], key=lambda row: (row[key], -row["layer"]))


def markdown(doc: dict[str, Any]) -> str:
    names = [m["name"] + (f" (r {m['ratio']:g})" if m["ratio"] else "") for m in doc["models"]]
    lines = [f"# {TITLE}", "", f"Sentences: {doc['data']} "
             "(parse-derived tasks, romcomp/studies/probing/tasks.py); "
             f"seed {doc['seed']}; logistic regression on mean-pooled hidden states, 80/20 split.", "",
             "Best layer by selectivity (task accuracy − control accuracy), per model:", "",
             "| task | classes | majority | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]  # fmt: skip
    for task in doc["tasks"]:
        first = doc["models"][0]["tasks"][task]
        cells = []
        for m in doc["models"]:
            b = best(m["tasks"][task])
            cells.append(f"sel {b['selectivity']:+.3f} (acc {b['acc']:.3f}, ctrl {b['control_acc']:.3f}, "
                         f"layer {b['layer']})")  # fmt: skip
        lines.append(
            f"| {task} | {first['classes']} | {first['majority_acc']:.3f} | " + " | ".join(cells) + " |"
        )
    lines += ["", "Per layer (selectivity):", ""]
    for m, name in zip(doc["models"], names, strict=True):
        layers = [row["layer"] for row in next(iter(m["tasks"].values()))["layers"]]
        lines += [
            f"### {name}",
            "",
            "| layer | " + " | ".join(doc["tasks"]) + " |",
            "|---" * (len(doc["tasks"]) + 1) + "|",
        ]
        for i, layer in enumerate(layers):
            cells = [f"{m['tasks'][t]['layers'][i]['selectivity']:+.3f}" for t in doc["tasks"]]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write(doc: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown(doc))
    tasks = doc["tasks"]
    fig, axes = plt.subplots(1, len(doc["models"]), figsize=(1.2 + 0.9 * len(tasks) * len(doc["models"]), 6),
                             squeeze=False)  # fmt: skip
    for ax, m in zip(axes[0], doc["models"], strict=True):
        data = [[m["tasks"][t]["layers"][i]["selectivity"] for t in tasks]
                for i in range(len(m["tasks"][tasks[0]]["layers"]))]  # fmt: skip
        im = ax.imshow(data, aspect="auto", cmap="RdBu_r", vmin=-0.5, vmax=0.5)
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=8)
        ids = [row["layer"] for row in m["tasks"][tasks[0]]["layers"]]
        ax.set_yticks(range(len(ids)), [str(i) for i in ids], fontsize=7)
        ax.set_ylabel("layer (0 = embeddings)")
        ax.set_title(m["name"] + (f" r{m['ratio']:g}" if m["ratio"] else ""), fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label="selectivity")
    fig.savefig(out / "selectivity.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp = out / "probe.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out / "probe.json")
