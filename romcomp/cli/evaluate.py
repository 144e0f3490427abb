"""``romcomp eval``: perplexity, accuracy and speed of dense and compressed models, one report.

The typer command only: :mod:`romcomp.evaluation.plan` validates the invocation before any model is
loaded, :mod:`romcomp.evaluation.run` evaluates the models one at a time and writes the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DEFAULT_JSON = Path("romcomp-eval.json")

EXAMPLES = """
Examples:

  romcomp eval smollm2-135m ./smollm2-135m-r0.3 --limit 200 --report eval.md

  romcomp eval ./llama2-7b-r0.3 --tasks wikitext2,ptb,c4 --dtype bfloat16 --json ppl.json

  romcomp eval smollm2-135m --tasks piqa,arc_easy,hellaswag --threads 2
"""


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
    batch_size: Annotated[
        int, typer.Option(help="Zero-shot requests per batch, at most; fewer for long ones (a bounded "
                               "activation budget); ppl: 1 at seq len >= 1024.")
    ] = 4,
    dtype: Annotated[
        str, typer.Option(help="Weights dtype: auto (the checkpoint's own: a bf16/fp16 checkpoint is not "
                               "widened to float32), float32, bfloat16 (half the RAM), float16.")
    ] = "auto",
    plots: Annotated[
        bool, typer.Option(help="With several models: PNGs of ppl/acc/throughput vs ratio beside the report.")
    ] = True,
    num_fewshot: Annotated[
        int, typer.Option(help="Solved examples before each lm-eval prompt (MMLU: always 5), drawn "
                               "from the task's own file, never the scored item.")
    ] = 0,
) -> None:  # fmt: skip
    """Perplexity, zero-shot/MMLU accuracy via lm-eval, size, memory and speed, as JSON + markdown."""
    from romcomp.evaluation.plan import plan
    from romcomp.evaluation.report import to_markdown
    from romcomp.evaluation.run import run

    p = plan(
        models, tasks, data_dir, limit, ppl_windows, seq_len, threads, batch_size, dtype, plots,
        mmlu_limit, num_fewshot,
    )  # fmt: skip
    doc = run(p, json_path, report)
    typer.echo(to_markdown(doc))


def register(app: typer.Typer) -> None:
    """Add ``romcomp eval`` to the main typer app (the caller also lists "eval" in its SUBCOMMANDS)."""
    app.command(name="eval", epilog=EXAMPLES)(eval_command)
