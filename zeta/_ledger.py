"""The ledger: the one place a request's outcome is recorded, exactly once.

Every request the scheduler is handed ends here once, from the caller's side: as a result, as
one typed error, or as cancelled (the caller left). The ledger counts it in the
:class:`~zeta.Recorder` and writes its one ``request_finished`` summary line on the
``zeta.requests`` logger (info; warning for outcomes that mean zeta or a backend failed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ._calibration import SampleLog, sample_of
from ._exceptions import InvalidInputError
from ._loop import LoopHandle
from ._request import Request
from .telemetry._logging import get_logger
from .telemetry._recorder import FAILURES, Outcome, Recorder, outcome_of

__all__ = ["REQUEST_LOGGER", "Ledger"]

#: The logger of the per-request summary lines (``request_finished`` events).
REQUEST_LOGGER = "zeta.requests"
_log = get_logger(REQUEST_LOGGER)
_stdlib_log = logging.getLogger(REQUEST_LOGGER)


class Ledger:
    """Records each request's end once; the scheduler, its streams and its intake write here.

    Args:
        recorder: where the counts and latencies go.
        clock: the scheduler's clock.
    """

    def __init__(self, recorder: Recorder, clock: Callable[[], float]) -> None:
        self.recorder = recorder
        self._clock = clock
        #: The running loop's cancellation exception (set when the scheduler starts).
        self.cancelled: type[BaseException] = BaseException
        #: The running loop (set when the scheduler starts), for streams dropped mid-way.
        self.handle: LoopHandle | None = None
        #: Where each successful request's timings go for the calibrator (``None``: nowhere).
        self.samples: SampleLog | None = None

    def outcome_of(self, exc: BaseException) -> Outcome:
        """What an exception the caller saw stands for: cancelled, or a typed error's outcome."""
        return Outcome.CANCELLED if isinstance(exc, self.cancelled) else outcome_of(exc)

    def record(self, request: Request, outcome: Outcome) -> None:
        """Count the request's end (a second call for the same request does nothing)."""
        if request.recorded:
            return
        request.recorded = True
        model = request.model
        now = self._clock()
        enqueued, started = request.enqueued_at, request.started_at
        queue_wait = None
        if enqueued is not None:
            queue_wait = (started if started is not None else now) - enqueued
        kind = request.kind.value
        recorder = self.recorder
        total = now - request.created_at
        recorder.request_finished(
            model,
            kind,
            outcome,
            queue_wait_s=queue_wait,
            service_s=request.service_s,
            total_s=total,
        )
        spilled_from = None
        if outcome is Outcome.OK:
            if request.preferred is not None and model != request.preferred:
                spilled_from = request.preferred
                recorder.spilled(spilled_from, model or "none")
            if self.samples is not None and (sample := sample_of(request)) is not None:
                self.samples.add(sample)
        elif outcome is Outcome.OVERLOADED:
            recorder.rejected(kind)
        self._log(
            request.id, model, kind, outcome, queue_wait, request.service_s, total, spilled_from
        )

    def record_unrouted(
        self, request_id: int, kind: str, created_at: float, exc: BaseException
    ) -> None:
        """Count a call that failed before it became a request (invalid input, a classifier bug)."""
        outcome = Outcome.INVALID if isinstance(exc, InvalidInputError) else Outcome.ERROR
        total = self._clock() - created_at
        self.recorder.request_finished(None, kind, outcome, total_s=total)
        self._log(request_id, None, kind, outcome, None, None, total, None)

    def record_orphan(self, request: Request) -> None:
        """A stream was dropped mid-way (garbage-collected): stop its request now and count it
        as cancelled on the event loop's thread. Callable from any thread."""
        request.abandoned = True  # the worker reads it: stop generating at the next token
        if self.handle is not None:
            self.handle.call_soon(self._abandon, request)

    def _abandon(self, request: Request) -> None:
        request.abandon()
        self.record(request, Outcome.CANCELLED)

    @staticmethod
    def _log(
        request_id: int,
        model: str | None,
        kind: str,
        outcome: Outcome,
        queue_wait_s: float | None,
        service_s: float | None,
        total_s: float,
        spilled_from: str | None,
    ) -> None:
        level = logging.WARNING if outcome in FAILURES else logging.INFO
        if _stdlib_log.isEnabledFor(level):
            _log.log(
                level,
                "request_finished",
                request_id=request_id,
                model=model,
                kind=kind,
                outcome=outcome.value,
                queue_wait_s=queue_wait_s,
                service_s=service_s,
                total_s=total_s,
                spilled_from=spilled_from,
            )
