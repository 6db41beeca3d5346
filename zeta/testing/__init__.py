"""Helpers for testing with zeta, reusable in applications' own test suites.

The model ladder writes small random-weight llama GGUF files that llama.cpp loads like real
models, so tests, the demo and benchmarks run without downloading anything::

    from zeta.testing import ladder_spec

    async with Scheduler(models=[ladder_spec("coder-tiny"), ladder_spec("embedder-tiny")]) as zs:
        ...
"""

from __future__ import annotations

from .._ladder import LADDER as LADDER
from .._ladder import LADDER_VERSION as LADDER_VERSION
from .._ladder import ROLES as ROLES
from .._ladder import LadderModel as LadderModel
from .._ladder import cache_dir as cache_dir
from .._ladder import ladder_spec as ladder_spec
from .._ladder import make_ladder as make_ladder
from .._ladder import make_model as make_model
from .._ladder import model_path as model_path
from .._ladder import write_model as write_model
from ._replay import LatencyStats as LatencyStats
from ._replay import ModelStats as ModelStats
from ._replay import ReplayResult as ReplayResult
from ._replay import ReplaySummary as ReplaySummary
from ._replay import RequestRecord as RequestRecord
from ._replay import Submit as Submit
from ._replay import replay as replay
from ._replay import submit_arrival as submit_arrival
from ._replay import summarize as summarize
from ._replay import warm_up as warm_up
from ._workloads import Arrival as Arrival
from ._workloads import agent_fanout as agent_fanout
from ._workloads import bursty as bursty
from ._workloads import steady as steady

_STATEFUL = ("SchedulerStateMachine", "scheduler_state_machine")


def __getattr__(name: str) -> object:
    # The state machine needs hypothesis, a test-only dependency: import it on first use.
    if name in _STATEFUL:
        from . import _stateful

        return getattr(_stateful, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = (
    "LADDER",
    "Arrival",
    "LatencyStats",
    "ModelStats",
    "ReplayResult",
    "ReplaySummary",
    "RequestRecord",
    "SchedulerStateMachine",
    "Submit",
    "agent_fanout",
    "bursty",
    "replay",
    "scheduler_state_machine",
    "steady",
    "submit_arrival",
    "summarize",
    "warm_up",
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
