"""``python -m unlearnlens``: the same command line as ``unlearnlens``."""

import sys

from unlearnlens.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
