"""Run a validated ``romcomp eval`` plan: each model in turn, one JSON (and markdown, plots) report.

Models are evaluated one at a time and the JSON is rewritten after each, so an interrupted multi-model
run keeps the finished models' numbers.
"""

from __future__ import annotations

import hashlib
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from romcomp.evaluation.nli_head import FOLDS, HEAD_TASKS
from romcomp.evaluation.plan import NOTES, EvalPlan
from romcomp.evaluation.zeroshot import BOOTSTRAP_ITERS, LM_EVAL_VERSION, SEEDS, TASK_FILES


def settings(p: EvalPlan) -> dict[str, Any]:
    """The report's ``settings``: every knob that changes a number."""
    from romcomp.evaluation.efficiency import SpeedSettings

    t = p.tasks
    return {
        "tasks": t.names(), "ppl_tasks": t.ppl, "zeroshot_tasks": t.zeroshot, "limit": p.limit,
        "ppl_windows": p.ppl_windows if p.ppl_windows is not None else p.limit,
        "mmlu_limit": p.mmlu_questions() if t.mmlu else None,
        "seq_len": p.seq_len, "threads": p.threads, "batch_size": p.batch_size, "dtype": p.dtype,
        "num_fewshot": {"zeroshot": p.num_fewshot, "mmlu": 5},
        "nli_head": {"folds": FOLDS, "seed": 0, "features": "[u, v, |u-v|, u*v], last layer, mean-pooled"}
        if t.heads else None, "seeds": SEEDS, "data_dir": str(p.data_dir),
        "harness": f"lm-eval {LM_EVAL_VERSION}" if (t.zeroshot or t.mmlu) else None,
        "bootstrap_iters": BOOTSTRAP_ITERS,
        "speed": SpeedSettings().to_dict() if t.speed else None,
        "notes": [note for name, note in NOTES.items() if name in t.names()],
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


def checkpoint_dtype(config: Any) -> str:
    """The dtype a checkpoint's config records (``dtype``, formerly ``torch_dtype``) when it is one
    ``--dtype`` accepts, else float32 (a config that records none, or e.g. float64)."""
    from romcomp.evaluation.plan import DTYPES

    recorded = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(recorded).removeprefix("torch.") if recorded is not None else "float32"
    return name if name in DTYPES and name != "auto" else "float32"


def load_model(path: Path, dtype: str) -> tuple[Any, Any]:
    """Model and tokenizer from a local directory (a decoder with its LM head, an encoder bare); romcomp
    outputs load via romcomp's Auto classes. ``dtype="auto"``: the checkpoint's own dtype
    (:func:`checkpoint_dtype`), so a bf16 or fp16 checkpoint is never widened to float32 (lm-eval's
    ``dtype="auto"``); the dtype used is ``model.dtype``."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    import romcomp  # noqa: F401 - registers the romcomp Auto classes
    from romcomp.model.shell import auto_class

    config = AutoConfig.from_pretrained(path)
    name = checkpoint_dtype(config) if dtype == "auto" else dtype
    model = auto_class(config).from_pretrained(path, dtype=getattr(torch, name))
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def model_identity(resolved: Any, model: Any) -> dict[str, Any]:
    """What identifies the weights evaluated: resolution, fingerprint, config hash, size, romcomp record."""
    import json

    from romcomp.compression.output import romcomp_record
    from romcomp.evaluation.efficiency import weight_bytes_on_disk

    config = resolved.path / "config.json"
    manifest = resolved.path / ".romcomp" / "manifest.json"
    record = romcomp_record(json.loads(config.read_text()))
    cfg = model.config
    romcomp = None
    if isinstance(record, dict):
        romcomp = {k: record.get(k) for k in ("ratio", "method", "allocation", "fit", "calib_stream",
                                              "calibration", "source", "version")}  # fmt: skip
    return {
        "spec": resolved.spec, "path": str(resolved.path), "description": resolved.description,
        "fingerprint": resolved.fingerprint,
        "config_sha256": _sha256(config),
        "romcomp_manifest_sha256": _sha256(manifest) if manifest.is_file() else None,
        "model_type": getattr(cfg, "model_type", None),
        "romcomp": romcomp, "ratio": float(romcomp["ratio"]) if romcomp else 0.0,
        "base_label": (romcomp or {}).get("source") or f"{resolved.spec} (dense)",
        "shape": {k: getattr(cfg, k, None) for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
        "parameters": sum(p.numel() for p in model.parameters()),
        "bytes_on_disk": weight_bytes_on_disk(resolved.path),
    }  # fmt: skip


def evaluate_one(p: EvalPlan, resolved: Any) -> dict[str, Any]:
    """Load one model, run the requested measurements, and free it (peak RSS reset per phase)."""
    import gc

    from romcomp.compression.memory import peak_rss, release_heap
    from romcomp.evaluation.efficiency import measure_speed, reset_peak_rss
    from romcomp.evaluation.perplexity import run_ppl

    gc.collect()
    release_heap()
    rss_reset = reset_peak_rss()
    start = time.perf_counter()
    model, tokenizer = load_model(resolved.path, p.dtype)
    entry = model_identity(resolved, model)
    entry["load_seconds"] = round(time.perf_counter() - start, 2)
    entry["load_peak_rss_bytes"] = peak_rss()
    entry["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    entry["rss_reset"] = rss_reset and reset_peak_rss()
    t = p.tasks
    if t.ppl:
        windows = p.ppl_windows if p.ppl_windows is not None else p.limit
        ppl_batch = 1 if p.seq_len >= 1024 else p.batch_size  # attention scores grow with L^2
        results = run_ppl(model, tokenizer, t.ppl, p.data_dir, p.seq_len, windows, ppl_batch)
        entry["perplexity"] = {r.dataset: r.to_dict() for r in results}
    if t.zeroshot or t.mmlu:
        _harness_tasks(p, model, tokenizer, entry)
    if t.heads:
        from romcomp.evaluation.nli_head import run_heads

        files = {HEAD_TASKS[h]: p.data_dir / TASK_FILES[HEAD_TASKS[h]] for h in t.heads}
        entry["nli_head"] = run_heads(model, tokenizer, t.heads, files, p.limit)
    if t.speed:
        entry["efficiency"] = measure_speed(model)
    entry["seconds"] = round(time.perf_counter() - start, 2)
    entry["run_peak_rss_bytes"] = peak_rss()
    entry["peak_rss_bytes"] = entry["run_peak_rss_bytes"]  # format-1 name, kept for old readers
    del model, tokenizer
    return entry


def _harness_tasks(p: EvalPlan, model: Any, tokenizer: Any, entry: dict[str, Any]) -> None:
    """Zero-shot tasks and MMLU through one lm-eval HFLM wrapper (built once per model)."""
    from romcomp.evaluation.mmlu import run_mmlu
    from romcomp.evaluation.zeroshot import harness_model, run_zeroshot

    # max_length stays lm-eval's own choice (the model's context), as in published harness numbers
    lm = harness_model(model, tokenizer, p.batch_size, None)
    if p.tasks.zeroshot:
        results = run_zeroshot(
            model, tokenizer, p.tasks.zeroshot, p.data_dir, p.limit, lm=lm, num_fewshot=p.num_fewshot
        )
        entry["zeroshot"] = {
            r.task: {"metrics": r.metrics, "docs_scored": r.docs_scored, "docs_total": r.docs_total,
                     "data_file": r.data_file, "sha256": r.sha256}
            for r in results
        }  # fmt: skip
    if p.tasks.mmlu:
        entry["mmlu"] = run_mmlu(lm, p.data_dir, p.mmlu_questions())[0].to_dict()


def run(p: EvalPlan, json_path: Path, report_path: Path | None) -> dict[str, Any]:
    """Evaluate every model in turn, rewriting the JSON (and markdown, plots) after each one."""
    import torch

    from romcomp.evaluation import report as rep

    if p.threads is not None:
        torch.set_num_threads(p.threads)
    doc = rep.new_report(settings(p))
    doc["settings"]["threads"] = torch.get_num_threads()
    doc["data"] = {str(path.relative_to(p.data_dir)): _sha256(path) for path in p.data_files.values()}
    for resolved in p.models:
        doc["models"].append(evaluate_one(p, resolved))
        doc["settings"]["dtypes_used"] = sorted({m["dtype"] for m in doc["models"]})
        doc["partial"] = rep.is_partial(doc)
        doc["settings"]["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if p.plots and len(doc["models"]) == len(p.models):
            doc["plots"] = [str(path) for path in _plots(doc, json_path, report_path)]
        rep.write_json(doc, json_path)
        if report_path is not None:
            Path(report_path).write_text(rep.to_markdown(doc), encoding="utf-8")
    return doc


def _plots(doc: dict[str, Any], json_path: Path, report_path: Path | None) -> list[Path]:
    """PNGs beside the markdown report (else the JSON), named after it: ``<stem>-ppl.png`` etc."""
    from romcomp.evaluation.plots import write_plots

    anchor = Path(report_path if report_path is not None else json_path)
    return write_plots(doc, anchor.with_suffix(""))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
