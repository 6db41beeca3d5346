"""Supervision: restarts with backoff, retry-once off a dead actor, hangs, down/probe, timers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio
import pytest

from zeta import (
    ActorDead,
    ActorState,
    BackendError,
    CalibrationView,
    ConfigError,
    ModelSpec,
    ModelUnavailable,
    Overloaded,
    Scheduler,
    Supervision,
)
from zeta.backends._base import Completion
from zeta.backends.simulated import FailurePlan, SimulatedCrash

pytestmark = pytest.mark.anyio

ALL = ("simple", "code", "reason")
FAST = Supervision(backoff_initial_s=0.001, backoff_max_s=0.01, probe_interval_s=0.01)


def sim(
    name: str,
    plan: FailurePlan | None = None,
    preferred: Sequence[str] = (),
    slots: int = 1,
    **options: Any,
) -> ModelSpec:
    """A simulated model; one slot unless asked, so "queued" and "running" are unambiguous."""
    opts = dict(options)
    if plan is not None:
        opts["failures"] = plan
    return ModelSpec(
        name,
        kinds=set(ALL),
        preferred=set(preferred),
        slots=slots,
        backend="simulated",
        options=opts,
    )


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll scheduler state (snapshots have no change events) until ``predicate`` holds."""
    with anyio.fail_after(10):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.001)


def state(zs: Scheduler, model: str) -> ActorState:
    return zs.snapshot().by_model(model)[0].state


def restarts(zs: Scheduler, model: str) -> int:
    return zs.snapshot().by_model(model)[0].restarts


@pytest.mark.parametrize("worker", ["thread", "to_thread"])
@pytest.mark.parametrize("failure", ["raise", "die"])
async def test_a_crash_is_retried_on_another_model_and_the_actor_restarts(
    failure: str, worker: str
) -> None:
    plan = FailurePlan(script=[failure])
    async with Scheduler(
        [sim("a", plan), sim("b")],
        policy="round_robin",
        supervision=FAST,
        worker=worker,  # type: ignore[arg-type]
    ) as zs:
        result = await zs.complete("hello", kind="simple")
        assert result.model == "b"
        await wait_until(lambda: state(zs, "a") is ActorState.READY)
        assert restarts(zs, "a") == 1
        # The restarted context serves again (a "die" left the old one dead for good).
        assert {(await zs.complete("again", kind="simple")).model for _ in range(4)} == {"a", "b"}
    assert zs.recorder.snapshot().restarts == {"a": 1}


async def test_without_another_capable_model_the_request_fails_with_actor_dead() -> None:
    async with Scheduler([sim("only", FailurePlan(script=["raise"]))], supervision=FAST) as zs:
        with pytest.raises(ActorDead) as info:
            await zs.complete("x")
        assert isinstance(info.value.__cause__, SimulatedCrash)
        await wait_until(lambda: state(zs, "only") is ActorState.READY)
        assert (await zs.complete("y")).model == "only"
    requests = zs.recorder.snapshot().requests
    assert (
        requests[("only", "simple", "actor_dead")] == 1 and requests[("only", "simple", "ok")] == 1
    )


async def test_a_request_is_retried_only_once() -> None:
    plans = FailurePlan(script=["raise"]), FailurePlan(script=["raise"])
    async with Scheduler(
        [sim("a", plans[0]), sim("b", plans[1]), sim("c")], policy="round_robin", supervision=FAST
    ) as zs:
        with pytest.raises(ActorDead):
            await zs.complete("unlucky", kind="simple")
    assert plans[0].calls == 1 and plans[1].calls == 1


async def test_queued_requests_move_to_another_model_when_the_actor_dies() -> None:
    gate = threading.Event()
    plan = FailurePlan(script=["raise"])
    served: list[str] = []
    try:
        async with Scheduler(
            [sim("a", plan, gate=gate), sim("b", preferred=["reason"])],
            policy="static",
            supervision=FAST,
        ) as zs:
            # "static" sends simple requests to "a" only (the model preferring "simple").
            async def call(prompt: str) -> None:
                served.append((await zs.complete(prompt, kind="simple")).model)

            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(call, f"p{i}")
                await wait_until(lambda: zs.snapshot().by_model("a")[0].queue_len == 2)
                gate.set()  # the running call crashes; its request and the queued two retry
    finally:
        gate.set()
    assert served == ["b", "b", "b"]


async def test_a_crash_fails_over_every_request_in_the_slots() -> None:
    # Four requests decode together on "a"; its context dies after the first token of one of
    # them. The three that streamed nothing are retried on "b"; the stream that did fails.
    plan = FailurePlan(script=["ok", "ok", "ok", "midstream"])
    gate = threading.Event()
    async with Scheduler(
        [
            sim("a", plan, slots=4, gate=gate, per_output_token_s=0.001),
            sim("b", preferred=["reason"]),
        ],
        policy="static",
        supervision=FAST,
    ) as zs:
        served: list[str] = []
        pieces: list[str] = []

        async def call(prompt: str) -> None:
            served.append((await zs.complete(prompt, kind="simple", max_tokens=50)).model)

        async def stream() -> None:
            with pytest.raises(ActorDead):
                async for piece in zs.stream("story", kind="simple", max_tokens=50):
                    pieces.append(piece)

        def load() -> tuple[int, int]:
            a = zs.snapshot().by_model("a")[0]
            return a.in_flight, a.queue_len

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(call, f"p{i}")
            # All three are taken into slots at once; their admission waits at the gate.
            await wait_until(lambda: load() == (3, 0))
            tg.start_soon(stream)
            await wait_until(lambda: load() == (3, 1))
            gate.set()
    assert served == ["b", "b", "b"] and len(pieces) == 1
    requests = zs.recorder.snapshot().requests
    assert requests[("b", "simple", "ok")] == 3 and requests[("a", "simple", "actor_dead")] == 1


async def test_a_stream_that_already_produced_pieces_is_not_retried() -> None:
    plan = FailurePlan(script=["midstream"])
    async with Scheduler([sim("a", plan), sim("b")], policy="round_robin", supervision=FAST) as zs:
        pieces = []
        with pytest.raises(ActorDead):
            async for piece in zs.stream("story", kind="simple", max_tokens=10):
                pieces.append(piece)
        assert len(pieces) == 1
    assert zs.recorder.snapshot().requests[("a", "simple", "actor_dead")] == 1


@pytest.mark.parametrize("worker", ["thread", "to_thread"])
async def test_a_hung_call_is_abandoned_and_the_request_retried(worker: str) -> None:
    plan = FailurePlan(script=["hang"], hang_s=1.0)
    cfg = Supervision(backoff_initial_s=0.001, backoff_max_s=0.01, hang_timeout_s=0.1)
    async with Scheduler(
        [sim("a", plan), sim("b")],
        policy="round_robin",
        supervision=cfg,
        worker=worker,  # type: ignore[arg-type]
    ) as zs:
        assert (await zs.complete("stuck", kind="simple")).model == "b"
        await wait_until(lambda: state(zs, "a") is ActorState.READY)
        assert restarts(zs, "a") == 1
        assert (await zs.complete("fine", kind="simple")).model == "a"


async def test_a_slow_call_that_keeps_producing_tokens_is_not_a_hang() -> None:
    cfg = Supervision(hang_timeout_s=0.1)
    async with Scheduler([sim("a", per_output_token_s=0.001)], supervision=cfg) as zs:
        result = await zs.complete("long", kind="simple", max_tokens=200)  # ~0.2 s in all
        assert result.completion_tokens == 200
        assert restarts(zs, "a") == 0


async def test_backend_errors_fail_the_request_without_a_restart() -> None:
    async with Scheduler([sim("a", FailurePlan(script=["error"]))], supervision=FAST) as zs:
        with pytest.raises(BackendError):
            await zs.complete("x")
        assert (await zs.complete("y")).model == "a"
        assert restarts(zs, "a") == 0
        assert zs.snapshot().models[0].failed == 1


async def test_too_many_restarts_mark_the_model_down_until_a_probe_succeeds() -> None:
    # Two crashes within the window exceed max_restarts=1. The probe draws "ok" only after
    # "hold" is released, so the test can observe the down state first.
    hold = threading.Event()
    plan = FailurePlan(script=["raise", "raise"])
    cfg = Supervision(
        max_restarts=1, window_s=60.0, backoff_initial_s=0.001, backoff_max_s=0.01,
        probe_interval_s=0.01,
    )  # fmt: skip
    opened = 0

    def factory(spec: ModelSpec, replica: int) -> Any:
        nonlocal opened
        from zeta.backends.simulated import open_backend

        opened += 1
        if opened > 2:  # the initial open and one restart go through; probes wait for the test
            hold.wait()
        return open_backend(spec, replica)

    try:
        async with Scheduler([sim("only", plan)], backend_factory=factory, supervision=cfg) as zs:
            for _ in range(2):
                await wait_until(lambda: state(zs, "only") is ActorState.READY)
                with pytest.raises(ActorDead):
                    await zs.complete("x")
            await wait_until(lambda: state(zs, "only") is ActorState.DOWN)
            with pytest.raises(ModelUnavailable):
                await zs.complete("while down")
            hold.set()
            await wait_until(lambda: state(zs, "only") is ActorState.READY)
            assert (await zs.complete("after")).model == "only"
    finally:
        hold.set()
    assert restarts(zs, "only") == 2


async def test_a_failed_reopen_is_retried_with_backoff() -> None:
    plan = FailurePlan(script=["raise"], open_script=["ok", "fail", "ok"])
    async with Scheduler([sim("a", plan), sim("b")], policy="round_robin", supervision=FAST) as zs:
        await zs.complete("x", kind="simple")
        await wait_until(lambda: state(zs, "a") is ActorState.READY)
        assert restarts(zs, "a") == 2
        assert plan.opens == 3


async def test_requests_route_around_a_down_model() -> None:
    plan = FailurePlan(p_die=1.0)  # every call dies; probes too
    cfg = Supervision(max_restarts=0, probe_interval_s=0.01)
    async with Scheduler(
        [sim("bad", plan), sim("good")], policy="round_robin", supervision=cfg
    ) as zs:
        await zs.complete("first", kind="simple")
        await wait_until(lambda: state(zs, "bad") is ActorState.DOWN)
        assert {(await zs.complete("next", kind="simple")).model for _ in range(5)} == {"good"}


# -- down is not full: ModelUnavailable vs Overloaded ---------------------------------------------
def never_loads(name: str, preferred: Sequence[str]) -> ModelSpec:
    """An optional model whose file never loads: down from the start, and after every probe."""
    return ModelSpec(
        name, path=f"/models/{name}.gguf", kinds=set(ALL), preferred=set(preferred),
        backend="simulated", options={"failures": FailurePlan(p_open_fail=1.0)}, optional=True,
    )  # fmt: skip


@pytest.mark.parametrize("how", ["crashed too often", "never loaded"])
async def test_static_refuses_with_model_unavailable_when_its_model_is_down(how: str) -> None:
    # "static" sends code to the coder only; the reasoner can serve code but is not the rule's.
    if how == "crashed too often":
        coder = sim("coder", FailurePlan(p_die=1.0), preferred=["simple", "code"])
    else:
        coder = never_loads("coder", ["simple", "code"])
    cfg = Supervision(max_restarts=0, probe_interval_s=3600.0)
    async with Scheduler(
        [coder, sim("reasoner", preferred=["reason"])],
        policy="static",
        supervision=cfg,
        admission_timeout=None,  # callers wait for room; a down model must not make them wait
    ) as zs:
        if how == "crashed too often":
            # The request that kills the coder's context is retried on the reasoner.
            assert (await zs.complete("def f():", kind="code")).model == "reasoner"
        await wait_until(lambda: state(zs, "coder") is ActorState.DOWN)
        with anyio.fail_after(10), pytest.raises(ModelUnavailable, match="coder"):
            await zs.complete("def g():", kind="code")
        assert (await zs.complete("why?", kind="reason")).model == "reasoner"
    recorded = zs.recorder.snapshot()
    assert recorded.requests[("none", "code", "unavailable")] == 1
    assert not recorded.rejections  # not an overload


async def test_static_refuses_with_overloaded_when_its_model_is_full() -> None:
    gate = threading.Event()
    try:
        async with Scheduler(
            [
                sim("coder", preferred=["simple", "code"], gate=gate),
                sim("reasoner", preferred=["reason"]),
            ],
            policy="static",
            mailbox_capacity=1,
        ) as zs:
            coder = lambda: zs.snapshot().by_model("coder")[0]  # noqa: E731
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: zs.complete("running", kind="code"))
                await wait_until(lambda: coder().in_flight == 1)
                tg.start_soon(lambda: zs.complete("queued", kind="code"))
                await wait_until(lambda: coder().queue_len == 1)
                with pytest.raises(Overloaded):
                    await zs.complete("refused", kind="code")
                gate.set()
    finally:
        gate.set()
    recorded = zs.recorder.snapshot()
    assert recorded.requests[("none", "code", "overloaded")] == 1
    assert recorded.requests[("coder", "code", "ok")] == 2  # the idle reasoner took none
    assert recorded.rejections == {"code": 1}


@pytest.mark.parametrize(("policy", "hard"), [("threshold", None), ("dynamic", "coder")])
async def test_hard_reasoning_with_the_reasoner_down(policy: str, hard: str | None) -> None:
    # "threshold" never sends reasoning harder than max_spill_difficulty (0.5) to a model that
    # does not prefer it, so with the reasoner down it is unavailable; "dynamic" uses the coder.
    cfg = Supervision(probe_interval_s=3600.0)
    async with Scheduler(
        [sim("coder", preferred=["simple", "code"]), never_loads("reasoner", ["reason"])],
        policy=policy,
        supervision=cfg,
    ) as zs:
        easy = await zs.complete("plan", kind="reason", difficulty=0.2)
        assert easy.model == "coder"
        if hard is None:
            with pytest.raises(ModelUnavailable, match="reasoner"):
                await zs.complete("prove it", kind="reason", difficulty=0.9)
        else:
            assert (await zs.complete("prove it", kind="reason", difficulty=0.9)).model == hard


# -- calibration ----------------------------------------------------------------------------------
class Calibrate:
    def __init__(self, proposal: Mapping[str, float] | None) -> None:
        self.proposal = proposal
        self.views: list[CalibrationView] = []

    async def calibrate(self, view: CalibrationView) -> Mapping[str, float] | None:
        self.views.append(view)
        return self.proposal


async def test_calibration_runs_on_its_timer_and_applies_parameters() -> None:
    calibrator = Calibrate({"tau": 2.5, "spill_penalty": 0.75})
    async with Scheduler([sim("a")], calibrator=calibrator, calibration_interval=0.01) as zs:
        await zs.complete("x")
        await wait_until(lambda: len(calibrator.views) >= 2)
        view = calibrator.views[-1]
        assert [m.name for m in view.snapshot.models] == ["a"]
        assert view.params["tau"] == 2.5 and view.run >= 1
        history = zs.recorder.snapshot()
        assert history.calibration_runs >= 1
        assert history.calibration_params["spill_penalty"] == 0.75


async def test_calibrate_now_and_invalid_proposals() -> None:
    async with Scheduler([sim("a")], calibrator=Calibrate({"contention_weight": 3.0})) as zs:
        assert await zs.calibrate() == {"contention_weight": 3.0}
    async with Scheduler([sim("a")], calibrator=Calibrate(None)) as zs:
        assert await zs.calibrate() == {}
    async with Scheduler([sim("a")], calibrator=Calibrate({"nonsense": 1.0})) as zs:
        with pytest.raises(ConfigError):
            await zs.calibrate()
        assert (await zs.complete("still serving")).model == "a"


async def test_a_failing_calibrator_or_sampler_does_not_stop_the_scheduler(
    captured_logs: list[dict[str, Any]],
) -> None:
    class Broken:
        async def calibrate(self, view: CalibrationView) -> Mapping[str, float] | None:
            raise RuntimeError("calibration bug")

        def sample(self, actors: Sequence[Any], now: float) -> Sequence[float]:
            raise RuntimeError("sampler bug")

    broken = Broken()
    async with Scheduler(
        [sim("a")],
        calibrator=broken,
        calibration_interval=0.01,
        sampler=broken,
        sample_interval=0.01,
    ) as zs:
        await wait_until(
            lambda: {"calibration_failed", "sample_failed"} <= {e["event"] for e in captured_logs}
        )
        assert (await zs.complete("x")).model == "a"


def test_supervision_settings_are_validated() -> None:
    for kwargs in (
        {"max_restarts": -1},
        {"window_s": 0},
        {"backoff_initial_s": -1},
        {"backoff_initial_s": 2.0, "backoff_max_s": 1.0},
        {"hang_timeout_s": 0},
        {"shutdown_timeout_s": float("nan")},
    ):
        with pytest.raises(ConfigError):
            Supervision(**kwargs)  # type: ignore[arg-type]


# -- a failed context must not resurrect what already ended ---------------------------------------
class Trace:
    """Collects the prompt of every backend call that started, from worker threads."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, op: str, text: str) -> None:
        with self._lock:
            self.prompts.append(text)


async def test_a_cancelled_running_request_is_not_rerun_when_its_context_then_crashes() -> None:
    gate = threading.Event()
    on_a, on_b = Trace(), Trace()
    try:
        async with Scheduler(
            [sim("a", FailurePlan(script=["raise"]), gate=gate, on_call=on_a),
             sim("b", on_call=on_b)],
            policy="round_robin",
            supervision=FAST,
        ) as zs:  # fmt: skip
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(lambda: zs.complete("left", kind="simple"))
                    await wait_until(lambda: zs.snapshot().by_model("a")[0].in_flight == 1)
                    scope.cancel()  # the caller leaves while its call runs on "a"
            gate.set()  # ... and then the call crashes the context
            await wait_until(lambda: restarts(zs, "a") == 1)
            await wait_until(lambda: state(zs, "a") is ActorState.READY)
            # "b" serves in mailbox order: anything moved to it earlier has run by now.
            while (await zs.complete("marker", kind="simple")).model != "b":
                pass
    finally:
        gate.set()
    assert on_a.prompts[0] == "left"
    assert "left" not in on_b.prompts
    assert zs.recorder.snapshot().requests[("a", "simple", "cancelled")] == 1


async def test_a_hung_call_that_resumes_does_not_feed_the_retried_stream() -> None:
    # "a" stalls before its first token; the watchdog gives up and the stream is retried on "b".
    # When "a" later resumes, its tokens must not reach the stream, and it must stop generating.
    stall, hold_b = threading.Event(), threading.Event()
    cfg = Supervision(backoff_initial_s=0.001, backoff_max_s=0.01, hang_timeout_s=0.05)
    factory_calls: list[Any] = []
    finished: list[tuple[str, Completion]] = []

    def factory(spec: ModelSpec, replica: int) -> Any:
        from zeta.backends.simulated import open_backend

        backend = open_backend(spec, replica)
        inner = backend.step

        def step() -> list[tuple[int, Completion]]:
            ended = inner()
            finished.extend((spec.name, completion) for _, completion in ended)
            return ended

        backend.step = step  # type: ignore[method-assign]
        factory_calls.append(backend)
        return backend

    try:
        async with Scheduler(
            [sim("a", gate=stall), sim("b", gate=hold_b)],
            policy="round_robin",
            supervision=cfg,
            backend_factory=factory,
        ) as zs:
            (first,) = [b for b in factory_calls if b.spec.name == "a"]
            async with zs.stream("story", kind="simple", max_tokens=50) as stream:
                pieces: list[str] = []

                async def consume() -> None:
                    async for piece in stream:
                        pieces.append(piece)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(consume)
                    await wait_until(lambda: zs.snapshot().by_model("b")[0].in_flight == 1)
                    stall.set()  # "a" wakes up and generates on its abandoned context
                    await wait_until(lambda: first._closed)  # its call ended, then it closed
                    hold_b.set()
            assert stream.result is not None and stream.result.model == "b"
            assert "".join(pieces) == stream.result.text
            assert len(pieces) == stream.result.completion_tokens == 50
        # The resumed call on "a" stopped at its first token instead of generating all 50.
        ((_, stale),) = [(m, c) for m, c in finished if m == "a"]
        assert stale.finish_reason == "cancelled" and stale.completion_tokens == 1
    finally:
        stall.set()
        hold_b.set()


async def test_a_policy_that_raises_while_retrying_does_not_lose_the_request() -> None:
    class FirstThenBroken:
        name = "first-then-broken"

        def __init__(self) -> None:
            self.calls = 0

        def choose(self, request: Any, table: Any, candidates: Sequence[Any]) -> int | None:
            self.calls += 1
            if self.calls > 1:
                raise KeyError("policy bug")
            return 0

    async with Scheduler(
        [sim("a", FailurePlan(script=["raise"])), sim("b")],
        policy=FirstThenBroken(),
        supervision=FAST,
    ) as zs:
        with anyio.fail_after(10):
            result = await zs.complete("x", kind="simple")
        assert result.model == "b"  # the retry fell back to the kernel's choice
        await wait_until(lambda: state(zs, "a") is ActorState.READY)
