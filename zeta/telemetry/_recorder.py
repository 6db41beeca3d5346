"""Plain-Python counters and histograms the runtime writes on the hot path.

The Prometheus collector reads :meth:`Recorder.snapshot` at scrape time, so the per-request path
never touches prometheus_client. Writes come from the event loop; reads may come from the
metrics server's thread, hence the lock (uncontended, tens of nanoseconds).
"""

from __future__ import annotations

import bisect
import enum
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from .._types import Kind

#: Latency bucket upper bounds in seconds (Prometheus ``le``), spanning 1 ms to 2 min.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip


class Outcome(enum.StrEnum):
    """How a request ended; the only values of the ``outcome`` metric label."""

    OK = "ok"
    CANCELLED = "cancelled"
    DEADLINE = "deadline_exceeded"
    OVERLOADED = "overloaded"
    ACTOR_DEAD = "actor_dead"
    UNAVAILABLE = "unavailable"
    INVALID = "invalid"
    ERROR = "error"
    CLOSED = "closed"


def outcome_of(exc: BaseException) -> Outcome:
    """The :class:`Outcome` an exception stands for in the ledger (cancellation aside)."""
    from .._exceptions import (
        ActorDead,
        DeadlineExceeded,
        InvalidInputError,
        ModelUnavailable,
        Overloaded,
        SchedulerClosed,
    )

    for cls, outcome in (
        (Overloaded, Outcome.OVERLOADED),
        (DeadlineExceeded, Outcome.DEADLINE),
        (ActorDead, Outcome.ACTOR_DEAD),
        (ModelUnavailable, Outcome.UNAVAILABLE),
        (InvalidInputError, Outcome.INVALID),
        (SchedulerClosed, Outcome.CLOSED),
    ):
        if isinstance(exc, cls):
            return outcome
    return Outcome.ERROR


@dataclass
class Histogram:
    """Cumulative-at-read histogram with fixed bucket bounds."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        """Count ``value`` in the first bucket whose bound is >= it (Prometheus ``le``)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def copy(self) -> Histogram:
        """An independent copy (the snapshot's, so later observations do not change it)."""
        return Histogram(self.bounds, list(self.counts), self.sum, self.count)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper_bound, cumulative_count)`` pairs, ending with ``(inf, count)``."""
        out, acc = [], 0
        for bound, c in zip((*self.bounds, float("inf")), self.counts, strict=True):
            acc += c
            out.append((bound, acc))
        return out


@dataclass(frozen=True)
class RecorderSnapshot:
    """A consistent copy of everything recorded so far."""

    requests: Mapping[tuple[str, str, str], int]  # (model, kind, outcome) -> count
    queue_wait: Mapping[tuple[str, str], Histogram]  # (model, kind)
    service: Mapping[tuple[str, str], Histogram]
    latency: Mapping[tuple[str, str], Histogram]
    spills: Mapping[tuple[str, str], int]  # (from_model, to_model) -> count
    restarts: Mapping[str, int]
    rejections: Mapping[str, int]  # kind -> overload rejections
    calibration_runs: int
    calibration_params: Mapping[str, float]


#: Model label used for requests that never reached a model (rejected, invalid, ...).
NO_MODEL = "none"
#: Kind label for anything that is not a :class:`~zeta.Kind` (an invalid request's kind), so a
#: caller's input can never create a new label value.
OTHER_KIND = "other"
_KIND_LABELS = frozenset(k.value for k in Kind)

#: Outcomes that mean zeta or a backend failed (the request log writes them at warning level).
FAILURES = frozenset({Outcome.ERROR, Outcome.ACTOR_DEAD, Outcome.UNAVAILABLE})


def kind_label(kind: object) -> str:
    """The ``kind`` label value for ``kind``: a :class:`~zeta.Kind` value, else ``"other"``."""
    value = kind.value if isinstance(kind, enum.Enum) else kind
    return value if isinstance(value, str) and value in _KIND_LABELS else OTHER_KIND


class Recorder:
    """Counts requests, latencies, spills, restarts, rejections and calibration runs.

    It only counts: the scheduler's ledger decides what a request's outcome is and writes its
    one ``request_finished`` log line.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str, str]] = Counter()
        self._queue_wait: dict[tuple[str, str], Histogram] = {}
        self._service: dict[tuple[str, str], Histogram] = {}
        self._latency: dict[tuple[str, str], Histogram] = {}
        self._spills: Counter[tuple[str, str]] = Counter()
        self._restarts: Counter[str] = Counter()
        self._rejections: Counter[str] = Counter()
        self._calibration_runs = 0
        self._calibration_params: dict[str, float] = {}

    def request_finished(
        self,
        model: str | None,
        kind: str,
        outcome: Outcome,
        *,
        queue_wait_s: float | None = None,
        service_s: float | None = None,
        total_s: float | None = None,
    ) -> None:
        """Record one finished request (exactly once per request).

        Args:
            model: the model that served (or last held) it; ``None`` if it never reached one.
            kind: the request's kind; anything that is not a :class:`~zeta.Kind` counts as
                ``"other"``.
            outcome: how it ended.
            queue_wait_s, service_s, total_s: time queued, inside the backend, and end to end.
        """
        key = (model or NO_MODEL, kind_label(kind))
        with self._lock:
            self._requests[(*key, outcome.value)] += 1
            for value, hists in (
                (queue_wait_s, self._queue_wait),
                (service_s, self._service),
                (total_s, self._latency),
            ):
                if value is not None:
                    h = hists.get(key)
                    if h is None:
                        h = hists[key] = Histogram()
                    h.observe(value)

    def spilled(self, from_model: str, to_model: str) -> None:
        """A request whose preferred model was ``from_model`` was sent to ``to_model``."""
        with self._lock:
            self._spills[(from_model, to_model)] += 1

    def restarted(self, model: str) -> None:
        """The supervisor restarted one of ``model``'s actors."""
        with self._lock:
            self._restarts[model] += 1

    def rejected(self, kind: str) -> None:
        """An admission was refused with ``Overloaded``."""
        with self._lock:
            self._rejections[kind_label(kind)] += 1

    def calibrated(self, params: Mapping[str, float]) -> None:
        """A calibration run finished; ``params`` (names from code, not input) are now in use."""
        with self._lock:
            self._calibration_runs += 1
            self._calibration_params = dict(params)

    def snapshot(self) -> RecorderSnapshot:
        """A consistent copy, safe to call from another thread (the metrics server's)."""
        with self._lock:
            return RecorderSnapshot(
                requests=dict(self._requests),
                queue_wait={k: h.copy() for k, h in self._queue_wait.items()},
                service={k: h.copy() for k, h in self._service.items()},
                latency={k: h.copy() for k, h in self._latency.items()},
                spills=dict(self._spills),
                restarts=dict(self._restarts),
                rejections=dict(self._rejections),
                calibration_runs=self._calibration_runs,
                calibration_params=dict(self._calibration_params),
            )
