"""MMLU 5-shot (57 subjects, per-subject, macro and micro averages) through lm-evaluation-harness.

The protocol is lm-eval 0.4.13's ``mmlu`` (as in the Open LLM Leaderboard v1 and most compression
papers): per subject, the description line, the 5 dev examples in file order, then the test question;
the answer is the letter with the highest log-likelihood. Descriptions and the subject -> category map
are read from the installed lm-eval's own ``mmlu_<subject>.yaml`` files rather than copied here, so the
prompts cannot drift from the harness that produced the published numbers.

Two averages are reported because papers use both: ``macro`` (mean of the 57 subject accuracies, the
original MMLU paper's number) and ``micro`` (every question weighted equally, lm-eval's group number).
With ``--limit N`` each subject contributes its first N test questions.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from romcomp.errors import RomcompError

MMLU_DIR = "mmlu"
NUM_FEWSHOT = 5
HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
TASK_PREFIX = "mmlu_"


@dataclass
class MmluResult:
    """Per-subject accuracies and the averages over them."""

    subjects: dict[str, dict[str, Any]] = field(default_factory=dict)

    def macro(self) -> float:
        return sum(s["acc"] for s in self.subjects.values()) / len(self.subjects)

    def micro(self) -> float:
        n = sum(s["docs_scored"] for s in self.subjects.values())
        return sum(s["acc"] * s["docs_scored"] for s in self.subjects.values()) / n

    def categories(self) -> dict[str, float]:
        """Macro average within each of lm-eval's four categories (stem, humanities, ...)."""
        by_cat: dict[str, list[float]] = {}
        for entry in self.subjects.values():
            by_cat.setdefault(entry["category"], []).append(entry["acc"])
        return {cat: sum(accs) / len(accs) for cat, accs in sorted(by_cat.items())}

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_fewshot": NUM_FEWSHOT, "macro_acc": self.macro(), "micro_acc": self.micro(),
            "categories": self.categories(), "subjects": self.subjects,
            "docs_scored": sum(s["docs_scored"] for s in self.subjects.values()),
            "docs_total": sum(s["docs_total"] for s in self.subjects.values()),
        }  # fmt: skip


def subjects(data_dir: Path) -> list[str]:
    """Subjects with both a test and a dev CSV; RomcompError naming what is missing otherwise."""
    root = data_dir / MMLU_DIR
    tests = {p.name.removesuffix("_test.csv") for p in (root / "test").glob("*_test.csv")}
    devs = {p.name.removesuffix("_dev.csv") for p in (root / "dev").glob("*_dev.csv")}
    if not tests:
        raise RomcompError(f"MMLU data missing: no {root}/test/*_test.csv (set --data-dir)")
    if tests != devs:
        odd = sorted(tests ^ devs)
        raise RomcompError(f"MMLU data incomplete: {', '.join(odd)} lack a test or dev CSV under {root}")
    return sorted(tests)


def data_files(data_dir: Path) -> dict[str, Path]:
    """Every MMLU CSV (report key -> path), for the report's sha256 list."""
    root = data_dir / MMLU_DIR
    names = subjects(data_dir)
    return {f"mmlu/{sp}/{s}": root / sp / f"{s}_{sp}.csv" for s in names for sp in ("dev", "test")}


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows as lm-eval's ``cais/mmlu`` schema: ``{"question", "choices": [4 strings], "answer": int}``."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows or rows[0] != HEADER:
        raise RomcompError(f"{path}: expected header {','.join(HEADER)}")
    docs = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 6 or row[5] not in ("0", "1", "2", "3"):
            raise RomcompError(f"{path}:{line}: expected 6 fields and an answer 0-3")
        docs.append({"question": row[0], "choices": row[1:5], "answer": int(row[5])})
    return docs


def harness_subject_info(subject: str) -> tuple[str, str]:
    """(description, category) of a subject from the installed lm-eval's task file."""
    import yaml

    from romcomp.evaluation.zeroshot import _lm_eval_file

    spec = yaml.safe_load(_lm_eval_file(f"tasks/mmlu/default/mmlu_{subject}.yaml").read_text())
    category = str(spec["tag"]).removeprefix("mmlu_").removesuffix("_tasks")
    return str(spec["description"]), category


def write_tasks(dest: Path, data_dir: Path, datasets_cache: Path) -> dict[str, tuple[str, int]]:
    """One YAML + two JSONL files per subject under ``dest``; returns subject -> (category, test docs)."""
    from romcomp.evaluation.zeroshot import TEMPLATE_DIR, fill_template

    template = (TEMPLATE_DIR / "mmlu.yaml").read_text(encoding="utf-8")
    info = {}
    for subject in subjects(data_dir):
        description, category = harness_subject_info(subject)
        paths = {}
        for split in ("test", "dev"):
            paths[split] = dest / f"mmlu_{subject}_{split}.jsonl"
            docs = read_csv(data_dir / MMLU_DIR / split / f"{subject}_{split}.csv")
            paths[split].write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
            if split == "test":
                info[subject] = (category, len(docs))
        text = fill_template(template, paths["test"], datasets_cache)
        text = text.replace("__ROMCOMP_DEV_FILE__", json.dumps(str(paths["dev"]))[1:-1])
        text = text.replace("__ROMCOMP_DESCRIPTION__", json.dumps(description)[1:-1])
        text = text.replace("__ROMCOMP_TASK__", TASK_PREFIX + subject)
        (dest / f"mmlu_{subject}.yaml").write_text(text, encoding="utf-8")
    return info


def run_mmlu(
    lm: Any, data_dir: Path, limit: int | None = None, only: Sequence[str] | None = None,
    log_samples: bool = False,
) -> tuple[MmluResult, dict[str, list[dict[str, Any]]]]:  # fmt: skip
    """5-shot accuracy per subject (``only`` restricts the subjects, for tests) and the samples."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from romcomp.evaluation.zeroshot import SEEDS, private_task_dir

    wanted = list(only) if only is not None else subjects(data_dir)
    with private_task_dir() as (tasks_dir, cache):
        info = write_tasks(tasks_dir, data_dir, cache)
        manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[TASK_PREFIX + s for s in wanted], task_manager=manager, num_fewshot=NUM_FEWSHOT,
            limit=limit, bootstrap_iters=0, log_samples=log_samples, **SEEDS,
        )  # fmt: skip
    if out is None:
        raise RomcompError("lm-eval returned no MMLU results")
    result = MmluResult()
    for subject in wanted:
        raw = out["results"][TASK_PREFIX + subject]
        category, total = info[subject]  # counted when the CSV was converted, not read again
        scored = int(out.get("n-samples", {}).get(TASK_PREFIX + subject, {}).get("effective", 0)) or min(
            total, limit or total
        )
        acc = float(raw["acc,none"])  # stderr below is lm-eval's closed form for a mean of 0/1 scores
        result.subjects[subject] = {
            "acc": acc, "acc_stderr": math.sqrt(acc * (1 - acc) / max(scored - 1, 1)),
            "docs_scored": scored, "docs_total": total, "category": category,
        }  # fmt: skip
    samples = {s: list(out.get("samples", {}).get(TASK_PREFIX + s, [])) for s in wanted}
    return result, samples
