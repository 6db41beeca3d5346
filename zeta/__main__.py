"""``python -m zeta``: the ``zeta`` command line (:mod:`zeta.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
