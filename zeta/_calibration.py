"""The calibration hook: what a calibrator sees and what it may change.

The supervisor calls the calibrator on a timer (``Scheduler(calibration_interval=...)``) and on
demand (``await zs.calibrate()``). A calibrator looks at live state and history and returns new
values for some of the scoring parameters (the fields of :class:`~zeta.Scoring`), or ``None`` to
keep them. The fitting logic itself lives with the calibrators, not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from ._snapshot import SchedulerSnapshot
from .telemetry._recorder import RecorderSnapshot

__all__ = ["CalibrationView", "Calibrator"]


@dataclass(frozen=True, slots=True)
class CalibrationView:
    """Everything a calibration run gets.

    Attributes:
        snapshot: every actor's state now.
        history: everything the recorder has counted since the scheduler started.
        params: the current values of the tunable parameters.
        run: how many calibration runs happened before this one.
    """

    snapshot: SchedulerSnapshot
    history: RecorderSnapshot
    params: Mapping[str, float]
    run: int


class Calibrator(Protocol):
    """Proposes parameter values from a :class:`CalibrationView`.

    ``calibrate`` runs on the event loop: a calibrator that computes for long should move the work
    to a thread itself (``await anyio.to_thread.run_sync(...)``). Returning a mapping applies it
    (unknown keys or invalid values reject the whole run); returning ``None`` changes nothing. An
    exception is logged and the next run happens on schedule.
    """

    async def calibrate(self, view: CalibrationView) -> Mapping[str, float] | None: ...
