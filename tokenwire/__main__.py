"""``python -m tokenwire``: the same entry point as the ``tokenwire`` console script."""

from tokenwire.cli import main

main()
