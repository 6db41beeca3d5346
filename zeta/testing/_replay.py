"""Replay a workload against a :class:`~zeta.Scheduler` and summarise what happened.

:func:`replay` submits every :class:`~zeta.testing._workloads.Arrival` at its scheduled time
(open loop: a slow policy cannot slow the arrivals down and hide its own queueing), each as its
own task, and keeps one :class:`RequestRecord` per arrival. :func:`summarize` turns the records
into latency quantiles per kind, throughput, the spilled share, per-model counts and error
counts. Comparing policies is then a loop over fresh schedulers with the same seeded workload::

    arrivals = bursty(20.0, rate=8.0, seed=1)
    for policy in ("static", "dynamic"):
        async with Scheduler(models=specs, policy=policy) as zs:
            run = await replay(zs, arrivals)
        print(policy, summarize(run.records, run.elapsed_s).by_kind["code"].p99_s)

Latency runs from a request's *scheduled* arrival to its answer, in wall-clock seconds of the
event loop's clock, so event-loop lag in submitting counts against the system under test.

An arrival becomes one ``complete`` or ``embed`` call (:func:`submit_arrival`). A workload whose
arrivals carry more (a subclass of :class:`~zeta.testing._workloads.Arrival` with a difficulty,
or several texts to embed) passes its own ``submit`` to :func:`replay` and :func:`warm_up`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from .._exceptions import ZetaError
from .._types import SERVED_KINDS, Kind, Priority
from ..telemetry._recorder import Outcome, outcome_of
from ._workloads import Arrival

if TYPE_CHECKING:
    from .._request import CompletionResult, EmbeddingResult
    from .._scheduler import Scheduler

__all__ = [
    "LatencyStats",
    "ModelStats",
    "ReplayResult",
    "ReplaySummary",
    "RequestRecord",
    "Submit",
    "outcome_of",
    "quantile",
    "replay",
    "submit_arrival",
    "summarize",
    "warm_up",
]


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """How one arrival of a replayed workload ended.

    Args:
        index: position of the arrival in the workload.
        at: scheduled arrival, in workload seconds (before ``time_scale``).
        kind, priority: as in the arrival.
        outcome: ``ok``, a typed error's outcome (``overloaded``, ``deadline_exceeded``, ...), or
            ``cancelled`` for a request still unfinished when the replay's timeout ran out.
        error: the exception's class name, for a request that failed with a :class:`~zeta.ZetaError`.
        model, replica: who served it (``ok`` only).
        spilled: served by a model that does not prefer its kind.
        queue_wait_s, service_s: time queued and inside the backend, as the result reports them.
        latency_s: scheduled arrival to answer or error, seconds (``None`` if unfinished).
        tokens: tokens generated (completions; ``0`` for embeddings and failures).
    """

    index: int
    at: float
    kind: Kind
    priority: Priority
    outcome: Outcome
    error: str | None = None
    model: str | None = None
    replica: int | None = None
    spilled: bool = False
    queue_wait_s: float | None = None
    service_s: float | None = None
    latency_s: float | None = None
    tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """The records of one replay, in workload order, and how long it took (wall seconds)."""

    records: tuple[RequestRecord, ...]
    elapsed_s: float
    time_scale: float = 1.0

    def summary(self) -> ReplaySummary:
        """Shorthand for ``summarize(self.records, self.elapsed_s)``."""
        return summarize(self.records, self.elapsed_s)


class _Unset:
    """Marker: use the scheduler's own default for an argument."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


class Submit(Protocol):
    """Sends one arrival to a scheduler and returns the result.

    ``options`` are the request options the replay sets (``deadline``, and ``admission_timeout``
    unless the scheduler's own default applies), to pass on to
    :meth:`~zeta.Scheduler.complete` or :meth:`~zeta.Scheduler.embed`.
    """

    def __call__(
        self, scheduler: Scheduler, arrival: Arrival, /, **options: Any
    ) -> Awaitable[CompletionResult | EmbeddingResult]: ...


async def submit_arrival(
    scheduler: Scheduler, arrival: Arrival, /, **options: Any
) -> CompletionResult | EmbeddingResult:
    """The default :class:`Submit`: ``embed`` the prompt, or ``complete`` it with the arrival's
    kind, ``max_tokens`` and priority."""
    if arrival.kind is Kind.EMBED:
        return await scheduler.embed(arrival.prompt, priority=arrival.priority, **options)
    return await scheduler.complete(
        arrival.prompt,
        kind=arrival.kind,
        max_tokens=arrival.max_tokens,
        priority=arrival.priority,
        **options,
    )


async def replay(
    scheduler: Scheduler,
    arrivals: Sequence[Arrival],
    *,
    time_scale: float = 1.0,
    deadline_s: float | None = None,
    admission_timeout: float | None = UNSET,
    timeout_s: float | None = None,
    on_record: Callable[[RequestRecord], object] | None = None,
    submit: Submit = submit_arrival,
) -> ReplayResult:
    """Submit every arrival at ``start + at * time_scale``, concurrently, and record how each ended.

    Arrivals need not be sorted. Each request runs as its own task, so a slow one never delays
    the next arrival. Typed errors (:class:`~zeta.ZetaError`) are recorded, not raised; any other
    exception is a bug and propagates.

    Args:
        scheduler: a running scheduler.
        arrivals: the workload.
        time_scale: multiplies every arrival time (``0.1`` plays a workload ten times faster).
        deadline_s: if given, each request's deadline is this many seconds after its submission.
        admission_timeout: passed to every request (``None`` waits for room); default the
            scheduler's own.
        timeout_s: give up this long after the start; requests still running are cancelled and
            recorded as ``cancelled``. ``None`` waits for every request.
        on_record: called with each record as its request ends (e.g. a live progress display).
        submit: sends one arrival (default :func:`submit_arrival`).

    Raises:
        ValueError: ``time_scale`` is not a finite number > 0.
    """
    if not (isinstance(time_scale, (int, float)) and 0.0 < time_scale < math.inf):
        raise ValueError(f"time_scale must be a finite number > 0, got {time_scale!r}")
    preferred = {spec.name: spec.preferred for spec in scheduler.models}
    options: dict[str, Any] = {}
    if not isinstance(admission_timeout, _Unset):
        options["admission_timeout"] = admission_timeout
    order = sorted(range(len(arrivals)), key=lambda i: arrivals[i].at)
    records: list[RequestRecord | None] = [None] * len(arrivals)
    start = anyio.current_time()
    finished = start

    async def one(i: int, arrival: Arrival, due: float) -> None:
        nonlocal finished
        deadline = None if deadline_s is None else scheduler.clock() + deadline_s
        try:
            result = await submit(scheduler, arrival, deadline=deadline, **options)
        except ZetaError as exc:
            now = anyio.current_time()
            record = RequestRecord(
                i,
                arrival.at,
                arrival.kind,
                arrival.priority,
                outcome_of(exc),
                error=type(exc).__name__,
                latency_s=now - due,
            )
        else:
            now = anyio.current_time()
            record = RequestRecord(
                i,
                arrival.at,
                arrival.kind,
                arrival.priority,
                Outcome.OK,
                model=result.model,
                replica=result.replica,
                spilled=arrival.kind not in preferred.get(result.model, frozenset()),
                queue_wait_s=result.queue_wait_s,
                service_s=result.service_s,
                latency_s=now - due,
                tokens=getattr(result, "completion_tokens", 0),
            )
        records[i] = record
        finished = max(finished, now)
        if on_record is not None:
            on_record(record)

    with anyio.move_on_after(math.inf if timeout_s is None else timeout_s) as scope:
        async with anyio.create_task_group() as tg:
            for i in order:
                due = start + arrivals[i].at * time_scale
                await anyio.sleep_until(due)
                tg.start_soon(one, i, arrivals[i], due)
    if scope.cancelled_caught:
        finished = anyio.current_time()
    out = tuple(
        r
        if r is not None
        else RequestRecord(i, a.at, a.kind, a.priority, Outcome.CANCELLED, error=None)
        for i, (r, a) in enumerate(zip(records, arrivals, strict=True))
    )
    return ReplayResult(out, finished - start, float(time_scale))


async def warm_up(
    scheduler: Scheduler, arrivals: Sequence[Arrival], *, submit: Submit = submit_arrival
) -> None:
    """Run the first arrival of each kind once, one after another, without recording anything.

    Primes what a fresh scheduler lacks (service-time estimates, page-cache, thread start-up) so
    a replay measures steady behaviour. Each request waits for mailbox room; typed errors are
    ignored. ``submit`` sends one arrival, as in :func:`replay`.
    """
    first: dict[Kind, Arrival] = {}
    for arrival in arrivals:
        first.setdefault(arrival.kind, arrival)
    for arrival in first.values():
        try:
            await submit(scheduler, arrival, deadline=None, admission_timeout=None)
        except ZetaError:
            pass


# -- summaries -------------------------------------------------------------------------------
def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of ascending ``sorted_values`` (``q`` in ``[0, 1]``); NaN if empty.

    The smallest value with at least ``q`` of the values at or below it: an observed latency,
    never an interpolation between two.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q!r}")
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Latency of the successful requests of one group, seconds (NaN when ``ok == 0``)."""

    requests: int
    ok: int
    p50_s: float
    p95_s: float
    p99_s: float
    mean_s: float
    max_s: float

    @classmethod
    def of(cls, records: Sequence[RequestRecord]) -> LatencyStats:
        lat = sorted(r.latency_s for r in records if r.ok and r.latency_s is not None)
        return cls(
            requests=len(records),
            ok=len(lat),
            p50_s=quantile(lat, 0.50),
            p95_s=quantile(lat, 0.95),
            p99_s=quantile(lat, 0.99),
            mean_s=math.fsum(lat) / len(lat) if lat else math.nan,
            max_s=lat[-1] if lat else math.nan,
        )


@dataclass(frozen=True, slots=True)
class ModelStats:
    """What one model served in a replay: successful requests, the tokens they generated, and
    how many of them were spilled to it (of a kind it does not prefer)."""

    requests: int
    tokens: int
    spilled: int


@dataclass(frozen=True, slots=True)
class ReplaySummary:
    """What one replay amounted to.

    ``throughput_rps`` counts successful requests per wall second of the replay;
    ``spilled_share`` is the share of successful requests served by a model that does not prefer
    their kind; ``outcomes`` counts every outcome (``ok`` included), ``errors`` the typed errors by
    class name; ``models`` the successful requests each model served, and ``by_model`` those
    with their tokens and spills.
    """

    requests: int
    ok: int
    elapsed_s: float
    throughput_rps: float
    tokens_per_s: float
    spilled_share: float
    latency: LatencyStats
    by_kind: Mapping[str, LatencyStats]
    outcomes: Mapping[str, int] = field(default_factory=dict)
    errors: Mapping[str, int] = field(default_factory=dict)
    models: Mapping[str, int] = field(default_factory=dict)
    by_model: Mapping[str, ModelStats] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        """Requests that did not succeed (typed errors and unfinished ones)."""
        return self.requests - self.ok

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy: NaN (no successful request in a group) becomes ``None``."""
        out: dict[str, Any] = _json_safe(
            {
                "requests": self.requests,
                "ok": self.ok,
                "elapsed_s": self.elapsed_s,
                "throughput_rps": self.throughput_rps,
                "tokens_per_s": self.tokens_per_s,
                "spilled_share": self.spilled_share,
                "latency": _stats_dict(self.latency),
                "by_kind": {k: _stats_dict(v) for k, v in self.by_kind.items()},
                "outcomes": dict(self.outcomes),
                "errors": dict(self.errors),
                "models": dict(self.models),
                "by_model": {
                    name: {"requests": m.requests, "tokens": m.tokens, "spilled": m.spilled}
                    for name, m in self.by_model.items()
                },
            }
        )
        return out


def _stats_dict(s: LatencyStats) -> dict[str, float | int]:
    return {
        "requests": s.requests,
        "ok": s.ok,
        "p50_s": s.p50_s,
        "p95_s": s.p95_s,
        "p99_s": s.p99_s,
        "mean_s": s.mean_s,
        "max_s": s.max_s,
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def summarize(records: Sequence[RequestRecord], elapsed_s: float) -> ReplaySummary:
    """Latency quantiles (overall and per served kind), throughput, spilled share, error counts.

    Every served kind appears in ``by_kind``, with zero requests if the workload had none.

    Raises:
        ValueError: ``elapsed_s`` is negative or not finite.
    """
    if not (isinstance(elapsed_s, (int, float)) and 0.0 <= elapsed_s < math.inf):
        raise ValueError(f"elapsed_s must be a finite number >= 0, got {elapsed_s!r}")
    ok = [r for r in records if r.ok]
    per_s = (lambda n: n / elapsed_s) if elapsed_s > 0 else (lambda n: 0.0)
    by_kind = {
        kind.value: LatencyStats.of([r for r in records if r.kind is kind]) for kind in SERVED_KINDS
    }
    served: dict[str, list[RequestRecord]] = {}
    for r in ok:
        if r.model is not None:
            served.setdefault(r.model, []).append(r)
    by_model = {
        name: ModelStats(len(rs), sum(r.tokens for r in rs), sum(r.spilled for r in rs))
        for name, rs in served.items()
    }
    return ReplaySummary(
        requests=len(records),
        ok=len(ok),
        elapsed_s=float(elapsed_s),
        throughput_rps=per_s(len(ok)),
        tokens_per_s=per_s(sum(r.tokens for r in ok)),
        spilled_share=sum(r.spilled for r in ok) / len(ok) if ok else 0.0,
        latency=LatencyStats.of(records),
        by_kind=by_kind,
        outcomes=dict(Counter(r.outcome.value for r in records)),
        errors=dict(Counter(r.error for r in records if r.error is not None)),
        models={name: m.requests for name, m in by_model.items()},
        by_model=by_model,
    )
