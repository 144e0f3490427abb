"""``python -m romcomp.cli``: the console entry point."""

from romcomp.cli.main import main

main()
