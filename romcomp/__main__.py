"""``python -m romcomp`` (and ``torchrun -m romcomp``): the console entry point."""

from romcomp.cli.main import main

main()
