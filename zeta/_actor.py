"""Model actors: one inference context, its worker thread and its bounded mailbox.

Every call into a context (open, complete, embed, close) runs on that context's own worker, one
at a time: a llama.cpp context entered by two threads at once aborts the whole process. Two
workers are available:

* :class:`ThreadWorker` (the default): one dedicated daemon thread per context, fed through a
  :class:`queue.SimpleQueue` and reporting back with a non-blocking, thread-safe callback onto the
  event loop. No thread-pool round trip per call, and thread-affine native state (CUDA contexts)
  always sees the same thread. ``python -m bench overhead`` measures it against the pool.
* :class:`ToThreadWorker`: ``anyio.to_thread.run_sync`` behind a per-context
  ``CapacityLimiter(1)``.

Both hand a finished :class:`Job` back through :class:`LoopHandle`, so the actor waits for a call
the same way with either, and can give up on a hung call without blocking the event loop.

Continuous batching: a context decodes up to ``slots`` requests together. Between decode steps,
on the event loop, the actor takes queued requests into free slots (mailbox priority order) and
drops those whose callers left; then one job on the worker runs steps (:func:`run_steps`) until
a request ends or a newcomer waits for a free slot. Only the worker ever touches the context.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

import anyio
from anyio.abc import TaskGroup

from ._exceptions import BackendError, DeadlineExceeded, InvalidInputError
from ._loop import LoopHandle
from ._mailbox import PriorityMailbox
from ._request import CompletionResult, EmbeddingResult, Request, RequestState
from ._scoring import ScoreTable
from ._snapshot import ActorState, ModelSnapshot
from ._types import Kind, ModelSpec, Priority
from .backends._base import (
    Backend,
    BackendFactory,
    BatchBackend,
    Completion,
    CompletionParams,
    Embedding,
    EmbedParams,
    TokenCallback,
    batched,
    run_alone,
)

__all__ = ["ContextFailure", "Job", "ModelActor", "ThreadWorker", "ToThreadWorker"]

T = TypeVar("T")


class Job(Generic[T]):
    """One call to run on a context's worker; the loop side awaits :meth:`wait`."""

    __slots__ = (
        "_event", "_handle", "elapsed", "error", "finished", "fn", "returned", "started", "value",
    )  # fmt: skip

    def __init__(self, fn: Callable[[], T], handle: LoopHandle) -> None:
        self.fn = fn
        self.value: T | None = None
        self.error: BaseException | None = None
        self.elapsed = 0.0
        self.started = False  # set on the worker thread when the call begins
        self.returned = False  # set on the worker thread when the call is over
        self.finished = False  # set on the loop, after value/error are final
        self._handle = handle
        self._event = handle.new_event()

    def run(self) -> None:
        """Run on the worker thread; report back to the loop."""
        self.started = True
        start = time.perf_counter()
        try:
            self.value = self.fn()
        except BaseException as exc:  # delivered to the awaiting task, which decides
            self.error = exc
        self.elapsed = time.perf_counter() - start
        self.returned = True
        self._handle.call_soon(self._finish)

    def _finish(self) -> None:
        self.finished = True
        self._event.set()

    def give_up(self) -> None:
        """Wake the waiter without a result (the call hung); ``finished`` stays ``False``."""
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()


class Worker(Protocol):
    """Runs a context's calls one at a time on a thread that is not the event loop's."""

    def submit(self, fn: Callable[[], T]) -> Job[T]: ...

    def retire(self, last: Callable[[], object] | None = None) -> Job[object] | None: ...


class ThreadWorker:
    """One dedicated daemon thread per context.

    ``retire`` queues a final call (closing the context) and stops the thread after it. If a call
    hangs, the thread closes the context whenever that call returns and then exits, so nothing
    else ever enters the context, and a hung thread never blocks interpreter exit.
    """

    def __init__(self, name: str, handle: LoopHandle) -> None:
        self._handle = handle
        self._jobs: queue.SimpleQueue[Job[Any] | None] = queue.SimpleQueue()
        self._retired = False
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is None:
                return
            job.run()

    def submit(self, fn: Callable[[], T]) -> Job[T]:
        if self._retired:
            raise RuntimeError("worker is retired")
        job = Job(fn, self._handle)
        self._jobs.put(job)
        return job

    def retire(self, last: Callable[[], object] | None = None) -> Job[object] | None:
        if self._retired:
            return None
        job = Job(last, self._handle) if last is not None else None
        if job is not None:
            self._jobs.put(job)
        self._retired = True
        self._jobs.put(None)
        return job


class ToThreadWorker:
    """``anyio.to_thread.run_sync`` per call, behind the context's own ``CapacityLimiter(1)``.

    Calls are started as tasks in ``task_group`` so the actor can stop waiting for a hung one. The
    thread is abandoned on cancellation (shutdown), which releases the limiter while the call may
    still run; the actor never submits to a worker again after giving up on it, so the context is
    still never entered twice.
    """

    def __init__(self, task_group: TaskGroup, handle: LoopHandle) -> None:
        self._tg = task_group
        self._handle = handle
        self._limiter = anyio.CapacityLimiter(1)
        self._retired = False

    async def _run(self, job: Job[Any]) -> None:
        try:
            await anyio.to_thread.run_sync(job.run, limiter=self._limiter, abandon_on_cancel=True)
        except BaseException:
            if not job.started:  # cancelled before it could run: its waiter must not hang
                job.give_up()
            raise

    def submit(self, fn: Callable[[], T]) -> Job[T]:
        if self._retired:
            raise RuntimeError("worker is retired")
        job = Job(fn, self._handle)
        self._tg.start_soon(self._run, job)
        return job

    def retire(self, last: Callable[[], object] | None = None) -> Job[object] | None:
        if self._retired:
            return None
        job = Job(last, self._handle) if last is not None else None
        if job is not None:
            self._tg.start_soon(self._run, job)
        self._retired = True
        return job


class ContextFailure(Exception):
    """Raised out of :meth:`ModelActor.serve` when its context broke (crashed or hung).

    ``requests`` are the requests that were running in it; ``error`` the backend's exception
    (``None`` for a hang).
    """

    def __init__(
        self, requests: Sequence[Request], error: BaseException | None, *, hung: bool = False
    ) -> None:
        what = "hung" if hung else f"failed: {type(error).__name__}"
        super().__init__(what)
        self.requests = tuple(requests)
        self.error = error
        self.hung = hung


class StepControl:
    """What the loop and the worker share while a step job runs (plain attributes: single loads
    and stores, safe under the GIL).

    ``wake``: set by the loop when a request waits for a free slot; the worker returns after the
    current step. ``steps``: bumped by the worker per step, so the hang watchdog sees progress.
    ``occupancy[k - 1]``: steps run with ``k`` sequences (written by the worker).
    """

    __slots__ = ("occupancy", "steps", "wake")

    def __init__(self, slots: int) -> None:
        self.wake = False
        self.steps = 0
        self.occupancy = [0] * slots


#: What a step job returns: the sequences that ended, and admissions the backend refused.
StepReport = tuple[list[tuple[int, Completion]], list[tuple[int, Exception]]]


def run_steps(
    backend: BatchBackend,
    admits: Sequence[tuple[int, CompletionParams, TokenCallback]],
    cancels: Sequence[int],
    active: int,
    control: StepControl,
) -> StepReport:
    """On the worker: drop ``cancels``, take ``admits`` into free slots, then step until a
    sequence ends, the loop asks to stop, or none is left. ``active`` counts the sequences
    admitted after this call's admissions (refused ones not yet subtracted)."""
    for seq in cancels:
        backend.cancel(seq)
    refused: list[tuple[int, Exception]] = []
    for seq, params, on_token in admits:
        try:
            backend.admit(seq, params, on_token)
        except (InvalidInputError, BackendError) as exc:  # this request's problem alone
            refused.append((seq, exc))
    active -= len(refused)
    ended: list[tuple[int, Completion]] = []
    occupancy = control.occupancy
    while active > 0:
        ended = backend.step()
        control.steps += 1
        if active <= len(occupancy):
            occupancy[active - 1] += 1
        if ended or control.wake:
            break
    return ended, refused


def _close_quietly(backend_job: Job[Backend | BatchBackend]) -> Callable[[], None]:
    """A call that closes the backend ``backend_job`` opened (run on the same worker, after it)."""

    def close() -> None:
        backend = backend_job.value
        if backend is not None:
            try:
                backend.close()
            except Exception:  # closing a broken context may fail; nothing left to do about it
                pass

    return close


class ModelActor:
    """One replica of one model: a context, its worker and its mailbox.

    Load, availability and estimates are kept current in the router's table row ``index``; an
    actor is available to the router while it is ``READY`` and its mailbox has room.
    """

    def __init__(
        self,
        spec: ModelSpec,
        replica: int,
        index: int,
        *,
        table: ScoreTable,
        factory: BackendFactory,
        capacity: int,
        aging_s: float,
        clock: Callable[[], float],
        on_capacity: Callable[[], None],
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.replica = replica
        self.index = index
        self.capacity = capacity
        self.mailbox: PriorityMailbox[Request] = PriorityMailbox(
            capacity, classes=len(Priority), aging_s=aging_s
        )
        self.state = ActorState.STARTING
        #: Requests in the context's slots, by sequence key (the request id).
        self.running: dict[int, Request] = {}
        #: Sequences the context decodes together (the backend's, once open).
        self.slots = spec.slots
        self.completed = 0
        self.failed = 0
        self.restarts = 0
        self.busy_s = 0.0
        self.backend: BatchBackend | None = None
        #: Set when the actor's supervising task has ended (created by :meth:`configure`).
        self.finished: anyio.Event
        self._table = table
        self._factory = factory
        self._clock = clock
        self._on_capacity = on_capacity
        self._worker: Worker | None = None
        self._open_job: Job[Backend | BatchBackend] | None = None
        self._control = StepControl(self.slots)
        #: Completion tokens of the requests this actor finished.
        self.generated_tokens = 0
        self._prefix_base = (0, 0)
        self._handle: LoopHandle | None = None
        self._make_worker: Callable[[str], Worker] | None = None
        # The call being awaited, and what the hang watchdog last saw of it.
        self._job: Job[Any] | None = None
        self._watched: tuple[Job[Any] | None, int, float] = (None, 0, 0.0)
        self._sync()

    def configure(self, handle: LoopHandle, make_worker: Callable[[str], Worker]) -> None:
        """Bind to the running event loop (called once the scheduler starts)."""
        self._handle = handle
        self._make_worker = make_worker
        self.mailbox.event_factory = handle.new_event
        self.finished = anyio.Event()

    # -- bookkeeping ------------------------------------------------------------------------
    def _sync(self) -> None:
        n = len(self.mailbox)
        self._table.set_load(self.index, n, len(self.running))
        self._table.set_available(self.index, self.state is ActorState.READY and n < self.capacity)

    def set_state(self, state: ActorState) -> None:
        self.state = state
        self._sync()
        if state is ActorState.READY:
            self._on_capacity()

    def enqueue(self, request: Request, now: float) -> bool:
        """Queue ``request`` here; ``False`` if the mailbox is full or closed."""
        if request.enqueued_at is None:
            request.enqueued_at = now
        try:
            request.ticket = self.mailbox.put_nowait(
                request, request.route.priority, request.enqueued_at
            )
        except (anyio.WouldBlock, anyio.ClosedResourceError):
            return False
        request.model = self.name
        request.withdraw = self.withdraw
        request.state = RequestState.QUEUED
        request.attempts += 1
        if len(self.running) < self.slots:
            self._control.wake = True  # a step job in progress returns, so this one starts
        self._sync()
        return True

    def withdraw(self, request: Request) -> None:
        """Take a queued request back out (cancelled, expired, or settled while queued)."""
        was_full = self.mailbox.full
        if request.ticket is not None and self.mailbox.remove(request.ticket):
            request.ticket = None
            request.state = RequestState.NEW
            self._sync()
            if was_full:
                self._on_capacity()

    def drain(self) -> list[Request]:
        """Empty the mailbox (the context died); return the requests, now in state ``NEW``."""
        return self._released(self.mailbox.drain())

    def close_mailbox(self) -> list[Request]:
        """Refuse further requests; return those still queued, now in state ``NEW``."""
        return self._released(self.mailbox.close())

    def _released(self, items: list[Request]) -> list[Request]:
        for request in items:
            request.ticket = None
            request.state = RequestState.NEW
        self._sync()
        return items

    def snapshot(self) -> ModelSnapshot:
        per_request, per_token = self._table.ewma(self.index)
        prefix_hits, prefix_tokens_reused = self._prefix_counts()
        return ModelSnapshot(
            name=self.name,
            replica=self.replica,
            device=self.spec.device,
            state=self.state,
            queue_len=len(self.mailbox),
            in_flight=len(self.running),
            ewma_request_s=per_request,
            ewma_token_s=per_token,
            utilisation=self._table.util(self.index),
            busy_s=self.busy_s,
            restarts=self.restarts,
            completed=self.completed,
            failed=self.failed,
            slots=self.slots,
            generated_tokens=self.generated_tokens,
            steps_by_occupancy=tuple(self._control.occupancy[: self.slots]),
            prefix_hits=prefix_hits,
            prefix_tokens_reused=prefix_tokens_reused,
        )

    def _prefix_counts(self) -> tuple[int, int]:
        """Prefix-cache hits and reused tokens over every context this actor has had."""
        backend, (hits, reused) = self.backend, self._prefix_base
        return (
            hits + int(getattr(backend, "prefix_hits", 0)),
            reused + int(getattr(backend, "prefix_tokens_reused", 0)),
        )

    # -- the context ------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Requests in the context's slots now."""
        return len(self.running)

    def begin_open(self) -> Job[Backend | BatchBackend]:
        """Start opening a fresh context on a fresh worker; finish with :meth:`finish_open`."""
        assert self._make_worker is not None, "configure() first"
        self.retire_context()
        self._worker = self._make_worker(f"zeta-{self.name}-{self.replica}")
        job = self._open_job = self._worker.submit(partial(self._factory, self.spec, self.replica))
        return job

    async def finish_open(self, job: Job[Backend | BatchBackend]) -> None:
        """Wait for the open; on failure retire the worker and raise the factory's error."""
        await job.wait()
        if job.error is not None:
            self.retire_context()
            raise job.error
        assert job.value is not None
        self.backend = batched(job.value)
        self.slots = self.backend.slots
        self._table.set_slots(self.index, self.slots)
        occupancy = self._control.occupancy
        if len(occupancy) < self.slots:
            occupancy.extend([0] * (self.slots - len(occupancy)))

    async def open(self) -> None:
        await self.finish_open(self.begin_open())

    def retire_context(self) -> Job[object] | None:
        """Give the context up: its worker closes it after any running call, then stops."""
        worker, job = self._worker, self._open_job
        self._worker = None
        self._open_job = None
        self._prefix_base = self._prefix_counts()
        self.backend = None
        if worker is None:
            return None
        return worker.retire(_close_quietly(job) if job is not None else None)

    async def close(self) -> None:
        """Close the context and wait for it (bounded by the caller's cancel scope)."""
        job = self.retire_context()
        if job is not None:
            await job.wait()

    async def probe(self) -> None:
        """One tiny call on the current context; raises whatever the call raised (or hung)."""
        backend, worker = self.backend, self._worker
        assert backend is not None and worker is not None
        if self.spec.kinds <= {Kind.EMBED}:
            job: Job[Any] = worker.submit(partial(backend.embed, ["ping"]))
        else:
            params = CompletionParams(prompt="ping", max_tokens=1)
            job = worker.submit(partial(run_alone, backend, params))
        if not await self._await_job(job):
            raise ContextFailure((), None, hung=True)
        if job.error is not None:
            raise job.error

    async def _await_job(self, job: Job[Any]) -> bool:
        """Wait for ``job``; ``False`` if the hang watchdog gave up on it first."""
        self._job = job
        try:
            await job.wait()
        finally:
            self._job = None
        return job.finished

    def check_hung(self, now: float, timeout: float) -> bool:
        """Called by the watchdog: give up on the running call if it made no progress (no step,
        no token) for ``timeout`` seconds. Keeping this off the per-request path means a call
        costs no cancel scope and no timer. Returns whether it gave up."""
        job = self._job
        # ``returned``: the call is over and only waits for a busy event loop to notice.
        if job is None or job.finished or job.returned:
            self._watched = (None, 0, 0.0)
            return False
        progress = self._control.steps + sum(r.progress for r in self.running.values())
        seen_job, seen_progress, since = self._watched
        if job is not seen_job or progress != seen_progress:
            self._watched = (job, progress, now)
            return False
        if now - since < timeout:
            return False
        job.give_up()
        return True

    # -- the loop ---------------------------------------------------------------------------
    async def serve(self) -> None:
        """Serve the mailbox until it is closed and empty, decoding up to ``slots`` requests at
        once.

        Raises:
            ContextFailure: the context crashed or hung; the supervisor restarts it.
        """
        mailbox = self.mailbox
        clock = self._clock
        running = self.running
        control = self._control
        while True:
            control.wake = False  # an arrival from now on ends the next step job early
            if not running:
                try:
                    first = await mailbox.receive(clock)
                except anyio.EndOfStream:
                    return
                taken = [first]
            else:
                taken = []
            # Fill the free slots, highest priority first.
            while len(running) + len(taken) < self.slots and len(mailbox):
                taken.append(mailbox.pop_nowait(clock()))
            was_full = len(mailbox) + len(taken) >= self.capacity > len(mailbox)
            admits = await self._start(taken, was_full)
            self._sync()
            # Free the slots of requests whose callers left (cancelled, expired, stream closed).
            cancels = [seq for seq, r in running.items() if r.done or r.abandoned]
            for seq in cancels:
                del running[seq]
            admits = [a for a in admits if a[0] in running]
            if running or cancels:
                await self._step(admits, cancels)

    async def _start(
        self, taken: list[Request], freed: bool
    ) -> list[tuple[int, CompletionParams, TokenCallback]]:
        """Mark requests just taken from the mailbox as running; return the completions'
        admissions. One that expired while queued fails here and never runs; embeddings run
        now, one call each, between steps. ``freed``: taking them made room in a full mailbox,
        which goes to the requests waiting for it (before an embedding's call, during which a
        newcomer could otherwise take it).

        Raises:
            ContextFailure: an embedding broke the context.
        """
        handle = self._handle
        assert handle is not None
        admits: list[tuple[int, CompletionParams, TokenCallback]] = []
        embeds: list[tuple[Request, EmbedParams]] = []
        for request in taken:
            request.ticket = None
            now = self._clock()
            if request.deadline is not None and now >= request.deadline:
                request.state = RequestState.NEW
                request.finish(error=DeadlineExceeded(f"request {request.id} expired in the queue"))
                continue
            request.state = RequestState.RUNNING
            request.started_at = now
            payload = request.payload
            if isinstance(payload, CompletionParams):
                self.running[request.id] = request
                admits.append((request.id, payload, request.token_callback(handle)))
            else:
                embeds.append((request, payload))
        for request, _ in embeds:
            # Held in ``running`` until settled: if the actor fails or is cancelled meanwhile,
            # the supervisor settles them too.
            self.running[request.id] = request
        if freed:
            self._sync()
            self._on_capacity()
        for request, payload in embeds:
            await self._embed(request, payload)
        return admits

    async def _embed(self, request: Request, payload: EmbedParams) -> None:
        backend, worker = self.backend, self._worker
        assert backend is not None and worker is not None
        self._sync()
        job = worker.submit(partial(backend.embed, payload.texts))
        if not await self._await_job(job):
            raise ContextFailure(list(self.running.values()), None, hung=True)
        del self.running[request.id]
        self.busy_s += job.elapsed
        self._settle(request, job.value, job.error)

    async def _step(
        self, admits: list[tuple[int, CompletionParams, TokenCallback]], cancels: list[int]
    ) -> None:
        """Run one step job: admissions and cancellations, then steps until a request ends."""
        backend, worker = self.backend, self._worker
        assert backend is not None and worker is not None
        job = worker.submit(
            partial(run_steps, backend, admits, cancels, len(self.running), self._control)
        )
        ok = await self._await_job(job)
        running = self.running
        if not ok:
            raise ContextFailure(list(running.values()), None, hung=True)
        self.busy_s += job.elapsed
        error = job.error
        if error is not None:
            if not isinstance(error, BackendError):
                raise ContextFailure(list(running.values()), error)
            # The step failed, the context is fine: every sequence in it was dropped.
            for request in running.values():
                self.failed += 1
                request.finish(error=error)
            running.clear()
            self._sync()
            return
        assert job.value is not None
        ended, refused = job.value
        for seq, exc in refused:
            self._settle(running.pop(seq), None, exc)
        # The kernel learns per-token time at the occupancy the request ended in.
        busy = max(1, min(len(running), self.slots))
        for seq, completion in ended:
            if seq in running:
                self._settle(running.pop(seq), completion, None, busy)
        self._sync()

    def _settle(
        self, request: Request, value: Any, error: BaseException | None, busy: int = 1
    ) -> None:
        if error is None:
            self.completed += 1
            self._succeed(request, value, self._clock(), busy)
        elif isinstance(error, (InvalidInputError, BackendError)):
            # The call failed but the backend says the context is fine.
            self.failed += 1
            request.finish(error=error)
        else:
            self.failed += 1
            raise ContextFailure([request, *self.running.values()], error)

    def _succeed(self, request: Request, value: Any, now: float, busy: int) -> None:
        assert request.started_at is not None and request.enqueued_at is not None
        queue_wait = request.started_at - request.enqueued_at
        if isinstance(value, Completion):
            self.generated_tokens += value.completion_tokens
            decode = value.service_s - value.first_token_s
            per_token = decode / value.completion_tokens if value.completion_tokens else 0.0
            self._observe(value.first_token_s, per_token, now, busy)
            request.service_s = value.service_s
            request.finish(
                result=CompletionResult(
                    text=value.text,
                    model=self.name,
                    replica=self.replica,
                    kind=request.kind,
                    finish_reason=value.finish_reason,
                    prompt_tokens=value.prompt_tokens,
                    completion_tokens=value.completion_tokens,
                    queue_wait_s=queue_wait,
                    first_token_s=value.first_token_s,
                    service_s=value.service_s,
                    request_id=request.id,
                )
            )
        elif isinstance(value, Embedding):
            self._observe(value.service_s, self._table.ewma(self.index)[1], now, 1)
            request.service_s = value.service_s
            request.finish(
                result=EmbeddingResult(
                    vectors=value.vectors,
                    model=self.name,
                    replica=self.replica,
                    prompt_tokens=value.prompt_tokens,
                    queue_wait_s=queue_wait,
                    service_s=value.service_s,
                    request_id=request.id,
                )
            )
        else:
            request.finish(
                error=BackendError(f"{self.name}: backend returned {type(value).__name__}")
            )

    def _observe(self, per_request: float, per_token: float, now: float, busy: int) -> None:
        # A backend's odd timing (negative, NaN) must not take the actor down via the kernel.
        if math.isfinite(per_request) and math.isfinite(per_token) and math.isfinite(now):
            self._table.observe(
                self.index,
                max(0.0, per_request),
                max(0.0, per_token),
                max(0.0, now),
                busy,
            )
