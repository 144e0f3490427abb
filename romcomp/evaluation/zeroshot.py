"""Zero-shot multiple choice (and LAMBADA) through lm-evaluation-harness, fully offline.

Why the harness itself: published zero-shot numbers for compressed LLMs (SVD-LLM, ASVD, SliceGPT, …)
come from lm-eval, and its details (the space delimiter, moving trailing context spaces into the
continuation, tokenizing context+continuation together, ``acc_norm`` dividing by the choice's length)
each move accuracies by a point or more. Re-implementing them would be a second, subtly different
protocol; driving the harness with our own task files keeps the numbers comparable.

The data are the local llm-foundry JSONL copies (``zeroshot_llmfoundry/*.jsonl``) plus the HellaSwag
subset in its original schema. romcomp's YAMLs (``romcomp/evaluation/tasks``) map those fields onto
lm-eval 0.4.13's prompt formats; each YAML's header says how. At run time they are copied to a
temporary directory with the absolute data paths and a private datasets cache filled in, and loaded
with ``TaskManager(include_path=..., include_defaults=False)`` so nothing is looked up on the hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from romcomp.errors import RomcompError

TASK_FILES: dict[str, str] = {
    "piqa": "zeroshot_llmfoundry/piqa.jsonl",
    "arc_easy": "zeroshot_llmfoundry/arc_easy.jsonl",
    "arc_challenge": "zeroshot_llmfoundry/arc_challenge.jsonl",
    "hellaswag": "hellaswag/hellaswag_val_subset.jsonl",
    "winogrande": "zeroshot_llmfoundry/winogrande.jsonl",
    "boolq": "zeroshot_llmfoundry/boolq.jsonl",
    "openbookqa": "zeroshot_llmfoundry/openbook_qa.jsonl",
    "copa": "zeroshot_llmfoundry/copa.jsonl",
    "lambada_openai": "zeroshot_llmfoundry/lambada_openai.jsonl",
    "commonsense_qa": "zeroshot_llmfoundry/commonsense_qa.jsonl",
    "rte": "nli/rte_dev.tsv",
    "snli": "nli/snli_1.0_test_subset.jsonl",
    "winogender_female": "bias/winogender_mc_female.jsonl",
    "winogender_male": "bias/winogender_mc_male.jsonl",
}
"""Task name (as in lm-eval) -> its data file under the data directory."""

SEVEN_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa")
"""The seven tasks whose mean accuracy SVD-LLM, ASVD and most compression papers print."""

LM_EVAL_VERSION = "0.4.13"
TEMPLATE_DIR = Path(__file__).resolve().parent / "tasks"
DATA_PLACEHOLDER = "__ROMCOMP_DATA_FILE__"
CACHE_PLACEHOLDER = "__ROMCOMP_DATASETS_CACHE__"
BOOTSTRAP_ITERS = 1000
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}
"""lm-eval's own defaults, pinned here so the report states them."""


@dataclass
class TaskResult:
    """One task's metrics (``acc``, ``acc_norm``, ``perplexity``, each with ``*_stderr`` when known)."""

    task: str
    metrics: dict[str, float]
    docs_scored: int
    docs_total: int
    data_file: str
    sha256: str
    samples: list[dict[str, Any]] = field(default_factory=list, repr=False)


def require_lm_eval() -> None:
    """Fail early, before any model is loaded, when the optional harness is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise RomcompError(
            f"zero-shot evaluation needs lm-evaluation-harness: pip install 'romcomp[eval]' "
            f"(lm-eval[hf]=={LM_EVAL_VERSION})"
        )


def task_data_files(tasks: Sequence[str], data_dir: Path) -> dict[str, Path]:
    """Each task's data file, or one RomcompError naming every missing file (checked before loading)."""
    files = {task: data_dir / TASK_FILES[task] for task in tasks}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise RomcompError(f"zero-shot data missing: {', '.join(missing)} (set --data-dir)")
    return files


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes: the report's identity of the data actually read."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def count_docs(path: Path, task: str = "") -> int:
    """The documents a task scores: non-blank JSON lines (a TSV's header row is not a document; SNLI's
    pairs without a gold label, ``"-"``, are dropped by its ``process_docs`` and not counted)."""
    with path.open("rb") as handle:
        lines = [line for line in handle if line.strip()]
    if task == "snli":
        return sum(1 for line in lines if json.loads(line).get("gold_label") != "-")
    return len(lines) - 1 if path.suffix == ".tsv" else len(lines)


def write_task_dir(dest: Path, files: dict[str, Path], datasets_cache: Path) -> None:
    """Fill the YAML templates with absolute data paths (JSON-escaped, valid in YAML double quotes)."""
    for task, data_file in files.items():
        text = (TEMPLATE_DIR / f"{task}.yaml").read_text(encoding="utf-8")
        (dest / f"{task}.yaml").write_text(fill_template(text, data_file, datasets_cache), encoding="utf-8")
    if "hellaswag" in files:
        shutil.copyfile(_lm_eval_file("tasks/hellaswag/utils.py"), dest / "hellaswag_utils.py")
    if "snli" in files:
        shutil.copyfile(TEMPLATE_DIR / "nli_utils.py", dest / "nli_utils.py")


def fill_template(text: str, data_file: Path, datasets_cache: Path) -> str:
    """A task template with its data file and the private datasets cache filled in."""
    text = text.replace(DATA_PLACEHOLDER, _yaml_quoted(data_file.resolve()))
    return text.replace(CACHE_PLACEHOLDER, _yaml_quoted(datasets_cache.resolve()))


def _yaml_quoted(path: Path) -> str:
    return json.dumps(str(path))[1:-1]


def _lm_eval_file(relpath: str) -> Path:
    """A file shipped inside the installed lm_eval (HellaSwag's preprocessing is taken verbatim)."""
    import lm_eval

    path = Path(lm_eval.__file__).resolve().parent / relpath
    if not path.is_file():
        raise RomcompError(
            f"lm_eval {lm_eval.__version__} has no {relpath}; install lm-eval=={LM_EVAL_VERSION}"
        )
    return path


@contextmanager
def private_task_dir() -> Iterator[tuple[Path, Path]]:
    """(task directory, datasets cache) in a temporary directory removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="romcomp-eval-") as tmp:
        root = Path(tmp)
        (root / "tasks").mkdir()
        yield root / "tasks", root / "datasets-cache"


@contextmanager
def task_manager(files: dict[str, Path]) -> Iterator[Any]:
    """A TaskManager that knows only romcomp's tasks, living in a temporary directory."""
    from lm_eval.tasks import TaskManager

    with private_task_dir() as (tasks_dir, cache):
        write_task_dir(tasks_dir, files, cache)
        yield TaskManager(include_path=str(tasks_dir), include_defaults=False)


def harness_model(model: Any, tokenizer: Any, batch_size: int, max_length: int | None) -> Any:
    """lm-eval's HFLM around an already loaded model, so romcomp outputs need no hub-style loading.

    The memory-bounded subclass (:mod:`romcomp.evaluation.loglik`): the same requests, order and scoring
    rule, but the LM head only at the scored positions and request batches bounded in tokens."""
    from romcomp.evaluation.loglik import bounded_hflm

    return bounded_hflm(model, tokenizer, batch_size, max_length)


def run_zeroshot(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    data_dir: Path,
    limit: int | None = None,
    batch_size: int = 4,
    max_length: int | None = None,
    log_samples: bool = False,
    lm: Any = None,
    num_fewshot: int = 0,
) -> list[TaskResult]:
    """Evaluate ``tasks`` on the first ``limit`` documents of each (all when None), zero-shot unless
    ``num_fewshot`` > 0: then each prompt is preceded by that many solved examples drawn (seeded) from the
    task's own file, never the scored document itself (lm-eval's rule for a task with only a test split;
    the local sets carry no training split).

    ``lm``: an existing HFLM to reuse (its model/tokenizer/batch size win over the arguments)."""
    require_lm_eval()
    import lm_eval

    files = task_data_files(tasks, data_dir)
    lm = lm if lm is not None else harness_model(model, tokenizer, batch_size, max_length)
    with task_manager(files) as manager:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot, limit=limit,
            bootstrap_iters=BOOTSTRAP_ITERS, log_samples=log_samples, **SEEDS,
        )  # fmt: skip
    if out is None:
        raise RomcompError("lm-eval returned no results")
    return [_task_result(task, files[task], out, limit) for task in tasks]


def _task_result(task: str, data_file: Path, out: dict[str, Any], limit: int | None) -> TaskResult:
    """Flatten lm-eval's ``{"acc,none": x, "acc_stderr,none": s}`` into ``{"acc": x, "acc_stderr": s}``."""
    raw = out["results"][task]
    metrics = {
        key.split(",")[0]: float(value)
        for key, value in raw.items()
        if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    total = count_docs(data_file, task)
    scored = int(out.get("n-samples", {}).get(task, {}).get("effective", min(total, limit or total)))
    samples = list(out.get("samples", {}).get(task, []))
    return TaskResult(task, metrics, scored, total, str(data_file), sha256_file(data_file), samples)
