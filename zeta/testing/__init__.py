"""Helpers for testing with zeta, reusable in applications' own test suites.

The model ladder writes small random-weight llama GGUF files that llama.cpp loads like real
models, so tests, the demo and benchmarks run without downloading anything::

    from zeta.testing import ladder_spec

    async with Scheduler(models=[ladder_spec("coder-tiny"), ladder_spec("embedder-tiny")]) as zs:
        ...
"""

from __future__ import annotations

from ._ladder import LADDER as LADDER
from ._ladder import LADDER_VERSION as LADDER_VERSION
from ._ladder import ROLES as ROLES
from ._ladder import LadderModel as LadderModel
from ._ladder import cache_dir as cache_dir
from ._ladder import ladder_spec as ladder_spec
from ._ladder import make_ladder as make_ladder
from ._ladder import make_model as make_model
from ._ladder import model_path as model_path
from ._ladder import write_model as write_model

__all__ = (
    "LADDER",
    "LADDER_VERSION",
    "ROLES",
    "LadderModel",
    "cache_dir",
    "ladder_spec",
    "make_ladder",
    "make_model",
    "model_path",
    "write_model",
)
