"""``romcomp eval``: perplexity and zero-shot accuracy of dense and compressed models, one report.

Everything that can be wrong with the input (task names, limits, data files, the optional harness, model
specs) is checked before the first model is loaded, because loading a 7B model on a CPU takes minutes
and a typo found afterwards wastes them. Models are evaluated one at a time and the JSON is rewritten
after each, so an interrupted multi-model run keeps the finished models' numbers.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import typer

from romcomp.errors import BadInputError
from romcomp.evaluation.ppl import PPL_FILES
from romcomp.evaluation.zeroshot import BOOTSTRAP_ITERS, LM_EVAL_VERSION, SEEDS, TASK_FILES

GROUPS: dict[str, list[str]] = {"ppl": list(PPL_FILES), "zeroshot": list(TASK_FILES)}
NOTES: dict[str, str] = {
    "c4": "c4: JSON lines 901-1000 of the 1000-doc C4 train sample, held out from calibration",
    "hellaswag": "hellaswag: a 1000-row subset of the 10,042-row validation split (all the data dir has)",
}
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_JSON = Path("romcomp-eval.json")

EXAMPLES = """
Examples:

  romcomp eval smollm2-135m ./smollm2-135m-r0.3 --limit 200 --report eval.md

  romcomp eval ./llama2-7b-r0.3 --tasks wikitext2,ptb,c4 --dtype bfloat16 --json ppl.json

  romcomp eval smollm2-135m --tasks piqa,arc_easy,hellaswag --threads 2
"""


@dataclass
class EvalPlan:
    """A validated ``romcomp eval`` invocation: nothing in it can fail for a user-input reason."""

    models: list[Any]  # ResolvedModel
    ppl: list[str]
    zeroshot: list[str]
    data_dir: Path
    data_files: dict[str, Path] = field(default_factory=dict)
    limit: int | None = None
    ppl_windows: int | None = None
    seq_len: int = 2048
    threads: int | None = None
    batch_size: int = 4
    dtype: str = "float32"


def parse_tasks(spec: str) -> tuple[list[str], list[str]]:
    """``"ppl,zeroshot"`` / ``"wikitext2,piqa"`` -> (perplexity sets, zero-shot tasks), in canonical order."""
    wanted: set[str] = set()
    for name in (part.strip().lower() for part in spec.split(",")):
        if not name:
            continue
        if name in GROUPS:
            wanted.update(GROUPS[name])
        elif name in PPL_FILES or name in TASK_FILES:
            wanted.add(name)
        else:
            known = ", ".join([*GROUPS, *PPL_FILES, *TASK_FILES])
            raise BadInputError(f"unknown task {name!r}; known: {known}")
    if not wanted:
        raise BadInputError("--tasks is empty")
    return [n for n in PPL_FILES if n in wanted], [n for n in TASK_FILES if n in wanted]


def plan(
    models: list[str], tasks: str, data_dir: Path | None, limit: int | None = None,
    ppl_windows: int | None = None, seq_len: int = 2048, threads: int | None = None,
    batch_size: int = 4, dtype: str = "float32",
) -> EvalPlan:  # fmt: skip
    """Validate everything and resolve the models; raises BadInputError/RomcompError before any load."""
    from calib.datasets import resolve_data_dir
    from romcomp.evaluation.ppl import ppl_data_files
    from romcomp.evaluation.zeroshot import require_lm_eval, task_data_files
    from romcomp.sources import resolve_model

    ppl, zeroshot = parse_tasks(tasks)
    _check_numbers(models, limit, ppl_windows, seq_len, threads, batch_size, dtype)
    root = resolve_data_dir(data_dir)
    if root is None or not root.is_dir():
        raise BadInputError(f"data directory {root or '(none found)'} does not exist; pass --data-dir")
    files = {**ppl_data_files(ppl, root), **(task_data_files(zeroshot, root) if zeroshot else {})}
    if zeroshot:
        require_lm_eval()
    resolved = [resolve_model(spec) for spec in models]
    return EvalPlan(
        resolved, ppl, zeroshot, root, files, limit, ppl_windows, seq_len, threads, batch_size, dtype
    )


def _check_numbers(
    models: list[str], limit: int | None, ppl_windows: int | None, seq_len: int, threads: int | None,
    batch_size: int, dtype: str,
) -> None:  # fmt: skip
    if not models:
        raise BadInputError("give at least one MODEL")
    for name, value in (("--limit", limit), ("--ppl-windows", ppl_windows), ("--threads", threads)):
        if value is not None and value < 1:
            raise BadInputError(f"{name} must be >= 1, got {value}")
    if seq_len < 2 or batch_size < 1:
        raise BadInputError(f"--seq-len must be >= 2 and --batch-size >= 1 (got {seq_len}, {batch_size})")
    if dtype not in DTYPES:
        raise BadInputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def settings(p: EvalPlan) -> dict[str, Any]:
    """The report's ``settings``: every knob that changes a number."""
    return {
        "ppl_tasks": p.ppl, "zeroshot_tasks": p.zeroshot, "limit": p.limit,
        "ppl_windows": p.ppl_windows if p.ppl_windows is not None else p.limit,
        "seq_len": p.seq_len, "threads": p.threads, "batch_size": p.batch_size, "dtype": p.dtype,
        "num_fewshot": 0, "seeds": SEEDS, "data_dir": str(p.data_dir),
        "harness": f"lm-eval {LM_EVAL_VERSION}" if p.zeroshot else None, "bootstrap_iters": BOOTSTRAP_ITERS,
        "notes": [note for name, note in NOTES.items() if name in (*p.ppl, *p.zeroshot)],
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


def load_model(path: Path, dtype: str) -> tuple[Any, Any]:
    """Model and tokenizer from a local directory; romcomp outputs load via romcomp's Auto classes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import romcomp  # noqa: F401 - registers the romcomp Auto classes

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def model_identity(resolved: Any, model: Any) -> dict[str, Any]:
    """What identifies the weights evaluated: resolution, fingerprint, config hash, parameter count."""
    config = resolved.path / "config.json"
    manifest = resolved.path / ".romcomp" / "manifest.json"
    return {
        "spec": resolved.spec, "path": str(resolved.path), "description": resolved.description,
        "fingerprint": resolved.fingerprint,
        "config_sha256": _sha256(config),
        "romcomp_manifest_sha256": _sha256(manifest) if manifest.is_file() else None,
        "model_type": getattr(model.config, "model_type", None),
        "parameters": sum(p.numel() for p in model.parameters()),
    }  # fmt: skip


def evaluate_one(p: EvalPlan, resolved: Any) -> dict[str, Any]:
    """Load one model, run the requested perplexities and zero-shot tasks, and free it."""
    from romcomp.evaluation.ppl import run_ppl
    from romcomp.evaluation.zeroshot import run_zeroshot
    from romcomp.memory import peak_rss

    start = time.perf_counter()
    model, tokenizer = load_model(resolved.path, p.dtype)
    entry = model_identity(resolved, model)
    entry["load_seconds"] = round(time.perf_counter() - start, 2)
    if p.ppl:
        windows = p.ppl_windows if p.ppl_windows is not None else p.limit
        ppl_batch = 1 if p.seq_len >= 1024 else p.batch_size  # attention scores grow with L^2
        results = run_ppl(model, tokenizer, p.ppl, p.data_dir, p.seq_len, windows, ppl_batch)
        entry["perplexity"] = {r.dataset: r.to_dict() for r in results}
    if p.zeroshot:
        # max_length stays lm-eval's own choice (the model's context), as in published harness numbers
        results = run_zeroshot(model, tokenizer, p.zeroshot, p.data_dir, p.limit, p.batch_size)
        entry["zeroshot"] = {
            r.task: {"metrics": r.metrics, "docs_scored": r.docs_scored, "docs_total": r.docs_total,
                     "data_file": r.data_file, "sha256": r.sha256}
            for r in results
        }  # fmt: skip
    entry["seconds"] = round(time.perf_counter() - start, 2)
    entry["peak_rss_bytes"] = peak_rss()
    del model
    return entry


def run(p: EvalPlan, json_path: Path, report_path: Path | None) -> dict[str, Any]:
    """Evaluate every model in turn, rewriting the JSON (and markdown) after each one."""
    import torch

    from romcomp.evaluation import report as rep

    if p.threads is not None:
        torch.set_num_threads(p.threads)
    doc = rep.new_report(settings(p))
    doc["settings"]["threads"] = torch.get_num_threads()
    doc["data"] = {str(path.relative_to(p.data_dir)): _sha256(path) for path in p.data_files.values()}
    for resolved in p.models:
        doc["models"].append(evaluate_one(p, resolved))
        doc["partial"] = rep.is_partial(doc)
        doc["settings"]["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        rep.write_json(doc, json_path)
        if report_path is not None:
            Path(report_path).write_text(rep.to_markdown(doc), encoding="utf-8")
    return doc


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def eval_command(
    models: Annotated[
        list[str], typer.Argument(help="HF or romcomp output directories, .gguf files, aliases, hub ids.")
    ],
    tasks: Annotated[
        str,
        typer.Option(help="Comma list of ppl, zeroshot, wikitext2, ptb, c4, piqa, arc_easy, arc_challenge, "
                          "hellaswag, winogrande, boolq, openbookqa, copa, lambada_openai."),
    ] = "ppl,zeroshot",
    limit: Annotated[
        int | None, typer.Option(help="Quick partial run: first N examples per task (and N ppl windows).")
    ] = None,
    ppl_windows: Annotated[
        int | None, typer.Option(help="Perplexity windows per set (default: all, or --limit).")
    ] = None,
    seq_len: Annotated[int, typer.Option(help="Perplexity window length (tokens).")] = 2048,
    report: Annotated[Path | None, typer.Option(help="Markdown report path (also printed).")] = None,
    json_path: Annotated[
        Path, typer.Option("--json", help="JSON report with every number and setting.")
    ] = DEFAULT_JSON,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice).")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Data directory (default: $ROMCOMP_DATA_DIR, then ../shared/data).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Zero-shot batch size (ppl: 1 at seq len >= 1024).")] = 4,
    dtype: Annotated[str, typer.Option(help="Weights dtype: float32, bfloat16 (half the RAM), float16.")] = (
        "float32"
    ),
) -> None:  # fmt: skip
    """Perplexity (WikiText-2, PTB, held-out C4) and zero-shot accuracy via lm-eval, as JSON + markdown."""
    from romcomp.evaluation.report import to_markdown

    p = plan(models, tasks, data_dir, limit, ppl_windows, seq_len, threads, batch_size, dtype)
    doc = run(p, json_path, report)
    typer.echo(to_markdown(doc))


def register(app: typer.Typer) -> None:
    """Add ``romcomp eval`` to the main typer app (the caller also lists "eval" in its SUBCOMMANDS)."""
    app.command(name="eval", epilog=EXAMPLES)(eval_command)
