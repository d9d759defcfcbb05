"""The ``ptychozarr`` command line."""

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ptychozarr`` console script."""
    print("ptychozarr", file=sys.stderr)
    return 0
