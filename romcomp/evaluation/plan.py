"""What ``romcomp eval`` was asked to measure, validated before any model is loaded.

Everything that can be wrong with the input (task names, limits, data files, the optional harness, model
specs) is checked by :func:`plan`, because loading a 7B model on a CPU takes minutes and a typo found
afterwards wastes them. The result, an :class:`EvalPlan`, is what :func:`romcomp.evaluation.run.run`
executes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from romcomp.errors import BadInputError
from romcomp.evaluation.nli_head import FOLDS, HEAD_TASKS
from romcomp.evaluation.perplexity import EVAL_FILES, PPL_FILES, VALIDATION_FILES
from romcomp.evaluation.zeroshot import TASK_FILES

NLI = ["rte", "snli"]
WINOGENDER = ["winogender_female", "winogender_male"]
ZEROSHOT = [t for t in TASK_FILES if t not in ("commonsense_qa", *NLI, *WINOGENDER)]
HEADS = list(HEAD_TASKS)
SPECIAL = ["mmlu", "speed"]
DEFAULT_TASKS = {"decoder": "ppl,zeroshot,speed", "encoder": "nli"}
GROUPS: dict[str, list[str]] = {
    "ppl": list(PPL_FILES),
    "validation": list(VALIDATION_FILES),
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
DTYPES = ("auto", "float32", "bfloat16", "float16")
"""``--dtype`` choices; ``auto``: each checkpoint's own dtype (:func:`.run.checkpoint_dtype`)."""


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
    dtype: str = "auto"
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
        elif name in EVAL_FILES or name in TASK_FILES or name in HEADS or name in SPECIAL:
            wanted.add(name)
        else:
            known = ", ".join([*GROUPS, *EVAL_FILES, *TASK_FILES, *HEADS, *SPECIAL])
            raise BadInputError(f"unknown task {name!r}; known: {known}")
    if not wanted:
        raise BadInputError("--tasks is empty")
    return Tasks(
        [n for n in EVAL_FILES if n in wanted], [n for n in TASK_FILES if n in wanted],
        "mmlu" in wanted, "speed" in wanted, [n for n in HEADS if n in wanted],
    )  # fmt: skip


def plan(
    models: list[str], tasks: str | None, data_dir: Path | None, limit: int | None = None,
    ppl_windows: int | None = None, seq_len: int = 2048, threads: int | None = None,
    batch_size: int = 4, dtype: str = "auto", plots: bool = True, mmlu_limit: int | None = None,
    num_fewshot: int = 0,
) -> EvalPlan:  # fmt: skip
    """Validate everything and resolve the models; raises BadInputError/RomcompError before any load."""
    from calib.paths import resolve_data_dir
    from romcomp.evaluation import mmlu
    from romcomp.evaluation.perplexity import ppl_data_files
    from romcomp.evaluation.plots import require_matplotlib
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

    from romcomp.model.shell import is_encoder

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
