"""Builds zeta's compiled scoring kernel (native/_scoring_c.pyx -> zeta._scoring_c).

A failed compile fails the install: a silent fallback to the pure-Python reference would hide a
performance regression. Set ZETA_NO_EXTENSIONS=1 at run time to choose the reference on purpose.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    from Cython.Build import cythonize
except ImportError as exc:  # pragma: no cover - pip installs Cython from [build-system]
    raise SystemExit(
        "zeta: building needs Cython>=3 (pip installs it from pyproject.toml)"
    ) from exc


class StrictBuildExt(build_ext):
    """build_ext that turns any compiler failure into one clear, fatal message."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            raise SystemExit(
                f"zeta: compiling the native scoring kernel failed: {exc}\n"
                "zeta needs a C compiler and the Python headers (Debian: apt-get install gcc "
                "python3-dev)."
            ) from exc


# -ffp-contract=off: no fused multiply-add, so compiled costs and EWMAs round exactly like the
# pure-Python reference (the tests compare them for equality).
extensions = [
    Extension(
        "zeta._scoring_c",
        ["native/_scoring_c.pyx"],
        extra_compile_args=[] if sys.platform == "win32" else ["-O3", "-ffp-contract=off"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        # zeta/_scoring_c.pxd (the typed layout of ScoreTable) is found by its qualified name.
        include_path=[os.path.dirname(os.path.abspath(__file__))],
        # Cython's timestamp check only knows a .pxd next to the .pyx, so an edit to
        # zeta/_scoring_c.pxd alone would leave a stale .c; regenerating takes seconds.
        force=True,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "embedsignature": True,
        },
    ),
    cmdclass={"build_ext": StrictBuildExt},
)
