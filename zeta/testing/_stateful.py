"""A Hypothesis state machine of the :class:`~zeta.Scheduler`, reusable for your own policies.

The machine runs a real scheduler over simulated backends on an event loop in a background
thread (``anyio.from_thread.start_blocking_portal``), and Hypothesis drives it from the test's
thread: it submits completions, streams and embeddings of random kinds, priorities, deadlines and
admission timeouts, cancels some, holds models busy, and injects backend failures (errors,
crashes, dead contexts, failed reopens). After every step it checks that

* every answer came from a model that serves the request's kind (and, for a stream, that the
  pieces add up to the text);
* every ending is a result, a typed :class:`~zeta.ZetaError` or the caller's own cancellation,
  and happens exactly once;
* snapshots are consistent: no negative counts, at most one call in flight per context, no
  mailbox over capacity;

and, at quiescent points and after closing, that the scheduler's own ledger (its
:class:`~zeta.Recorder`) counts every request exactly once with the outcome the caller saw, that
nothing is left queued or running, and that every worker thread has exited.

Test your own policy with it::

    from hypothesis import settings
    from zeta.testing._stateful import scheduler_state_machine

    TestMyPolicy = scheduler_state_machine(MyPolicy, anyio_backend="trio").TestCase
    TestMyPolicy.settings = settings(max_examples=20, stateful_step_count=30, deadline=None)

Requires ``hypothesis`` (a test dependency, not a runtime one).
"""

from __future__ import annotations

import math
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from .._exceptions import BackendError, InvalidRequestError, ModelLoadError, ZetaError
from .._policies import Policy
from .._request import CompletionResult, EmbeddingResult
from .._scheduler import Scheduler
from .._snapshot import ActorState, SchedulerSnapshot
from .._supervisor import Supervision
from .._types import Kind, ModelSpec, Priority
from ..backends._base import Completion, CompletionParams, Embedding, TokenCallback
from ..backends.simulated import SimulatedBackend, SimulatedCrash, open_backend
from ..telemetry._recorder import Outcome
from ._replay import outcome_of

__all__ = ["FaultInjector", "SchedulerStateMachine", "machine_models", "scheduler_state_machine"]

#: Faults a call can be given: a failed call (context fine), a crash, a context that stays dead.
CALL_FAULTS = ("error", "crash", "die")
#: Seconds to wait for the scheduler to settle before declaring something hung.
SETTLE_TIMEOUT_S = 20.0


def machine_models(gates: dict[str, threading.Event]) -> list[ModelSpec]:
    """The models the machine schedules onto; ``gates`` gets one open gate per model.

    A coder with two replicas and a reasoner (both serve every completion kind, each prefers its
    own), a ``sprinter`` that serves only ``simple`` (so routing a harder kind to it is a visible
    bug) and an embedder. Coder and reasoner batch 2 and 3 requests per context (continuous
    batching), the sprinter one. Calls take a millisecond or two.
    """
    shapes = [
        ("coder", {Kind.SIMPLE, Kind.CODE, Kind.REASON}, {Kind.SIMPLE, Kind.CODE}, 1, 2, 2),
        ("reasoner", {Kind.SIMPLE, Kind.CODE, Kind.REASON}, {Kind.REASON}, 0, 1, 3),
        ("sprinter", {Kind.SIMPLE}, {Kind.SIMPLE}, 2, 1, 1),
        ("embedder", {Kind.EMBED}, {Kind.EMBED}, 0, 1, 2),
    ]
    specs = []
    for i, (name, kinds, preferred, quality, replicas, slots) in enumerate(shapes):
        gate = gates.setdefault(name, threading.Event())
        gate.set()
        options: dict[str, object] = {
            "base_s": 0.0003,
            "per_prompt_token_s": 0.00001,
            "per_output_token_s": 0.0001,
            "jitter": 0.5,
            "seed": i,
            "gate": gate,
        }
        specs.append(
            ModelSpec(
                name,
                kinds=frozenset(kinds),
                preferred=frozenset(preferred),
                quality=quality,
                replicas=replicas,
                slots=slots,
                backend="simulated",
                options=options,
            )
        )
    return specs


class FaultInjector:
    """A backend factory that opens simulated contexts and fails them on demand.

    :meth:`inject` queues a fault for a model's next call (on whichever replica makes it) or its
    next open; the wrapped contexts draw from the queue. ``"error"`` raises
    :class:`~zeta.BackendError` (the context is fine), ``"crash"`` raises a crash once, ``"die"``
    leaves the context dead (every later call crashes) until the supervisor reopens it, and
    ``"open"`` makes the next open fail with :class:`~zeta.ModelLoadError`. Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[str, deque[str]] = {}
        self._opens: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()

    def inject(self, model: str, fault: str) -> None:
        if fault not in (*CALL_FAULTS, "open"):
            raise ValueError(f"unknown fault {fault!r}")
        with self._lock:
            if fault == "open":
                self._opens[model] += 1
            else:
                self._calls.setdefault(model, deque()).append(fault)
            self.injected[fault] += 1

    def clear(self) -> None:
        """Drop every pending fault."""
        with self._lock:
            self._calls.clear()
            self._opens.clear()

    def _next_call(self, model: str) -> str | None:
        with self._lock:
            queue = self._calls.get(model)
            return queue.popleft() if queue else None

    def __call__(self, spec: ModelSpec, replica: int) -> _FaultyBackend:
        with self._lock:
            fail = self._opens[spec.name] > 0
            if fail:
                self._opens[spec.name] -= 1
        if fail:
            raise ModelLoadError("injected open failure", path=spec.name)
        return _FaultyBackend(open_backend(spec, replica), self)


class _FaultyBackend:
    """A simulated context (batching ``spec.slots`` requests) that draws injected faults before
    each call: each admission of a completion, and each embedding."""

    def __init__(self, inner: SimulatedBackend, faults: FaultInjector) -> None:
        self.spec = inner.spec
        self.slots = inner.slots
        self._inner = inner
        self._faults = faults
        self._dead = False

    def _check(self) -> None:
        name = self.spec.name
        if self._dead:
            raise SimulatedCrash(f"{name}: context is dead")
        fault = self._faults._next_call(name)
        if fault == "error":
            raise BackendError(f"{name}: injected error")
        if fault == "die":
            self._dead = True
        if fault is not None:
            raise SimulatedCrash(f"{name}: injected {fault}")

    def admit(self, seq: int, params: CompletionParams, on_token: TokenCallback | None) -> None:
        self._check()
        self._inner.admit(seq, params, on_token)

    def step(self) -> list[tuple[int, Completion]]:
        if self._dead:
            raise SimulatedCrash(f"{self.spec.name}: context is dead")
        return self._inner.step()

    def cancel(self, seq: int) -> None:
        self._inner.cancel(seq)

    def embed(self, texts: Sequence[str]) -> Embedding:
        self._check()
        return self._inner.embed(texts)

    def close(self) -> None:
        self._inner.close()


@dataclass(eq=False)
class _Entry:
    """One submitted request and how it ended (settled on the event loop)."""

    id: int
    op: str  # "complete", "stream", "embed" or "invalid"
    kind: Kind
    stop_after: int | None = None  # streams: leave after this many pieces
    texts: int = 1
    scope: anyio.CancelScope | None = None
    outcome: Outcome | None = None
    error: ZetaError | None = None
    result: CompletionResult | EmbeddingResult | None = None
    pieces: list[str] = field(default_factory=list)
    settled: int = 0
    escaped: Exception | None = None  # an exception that is not a ZetaError escaped the call

    def settle(
        self, outcome: Outcome, *, error: ZetaError | None = None, result: Any = None
    ) -> None:
        self.settled += 1
        if self.settled == 1:
            self.outcome, self.error, self.result = outcome, error, result


class SchedulerStateMachine(RuleBasedStateMachine):
    """The state machine; subclass it (or use :func:`scheduler_state_machine`) to pick a policy.

    Class attributes:
        policy: a policy name, or a zero-argument callable returning a fresh :class:`~zeta.Policy`
            (policies keep state, so each run gets a new one).
        anyio_backend: ``"asyncio"`` or ``"trio"``.
        worker: the scheduler's worker (``"thread"`` or ``"to_thread"``).
        mailbox_capacity: small, so mailboxes fill and admission control is exercised.
    """

    policy: ClassVar[str | Callable[[], Policy]] = "dynamic"
    anyio_backend: ClassVar[str] = "asyncio"
    worker: ClassVar[Literal["thread", "to_thread"]] = "thread"
    mailbox_capacity: ClassVar[int] = 3

    def __init__(self) -> None:
        super().__init__()
        self._threads_before = set(threading.enumerate())
        self.gates: dict[str, threading.Event] = {}
        self.models = machine_models(self.gates)
        self.specs = {m.name: m for m in self.models}
        self.faults = FaultInjector()
        self.entries: dict[int, _Entry] = {}
        self.futures: list[Future[None]] = []
        self._ids = 0
        self._ended: anyio.Event | None = None  # set whenever a request ends (settle waits on it)
        policy = type(self).policy
        self._portal_cm: AbstractContextManager[BlockingPortal] = start_blocking_portal(
            type(self).anyio_backend
        )
        self.portal = self._portal_cm.__enter__()
        try:
            self.scheduler = Scheduler(
                self.models,
                policy=policy if isinstance(policy, str) else policy(),
                mailbox_capacity=type(self).mailbox_capacity,
                backend_factory=self.faults,
                worker=type(self).worker,
                supervision=Supervision(
                    max_restarts=2,
                    window_s=1.0,
                    backoff_initial_s=0.001,
                    backoff_max_s=0.004,
                    probe_interval_s=0.003,
                    hang_timeout_s=None,
                    shutdown_timeout_s=0.02,
                ),
                sample_interval=0.005,
                aging_s=0.05,
            )
            self._run, _ = self.portal.start_task(self.scheduler.run)
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise

    # -- submitting (runs on the event loop) ------------------------------------------------
    async def _request(self, entry: _Entry, kw: dict[str, Any]) -> None:
        try:
            await self._attempt(entry, kw)
        except Exception as exc:  # not a ZetaError: a bug, re-raised by the next invariant check
            entry.escaped = exc
            raise
        finally:
            if self._ended is not None:
                self._ended.set()

    async def _attempt(self, entry: _Entry, kw: dict[str, Any]) -> None:
        """Make one request and settle its entry with what the caller saw."""
        zs = self.scheduler
        deadline_s = kw.pop("deadline_s", None)
        with anyio.CancelScope() as scope:
            entry.scope = scope
            try:
                if deadline_s is not None:
                    kw["deadline"] = zs.clock() + deadline_s
                if entry.op == "stream":
                    await self._stream(entry, kw)
                    return
                result: CompletionResult | EmbeddingResult
                if entry.op == "embed":
                    result = await zs.embed(kw.pop("texts"), **kw)
                else:
                    result = await zs.complete(**kw)
            except ZetaError as exc:
                entry.settle(outcome_of(exc), error=exc)
            else:
                entry.settle(Outcome.OK, result=result)
        if scope.cancelled_caught and not entry.settled:
            entry.settle(Outcome.CANCELLED)

    async def _stream(self, entry: _Entry, kw: dict[str, Any]) -> None:
        async with self.scheduler.stream(**kw) as stream:
            async for piece in stream:
                entry.pieces.append(piece)
                if entry.stop_after is not None and len(entry.pieces) >= entry.stop_after:
                    break
            # Settled here: a cancellation while the stream closes does not undo a result.
            if stream.result is not None:
                entry.settle(Outcome.OK, result=stream.result)
            else:
                entry.settle(Outcome.CANCELLED)  # the caller left before the end

    def _submit(
        self, op: str, kind: Kind, kw: dict[str, Any], stop_after: int | None = None
    ) -> None:
        """Start one request as a task on the event loop; ``kw`` are the API call's arguments."""
        self._ids += 1
        texts = len(kw["texts"]) if "texts" in kw else 0
        entry = _Entry(self._ids, op, kind, stop_after=stop_after, texts=texts)
        self.entries[entry.id] = entry
        self.futures.append(self.portal.start_task_soon(self._request, entry, kw))

    # -- rules ------------------------------------------------------------------------------
    @rule(
        kind=st.sampled_from([Kind.SIMPLE, Kind.CODE, Kind.REASON, Kind.AUTO]),
        priority=st.sampled_from(list(Priority)),
        max_tokens=st.integers(1, 6),
        deadline_s=st.sampled_from([None, None, 0.002, 0.02, 0.2]),
        admission_timeout=st.sampled_from([0.0, 0.002, None]),
        words=st.sampled_from(["hello there", "def f(x): return x", "why? explain step by step"]),
        invalid=st.sampled_from([None] * 6 + ["empty", "tokens", "kind"]),
    )
    def complete(
        self,
        kind: Kind,
        priority: Priority,
        max_tokens: int,
        deadline_s: float | None,
        admission_timeout: float | None,
        words: str,
        invalid: str | None,
    ) -> None:
        kw: dict[str, Any] = {
            "prompt": words,
            "kind": kind,
            "priority": priority,
            "max_tokens": max_tokens,
            "deadline_s": deadline_s,
            "admission_timeout": admission_timeout,
        }
        if invalid is not None:  # a malformed request must fail with InvalidRequestError
            malformed: dict[str, dict[str, Any]] = {
                "empty": {"prompt": ""},
                "tokens": {"max_tokens": 0},
                "kind": {"kind": "nope"},
            }
            kw.update(malformed[invalid])
        self._submit("invalid" if invalid else "complete", kind, kw)

    @rule(
        kind=st.sampled_from([Kind.SIMPLE, Kind.CODE, Kind.REASON]),
        max_tokens=st.integers(1, 6),
        stop_after=st.none() | st.integers(1, 6),
        deadline_s=st.sampled_from([None, 0.02, 0.2]),
    )
    def stream(
        self, kind: Kind, max_tokens: int, stop_after: int | None, deadline_s: float | None
    ) -> None:
        if stop_after is not None and stop_after >= max_tokens:
            stop_after = None  # leaving after the last piece is not leaving early
        kw = {
            "prompt": "stream this",
            "kind": kind,
            "max_tokens": max_tokens,
            "deadline_s": deadline_s,
            "admission_timeout": None,
        }
        self._submit("stream", kind, kw, stop_after)

    @rule(
        n=st.integers(1, 3),
        priority=st.sampled_from(list(Priority)),
        admission_timeout=st.sampled_from([0.0, None]),
    )
    def embed(self, n: int, priority: Priority, admission_timeout: float | None) -> None:
        kw = {
            "texts": [f"text {i}" for i in range(n)],
            "priority": priority,
            "admission_timeout": admission_timeout,
        }
        self._submit("embed", Kind.EMBED, kw)

    def _pending(self) -> list[int]:
        return [e.id for e in self.entries.values() if e.settled == 0 and e.escaped is None]

    @precondition(lambda self: self.entries)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        """Cancel one of the latest requests (a no-op if it has ended already).

        Drawn from what was submitted, not from what is still pending: that depends on timing,
        and Hypothesis needs the same steps to draw the same data.
        """
        recent = sorted(self.entries)[-6:]
        entry = self.entries[data.draw(st.sampled_from(recent), label="cancel")]
        self.portal.call(_cancel, entry)

    @rule(model=st.sampled_from(["coder", "reasoner", "sprinter", "embedder"]))
    def hold(self, model: str) -> None:
        """Keep ``model`` busy: calls block before they start until it is released."""
        self.gates[model].clear()

    @rule(model=st.sampled_from(["coder", "reasoner", "sprinter", "embedder"]))
    def release(self, model: str) -> None:
        self.gates[model].set()

    @rule(
        model=st.sampled_from(["coder", "reasoner", "sprinter", "embedder"]),
        fault=st.sampled_from([*CALL_FAULTS, "open"]),
    )
    def inject(self, model: str, fault: str) -> None:
        self.faults.inject(model, fault)

    @rule(seconds=st.sampled_from([0.0, 0.001, 0.005]))
    def pause(self, seconds: float) -> None:
        self.portal.call(anyio.sleep, seconds)

    @rule()
    def settle(self) -> None:
        """Release every model, wait until every request has ended, and check the ledger."""
        for gate in self.gates.values():
            gate.set()
        self.portal.call(self._wait_settled)
        self._check_ledger(self.portal.call(_sync, self.scheduler.recorder.snapshot))

    async def _wait_settled(self) -> None:
        with anyio.fail_after(SETTLE_TIMEOUT_S):
            while self._pending():
                self._ended = anyio.Event()
                await self._ended.wait()

    # -- invariants -------------------------------------------------------------------------
    @invariant()
    def snapshot_is_consistent(self) -> None:
        _check_snapshot(
            self.portal.call(_sync, self.scheduler.snapshot), self.models, self.mailbox_capacity
        )

    @invariant()
    def answers_are_sound(self) -> None:
        for entry in self.entries.values():
            if entry.escaped is not None:
                raise entry.escaped
        for entry in self.portal.call(
            _sync, lambda: [e for e in self.entries.values() if e.settled]
        ):
            self._check_entry(entry)

    def _check_entry(self, entry: _Entry) -> None:
        assert entry.settled == 1, f"request {entry.id} ended {entry.settled} times"
        if entry.op == "invalid":
            assert isinstance(entry.error, InvalidRequestError), (entry.id, entry.error)
            return
        if entry.outcome is not Outcome.OK:
            assert entry.result is None
            if entry.outcome is not Outcome.CANCELLED:
                assert isinstance(entry.error, ZetaError), (entry.id, entry.error)
            return
        result = entry.result
        if entry.op == "embed":
            assert isinstance(result, EmbeddingResult), result
            assert Kind.EMBED in self.specs[result.model].kinds, (result.model, "embed")
            assert len(result.vectors) == entry.texts
            return
        assert isinstance(result, CompletionResult), result
        assert result.kind in self.specs[result.model].kinds, (result.model, result.kind)
        if entry.kind is not Kind.AUTO:
            assert result.kind is entry.kind, (entry.kind, result.kind)
        else:
            assert result.kind is not Kind.AUTO
        if entry.op == "stream":
            assert "".join(entry.pieces) == result.text, (entry.pieces, result.text)

    def _check_ledger(self, history: Any) -> None:
        """The scheduler's recorder counts every ended request once, as the caller saw it."""
        ended = [e for e in self.entries.values() if e.settled]
        seen = Counter(e.outcome.value for e in ended if e.outcome is not None)
        recorded: Counter[str] = Counter()
        for (_model, _kind, outcome), n in history.requests.items():
            recorded[outcome] += n
        assert recorded == seen, f"recorder {dict(recorded)} != callers {dict(seen)}"

    # -- teardown ---------------------------------------------------------------------------
    def teardown(self) -> None:
        """Close (with models still held, if some are), then check nothing was lost or left."""
        try:
            held = [name for name, gate in self.gates.items() if not gate.is_set()]
            self.portal.call(self.scheduler.aclose)
            for gate in self.gates.values():
                gate.set()
            self._run.result(timeout=SETTLE_TIMEOUT_S)
            for future in self.futures:
                future.result(timeout=SETTLE_TIMEOUT_S)  # a non-ZetaError escaped: a bug
            assert not self._pending(), f"requests never ended: {self._pending()}"
            for entry in self.entries.values():
                self._check_entry(entry)
            self._check_ledger(self.scheduler.recorder.snapshot())
            snap = self.scheduler.snapshot()
            for m in snap.models:
                assert m.state is ActorState.STOPPED, (m.name, m.replica, m.state, held)
                assert m.queue_len == 0 and m.in_flight == 0, m
        finally:
            for gate in self.gates.values():
                gate.set()
            self.faults.clear()
            self._portal_cm.__exit__(None, None, None)
        # Worker threads close their context and exit once their last call returns.
        for thread in set(threading.enumerate()) - self._threads_before:
            if thread.name.startswith("zeta-"):
                thread.join(timeout=SETTLE_TIMEOUT_S)
                assert not thread.is_alive(), f"worker thread {thread.name} was left running"


async def _sync(fn: Callable[[], Any]) -> Any:
    """Call ``fn`` on the event loop (reads there are consistent with the scheduler's state)."""
    return fn()


async def _cancel(entry: _Entry) -> None:
    if entry.scope is not None:
        entry.scope.cancel()


def _check_snapshot(snap: SchedulerSnapshot, models: Sequence[ModelSpec], capacity: int) -> None:
    by_model: Counter[str] = Counter()
    for m in snap.models:
        assert m.queue_len >= 0 and m.in_flight >= 0, m
        assert m.in_flight <= m.slots, f"{m.name}[{m.replica}] runs {m.in_flight} > {m.slots}"
        assert m.queue_len <= capacity, f"{m.name}[{m.replica}] holds {m.queue_len} > {capacity}"
        assert m.restarts >= 0 and m.completed >= 0 and m.failed >= 0, m
        assert math.isfinite(m.ewma_request_s) and m.ewma_request_s >= 0.0, m
        assert 0.0 <= m.utilisation <= 1.0, m
        by_model[m.name] += m.in_flight
    for spec in models:
        most = spec.replicas * spec.slots
        assert by_model[spec.name] <= most, (spec.name, by_model[spec.name])


def scheduler_state_machine(
    policy: str | Callable[[], Policy],
    *,
    anyio_backend: str = "asyncio",
    worker: Literal["thread", "to_thread"] = "thread",
    mailbox_capacity: int = 3,
) -> type[SchedulerStateMachine]:
    """A :class:`SchedulerStateMachine` subclass for ``policy`` on ``anyio_backend``.

    Run it with ``hypothesis.stateful.run_state_machine_as_test(machine, settings=...)`` or
    collect ``machine.TestCase`` with pytest.
    """
    label = policy if isinstance(policy, str) else getattr(policy, "__name__", "custom")
    attrs = {
        "policy": policy,
        "anyio_backend": anyio_backend,
        "worker": worker,
        "mailbox_capacity": mailbox_capacity,
    }
    return type(f"SchedulerMachine[{label},{anyio_backend}]", (SchedulerStateMachine,), attrs)
