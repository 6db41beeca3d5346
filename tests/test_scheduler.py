"""The public Scheduler API on the simulated backend, on asyncio and trio.

Tests hold a context busy with a gate (a ``threading.Event`` the simulated backend waits on) and
watch queue state through ``snapshot()``, so they assert behaviour without relying on timings.
"""

from __future__ import annotations

import gc
import math
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.abc
import pytest

from zeta import (
    ActorState,
    Classification,
    CompletionResult,
    ConfigError,
    DeadlineExceeded,
    DynamicPolicy,
    InvalidRequestError,
    Kind,
    ModelLoadError,
    ModelSpec,
    ModelUnavailable,
    NoCapableModelError,
    Outcome,
    Overloaded,
    Priority,
    RouteRequest,
    Scheduler,
    SchedulerClosed,
    Scoring,
    Supervision,
)
from zeta.backends._base import Completion
from zeta.backends.simulated import FailurePlan, SimulatedBackend, open_backend

pytestmark = pytest.mark.anyio

ALL = ("simple", "code", "reason")


def sim(
    name: str,
    kinds: Sequence[str] = ALL,
    preferred: Sequence[str] = (),
    replicas: int = 1,
    slots: int = 4,
    **options: Any,
) -> ModelSpec:
    return ModelSpec(
        name, kinds=set(kinds), preferred=set(preferred), replicas=replicas, slots=slots,
        backend="simulated", options=options,
    )  # fmt: skip


def ladder(**options: Any) -> list[ModelSpec]:
    return [
        sim("coder", preferred=("simple", "code"), **options),
        sim("reasoner", preferred=("reason",), **options),
        sim("embedder", kinds=("embed",), **options),
    ]


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll scheduler state (snapshots have no change events) until ``predicate`` holds."""
    with anyio.fail_after(10):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.001)


def queued(zs: Scheduler, model: str) -> int:
    return sum(m.queue_len for m in zs.snapshot().by_model(model))


def busy(zs: Scheduler, model: str) -> int:
    return sum(m.in_flight for m in zs.snapshot().by_model(model))


class Trace:
    """Collects ``(op, text)`` for every backend call that started, from worker threads."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, op: str, text: str) -> None:
        with self._lock:
            self.calls.append((op, text))

    @property
    def prompts(self) -> list[str]:
        return [text for _, text in self.calls]


@contextmanager
def gate() -> Iterator[threading.Event]:
    """A closed gate that is always opened at the end, so no worker thread stays blocked."""
    g = threading.Event()
    try:
        yield g
    finally:
        g.set()


class Opened:
    """A backend factory that keeps every simulated context it opens and what each returned."""

    def __init__(self) -> None:
        self.backends: list[SimulatedBackend] = []
        self.completions: list[Completion] = []

    def __call__(self, spec: ModelSpec, replica: int) -> SimulatedBackend:
        backend = open_backend(spec, replica)
        inner = backend.step
        completions = self.completions

        def step() -> list[tuple[int, Completion]]:
            ended = inner()
            completions.extend(completion for _, completion in ended)
            return ended

        backend.step = step  # type: ignore[method-assign]
        self.backends.append(backend)
        return backend


# -- the basic API --------------------------------------------------------------------------------
@pytest.mark.parametrize("worker", ["thread", "to_thread"])
async def test_complete_embed_stream(worker: str) -> None:
    async with Scheduler(ladder(), worker=worker) as zs:  # type: ignore[arg-type]
        code = await zs.complete("def f(x):\n    return x  # add a docstring", max_tokens=5)
        assert isinstance(code, CompletionResult)
        assert (code.model, code.kind, code.completion_tokens) == ("coder", Kind.CODE, 5)
        assert code.finish_reason == "length" and code.text

        reason = await zs.complete("Explain step by step why primes are infinite; prove it.")
        assert (reason.model, reason.kind) == ("reasoner", Kind.REASON)

        chat = await zs.complete("hello", kind="simple", max_tokens=2)
        assert chat.model == "coder" and chat.kind is Kind.SIMPLE

        emb = await zs.embed(["alpha", "beta"])
        again = await zs.embed("alpha")
        assert emb.model == "embedder" and len(emb.vectors) == 2
        assert again.vectors[0] == emb.vectors[0] != emb.vectors[1]

        pieces = []
        async with zs.stream("tell me something", kind=Kind.SIMPLE, max_tokens=6) as stream:
            async for piece in stream:
                pieces.append(piece)
        assert len(pieces) == 6
        assert stream.result is not None and "".join(pieces) == stream.result.text

        ids = {code.request_id, reason.request_id, chat.request_id, emb.request_id}
        assert len(ids) == 4
    counts = zs.recorder.snapshot().requests
    assert sum(counts.values()) == 6
    assert counts[("coder", "code", "ok")] == 1 and counts[("embedder", "embed", "ok")] == 2


async def test_snapshot() -> None:
    async with Scheduler([*ladder(), sim("twin", replicas=1)], mailbox_capacity=3) as zs:
        await zs.complete("hi", kind="simple")
        snap = zs.snapshot()
        assert [m.name for m in snap.models] == ["coder", "reasoner", "embedder", "twin"]
        coder = snap.by_model("coder")[0]
        assert coder.state is ActorState.READY
        assert (coder.queue_len, coder.in_flight, coder.completed, coder.failed) == (0, 0, 1, 0)
        assert coder.ewma_request_s >= 0.0 and coder.busy_s > 0.0
    assert all(m.state is ActorState.STOPPED for m in zs.snapshot().models)


async def test_replicas_are_separate_actors() -> None:
    with gate() as g:
        async with Scheduler([sim("m", replicas=2, gate=g)]) as zs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(zs.complete, "a")
                tg.start_soon(zs.complete, "b")
                # Both run at once, one per replica.
                await wait_until(lambda: busy(zs, "m") == 2)
                assert [m.in_flight for m in zs.snapshot().models] == [1, 1]
                g.set()


async def test_custom_classifier_and_policy_objects_are_used() -> None:
    class AlwaysReason:
        def classify(self, prompt: str) -> Classification:
            return Classification(Kind.REASON, 0.9)

    class LastCapable:
        name = "last"

        def __init__(self) -> None:
            self.seen: list[RouteRequest] = []

        def choose(
            self, request: RouteRequest, table: Any, candidates: Sequence[Any]
        ) -> int | None:
            self.seen.append(request)
            ok = [
                c.index for c in candidates if request.kind in c.kinds and table.available(c.index)
            ]
            return ok[-1] if ok else None

    policy = LastCapable()
    async with Scheduler(ladder(), classifier=AlwaysReason(), policy=policy) as zs:
        result = await zs.complete("def f(): pass")
    assert result.kind is Kind.REASON and result.model == "reasoner"
    assert policy.seen[0].difficulty == 0.9 and policy.seen[0].kind is Kind.REASON


@pytest.mark.parametrize(
    ("error", "outcome"),
    [(RuntimeError("classifier bug"), "error"), (InvalidRequestError("unclassifiable"), "invalid")],
)
async def test_a_classifier_that_raises_fails_the_request_which_is_counted_once(
    error: Exception, outcome: str, captured_logs: list[dict[str, Any]]
) -> None:
    class Raising:
        def classify(self, prompt: str) -> Classification:
            raise error

    trace = Trace()
    async with Scheduler([sim("m", on_call=trace)], classifier=Raising()) as zs:
        with pytest.raises(type(error)) as info:
            await zs.complete("which kind am I?")
        assert info.value is error  # the caller sees the classifier's own exception
        with pytest.raises(type(error)):
            zs.stream("and me?")
        # A request with an explicit kind never asks the classifier.
        assert (await zs.complete("plain", kind="simple")).model == "m"
    assert trace.prompts == ["plain"]
    requests = zs.recorder.snapshot().requests
    assert requests == {("none", "auto", outcome): 2, ("m", "simple", "ok"): 1}
    finished = [e["outcome"] for e in captured_logs if e["event"] == "request_finished"]
    assert finished == [outcome, outcome, "ok"]


# -- priorities -----------------------------------------------------------------------------------
async def test_higher_priority_is_served_first() -> None:
    trace = Trace()
    with gate() as g:
        async with Scheduler([sim("m", gate=g, on_call=trace)], aging_s=3600) as zs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(zs.complete, "first")
                await wait_until(lambda: busy(zs, "m") == 1)
                # Arrival order is the reverse of priority order.
                order = [
                    ("low", Priority.LOW),
                    ("normal", Priority.NORMAL),
                    ("high", Priority.HIGH),
                ]
                for n, (prompt, prio) in enumerate(order, 1):
                    tg.start_soon(
                        lambda p=prompt, q=prio: zs.complete(p, kind="simple", priority=q)
                    )
                    await wait_until(lambda n=n: queued(zs, "m") == n)
                g.set()
    assert trace.prompts == ["first", "high", "normal", "low"]


async def test_aging_uses_the_scheduler_clock() -> None:
    now = [1000.0]
    trace = Trace()
    with gate() as g:
        async with Scheduler(
            [sim("m", gate=g, on_call=trace)], aging_s=1.0, clock=lambda: now[0]
        ) as zs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(zs.complete, "first")
                await wait_until(lambda: busy(zs, "m") == 1)
                tg.start_soon(lambda: zs.complete("patient", kind="simple", priority=Priority.LOW))
                await wait_until(lambda: queued(zs, "m") == 1)
                now[0] += 5.0  # the LOW request has now waited 5 aging periods
                tg.start_soon(lambda: zs.complete("urgent", kind="simple", priority=Priority.HIGH))
                await wait_until(lambda: queued(zs, "m") == 2)
                g.set()
    assert trace.prompts == ["first", "patient", "urgent"]


# -- admission ------------------------------------------------------------------------------------
async def test_overloaded_when_every_capable_mailbox_is_full() -> None:
    with gate() as g:
        async with Scheduler([sim("m", gate=g)], mailbox_capacity=1) as zs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(zs.complete, "running")
                await wait_until(lambda: busy(zs, "m") == 1)
                tg.start_soon(zs.complete, "queued")
                await wait_until(lambda: queued(zs, "m") == 1)
                with pytest.raises(Overloaded) as info:
                    await zs.complete("refused")
                assert info.value.retry_after > 0
                g.set()
    snap = zs.recorder.snapshot()
    assert snap.rejections == {"simple": 1}
    assert snap.requests[("none", "simple", "overloaded")] == 1
    assert snap.requests[("m", "simple", "ok")] == 2


async def test_admission_can_wait_for_room() -> None:
    results: list[str] = []
    with gate() as g:
        async with Scheduler([sim("m", gate=g)], mailbox_capacity=1, admission_timeout=None) as zs:

            async def call(prompt: str) -> None:
                results.append((await zs.complete(prompt, kind="simple")).model)

            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "running")
                await wait_until(lambda: busy(zs, "m") == 1)
                tg.start_soon(call, "queued")
                await wait_until(lambda: queued(zs, "m") == 1)
                tg.start_soon(call, "waiting")
                await anyio.wait_all_tasks_blocked()
                assert queued(zs, "m") == 1  # still waiting for room, not refused
                g.set()
    assert results == ["m", "m", "m"]


async def test_admission_wait_gives_up_with_overloaded() -> None:
    with gate() as g:
        async with Scheduler([sim("m", gate=g)], mailbox_capacity=1) as zs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(zs.complete, "running")
                await wait_until(lambda: busy(zs, "m") == 1)
                tg.start_soon(zs.complete, "queued")
                await wait_until(lambda: queued(zs, "m") == 1)
                with pytest.raises(Overloaded):
                    await zs.complete("impatient", admission_timeout=0.02)
                g.set()


class CountingDynamic:
    """The kernel's decision, counting how often the router asks for one."""

    name = "counting"

    def __init__(self) -> None:
        self.calls = 0

    def choose(self, request: RouteRequest, table: Any, candidates: Sequence[Any]) -> int | None:
        self.calls += 1
        return DynamicPolicy().choose(request, table, candidates)


async def fill_then_wait(
    zs: Scheduler, tg: anyio.abc.TaskGroup, waiters: Sequence[tuple[str, str, Priority]]
) -> None:
    """Fill model ``m`` (one running, one queued in a mailbox of one), then start ``waiters``
    (``(prompt, kind, priority)``) a millisecond or more apart, each waiting for room."""
    tg.start_soon(zs.complete, "running")
    await wait_until(lambda: busy(zs, "m") == 1)
    tg.start_soon(zs.complete, "queued")
    await wait_until(lambda: queued(zs, "m") == 1)
    for prompt, kind, priority in waiters:
        tg.start_soon(lambda p=prompt, k=kind, q=priority: zs.complete(p, kind=k, priority=q))
        await anyio.wait_all_tasks_blocked()
        await anyio.sleep(0.001)


async def test_waiting_for_room_admits_in_arrival_order_without_waking_every_waiter() -> None:
    # Each freed slot must admit the oldest waiter, not wake all of them to race for it: that
    # costs a routing decision per waiter per slot, quadratic in the number waiting.
    waiting = 40
    trace = Trace()
    policy = CountingDynamic()
    with gate() as g:
        async with Scheduler(
            [sim("m", gate=g, on_call=trace)], policy=policy, mailbox_capacity=1,
            admission_timeout=None,
        ) as zs:  # fmt: skip
            async with anyio.create_task_group() as tg:
                normal = Priority.NORMAL
                await fill_then_wait(zs, tg, [(f"w{i}", "simple", normal) for i in range(waiting)])
                before = policy.calls
                g.set()
    assert trace.prompts == ["running", "queued", *(f"w{i}" for i in range(waiting))]
    assert policy.calls - before <= 2 * waiting


async def test_waiting_requests_of_every_kind_are_admitted_oldest_first() -> None:
    # The lines used to be served in kind order (simple, code, embed, reason): while a surge of
    # code and simple kept the mailboxes full, each freed slot went to them and reasoning
    # starved. Now the oldest waiter takes the room, whatever its kind.
    waiters = [("reason-0", "reason"), ("code-1", "code"), ("simple-2", "simple"),
               ("reason-3", "reason"), ("simple-4", "simple")]  # fmt: skip
    trace = Trace()
    with gate() as g:
        async with Scheduler(
            [sim("m", gate=g, on_call=trace)], mailbox_capacity=1, admission_timeout=None
        ) as zs:
            async with anyio.create_task_group() as tg:
                await fill_then_wait(zs, tg, [(p, k, Priority.NORMAL) for p, k in waiters])
                g.set()
    assert trace.prompts == ["running", "queued", *(p for p, _ in waiters)]


@pytest.mark.parametrize("aging_s", [math.inf, 1e-4])
async def test_waiting_requests_are_admitted_by_priority_then_age(aging_s: float) -> None:
    # As in the mailbox: the lowest class minus time waited over aging_s first. Without aging,
    # class first; with aging so fast that a millisecond outweighs ten classes, arrival order.
    high, normal, low = Priority.HIGH, Priority.NORMAL, Priority.LOW
    waiters = [("low-reason", "reason", low), ("normal-code", "code", normal),
               ("high-simple", "simple", high), ("low-code", "code", low),
               ("high-code", "code", high)]  # fmt: skip
    trace = Trace()
    with gate() as g:
        async with Scheduler(
            [sim("m", gate=g, on_call=trace)], mailbox_capacity=1, admission_timeout=None,
            aging_s=aging_s,
        ) as zs:  # fmt: skip
            async with anyio.create_task_group() as tg:
                await fill_then_wait(zs, tg, waiters)
                g.set()
    by_class = ["high-simple", "high-code", "normal-code", "low-reason", "low-code"]
    expected = by_class if aging_s == math.inf else [p for p, _, _ in waiters]
    assert trace.prompts == ["running", "queued", *expected]


async def test_a_policy_that_raises_for_one_waiter_fails_only_that_request() -> None:
    class BrokenForReasonWithRoom:
        name = "broken"

        def choose(
            self, request: RouteRequest, table: Any, candidates: Sequence[Any]
        ) -> int | None:
            if request.kind is Kind.REASON and table.available(0):
                raise KeyError("policy bug")
            return DynamicPolicy().choose(request, table, candidates)

    trace = Trace()
    outcomes: dict[str, object] = {}

    async def run(prompt: str, kind: str) -> None:
        try:
            outcomes[prompt] = (await zs.complete(prompt, kind=kind)).model
        except KeyError as exc:
            outcomes[prompt] = exc

    with gate() as g:
        async with Scheduler(
            [sim("m", gate=g, on_call=trace)], policy=BrokenForReasonWithRoom(),
            mailbox_capacity=1, admission_timeout=None,
        ) as zs:  # fmt: skip
            async with anyio.create_task_group() as tg:
                await fill_then_wait(zs, tg, [])
                for prompt, kind in (("reason-0", "reason"), ("code-1", "code")):
                    tg.start_soon(run, prompt, kind)
                    await anyio.wait_all_tasks_blocked()
                g.set()
    assert isinstance(outcomes["reason-0"], KeyError)  # its caller gets the policy's error
    assert outcomes["code-1"] == "m"  # and the line goes on
    assert trace.prompts == ["running", "queued", "code-1"]


async def test_room_freed_for_an_embedding_goes_to_a_waiter_not_a_newcomer() -> None:
    # Taking an embedding from a full mailbox frees room before the embedding's call runs; the
    # requests waiting for that room must get it before the call lets a newcomer in.
    trace = Trace()
    hold = {"e0": threading.Event(), "e1": threading.Event()}

    def on_call(op: str, text: str) -> None:
        trace(op, text)
        if text in hold:
            hold[text].wait(10)

    try:
        async with Scheduler(
            [sim("emb", kinds=("embed",), on_call=on_call)], mailbox_capacity=1,
            admission_timeout=None,
        ) as zs:  # fmt: skip
            async with anyio.create_task_group() as tg:
                tg.start_soon(zs.embed, "e0")
                await wait_until(lambda: trace.prompts == ["e0"])
                tg.start_soon(zs.embed, "e1")
                await wait_until(lambda: queued(zs, "emb") == 1)
                tg.start_soon(zs.embed, "waiter")
                await anyio.wait_all_tasks_blocked()
                hold["e0"].set()
                await wait_until(lambda: "e1" in trace.prompts)
                tg.start_soon(zs.embed, "newcomer")
                await anyio.wait_all_tasks_blocked()
                hold["e1"].set()
    finally:
        for event in hold.values():
            event.set()
    assert trace.prompts == ["e0", "e1", "waiter", "newcomer"]


async def test_waiters_of_one_kind_do_not_hold_up_another_kind() -> None:
    trace = Trace()
    with gate() as code_gate, gate() as reason_gate:
        specs = [
            sim("coder", kinds=("simple", "code"), gate=code_gate, on_call=trace),
            sim("reasoner", kinds=("reason",), gate=reason_gate, on_call=trace),
        ]
        async with Scheduler(specs, mailbox_capacity=1, admission_timeout=None) as zs:
            async with anyio.create_task_group() as tg:
                for model, kind in (("coder", "code"), ("reasoner", "reason")):
                    tg.start_soon(lambda k=kind: zs.complete(f"{k}-running", kind=k))
                    await wait_until(lambda m=model: busy(zs, m) == 1)
                    tg.start_soon(lambda k=kind: zs.complete(f"{k}-queued", kind=k))
                    await wait_until(lambda m=model: queued(zs, m) == 1)
                tg.start_soon(lambda: zs.complete("code-waiting", kind="code"))
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(lambda: zs.complete("reason-waiting", kind="reason"))
                await anyio.wait_all_tasks_blocked()
                reason_gate.set()  # only the reasoner frees room; the older code waiter stays
                await wait_until(lambda: "reason-waiting" in trace.prompts)
                assert "code-waiting" not in trace.prompts
                code_gate.set()
    assert "code-waiting" in trace.prompts


# -- deadlines ------------------------------------------------------------------------------------
async def test_a_request_whose_deadline_passes_in_the_queue_never_runs() -> None:
    trace = Trace()
    with gate() as g:
        async with Scheduler([sim("m", gate=g, on_call=trace)]) as zs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(zs.complete, "running")
                await wait_until(lambda: busy(zs, "m") == 1)
                with pytest.raises(DeadlineExceeded):
                    await zs.complete("late", deadline=zs.clock() + 0.05)
                assert queued(zs, "m") == 0
                g.set()
            await zs.complete("after")
    assert trace.prompts == ["running", "after"]
    assert zs.recorder.snapshot().requests[("m", "simple", "deadline_exceeded")] == 1


async def test_a_running_request_past_its_deadline_fails_and_stops_generating() -> None:
    opened = Opened()
    async with Scheduler([sim("m", per_output_token_s=0.002)], backend_factory=opened) as zs:
        with pytest.raises(DeadlineExceeded):
            await zs.complete("long", max_tokens=100_000, deadline=zs.clock() + 0.05)
        await wait_until(lambda: zs.snapshot().models[0].completed == 1)
        assert (await zs.complete("next", max_tokens=1)).text
    stopped = opened.completions[0]
    assert stopped.finish_reason == "cancelled" and stopped.completion_tokens < 100_000


async def test_deadline_in_the_past_is_invalid() -> None:
    async with Scheduler([sim("m")]) as zs:
        with pytest.raises(InvalidRequestError):
            await zs.complete("x", deadline=zs.clock() - 1)


# -- cancellation ---------------------------------------------------------------------------------
async def test_cancelling_a_queued_request_removes_it() -> None:
    trace = Trace()
    with gate() as g:
        async with Scheduler([sim("m", gate=g, on_call=trace)]) as zs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(zs.complete, "running")
                await wait_until(lambda: busy(zs, "m") == 1)
                with anyio.CancelScope() as scope:
                    tg.start_soon(lambda: _cancel_when(zs, scope, lambda: queued(zs, "m") == 1))
                    await zs.complete("doomed")
                assert scope.cancelled_caught
                assert queued(zs, "m") == 0
                g.set()
    assert trace.prompts == ["running"]
    assert zs.recorder.snapshot().requests[("m", "simple", "cancelled")] == 1


async def _cancel_when(
    zs: Scheduler, scope: anyio.CancelScope, predicate: Callable[[], bool]
) -> None:
    await wait_until(predicate)
    scope.cancel()


async def test_cancelling_a_running_request_drops_the_result_and_frees_the_context() -> None:
    with gate() as g:
        async with Scheduler([sim("m", gate=g)]) as zs:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(lambda: _cancel_when(zs, scope, lambda: busy(zs, "m") == 1))
                    await zs.complete("abandoned")
            assert scope.cancelled_caught
            assert busy(zs, "m") == 1  # the thread is still inside the call
            g.set()
            await wait_until(lambda: busy(zs, "m") == 0)
            assert (await zs.complete("next", kind="simple")).model == "m"
            assert zs.snapshot().models[0].completed == 2
    requests = zs.recorder.snapshot().requests
    assert requests[("m", "simple", "cancelled")] == 1 and requests[("m", "simple", "ok")] == 1


async def test_closing_a_stream_stops_generation_at_the_next_token() -> None:
    opened = Opened()
    async with Scheduler([sim("m", per_output_token_s=0.001)], backend_factory=opened) as zs:
        async with zs.stream("go on forever", kind="simple", max_tokens=100_000) as stream:
            got = [piece async for piece, _ in _zip(stream, range(3))]
        assert len(got) == 3
        await wait_until(lambda: zs.snapshot().models[0].completed == 1)
    (completion,) = opened.completions
    assert completion.finish_reason == "cancelled" and completion.completion_tokens < 100_000
    assert zs.recorder.snapshot().requests[("m", "simple", "cancelled")] == 1


async def test_dropping_a_stream_without_closing_it_stops_generation() -> None:
    opened = Opened()
    async with Scheduler([sim("m", per_output_token_s=0.001)], backend_factory=opened) as zs:
        async for _ in zs.stream("forever", kind="simple", max_tokens=100_000):
            break
        gc.collect()
        # Generation stops at its next token (the backend ends the sequence as cancelled) or,
        # when the actor is between step jobs at that moment, at the step boundary (it frees
        # the slot). Either way the slot is free long before 100,000 tokens.
        await wait_until(lambda: zs.snapshot().models[0].in_flight == 0)
        await wait_until(lambda: sum(zs.recorder.snapshot().requests.values()) == 1)
    assert all(
        c.finish_reason == "cancelled" and c.completion_tokens < 100_000 for c in opened.completions
    )
    assert zs.recorder.snapshot().requests == {("m", "simple", "cancelled"): 1}


async def _zip(stream: AsyncIterator[str], bound: range) -> AsyncIterator[tuple[str, int]]:
    for i in bound:
        yield await stream.__anext__(), i


# -- lifecycle ------------------------------------------------------------------------------------
async def test_runs_inside_an_application_task_group() -> None:
    async with anyio.create_task_group() as tg:
        zs = await tg.start(Scheduler([sim("m")]).run)
        assert isinstance(zs, Scheduler) and zs.running
        assert (await zs.complete("hi")).model == "m"
        await zs.aclose()
        assert not zs.running
    with pytest.raises(SchedulerClosed):
        await zs.complete("too late")


async def test_cancelling_the_application_task_group_shuts_down_cleanly() -> None:
    async with anyio.create_task_group() as tg:
        zs = await tg.start(Scheduler([sim("m")]).run)
        await zs.complete("hi")
        tg.cancel_scope.cancel()
    assert all(m.state is ActorState.STOPPED for m in zs.snapshot().models)


async def test_shutdown_fails_queued_requests_and_bounds_running_ones() -> None:
    outcomes: list[str] = []
    with gate() as g:
        async with anyio.create_task_group() as tg:
            sched = Scheduler(
                [sim("m", gate=g)], mailbox_capacity=1, admission_timeout=None,
                supervision=Supervision(shutdown_timeout_s=0.05),
            )  # fmt: skip
            zs = await tg.start(sched.run)

            async def call(prompt: str) -> None:
                try:
                    await zs.complete(prompt)
                    outcomes.append("ok")
                except SchedulerClosed:
                    outcomes.append("closed")

            tg.start_soon(call, "running")
            await wait_until(lambda: busy(zs, "m") == 1)
            tg.start_soon(call, "queued")
            await wait_until(lambda: queued(zs, "m") == 1)
            tg.start_soon(call, "waiting for room")
            await anyio.wait_all_tasks_blocked()
            await zs.aclose()  # the running call never returns in time
        assert outcomes == ["closed", "closed", "closed"]


async def test_body_exceptions_propagate_unwrapped() -> None:
    with pytest.raises(KeyError):
        async with Scheduler([sim("m")]):
            raise KeyError("mine")


async def test_a_model_that_fails_to_load_fails_startup() -> None:
    specs = [sim("ok"), sim("broken", failures=FailurePlan(open_script=["fail"]))]
    with pytest.raises(ModelLoadError):
        async with Scheduler(specs):
            pytest.fail("must not start")
    # zeta's own worker threads are gone (the event loop's thread cache may keep its own).
    await wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("zeta-")])


def optional(name: str, plan: FailurePlan, replicas: int = 1, **kw: Any) -> ModelSpec:
    """A simulated model that may fail to load without stopping the scheduler."""
    return ModelSpec(
        name, path=f"/models/{name}.gguf", kinds=set(kw.pop("kinds", ALL)),
        preferred=set(kw.pop("preferred", ())), replicas=replicas, backend="simulated",
        options={"failures": plan, **kw}, optional=True,
    )  # fmt: skip


FAST_PROBES = Supervision(probe_interval_s=0.001)


async def test_an_optional_model_that_fails_to_load_is_down_and_the_rest_start(
    captured_logs: list[dict[str, Any]],
) -> None:
    never = FailurePlan(p_open_fail=1.0)  # every open fails: the file stays bad
    specs = [
        sim("coder", preferred=("simple", "code")),
        optional("reasoner", never, replicas=2, preferred=("reason",)),
        sim("embedder", kinds=("embed",)),
    ]
    # Callers would wait for room as long as it takes: an unavailable model must not make them.
    async with Scheduler(
        specs, policy="static", supervision=FAST_PROBES, admission_timeout=None
    ) as zs:
        states = [(m.name, m.replica, m.state) for m in zs.snapshot().models]
        assert states == [
            ("coder", 0, ActorState.READY),
            ("reasoner", 0, ActorState.DOWN),
            ("reasoner", 1, ActorState.DOWN),
            ("embedder", 0, ActorState.READY),
        ]
        assert (await zs.complete("def f():", kind="code")).model == "coder"
        assert (await zs.embed("text")).model == "embedder"
        # "static" serves reasoning on the reasoner only: unavailable, at once.
        with anyio.fail_after(10), pytest.raises(ModelUnavailable, match="reasoner"):
            await zs.complete("why?", kind="reason")
        # It is probed (and stays down while the file is bad).
        await wait_until(lambda: never.opens >= 6)
        assert {m.state for m in zs.snapshot().by_model("reasoner")} == {ActorState.DOWN}
    (warning,) = [e for e in captured_logs if e["event"] == "model_load_failed"]
    assert warning["log_level"] == "warning"
    assert (warning["model"], warning["path"], warning["replicas"]) == (
        "reasoner", "/models/reasoner.gguf", [0, 1],
    )  # fmt: skip
    assert "/models/reasoner.gguf" in warning["error"]
    requests = zs.recorder.snapshot().requests
    assert requests[("none", "reason", "unavailable")] == 1
    assert requests[("coder", "code", "ok")] == 1


async def test_an_optional_model_joins_once_its_file_loads() -> None:
    plan = FailurePlan(open_script=["fail", "fail"])  # startup and the first probe fail
    async with Scheduler(
        [sim("a"), optional("b", plan)], policy="round_robin", supervision=FAST_PROBES
    ) as zs:
        assert [m.state for m in zs.snapshot().models] == [ActorState.READY, ActorState.DOWN]
        assert (await zs.complete("x", kind="simple")).model == "a"
        await wait_until(lambda: zs.snapshot().models[1].state is ActorState.READY)
        assert {(await zs.complete("y", kind="simple")).model for _ in range(4)} == {"a", "b"}
    assert plan.opens == 3
    assert zs.snapshot().models[1].restarts == 0  # it never ran, so it never restarted


def _raising_factory(spec: ModelSpec, replica: int) -> Any:
    if spec.name == "buggy":
        raise RuntimeError("backend bug")
    return open_backend(spec, replica)


def _fails_to_load() -> FailurePlan:
    return FailurePlan(open_script=["fail"])


@pytest.mark.parametrize(
    ("specs", "error", "blamed"),
    [
        (lambda: [optional("opt", _fails_to_load()), sim("req", failures=_fails_to_load())],
         ModelLoadError, "req"),
        (lambda: [optional("a", _fails_to_load()), optional("b", _fails_to_load())],
         ModelLoadError, "/models/a.gguf"),
        (lambda: [sim("ok"), optional("buggy", FailurePlan())], RuntimeError, "backend bug"),
        (lambda: [sim("ok"), optional("bad", FailurePlan(), load_s=-1)], ConfigError,
         "options.load_s"),
    ],
    ids=["a required model fails too", "every model fails", "not a load error", "bad options"],
)  # fmt: skip
async def test_startup_still_fails_unless_only_optional_model_files_failed(
    specs: Callable[[], list[ModelSpec]], error: type[Exception], blamed: str
) -> None:
    before = set(threading.enumerate())
    with pytest.raises(error, match=f"^{blamed}"):
        async with Scheduler(specs(), backend_factory=_raising_factory, supervision=FAST_PROBES):
            pytest.fail("must not start")
    # Every context's worker thread ("zeta-<model>-<replica>") ends.
    await wait_until(
        lambda: not [t for t in set(threading.enumerate()) - before if t.name.startswith("zeta-")]
    )


@pytest.mark.parametrize("worker", ["thread", "to_thread"])
async def test_a_failed_startup_closes_the_contexts_that_did_open_before_raising(
    worker: str,
) -> None:
    # "slow" is still loading when "broken" fails: startup must not raise (and leave the user free
    # to retry, loading it twice) while a thread of the failed scheduler still loads weights.
    opened = Opened()
    specs = [sim("broken", failures=FailurePlan(open_script=["fail"])), sim("slow", load_s=0.1)]
    with pytest.raises(ModelLoadError):
        async with Scheduler(specs, backend_factory=opened, worker=worker):  # type: ignore[arg-type]
            pytest.fail("must not start")
    assert [b.spec.name for b in opened.backends] == ["slow"]
    assert opened.backends[0]._closed


@pytest.mark.parametrize("worker", ["thread", "to_thread"])
async def test_cancelling_startup_neither_hangs_nor_leaves_a_context_open(worker: str) -> None:
    opened = Opened()
    patient = Supervision(shutdown_timeout_s=60.0)
    with anyio.fail_after(10):  # not a timing: a hang would wait out the 60 s shutdown timeout
        with anyio.move_on_after(0.02) as scope:
            async with Scheduler(
                [sim("slow", load_s=0.2)], backend_factory=opened, supervision=patient,
                worker=worker,  # type: ignore[arg-type]
            ):  # fmt: skip
                pytest.fail("must not start")
    assert scope.cancelled_caught
    if worker == "thread":  # the pool's abandoned thread finishes loading on its own
        await wait_until(lambda: [b._closed for b in opened.backends] == [True])


async def test_a_scheduler_runs_once() -> None:
    zs = Scheduler([sim("m")])
    async with zs:
        pass
    with pytest.raises(RuntimeError):
        async with zs:
            pass


async def test_requests_before_start_are_refused() -> None:
    zs = Scheduler([sim("m")])
    with pytest.raises(SchedulerClosed):
        await zs.complete("early")


# -- invalid input --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"prompt": ""},
        {"prompt": 3},
        {"prompt": "x", "kind": "poetry"},
        {"prompt": "x", "kind": "embed"},
        {"prompt": "x", "max_tokens": 0},
        {"prompt": "x", "max_tokens": 2.5},
        {"prompt": "x", "priority": 7},
        {"prompt": "x", "difficulty": 1.5},
        {"prompt": "x", "stop": "END"},
        {"prompt": "x", "stop": 5},
        {"prompt": "x", "stop": ["END", 5]},
        {"prompt": "x", "temperature": -1},
        {"prompt": "x", "deadline": "soon"},
        {"prompt": "x", "deadline": float("nan")},
        {"prompt": "x", "deadline": 10**400},
        {"prompt": "x", "admission_timeout": -1},
        {"prompt": "x", "admission_timeout": 10**400},
        {"prompt": "x", "max_tokens": 10**400},
        {"prompt": "x", "temperature": 10**400},
        {"prompt": "x", "temperature": float("inf")},
        {"prompt": "x", "difficulty": 10**400},
        {"prompt": "x", "priority": 10**400},
        {"prompt": "x\ud800y"},
        {"prompt": "x", "stop": ["\udfff"]},
        {"prompt": "x", "max_token": 5},
    ],
)
@pytest.mark.parametrize("call", ["complete", "stream"])
async def test_invalid_requests_fail_at_the_call_and_are_counted(
    kwargs: dict[str, Any], call: str
) -> None:
    trace = Trace()
    async with Scheduler([sim("m", on_call=trace)]) as zs:
        with pytest.raises(InvalidRequestError):
            if call == "complete":
                await zs.complete(**kwargs)
            else:
                zs.stream(**kwargs)  # no iteration: the call itself raises
    assert trace.calls == []
    assert sum(zs.recorder.snapshot().requests.values()) == 1
    ((_, _, outcome),) = zs.recorder.snapshot().requests
    assert outcome == Outcome.INVALID.value


@pytest.mark.parametrize(
    "kwargs",
    [
        {"texts": ["ok", "bad\ud800"]},
        {"texts": [""]},
        {"texts": "x", "admission_timeout": -1.0},
        {"texts": "x", "kind": "embed"},
    ],
)
async def test_invalid_embeddings_fail_at_the_call_and_are_counted(kwargs: dict[str, Any]) -> None:
    trace = Trace()
    async with Scheduler([sim("m", on_call=trace)]) as zs:
        with pytest.raises(InvalidRequestError):
            await zs.embed(**kwargs)
        assert (await zs.complete("still serving", kind="simple")).model == "m"
    assert trace.prompts == ["still serving"]
    assert zs.recorder.snapshot().requests == {
        ("none", "embed", "invalid"): 1, ("m", "simple", "ok"): 1,
    }  # fmt: skip


async def test_auto_falls_back_to_a_served_kind() -> None:
    async with Scheduler([sim("chat", kinds=("simple",))]) as zs:
        result = await zs.complete("Explain step by step why primes are infinite; prove it.")
    assert (result.model, result.kind) == ("chat", Kind.SIMPLE)


async def test_no_capable_model() -> None:
    async with Scheduler([sim("coder", kinds=("code",))]) as zs:
        with pytest.raises(NoCapableModelError):
            await zs.embed("x")
        with pytest.raises(NoCapableModelError):
            await zs.complete("Why? Prove it, step by step.", kind="reason")
        with pytest.raises(InvalidRequestError):
            await zs.embed([])
        with pytest.raises(NoCapableModelError):
            zs.stream("x", kind="simple")


# -- telemetry ------------------------------------------------------------------------------------
async def test_spills_are_counted_and_logged(captured_logs: list[dict[str, Any]]) -> None:
    with gate() as g:
        specs = [
            sim("coder", preferred=("simple", "code"), gate=g),
            sim("reasoner", preferred=("reason",)),
        ]
        async with Scheduler(specs, policy="dynamic", scoring=Scoring(spill_penalty=0.0)) as zs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: zs.complete("print('busy')", kind="code"))
                await wait_until(lambda: busy(zs, "coder") == 1)
                spilled = await zs.complete("secret prompt text", kind="code")
                g.set()
    assert spilled.model == "reasoner"
    assert zs.recorder.snapshot().spills == {("coder", "reasoner"): 1}
    finished = [e for e in captured_logs if e["event"] == "request_finished"]
    assert len(finished) == 2
    line = next(e for e in finished if e["request_id"] == spilled.request_id)
    assert line["model"] == "reasoner" and line["kind"] == "code" and line["outcome"] == "ok"
    assert line["spilled_from"] == "coder" and line["queue_wait_s"] >= 0 and line["service_s"] >= 0
    assert "secret prompt text" not in repr(captured_logs)


async def test_sampler_readings_reach_the_kernel() -> None:
    class Fixed:
        def sample(self, actors: Sequence[Any], now: float) -> list[float]:
            return [0.25 + 0.5 * i for i in range(len(actors))]

    async with Scheduler([sim("a"), sim("b")], sampler=Fixed(), sample_interval=0.01) as zs:
        await wait_until(lambda: [m.utilisation for m in zs.snapshot().models] == [0.25, 0.75])


# -- continuous batching --------------------------------------------------------------------------
async def test_requests_in_flight_share_the_slots_of_one_context() -> None:
    async with Scheduler([sim("m", slots=4, per_output_token_s=0.0005)]) as zs:
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(lambda i=i: zs.complete(f"prompt {i}", max_tokens=20))
    (m,) = zs.snapshot().models
    assert m.slots == 4 and m.generated_tokens == 8 * 20 and m.completed == 8
    assert len(m.steps_by_occupancy) == 4
    assert m.steps_by_occupancy[3] > 0  # steps decoded four sequences at once
    # Eight requests of 20 tokens on 4 slots need at least 40 steps, far fewer than 160.
    assert 40 <= sum(m.steps_by_occupancy) < 160


async def test_one_slot_serves_one_request_at_a_time() -> None:
    async with Scheduler([sim("m", slots=1)]) as zs:
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(lambda i=i: zs.complete(f"prompt {i}", max_tokens=5))
    (m,) = zs.snapshot().models
    assert m.steps_by_occupancy == (20,)


async def test_a_request_with_a_free_slot_does_not_wait_for_a_long_one() -> None:
    async with Scheduler([sim("m", slots=2, per_output_token_s=0.001)]) as zs:
        async with zs.stream("long", max_tokens=100_000) as long:
            first = await long.__anext__()
            short = await zs.complete("short", max_tokens=3)
            assert first and short.completion_tokens == 3
            assert zs.snapshot().models[0].in_flight == 1  # the long one still runs
    assert zs.recorder.snapshot().requests[("m", "simple", "cancelled")] == 1


async def test_cancelling_one_request_leaves_the_others_in_its_batch_untouched() -> None:
    async with Scheduler([sim("m", slots=4, per_output_token_s=0.0005)]) as zs:
        alone = {p: (await zs.complete(p, max_tokens=12)).text for p in ("a", "b", "c")}
        results: dict[str, str] = {}

        async def run(prompt: str) -> None:
            results[prompt] = (await zs.complete(prompt, max_tokens=12)).text

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "a")
            tg.start_soon(run, "b")
            with anyio.CancelScope() as scope:
                async with zs.stream("c", max_tokens=10_000) as s:
                    async for _ in s:
                        if len(results) == 0:
                            continue
                        scope.cancel()
            tg.start_soon(run, "c")
    assert results == alone
    assert zs.snapshot().models[0].in_flight == 0
