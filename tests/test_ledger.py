"""Exactly once: thousands of random requests, each ends in one result or one typed error.

Random operations (complete, stream, embed), priorities, deadlines, admission timeouts, caller
cancellations, streams abandoned part-way, injected backend errors, crashes, deaths and hangs,
tiny mailboxes (so admission refuses some), and a burst of requests racing the shutdown. What each
caller saw is compared with what the scheduler recorded: the same outcome, counted once. Afterwards
no task and no worker thread of the scheduler may be left.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from concurrent.futures import Future
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.from_thread import start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from zeta import (
    ActorDead,
    BackendError,
    DeadlineExceeded,
    InvalidRequestError,
    ModelSpec,
    ModelUnavailable,
    Overloaded,
    Priority,
    Scheduler,
    SchedulerClosed,
    Supervision,
    ZetaError,
)
from zeta.backends.simulated import FailurePlan

REQUESTS = 2000
SHUTDOWN_BURST = 200

#: What the caller saw -> the outcome the recorder must hold.
RECORDED_AS = {
    "ok": "ok",
    "cancelled": "cancelled",
    "closed_early": "cancelled",
    Overloaded.__name__: "overloaded",
    DeadlineExceeded.__name__: "deadline_exceeded",
    ActorDead.__name__: "actor_dead",
    ModelUnavailable.__name__: "unavailable",
    BackendError.__name__: "error",
    SchedulerClosed.__name__: "closed",
    InvalidRequestError.__name__: "invalid",
}


def models(seed: int) -> list[ModelSpec]:
    def plan(i: int) -> FailurePlan:
        return FailurePlan(
            p_error=0.02, p_raise=0.02, p_die=0.01, p_hang=0.002, hang_s=0.2, seed=seed + i
        )

    sim: dict[str, Any] = {"per_output_token_s": 0.00002}
    return [
        ModelSpec(
            "coder", kinds={"simple", "code", "reason"}, preferred={"simple", "code"}, replicas=2,
            backend="simulated", options={**sim, "failures": plan(0)},
        ),
        ModelSpec(
            "reasoner", kinds={"simple", "code", "reason"}, preferred={"reason"},
            backend="simulated", options={**sim, "failures": plan(1)},
        ),
        ModelSpec("embedder", kinds={"embed"}, backend="simulated", options={"failures": plan(2)}),
    ]  # fmt: skip


def zeta_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("zeta-")}


@pytest.mark.anyio
@pytest.mark.parametrize("policy", ["dynamic", "threshold"])
async def test_every_request_ends_exactly_once(policy: str) -> None:
    rng = random.Random(20240611)
    tasks_before = {t.id for t in anyio.get_running_tasks()}
    supervision = Supervision(
        max_restarts=3, window_s=0.2, backoff_initial_s=0.001, backoff_max_s=0.005,
        probe_interval_s=0.005, hang_timeout_s=0.05, shutdown_timeout_s=2.0,
    )  # fmt: skip
    scheduler = Scheduler(
        models(rng.randrange(1000)), policy=policy, mailbox_capacity=3, supervision=supervision,
        sample_interval=0.01, seed=7,
    )  # fmt: skip
    observed: list[str] = []
    kinds = ["simple", "code", "reason", "auto"]
    prompts = ["hi", "def f(): return 1", "Why? Prove it step by step.", "tell me about queues"]

    async def one_request(zs: Scheduler) -> None:
        op = rng.choice(["complete", "complete", "stream", "embed"])
        deadline_in = rng.choice([None, None, 0.0005, 0.005, 0.5])
        deadline = None if deadline_in is None else zs.clock() + deadline_in
        admission = rng.choice([0.0, 0.01, 0.05, None if deadline is not None else 0.1])
        cancel_after = rng.choice([None, None, None, None, 0.0, 0.0003, 0.003])
        stop_after = rng.choice([None, None, 1, 3])
        common: dict[str, Any] = {
            "priority": rng.choice(list(Priority)),
            "deadline": deadline,
            "admission_timeout": admission,
        }
        outcome: str | None = None
        with anyio.move_on_after(cancel_after if cancel_after is not None else 3600) as scope:
            try:
                if op == "embed":
                    await zs.embed(["a", "b"][: rng.randint(1, 2)], **common)
                    outcome = "ok"
                else:
                    kind = rng.choice(kinds)
                    prompt = rng.choice(prompts)
                    max_tokens = rng.randint(1, 8)
                    if op == "complete":
                        await zs.complete(prompt, kind=kind, max_tokens=max_tokens, **common)
                        outcome = "ok"
                    else:
                        async with zs.stream(
                            prompt, kind=kind, max_tokens=max_tokens, **common
                        ) as s:
                            n = 0
                            async for _ in s:
                                n += 1
                                if stop_after is not None and n >= stop_after:
                                    break
                        outcome = "ok" if s.result is not None else "closed_early"
            except ZetaError as exc:
                outcome = type(exc).__name__
        if outcome is None:
            assert scope.cancelled_caught
            outcome = "cancelled"
        assert outcome in RECORDED_AS, outcome
        observed.append(outcome)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as app:
            zs = await app.start(scheduler.run)
            async with anyio.create_task_group() as callers:
                for i in range(REQUESTS):
                    callers.start_soon(one_request, zs)
                    if i % 4 == 0:
                        await anyio.sleep(0.0005)
            # A burst that races the shutdown.
            async with anyio.create_task_group() as callers:
                for _ in range(SHUTDOWN_BURST):
                    callers.start_soon(one_request, zs)
                await anyio.lowlevel.checkpoint()
                zs.close()
            await zs.aclose()

    # The ledger: one recorded outcome per request, matching what its caller saw.
    total = REQUESTS + SHUTDOWN_BURST
    assert len(observed) == total
    history = scheduler.recorder.snapshot()
    recorded: Counter[str] = Counter()
    for (_, _, outcome), n in history.requests.items():
        recorded[outcome] += n
    expected: Counter[str] = Counter(RECORDED_AS[o] for o in observed)
    assert recorded == expected
    assert sum(recorded.values()) == total

    # The run exercised what it claims to.
    seen = Counter(observed)
    for must in (
        "ok",
        "cancelled",
        "closed_early",
        "Overloaded",
        "DeadlineExceeded",
        "ActorDead",
        "BackendError",
    ):
        assert seen[must] > 0, (must, seen)
    assert sum(history.restarts.values()) > 0

    # Nothing left behind.
    assert {t.id for t in anyio.get_running_tasks()} <= tasks_before
    with anyio.fail_after(10):
        while zeta_threads():  # noqa: ASYNC110 - threads have no events; hung ones end on their own
            await anyio.sleep(0.01)
    for m in scheduler.snapshot().models:
        assert (m.queue_len, m.in_flight, m.state.value) == (0, 0, "stopped")


# -- the same ledger, with interleavings chosen (and shrunk) by Hypothesis -------------------------
class Permits:
    """Backend calls block on entry until the state machine grants them a permit."""

    def __init__(self) -> None:
        self.sem = threading.Semaphore(0)

    def __call__(self, op: str, text: str) -> None:
        self.sem.acquire()


class SchedulerMachine(RuleBasedStateMachine):
    """Submit, cancel, grant backend calls and inject crashes in any order; then drain and check.

    The scheduler runs in a blocking portal's event loop; every rule is one portal call.
    """

    backend = "asyncio"

    def __init__(self) -> None:
        super().__init__()
        self._portal_cm = start_blocking_portal(self.backend)
        self.portal = self._portal_cm.__enter__()
        self.permits = Permits()
        self.plan = FailurePlan()
        self.plans = [FailurePlan(), FailurePlan()]
        opts: dict[str, Any] = {"on_call": self.permits}
        specs = [
            ModelSpec("a", backend="simulated", options={**opts, "failures": self.plans[0]}),
            ModelSpec("b", backend="simulated", options={**opts, "failures": self.plans[1]}),
        ]
        cfg = Supervision(backoff_initial_s=0.0, backoff_max_s=0.0, max_restarts=1000)
        self.zs = Scheduler(specs, mailbox_capacity=2, supervision=cfg, sample_interval=3600)
        self.run_future, _ = self.portal.start_task(self.zs.run)
        self.scopes: dict[int, anyio.CancelScope] = {}
        self.futures: dict[int, Future[str]] = {}
        self.next_id = 0

    async def _request(self, i: int, priority: Priority, scope: anyio.CancelScope) -> str:
        with scope:
            try:
                await self.zs.complete(f"r{i}", kind="simple", max_tokens=1, priority=priority)
                return "ok"
            except ZetaError as exc:
                return type(exc).__name__
        return "cancelled"

    @rule(priority=st.sampled_from(list(Priority)))
    def submit(self, priority: Priority) -> None:
        i = self.next_id
        self.next_id += 1
        scope = self.portal.call(anyio.CancelScope)
        self.scopes[i] = scope
        self.futures[i] = self.portal.start_task_soon(self._request, i, priority, scope)
        self.portal.call(anyio.wait_all_tasks_blocked)

    @precondition(lambda self: self.next_id > 0)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        # Draw from every request ever submitted (which requests are still live depends on
        # thread timing, and Hypothesis needs generation to be deterministic); a finished
        # request ignores the cancel.
        i = data.draw(st.integers(0, self.next_id - 1))
        self.portal.call(self.scopes[i].cancel)

    @rule(n=st.integers(1, 3))
    def grant(self, n: int) -> None:
        self.permits.sem.release(n)

    @rule(model=st.integers(0, 1), how=st.sampled_from(["raise", "error", "die"]))
    def fail_next_call(self, model: int, how: str) -> None:
        self.plans[model]._script.append(how)

    @invariant()
    def nothing_is_counted_twice(self) -> None:
        recorded = sum(self.zs.recorder.snapshot().requests.values())
        assert recorded <= self.next_id

    def teardown(self) -> None:
        try:
            self.permits.sem.release(10_000)  # let every held and future call through
            for f in self.futures.values():
                f.result(timeout=10)
            self.portal.call(self.zs.aclose)
            self.run_future.result(timeout=10)
            seen = Counter(f.result() for f in self.futures.values())
            recorded: Counter[str] = Counter()
            for (_, _, outcome), n in self.zs.recorder.snapshot().requests.items():
                recorded[outcome] += n
            assert recorded == Counter(RECORDED_AS[o] for o in seen.elements())
        finally:
            self._portal_cm.__exit__(None, None, None)


SchedulerMachine.TestCase.settings = settings(
    max_examples=15, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
TestSchedulerMachineAsyncio = SchedulerMachine.TestCase


class TrioSchedulerMachine(SchedulerMachine):
    backend = "trio"


TestSchedulerMachineTrio = TrioSchedulerMachine.TestCase
