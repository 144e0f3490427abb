"""The ``romcomp`` command line: a thin typer layer, one module per subcommand, over one typed config."""

from __future__ import annotations

from romcomp.cli.main import app, main

__all__ = ["app", "main"]
