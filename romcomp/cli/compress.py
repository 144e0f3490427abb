"""``romcomp MODEL [options]`` / ``romcomp compress``: the compression command, a thin layer over
:class:`romcomp.compression.config.CompressConfig` (the method list and the method options' help come from
the method registry)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from romcomp.cli import options as opt
from romcomp.methods import DEFAULT_METHOD
from romcomp.methods.registry import method_help, option_help

EXAMPLES = """
Examples:

  romcomp smollm2-135m --ratio 0.3 --max-ram 4GB

  romcomp meta-llama/Llama-2-7b-hf --ratio 0.3 --max-ram 24GB --dry-run

  romcomp meta-llama/Llama-2-7b-hf --ratio 0.3 --max-ram 24GB --out llama2-7b-r0.3

  romcomp ./my-model --ratio 0.2 --calib wikitext2 --n-samples 64 --threads 2
"""


def compress(
    model: Annotated[
        str,
        typer.Argument(help="Local HF directory, .gguf file, alias (smollm2-135m, llama2-7b, …) or hub id."),
    ],
    ratio: Annotated[
        str,
        typer.Option(
            help="Fraction of the decoder-block linear parameters to remove, in (0, 1); a comma list "
            "(0.1,0.2,0.3) writes one output per ratio in one pass, under --out."
        ),
    ],
    max_ram: opt.MaxRam = None,
    out: Annotated[Path | None, typer.Option(help="Output directory (default: <model>-r<ratio>).")] = None,
    method: Annotated[
        str,
        typer.Option(help=method_help()),
    ] = DEFAULT_METHOD,
    calib: opt.Calib = "c4",
    n_samples: opt.NSamples = None,
    seq_len: opt.SeqLen = None,
    seed: opt.Seed = 0,
    data_dir: opt.DataDir = None,
    calib_stream: Annotated[
        str, typer.Option(help="Calibrate each block on the 'compressed' or the 'dense' model's activations.")
    ] = "compressed",
    sequential: Annotated[
        bool,
        typer.Option(
            help="Fit a block's linear groups one after another (each sees its predecessors compressed)."
        ),
    ] = True,
    fit: Annotated[
        str | None,
        typer.Option(
            help="error-aware: fit each linear to the dense model's outputs from the compressed model's "
            "inputs (default for rom); local: to its own outputs (SVD-LLM/ROM; default for svd)."
        ),
    ] = None,
    allocation: Annotated[
        str,
        typer.Option(
            help="Rank allocation: auto (global, from a dense pre-pass), uniform, v2 (SVD-LLM V2), "
            "last-n (LLM-ROM: only the last N blocks), asvd (ASVD's sensitivity search, ratio <= 0.6)."
        ),
    ] = "auto",
    last_n: Annotated[
        int | None, typer.Option(help="With --allocation last-n: how many final blocks to compress.")
    ] = None,
    prepass_samples: Annotated[
        int | None,
        typer.Option(
            help="Calibration windows (the first N) the dense pre-pass of --allocation auto, v2 or asvd "
            "reads [default: auto 32 x 512 tokens' worth, v2/asvd all].",
            show_default=False,
        ),
    ] = None,
    density: Annotated[
        float | None,
        typer.Option(
            help=option_help("density"),
            show_default=False,
        ),
    ] = None,
    compute_dtype: opt.ComputeDtype = "float32",
    threads: opt.Threads = None,
    overwrite: Annotated[
        bool, typer.Option(help="Discard a previous romcomp output in --out and start over.")
    ] = False,
    progress: opt.Progress = True,
    ppl_windows: Annotated[
        int,
        typer.Option(
            help="Afterwards print WikiText-2 test perplexity before/after on the first N 512-token windows "
            "(small models)."
        ),
    ] = 0,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Only plan: resolve the model, read its headers and config, print the memory plan by "
            "phase, the configuration --max-ram leads to and a time estimate (one block probed), write "
            "nothing. A real run prints the same header before its first pass.",
        ),
    ] = False,
) -> None:
    """Compress MODEL by ROM, block by block, and write a directory transformers loads."""
    from romcomp.compression.config import CompressConfig
    from romcomp.compression.pipeline import dry_run as plan_only
    from romcomp.compression.pipeline import run_spec
    from romcomp.compression.report import summary

    cfg = CompressConfig(
        model=model, ratio=ratio, out=out, max_ram=max_ram, method=method, calib=calib, n_samples=n_samples,
        seq_len=seq_len, seed=seed, data_dir=data_dir, calib_stream=calib_stream, sequential=sequential,
        fit=fit, allocation=allocation, last_n=last_n, prepass_samples=prepass_samples, density=density,
        threads=threads, overwrite=overwrite, progress=progress, compute_dtype=compute_dtype,
    )  # fmt: skip
    spec = cfg.resolve()
    if ppl_windows > 0:
        _refuse_encoder_perplexity(model)
    if dry_run:
        planned = plan_only(spec)
        if planned is not None:  # None: a worker of a distributed run other than rank 0
            typer.echo(planned.header())
            typer.echo("dry run: nothing written")
        return
    results = run_spec(spec, announce=lambda plan: typer.echo(plan.header() + "\n"))
    for result in results:
        typer.echo(summary(result) + ("\n" if len(results) > 1 else ""))
    if ppl_windows > 0:
        from romcomp.evaluation.quality import before_after

        for result in results:
            ba = before_after(result.source_dir, result.out, ppl_windows, data_dir=data_dir)
            typer.echo(f"ratio {result.ratio:g}: " + ba.line(result.calibration))


def _refuse_encoder_perplexity(model: str) -> None:
    """``--ppl-windows`` scores next-token prediction: refuse an encoder before any work."""
    from transformers import AutoConfig

    from romcomp.errors import BadInputError
    from romcomp.model.shell import is_encoder
    from romcomp.model.sources import resolve_model

    if is_encoder(AutoConfig.from_pretrained(resolve_model(model).path)):
        raise BadInputError(f"--ppl-windows measures a causal LM's perplexity; {model} is an encoder")


def register(app: typer.Typer) -> None:
    """Add ``romcomp compress`` (also what ``romcomp MODEL`` runs)."""
    app.command(epilog=EXAMPLES)(compress)
