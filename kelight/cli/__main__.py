"""``python -m kelight.cli``: the ``kelight`` command."""

from kelight.cli.main import main

main()
