"""``romcomp eval`` reports: one JSON holding every number and setting, and a markdown table from it.

The JSON is the record (the markdown is derived from it and never the other way round), so a table can
always be regenerated from an old run, and a reader can check exactly which model files, data bytes,
seeds, limits and library versions produced a number. A run with ``--limit`` is *partial*: its
numbers are on the first N documents/windows only, and both outputs say so at the top.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPORT_FORMAT = 1
_PACKAGES = ("romcomp", "torch", "transformers", "lm_eval", "datasets", "tokenizers", "numpy")


def versions() -> dict[str, str]:
    """Versions of Python and of every library that can change a number (``missing`` when absent)."""
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
    if found["romcomp"] == "missing":  # running from a checkout, not an installed distribution
        from romcomp import __version__

        found["romcomp"] = __version__
    found["romcomp_git"] = _git_revision()
    return found


def _git_revision() -> str:
    """``<commit>`` or ``<commit>-dirty`` of the romcomp checkout, ``unknown`` outside one."""
    from romcomp.paths import REPO_ROOT

    def git(*args: str) -> str:
        cmd = ["git", "-C", str(REPO_ROOT), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if commit and dirty else commit or "unknown"


def new_report(settings: dict[str, Any]) -> dict[str, Any]:
    """An empty report for ``settings`` (must hold ``limit``); models are appended as they finish."""
    return {
        "format": REPORT_FORMAT,
        "partial": settings.get("limit") is not None,
        "settings": settings,
        "versions": versions(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "data": {},
        "models": [],
    }


def write_json(report: dict[str, Any], path: Path) -> None:
    """Write atomically, so an interrupted run never leaves half a JSON where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2, sort_keys=False, allow_nan=True)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_partial(report: dict[str, Any]) -> bool:
    """True when a number covers fewer examples or windows than its whole data set (``--limit``)."""
    if report["settings"].get("limit") is not None or report["settings"].get("mmlu_limit") is not None:
        return True
    for model in report["models"]:
        if any(e["windows"] < e["windows_available"] for e in model.get("perplexity", {}).values()):
            return True
        if any(e["docs_scored"] < e["docs_total"] for e in model.get("zeroshot", {}).values()):
            return True
        if any(e["pairs"] < e["pairs_total"] for e in model.get("nli_head", {}).values()):
            return True
        mmlu = model.get("mmlu")
        if mmlu and mmlu["docs_scored"] < mmlu["docs_total"]:
            return True
    return False


def load_json(path: Path) -> dict[str, Any]:
    """Read a report written by :func:`write_json`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "int":
        return f"{int(value):,}"
    if not math.isfinite(value):
        return str(value)
    if kind == "ppl":
        return f"{value:.2f}" if abs(value) < 1e6 else f"{value:.3e}"
    if kind == "bytes":
        from romcomp.compression.memory import fmt_bytes

        return fmt_bytes(int(value))
    if kind in ("speed", "ratio"):
        return f"{value:.2f}" if kind == "ratio" else f"{value:.1f}"
    return f"{value:.4f}"


SIZE_ROWS = (
    ("parameters", "parameters", "int"),
    ("bytes on disk (weights)", "bytes_on_disk", "bytes"),
    ("peak RSS while loading", "load_peak_rss_bytes", "bytes"),
    ("peak RSS while evaluating", "run_peak_rss_bytes", "bytes"),
)
SPEED_ROWS = (
    ("prefill tokens/s (batch 1)", "prefill_tokens_per_s"),
    ("decode tokens/s, batch 1", "decode_b1_tokens_per_s"),
    ("decode ms/token, batch 1", "decode_b1_ms_per_token"),
    ("decode tokens/s, batch 8", "decode_b8_tokens_per_s"),
)


def _row_specs(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """``(label, section, key, metric)`` for every number any model has, in first-seen order."""
    specs: list[tuple[str, str, str, str]] = []
    for model in report["models"]:
        for name in model.get("perplexity", {}):
            specs += [(f"{name} ppl", "perplexity", name, "ppl")]
            specs += [(f"{name} tokens scored", "perplexity", name, "tokens_scored")]
        for task, entry in model.get("zeroshot", {}).items():
            for metric in entry["metrics"]:
                if not metric.endswith("_stderr"):
                    specs.append((f"{task} {metric}", "zeroshot", task, metric))
        for task, entry in model.get("nli_head", {}).items():
            specs += [(f"{task} acc ({entry['folds']}-fold head)", "nli_head", task, "acc"),
                      (f"{task} majority baseline", "nli_head", task, "majority_acc")]  # fmt: skip
    return list(dict.fromkeys(specs))


def _value(model: dict[str, Any], section: str, key: str, metric: str) -> float | None:
    entry = model.get(section, {}).get(key)
    if entry is None:
        return None
    return entry["metrics"].get(metric) if section == "zeroshot" else entry.get(metric)


def _kind(metric: str) -> str:
    return {"ppl": "ppl", "perplexity": "ppl", "tokens_scored": "int"}.get(metric, "acc")


def mean_acc(model: dict[str, Any]) -> float | None:
    """Mean ``acc`` over the zero-shot tasks that were run."""
    accs = [
        entry["metrics"]["acc"] for entry in model.get("zeroshot", {}).values() if "acc" in entry["metrics"]
    ]
    return sum(accs) / len(accs) if accs else None


def winogender_gap(model: dict[str, Any]) -> float | None:
    """Accuracy on the female-pronoun Winogender sentences minus the male ones (None unless both ran)."""
    zs = model.get("zeroshot", {})
    accs = [zs.get(t, {}).get("metrics", {}).get("acc") for t in ("winogender_female", "winogender_male")]
    return None if None in accs else accs[0] - accs[1]


def seven_task_acc(model: dict[str, Any]) -> float | None:
    """Mean ``acc`` over the seven tasks of SVD-LLM/ASVD tables; None unless all seven were run."""
    from romcomp.evaluation.zeroshot import SEVEN_TASKS

    zs = model.get("zeroshot", {})
    if not all(task in zs and "acc" in zs[task]["metrics"] for task in SEVEN_TASKS):
        return None
    return sum(zs[task]["metrics"]["acc"] for task in SEVEN_TASKS) / len(SEVEN_TASKS)


def _mmlu_rows(models: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    if not any("mmlu" in m for m in models):
        return []
    rows = [
        ("MMLU 5-shot macro acc", [_fmt(m.get("mmlu", {}).get("macro_acc"), "acc") for m in models]),
        ("MMLU 5-shot micro acc", [_fmt(m.get("mmlu", {}).get("micro_acc"), "acc") for m in models]),
    ]
    cats = dict.fromkeys(c for m in models for c in m.get("mmlu", {}).get("categories", {}))
    rows += [(f"MMLU {cat} (macro)", [_fmt(m.get("mmlu", {}).get("categories", {}).get(cat), "acc")
                                      for m in models]) for cat in cats]  # fmt: skip
    return rows


def table_rows(report: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """Markdown rows: a label and one formatted cell per model (rows = metrics, columns = models)."""
    models = report["models"]
    rows = []
    if any("ratio" in m for m in models):
        rows.append(("ratio", [_fmt(m.get("ratio"), "ratio") for m in models]))
    rows += [(label, [_fmt(m.get(key), kind) for m in models]) for label, key, kind in SIZE_ROWS
             if any(m.get(key) is not None for m in models)]  # fmt: skip
    rows += [
        (label, [_fmt(_value(m, section, key, metric), _kind(metric)) for m in models])
        for label, section, key, metric in _row_specs(report)
    ]
    if any(seven_task_acc(m) is not None for m in models):
        rows.append(("7-task mean acc", [_fmt(seven_task_acc(m), "acc") for m in models]))
    if any(mean_acc(m) is not None for m in models):
        rows.append(("zero-shot mean acc (tasks run)", [_fmt(mean_acc(m), "acc") for m in models]))
    if any(winogender_gap(m) is not None for m in models):
        rows.append(("Winogender gap (female - male acc)", [_fmt(winogender_gap(m), "gap") for m in models]))
    rows += _mmlu_rows(models)
    rows += [(label, [_fmt(m.get("efficiency", {}).get(key), "speed") for m in models])
             for label, key in SPEED_ROWS if any(key in m.get("efficiency", {}) for m in models)]  # fmt: skip
    return rows


def mmlu_subject_lines(report: dict[str, Any]) -> list[str]:
    """A second table: MMLU accuracy per subject (rows) and model (columns)."""
    models = [m for m in report["models"] if "mmlu" in m]
    if not models:
        return []
    subjects = dict.fromkeys(s for m in models for s in m["mmlu"]["subjects"])
    lines = [
        "",
        "## MMLU per subject (5-shot acc)",
        "",
        "| subject | " + " | ".join(m["spec"] for m in models) + " |",
        "|---|" + "---:|" * len(models),
    ]
    for subject in subjects:
        cells = [_fmt(m["mmlu"]["subjects"].get(subject, {}).get("acc"), "acc") for m in models]
        lines.append(f"| {subject} | " + " | ".join(cells) + " |")
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    """The human summary: a partial-run warning, the table, then the settings that produced it."""
    settings = report["settings"]
    lines = ["# romcomp eval", ""]
    if report["partial"]:
        lines += [f"**PARTIAL RUN** ({_partial_reason(settings)}): not comparable to full-set numbers.", ""]
    names = [m["spec"] for m in report["models"]]
    lines += ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in table_rows(report)]
    lines += ["", *_settings_lines(report), *mmlu_subject_lines(report)]
    return "\n".join(lines) + "\n"


def _partial_reason(settings: dict[str, Any]) -> str:
    parts = []
    if settings.get("limit") is not None:
        parts.append(f"--limit {settings['limit']}: first {settings['limit']} examples per task")
    if settings.get("ppl_windows") is not None and settings.get("ppl_tasks", True):
        parts.append(f"first {settings['ppl_windows']} perplexity windows per set")
    if settings.get("mmlu_limit") is not None:
        parts.append(f"first {settings['mmlu_limit']} MMLU questions per subject")
    return "; ".join(parts)


def _fewshot(settings: dict[str, Any]) -> str:
    """``lm-eval tasks num_fewshot K, MMLU num_fewshot 5`` (reports before the option had K = 0)."""
    shots = settings.get("num_fewshot") or {}
    return f"lm-eval tasks num_fewshot {shots.get('zeroshot', 0)}, MMLU num_fewshot {shots.get('mmlu', 5)}"


def _knobs(settings: dict[str, Any]) -> list[str]:
    """The settings that changed this run's numbers: the window length only where perplexity ran, the
    harness's batch size and shots only where it ran, the head's protocol only where a head ran (an
    encoder's report has no next-token settings). Reports without the task lists show everything."""
    s = settings
    knobs = [f"seq len {s.get('seq_len')}"] if s.get("ppl_tasks", True) else []
    dtype = f"dtype {s.get('dtype')}"
    if s.get("dtype") == "auto" and s.get("dtypes_used"):  # the checkpoints' own dtypes
        dtype += f" ({'/'.join(s['dtypes_used'])})"
    knobs += [f"threads {s.get('threads')}", dtype]
    if s.get("zeroshot_tasks", True) or "mmlu" in s.get("tasks", []):
        knobs += [f"batch size {s.get('batch_size')}", _fewshot(s)]
    if s.get("nli_head"):
        h = s["nli_head"]
        knobs.append(f"NLI head {h.get('folds')}-fold CV (seed {h.get('seed')}) on {h.get('features')}")
    return [*knobs, f"seeds {s.get('seeds')}"]


def _settings_lines(report: dict[str, Any]) -> list[str]:
    s, v = report["settings"], report["versions"]
    lines = [
        "- " + ", ".join(_knobs(s)),
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
    ]
    for model in report["models"]:
        lines.append(
            f"- `{model['spec']}`: {model.get('description', '')} (fingerprint {model['fingerprint'][:12]})"
        )
        if model.get("romcomp"):
            rc = model["romcomp"]
            lines.append(f"  - romcomp {rc.get('method')} ratio {rc.get('ratio')}, "
                         f"{rc.get('allocation')} ranks, calibrated on {rc.get('calibration')}")  # fmt: skip
        if model.get("efficiency"):
            from romcomp.evaluation.efficiency import describe

            reset = "per model and phase" if model.get("rss_reset") else "cumulative (reset unavailable)"
            lines.append(f"  - speed: {describe(model['efficiency'])}; peak RSS {reset}")
    docs = _docs_scored(report)
    if docs:
        lines.append("- examples scored: " + ", ".join(docs))
    lines += [f"- note: {note}" for note in s.get("notes", [])]
    grouped: dict[str, list[str]] = {}
    for name, sha in report["data"].items():
        if name.startswith("mmlu/"):  # 114 files: one combined line here, each file in the JSON
            grouped.setdefault("mmlu", []).append(f"{name} {sha}")
        else:
            lines.append(f"- data `{name}` sha256 {sha}")
    for group, entries in grouped.items():
        combined = hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()
        lines.append(
            f"- data `{group}/` {len(entries)} files, sha256 of the sorted 'name sha256' list {combined}"
        )
    return lines


def _docs_scored(report: dict[str, Any]) -> list[str]:
    seen: dict[str, str] = {}
    for model in report["models"]:
        for task, entry in model.get("zeroshot", {}).items():
            seen.setdefault(task, f"{task} {entry['docs_scored']}/{entry['docs_total']}")
        for task, entry in model.get("nli_head", {}).items():
            seen.setdefault(task, f"{task} {entry['pairs']}/{entry['pairs_total']}")
        if "mmlu" in model:
            seen.setdefault("mmlu", f"mmlu {model['mmlu']['docs_scored']}/{model['mmlu']['docs_total']}")
    return list(seen.values())


def parse_markdown_table(markdown: str) -> tuple[list[str], dict[str, list[str]]]:
    """The model names and ``{label: cells}`` of the table in :func:`to_markdown` output (for checks)."""
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    if len(table) < 2:
        return [], {}
    header = _cells(table[0])[1:]
    return header, {_cells(line)[0]: _cells(line)[1:] for line in table[2:]}


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def model_names(report: dict[str, Any]) -> Sequence[str]:
    """Column order of the table."""
    return [m["spec"] for m in report["models"]]
