"""Thin typer CLI over :class:`romcomp.compress.config.CompressConfig`.

``romcomp MODEL [options]`` is the compress command; other commands are subcommands (``romcomp compress``
is the explicit spelling). A model path that collides with a subcommand name can be written ``./name``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from romcomp.cli import options as opt
from romcomp.errors import RomcompError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Low-rank (reduced-order model) compression of decoder LLMs, block by block, on a CPU.",
)
SUBCOMMANDS = {"compress", "eval", "analyze", "probe"}

EXAMPLES = """
Examples:

  romcomp smollm2-135m --ratio 0.3 --max-ram 4GB

  romcomp meta-llama/Llama-2-7b-hf --ratio 0.3 --max-ram 24GB --out llama2-7b-r0.3

  romcomp ./my-model --ratio 0.2 --calib wikitext2 --n-samples 64 --threads 2
"""


@app.command(epilog=EXAMPLES)
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
        typer.Option(
            help="Decomposition method: rom (default), svd (data-free), svd-llm (whitened SVD as the "
            "official SVD-LLM code), asvd (activation-aware SVD, alpha 0.5), fwsvd (Fisher-weighted SVD, "
            "streamed gradients) or lpaf (first-order pruning, then a factorization of the kept weights)."
        ),
    ] = "rom",
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
    density: Annotated[
        float | None,
        typer.Option(
            help="With --method lpaf: fraction of each matrix's weights its first-order pruning keeps "
            "[default: 0.5].",
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
) -> None:
    """Compress MODEL by ROM, block by block, and write a directory transformers loads."""
    import romcomp
    from romcomp.compress.config import CompressConfig
    from romcomp.compress.report import summary

    cfg = CompressConfig(
        model=model, ratio=ratio, out=out, max_ram=max_ram, method=method, calib=calib, n_samples=n_samples,
        seq_len=seq_len, seed=seed, data_dir=data_dir, calib_stream=calib_stream, sequential=sequential,
        fit=fit, allocation=allocation, last_n=last_n, density=density,
        threads=threads, overwrite=overwrite, progress=progress, compute_dtype=compute_dtype,
    )  # fmt: skip
    if ppl_windows > 0:
        _refuse_encoder_perplexity(model)
    results = romcomp.api.run_many(cfg)
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

    from romcomp.compress.engine import is_encoder
    from romcomp.errors import BadInputError
    from romcomp.model.sources import resolve_model

    if is_encoder(AutoConfig.from_pretrained(resolve_model(model).path)):
        raise BadInputError(f"--ppl-windows measures a causal LM's perplexity; {model} is an encoder")


def _register_subcommands() -> None:
    from romcomp.cli.analyze import register as register_analyze
    from romcomp.cli.evaluate import register
    from romcomp.cli.probe import register as register_probe

    register(app)
    register_analyze(app)
    register_probe(app)


_register_subcommands()


@app.callback()
def _root() -> None:
    """romcomp MODEL [options] compresses; see `romcomp compress --help` for the options."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point: route ``romcomp MODEL ...`` to ``compress`` and map errors to exit codes."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in SUBCOMMANDS and not args[0].startswith("-"):
        args.insert(0, "compress")
    try:
        app(args=args, prog_name="romcomp", standalone_mode=False)
    except RomcompError as e:
        typer.echo(f"romcomp: error: {e}", err=True)
        sys.exit(e.exit_code)
    except OSError as e:  # disk full, permissions, vanished files: one line, nothing marked done
        typer.echo(f"romcomp: error: {e}", err=True)
        sys.exit(1)
    except typer.Abort:
        typer.echo("romcomp: aborted", err=True)
        sys.exit(1)
    except Exception as e:
        # Usage errors of click (vendored by newer typer): print the usage message, keep click's exit code.
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Exit" and isinstance(getattr(e, "exit_code", None), int):
            sys.exit(e.exit_code)
        raise
    sys.exit(0)
