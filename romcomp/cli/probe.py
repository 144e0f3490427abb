"""``romcomp probe MODEL [MODEL...]``: the thin CLI over :func:`romcomp.studies.probing.run.run_probes`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

EXAMPLES = """
Examples:

  romcomp probe smollm2-135m ./smollm2-135m-r0.2 --out probes

  romcomp probe all-minilm-l6-v2 ./minilm-r0.2 --tasks sentence_length,bigram_shift
"""


def probe_command(
    models: Annotated[list[str], typer.Argument(help="Models to probe: dense and compressed, side by side.")],
    out: Annotated[Path, typer.Option(help="Report directory.")] = Path("romcomp-probe"),
    tasks: Annotated[str, typer.Option(help="Comma list of probing tasks (default: all seven).")] = "",
    data_dir: Annotated[
        Path | None, typer.Option(help="Data directory (default: $ROMCOMP_DATA_DIR, then ../shared/data).")
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the split, the bigram shifts and the control labels.")
    ] = 0,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    layer_step: Annotated[
        int, typer.Option(help="Probe every N-th layer (from the embeddings) and the last: N× fewer probes.")
    ] = 1,
) -> None:
    """Linear probes (logistic regression) on every layer's hidden states for seven linguistic tasks, each
    with a control task: accuracy, control accuracy and selectivity per layer; probe.json, report.md and
    selectivity.png."""
    from romcomp.compression.memory import fmt_bytes
    from romcomp.studies.probing.run import best, run_probes
    from romcomp.studies.probing.tasks import TASKS

    wanted = [t.strip() for t in tasks.split(",") if t.strip()] or list(TASKS)
    doc = run_probes(models, out, data_dir, wanted, seed, threads, layer_step)
    for m in doc["models"]:
        cells = ", ".join(f"{t} {best(m['tasks'][t])['selectivity']:+.2f}" for t in wanted)
        typer.echo(f"{m['name']}: best selectivity {cells}")
    typer.echo(f"report       {out / 'report.md'} (probe.json, selectivity.png); peak RSS "
               f"{fmt_bytes(doc['peak_rss_bytes'])}")  # fmt: skip


def register(app: typer.Typer) -> None:
    """Add ``romcomp probe`` (the caller lists "probe" in its SUBCOMMANDS)."""
    app.command(name="probe", epilog=EXAMPLES)(probe_command)
