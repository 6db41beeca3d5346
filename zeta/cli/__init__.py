"""zeta's command line (the ``zeta`` console script and ``python -m zeta``).

``zeta demo`` (:mod:`zeta.cli._demo`), ``zeta models make|list`` and ``zeta config check FILE``
(:mod:`zeta.cli._main`).
"""

from __future__ import annotations

from ._main import build_parser as build_parser
from ._main import main as main

__all__ = ("build_parser", "main")
