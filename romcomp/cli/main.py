"""The ``romcomp`` typer app and console entry point; each subcommand lives in a module of its own.

``romcomp MODEL [options]`` is the compress command; other commands are subcommands (``romcomp compress``
is the explicit spelling). A model path that collides with a subcommand name can be written ``./name``.
"""

from __future__ import annotations

import sys

import typer

from romcomp.errors import USER_ERRORS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Low-rank (reduced-order model) compression of decoder LLMs, block by block, on a CPU.",
)
SUBCOMMANDS = {"compress", "eval", "analyze", "probe"}


def _register_subcommands() -> None:
    from romcomp.cli.analyze import register as register_analyze
    from romcomp.cli.compress import register as register_compress
    from romcomp.cli.evaluate import register
    from romcomp.cli.probe import register as register_probe

    register_compress(app)
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
    except USER_ERRORS as e:
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
