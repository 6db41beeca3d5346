"""The replay driver (zeta.testing._replay): quantile and summary math on hand-built records, and
replays against a real scheduler over simulated models on both anyio backends."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from zeta import (
    ActorDead,
    BackendError,
    CompletionResult,
    ConfigError,
    DeadlineExceeded,
    EmbeddingResult,
    Kind,
    ModelSpec,
    ModelUnavailable,
    NoCapableModelError,
    Outcome,
    Overloaded,
    Priority,
    Scheduler,
    SchedulerClosed,
    TryAgainError,
)
from zeta.testing._replay import (
    ModelStats,
    RequestRecord,
    outcome_of,
    quantile,
    replay,
    submit_arrival,
    summarize,
    warm_up,
)
from zeta.testing._workloads import Arrival

# -- quantiles -------------------------------------------------------------------------------


def test_nearest_rank_quantiles() -> None:
    values = [float(v) for v in range(1, 101)]
    assert quantile(values, 0.50) == 50.0
    assert quantile(values, 0.95) == 95.0
    assert quantile(values, 0.99) == 99.0
    assert quantile(values, 1.0) == 100.0
    assert quantile(values, 0.0) == 1.0
    assert quantile([3.0, 7.0], 0.5) == 3.0  # an observed value, never an interpolation
    assert quantile([3.0, 7.0], 0.51) == 7.0
    assert quantile([4.0], 0.99) == 4.0
    assert math.isnan(quantile([], 0.5))
    with pytest.raises(ValueError):
        quantile(values, 1.5)


# -- summaries -------------------------------------------------------------------------------


def rec(
    i: int,
    kind: Kind,
    latency: float | None,
    outcome: Outcome = Outcome.OK,
    *,
    model: str | None = "coder",
    spilled: bool = False,
    tokens: int = 0,
    error: str | None = None,
) -> RequestRecord:
    ok = outcome is Outcome.OK
    return RequestRecord(
        i,
        at=float(i),
        kind=kind,
        priority=Priority.NORMAL,
        outcome=outcome,
        error=error,
        model=model if ok else None,
        replica=0 if ok else None,
        spilled=spilled,
        latency_s=latency,
        tokens=tokens,
    )


def test_summary_math() -> None:
    records = [
        *(rec(i, Kind.CODE, 0.1 * (i + 1), tokens=10) for i in range(10)),  # 0.1 .. 1.0 s
        rec(10, Kind.REASON, 2.0, model="reasoner", tokens=40),
        rec(11, Kind.REASON, 3.0, model="coder", spilled=True, tokens=40),
        rec(12, Kind.CODE, 0.5, Outcome.OVERLOADED, error="Overloaded"),
        rec(13, Kind.CODE, 9.0, Outcome.DEADLINE, error="DeadlineExceeded"),
        rec(14, Kind.EMBED, None, Outcome.CANCELLED),
    ]
    s = summarize(records, elapsed_s=4.0)
    assert (s.requests, s.ok, s.failed) == (15, 12, 3)
    assert s.throughput_rps == pytest.approx(12 / 4.0)
    assert s.tokens_per_s == pytest.approx((10 * 10 + 80) / 4.0)
    assert s.spilled_share == pytest.approx(1 / 12)

    code = s.by_kind["code"]
    assert (code.requests, code.ok) == (12, 10)  # failures count as requests, not latencies
    assert code.p50_s == pytest.approx(0.5)
    assert code.p95_s == pytest.approx(1.0)
    assert code.p99_s == pytest.approx(1.0)
    assert code.mean_s == pytest.approx(0.55)
    assert code.max_s == pytest.approx(1.0)
    reason = s.by_kind["reason"]
    assert (reason.p50_s, reason.p99_s) == (2.0, 3.0)
    assert s.by_kind["embed"].requests == 1 and s.by_kind["embed"].ok == 0
    assert math.isnan(s.by_kind["embed"].p50_s)
    assert s.by_kind["simple"].requests == 0 and math.isnan(s.by_kind["simple"].p99_s)
    assert s.latency.ok == 12 and s.latency.max_s == 3.0
    assert s.latency.p50_s == pytest.approx(0.6)

    assert s.outcomes == {"ok": 12, "overloaded": 1, "deadline_exceeded": 1, "cancelled": 1}
    assert s.errors == {"Overloaded": 1, "DeadlineExceeded": 1}
    assert s.models == {"coder": 11, "reasoner": 1}
    assert s.by_model == {
        "coder": ModelStats(requests=11, tokens=140, spilled=1),
        "reasoner": ModelStats(requests=1, tokens=40, spilled=0),
    }


def test_summary_of_nothing_and_bad_elapsed() -> None:
    s = summarize([], 0.0)
    assert (s.requests, s.ok, s.throughput_rps, s.spilled_share) == (0, 0, 0.0, 0.0)
    assert s.models == {} and s.by_model == {}
    assert set(s.by_kind) == {"simple", "code", "embed", "reason"}
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            summarize([], bad)


def test_summary_to_dict_is_json() -> None:
    records = [
        rec(0, Kind.CODE, 0.25, tokens=3),
        rec(1, Kind.CODE, 0.5, model="reasoner", spilled=True, tokens=2),
        rec(2, Kind.EMBED, None, Outcome.CANCELLED),
    ]
    d = summarize(records, 1.0).to_dict()
    again = json.loads(json.dumps(d, allow_nan=False))
    assert again["by_kind"]["code"]["p99_s"] == 0.5
    assert again["by_kind"]["embed"]["p50_s"] is None  # NaN is not JSON
    assert again["outcomes"] == {"ok": 2, "cancelled": 1}
    assert again["models"] == {"coder": 1, "reasoner": 1}
    assert again["by_model"] == {
        "coder": {"requests": 1, "tokens": 3, "spilled": 0},
        "reasoner": {"requests": 1, "tokens": 2, "spilled": 1},
    }


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (Overloaded("full", retry_after=1.0), Outcome.OVERLOADED),
        (DeadlineExceeded("late"), Outcome.DEADLINE),
        (ActorDead("dead"), Outcome.ACTOR_DEAD),
        (ModelUnavailable("down"), Outcome.UNAVAILABLE),
        (NoCapableModelError("none"), Outcome.INVALID),
        (ConfigError("bad"), Outcome.INVALID),
        (SchedulerClosed("closed"), Outcome.CLOSED),
        (BackendError("oops"), Outcome.ERROR),
        (TryAgainError("later"), Outcome.ERROR),
    ],
)
def test_outcome_of(error: Any, outcome: Outcome) -> None:
    assert outcome_of(error) is outcome


# -- replays against a scheduler -------------------------------------------------------------


def sim(name: str, kinds: set[Kind], preferred: set[Kind], **options: Any) -> ModelSpec:
    return ModelSpec(
        name, kinds=frozenset(kinds), preferred=frozenset(preferred), backend="simulated",
        options={"base_s": 0.0005, "per_output_token_s": 0.0001, **options},
    )  # fmt: skip


@contextmanager
def open_gate() -> Iterator[threading.Event]:
    """A closed gate that is always opened at the end, so no worker thread stays blocked."""
    gate = threading.Event()
    try:
        yield gate
    finally:
        gate.set()


def arrival(at: float, kind: Kind, priority: Priority = Priority.NORMAL) -> Arrival:
    return Arrival(at, kind, f"{kind.value} request at {at}", 3, priority)


@pytest.mark.anyio
async def test_replay_records_every_arrival_in_workload_order() -> None:
    coder = sim("coder", {Kind.SIMPLE, Kind.CODE, Kind.REASON}, {Kind.SIMPLE, Kind.CODE})
    reasoner = sim("reasoner", {Kind.REASON, Kind.CODE}, {Kind.REASON})
    embedder = sim("embedder", {Kind.EMBED}, {Kind.EMBED})
    # Deliberately unsorted: records follow the input's order, submissions the times'.
    arrivals = [
        arrival(0.004, Kind.REASON),
        arrival(0.0, Kind.CODE),
        arrival(0.002, Kind.EMBED, Priority.LOW),
        arrival(0.001, Kind.SIMPLE, Priority.HIGH),
        arrival(0.003, Kind.CODE),
    ]
    seen: list[int] = []
    async with Scheduler([coder, reasoner, embedder], policy="static") as zs:
        result = await replay(zs, arrivals, on_record=lambda r: seen.append(r.index))
    assert [r.index for r in result.records] == list(range(len(arrivals)))
    assert sorted(seen) == list(range(len(arrivals)))
    specs = {m.name: m for m in (coder, reasoner, embedder)}
    for r, a in zip(result.records, arrivals, strict=True):
        assert r.outcome is Outcome.OK, r
        assert (r.at, r.kind, r.priority) == (a.at, a.kind, a.priority)
        assert r.model is not None and r.kind in specs[r.model].kinds
        assert r.spilled is (r.kind not in specs[r.model].preferred)
        assert r.latency_s is not None and r.service_s is not None and r.queue_wait_s is not None
        assert r.latency_s >= r.service_s >= 0.0
        assert r.tokens == (0 if r.kind is Kind.EMBED else 3)
    # Static sends each kind to the model that prefers it.
    assert [r.model for r in result.records] == [
        "reasoner", "coder", "embedder", "coder", "coder"
    ]  # fmt: skip
    assert result.elapsed_s >= 0.004
    assert result.summary().ok == len(arrivals)


@pytest.mark.anyio
async def test_typed_errors_are_recorded_not_raised() -> None:
    with open_gate() as gate:
        coder = sim("coder", {Kind.CODE}, {Kind.CODE}, gate=gate)
        async with Scheduler([coder], mailbox_capacity=1) as zs:
            # One runs (blocked on the gate) and at most one more fits the mailbox; the others
            # are refused at once (the scheduler's default admission timeout is 0). Once two
            # have been refused, the gate opens and the accepted ones finish.
            arrivals = [arrival(0.0, Kind.CODE) for _ in range(4)]
            refused = 0

            def on_record(r: RequestRecord) -> None:
                nonlocal refused
                refused += r.outcome is Outcome.OVERLOADED
                if refused == 2:
                    gate.set()

            result = await replay(zs, arrivals, on_record=on_record)
    ok = [r for r in result.records if r.ok]
    over = [r for r in result.records if r.outcome is Outcome.OVERLOADED]
    assert len(ok) in (1, 2) and len(ok) + len(over) == 4
    assert all(r.error == "Overloaded" and r.model is None for r in over)
    assert all(r.error is None and r.model == "coder" for r in ok)
    assert result.summary().errors == {"Overloaded": len(over)}


@pytest.mark.anyio
async def test_admission_timeout_and_deadline_are_passed_on() -> None:
    with open_gate() as gate:
        coder = sim("coder", {Kind.CODE}, {Kind.CODE}, gate=gate)
        async with Scheduler([coder], mailbox_capacity=1) as zs:
            arrivals = [arrival(0.0, Kind.CODE) for _ in range(3)]
            # Waiting for room (admission_timeout=None) until the deadline: every request that
            # cannot finish while the gate is shut fails with DeadlineExceeded, none Overloaded.
            result = await replay(zs, arrivals, deadline_s=0.05, admission_timeout=None)
            gate.set()
    assert [r.outcome for r in result.records] == [Outcome.DEADLINE] * 3
    assert {r.error for r in result.records} == {"DeadlineExceeded"}


@pytest.mark.anyio
async def test_timeout_cancels_what_is_unfinished() -> None:
    with open_gate() as gate:
        coder = sim("coder", {Kind.CODE}, {Kind.CODE}, gate=gate)
        embedder = sim("embedder", {Kind.EMBED}, {Kind.EMBED})
        async with Scheduler([coder, embedder]) as zs:
            arrivals = [arrival(0.0, Kind.CODE), arrival(0.0, Kind.EMBED), arrival(5.0, Kind.CODE)]
            result = await replay(zs, arrivals, timeout_s=0.2)
            snap = zs.snapshot()
            history = zs.recorder.snapshot()
            gate.set()
    assert [r.outcome for r in result.records] == [Outcome.CANCELLED, Outcome.OK, Outcome.CANCELLED]
    assert result.records[0].latency_s is None and result.records[0].error is None
    assert 0.2 <= result.elapsed_s < 5.0
    assert sum(m.queue_len for m in snap.models) == 0
    # The scheduler saw the running request's caller leave; the last one was never submitted.
    assert history.requests == {("coder", "code", "cancelled"): 1, ("embedder", "embed", "ok"): 1}
    assert result.summary().outcomes == {"cancelled": 2, "ok": 1}


@pytest.mark.anyio
async def test_time_scale() -> None:
    coder = sim("coder", {Kind.CODE}, {Kind.CODE})
    async with Scheduler([coder]) as zs:
        start = anyio.current_time()
        result = await replay(zs, [arrival(10.0, Kind.CODE)], time_scale=0.005)
        took = anyio.current_time() - start
        assert result.time_scale == 0.005
        assert result.records[0].ok
        assert took >= 0.05  # scheduled at 10 s * 0.005
        for bad in (0.0, -1.0, math.inf, math.nan):
            with pytest.raises(ValueError):
                await replay(zs, [], time_scale=bad)


@pytest.mark.anyio
async def test_warm_up_runs_one_request_per_kind() -> None:
    coder = sim("coder", {Kind.SIMPLE, Kind.CODE}, {Kind.SIMPLE, Kind.CODE})
    embedder = sim("embedder", {Kind.EMBED}, {Kind.EMBED})
    arrivals = [
        arrival(float(i), k) for i, k in enumerate([Kind.CODE, Kind.CODE, Kind.EMBED, Kind.SIMPLE])
    ]
    async with Scheduler([coder, embedder]) as zs:
        await warm_up(zs, arrivals)
        done = {m.name: m.completed for m in zs.snapshot().models}
        history = zs.recorder.snapshot()
    assert done == {"coder": 2, "embedder": 1}
    assert sum(history.requests.values()) == 3


@dataclass(frozen=True, slots=True)
class TaggedArrival(Arrival):
    """An arrival that carries more than :class:`Arrival`: several texts to embed."""

    texts: tuple[str, ...] = ()


@pytest.mark.anyio
async def test_submit_sends_what_a_custom_arrival_carries() -> None:
    coder = sim("coder", {Kind.CODE}, {Kind.CODE})
    embedder = sim("embedder", {Kind.EMBED}, {Kind.EMBED})
    arrivals = [
        TaggedArrival(0.0, Kind.EMBED, "", 0, texts=("a", "b", "c")),
        arrival(0.001, Kind.CODE),
        TaggedArrival(0.002, Kind.EMBED, "", 0, texts=("d", "e")),
    ]
    calls: list[tuple[int, dict[str, Any]]] = []
    vectors: list[int] = []

    async def submit(
        zs: Scheduler, a: Arrival, /, **options: Any
    ) -> CompletionResult | EmbeddingResult:
        calls.append((arrivals.index(a), options))
        if not isinstance(a, TaggedArrival):
            return await submit_arrival(zs, a, **options)
        result = await zs.embed(list(a.texts), priority=a.priority, **options)
        vectors.append(len(result.vectors))
        return result

    async with Scheduler([coder, embedder]) as zs:
        await warm_up(zs, arrivals, submit=submit)
        # warm-up: the first of each kind, waiting for room and without a deadline
        assert calls == [
            (0, {"deadline": None, "admission_timeout": None}),
            (1, {"deadline": None, "admission_timeout": None}),
        ]
        calls.clear()
        result = await replay(zs, arrivals, submit=submit, admission_timeout=0.5)
    assert [r.outcome for r in result.records] == [Outcome.OK] * 3
    assert [r.model for r in result.records] == ["embedder", "coder", "embedder"]
    assert sorted(i for i, _ in calls) == [0, 1, 2]
    assert all(o == {"deadline": None, "admission_timeout": 0.5} for _, o in calls)
    assert vectors == [3, 3, 2]  # warm-up, then the two replayed embeds
