"""``romcomp eval``: perplexity, accuracy and speed of dense and compressed models, one report.

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
from romcomp.evaluation.nli_head import FOLDS, HEAD_TASKS
from romcomp.evaluation.ppl import PPL_FILES
from romcomp.evaluation.zeroshot import BOOTSTRAP_ITERS, LM_EVAL_VERSION, SEEDS, TASK_FILES

NLI = ["rte", "snli"]
WINOGENDER = ["winogender_female", "winogender_male"]
ZEROSHOT = [t for t in TASK_FILES if t not in ("commonsense_qa", *NLI, *WINOGENDER)]
HEADS = list(HEAD_TASKS)
SPECIAL = ["mmlu", "speed"]
DEFAULT_TASKS = {"decoder": "ppl,zeroshot,speed", "encoder": "nli"}
GROUPS: dict[str, list[str]] = {
    "ppl": list(PPL_FILES),
    "zeroshot": ZEROSHOT,
    "nli": NLI,
    "winogender": WINOGENDER,
    "nli_head": HEADS,
    "knowledge": ["mmlu", "commonsense_qa"],
    "all": [*PPL_FILES, *TASK_FILES, *HEADS, *SPECIAL],
}
NOTES: dict[str, str] = {
    "c4": "c4: JSON lines 901-1000 of the 1000-doc C4 train sample, held out from calibration",
    "hellaswag": "hellaswag: a 1000-row subset of the 10,042-row validation split (all the data dir has)",
    "commonsense_qa": "commonsense_qa: llm-foundry's copy keeps 4 of the 5 options (chance 0.25)",
    "mmlu": "mmlu: 5-shot from the dev split (first 5, lm-eval's first_n), macro = mean of subject accs",
    "rte": "rte: GLUE dev (277 pairs), lm-eval's rte prompt, zero-shot, chance 0.5",
    "snli": "snli: 1254 labelled pairs of a 1277-pair test subset, lm-eval's mnli prompt, zero-shot, "
    "chance 1/3",
    "rte_head": "rte_head, snli_head: logistic regression on frozen [u, v, |u-v|, u*v] features (last "
    f"layer, mean-pooled), {FOLDS}-fold stratified cross-validation on the evaluation pairs (no training "
    "split offline), seed 0; an encoder's rte/snli are scored this way",
    "winogender_female": "winogender: the same 60 sentences with a female / a male pronoun (one standard "
    "error ~0.065 each); the gap is female - male accuracy",
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
class Tasks:
    """What ``--tasks`` selected, in canonical order."""

    ppl: list[str] = field(default_factory=list)
    zeroshot: list[str] = field(default_factory=list)
    mmlu: bool = False
    speed: bool = False
    heads: list[str] = field(default_factory=list)

    def names(self) -> list[str]:
        flags = [name for name, on in (("mmlu", self.mmlu), ("speed", self.speed)) if on]
        return [*self.ppl, *self.zeroshot, *self.heads, *flags]

    def for_encoders(self, model: str) -> Tasks:
        """An encoder's selection: ``rte``/``snli`` become their frozen-feature heads; anything that needs
        a next-token head (perplexity, prompts, MMLU, decode speed) is refused before any load."""
        heads = dict.fromkeys([*(f"{t}_head" for t in self.zeroshot if t in NLI), *self.heads])
        other = [n for n in self.names() if n not in NLI and n not in HEADS]
        if other:
            raise BadInputError(
                f"{model} is an encoder: it has no next-token head for {', '.join(other)}; "
                "its tasks are rte, snli (a head on frozen features)"
            )
        return Tasks(heads=[h for h in HEADS if h in heads])


@dataclass
class EvalPlan:
    """A validated ``romcomp eval`` invocation: nothing in it can fail for a user-input reason."""

    models: list[Any]  # ResolvedModel
    tasks: Tasks
    data_dir: Path
    data_files: dict[str, Path] = field(default_factory=dict)
    limit: int | None = None
    ppl_windows: int | None = None
    seq_len: int = 2048
    threads: int | None = None
    batch_size: int = 4
    dtype: str = "float32"
    plots: bool = True
    mmlu_limit: int | None = None
    num_fewshot: int = 0

    def mmlu_questions(self) -> int | None:
        """Test questions per MMLU subject: ``--mmlu-limit``, else ``--limit``, else all."""
        return self.mmlu_limit if self.mmlu_limit is not None else self.limit


def parse_tasks(spec: str) -> Tasks:
    """``"ppl,zeroshot"`` / ``"wikitext2,piqa,mmlu,speed"`` -> the selection, in canonical order."""
    wanted: set[str] = set()
    for name in (part.strip().lower() for part in spec.split(",")):
        if not name:
            continue
        if name in GROUPS:
            wanted.update(GROUPS[name])
        elif name in PPL_FILES or name in TASK_FILES or name in HEADS or name in SPECIAL:
            wanted.add(name)
        else:
            known = ", ".join([*GROUPS, *PPL_FILES, *TASK_FILES, *HEADS, *SPECIAL])
            raise BadInputError(f"unknown task {name!r}; known: {known}")
    if not wanted:
        raise BadInputError("--tasks is empty")
    return Tasks(
        [n for n in PPL_FILES if n in wanted], [n for n in TASK_FILES if n in wanted],
        "mmlu" in wanted, "speed" in wanted, [n for n in HEADS if n in wanted],
    )  # fmt: skip


def plan(
    models: list[str], tasks: str | None, data_dir: Path | None, limit: int | None = None,
    ppl_windows: int | None = None, seq_len: int = 2048, threads: int | None = None,
    batch_size: int = 4, dtype: str = "float32", plots: bool = True, mmlu_limit: int | None = None,
    num_fewshot: int = 0,
) -> EvalPlan:  # fmt: skip
    """Validate everything and resolve the models; raises BadInputError/RomcompError before any load."""
    from calib.datasets import resolve_data_dir
    from romcomp.evaluation import mmlu
    from romcomp.evaluation.plots import require_matplotlib
    from romcomp.evaluation.ppl import ppl_data_files
    from romcomp.evaluation.zeroshot import require_lm_eval, task_data_files
    from romcomp.model.sources import resolve_model

    sel = parse_tasks(tasks or DEFAULT_TASKS["decoder"])
    _check_numbers(models, limit, ppl_windows, seq_len, threads, batch_size, dtype)
    if mmlu_limit is not None and mmlu_limit < 1:
        raise BadInputError(f"--mmlu-limit must be >= 1, got {mmlu_limit}")
    if num_fewshot < 0:
        raise BadInputError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    root = resolve_data_dir(data_dir)
    needs_data = sel.ppl or sel.zeroshot or sel.mmlu or sel.heads
    if needs_data and (root is None or not root.is_dir()):
        raise BadInputError(f"data directory {root or '(none found)'} does not exist; pass --data-dir")
    resolved = [resolve_model(spec) for spec in models]
    sel = _tasks_for_models(sel, tasks, resolved)
    files = {**ppl_data_files(sel.ppl, root)} if sel.ppl else {}
    if sel.heads:
        files.update(task_data_files([HEAD_TASKS[h] for h in sel.heads], root))
    if sel.zeroshot or sel.mmlu:
        require_lm_eval()
    if sel.zeroshot:
        files.update(task_data_files(sel.zeroshot, root))
    if sel.mmlu:
        files.update(mmlu.data_files(root))
    plots = plots and len(models) > 1
    if plots:
        require_matplotlib()
    root = root or Path(".")
    return EvalPlan(
        resolved, sel, root, files, limit, ppl_windows, seq_len, threads, batch_size, dtype, plots,
        mmlu_limit, num_fewshot,
    )  # fmt: skip


def _tasks_for_models(sel: Tasks, spec: str | None, resolved: list[Any]) -> Tasks:
    """The selection as the models can run it: encoders get their heads (and ``nli`` by default); one run
    holds encoders or decoders, not both, since the two score different things."""
    from transformers import AutoConfig

    from romcomp.compress.engine import is_encoder

    kinds = {r.spec: is_encoder(AutoConfig.from_pretrained(r.path)) for r in resolved}
    if not any(kinds.values()):
        return sel
    if not all(kinds.values()):
        raise BadInputError(
            f"evaluate encoders ({', '.join(m for m, e in kinds.items() if e)}) and decoders "
            f"({', '.join(m for m, e in kinds.items() if not e)}) in separate runs"
        )
    return (sel if spec else parse_tasks(DEFAULT_TASKS["encoder"])).for_encoders(next(iter(kinds)))


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


def load_model(path: Path, dtype: str) -> tuple[Any, Any]:
    """Model and tokenizer from a local directory (a decoder with its LM head, an encoder bare); romcomp
    outputs load via romcomp's Auto classes."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    import romcomp  # noqa: F401 - registers the romcomp Auto classes
    from romcomp.compress.engine import auto_class

    model = auto_class(AutoConfig.from_pretrained(path)).from_pretrained(path, dtype=getattr(torch, dtype))
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def model_identity(resolved: Any, model: Any) -> dict[str, Any]:
    """What identifies the weights evaluated: resolution, fingerprint, config hash, size, romcomp record."""
    import json

    from romcomp.compress.output import romcomp_record
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

    from romcomp.compress.memory import peak_rss, release_heap
    from romcomp.evaluation.efficiency import measure_speed, reset_peak_rss
    from romcomp.evaluation.ppl import run_ppl

    gc.collect()
    release_heap()
    rss_reset = reset_peak_rss()
    start = time.perf_counter()
    model, tokenizer = load_model(resolved.path, p.dtype)
    entry = model_identity(resolved, model)
    entry["load_seconds"] = round(time.perf_counter() - start, 2)
    entry["load_peak_rss_bytes"] = peak_rss()
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


def eval_command(
    models: Annotated[
        list[str], typer.Argument(help="HF or romcomp output directories, .gguf files, aliases, hub ids.")
    ],
    tasks: Annotated[
        str | None,
        typer.Option(help="Comma list of groups ppl, zeroshot, nli, nli_head, winogender, knowledge, all and "
                          "names wikitext2, ptb, c4, piqa, arc_easy, arc_challenge, hellaswag, winogrande, "
                          "boolq, openbookqa, copa, lambada_openai, commonsense_qa, rte, snli, rte_head, "
                          "snli_head (a head on frozen features), winogender_female/_male, mmlu (5-shot), "
                          "speed (prefill/decode tok/s) [default: ppl,zeroshot,speed; nli for encoders]."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Quick partial run: first N examples per task (and N ppl windows).")
    ] = None,
    ppl_windows: Annotated[
        int | None, typer.Option(help="Perplexity windows per set (default: all, or --limit).")
    ] = None,
    mmlu_limit: Annotated[
        int | None, typer.Option(help="MMLU test questions per subject (default: all, or --limit).")
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
    plots: Annotated[
        bool, typer.Option(help="With several models: PNGs of ppl/acc/throughput vs ratio beside the report.")
    ] = True,
    num_fewshot: Annotated[
        int, typer.Option(help="Solved examples before each lm-eval prompt (MMLU: always 5), drawn "
                               "from the task's own file, never the scored item.")
    ] = 0,
) -> None:  # fmt: skip
    """Perplexity, zero-shot/MMLU accuracy via lm-eval, size, memory and speed, as JSON + markdown."""
    from romcomp.evaluation.report import to_markdown

    p = plan(
        models, tasks, data_dir, limit, ppl_windows, seq_len, threads, batch_size, dtype, plots,
        mmlu_limit, num_fewshot,
    )  # fmt: skip
    doc = run(p, json_path, report)
    typer.echo(to_markdown(doc))


def register(app: typer.Typer) -> None:
    """Add ``romcomp eval`` to the main typer app (the caller also lists "eval" in its SUBCOMMANDS)."""
    app.command(name="eval", epilog=EXAMPLES)(eval_command)
