"""``python -m textrl`` (and ``torchrun ... -m textrl train ...``): the ``textrl`` command line.

The command line lives in :mod:`agents.cli`, the top layer; this entry point only hands over to it, so the
layer contract exempts this one import (pyproject.toml).
"""

import sys

from agents.cli import main

if __name__ == "__main__":
    sys.exit(main())
