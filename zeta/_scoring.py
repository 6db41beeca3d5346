"""Selects the scoring kernel: compiled (``zeta._scoring_c``) unless ``ZETA_NO_EXTENSIONS=1``.

An installed zeta always has the compiled kernel (a failed compile fails the install), so a
missing extension is an error, not a silent fallback.
"""

from __future__ import annotations

import os

from . import _scoring_py

__all__ = ("IMPLEMENTATION", "NO_CANDIDATE", "ScoreTable")

# The same in both implementations.
NO_CANDIDATE = _scoring_py.NO_CANDIDATE

if os.environ.get("ZETA_NO_EXTENSIONS", "") not in ("", "0"):
    from ._scoring_py import ScoreTable

    IMPLEMENTATION = "py"
else:
    try:
        from ._scoring_c import ScoreTable  # type: ignore[assignment]
    except ImportError as exc:  # pragma: no cover - only on a broken install
        raise ImportError(
            "zeta's compiled scoring kernel (zeta._scoring_c) is missing: reinstall zeta with a C "
            "compiler available (pip install -e .), or set ZETA_NO_EXTENSIONS=1 to use the "
            "pure-Python reference"
        ) from exc
    IMPLEMENTATION = "c"
