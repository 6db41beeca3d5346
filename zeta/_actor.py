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
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
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
    Completion,
    CompletionParams,
    Embedding,
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

    ``request`` is the request that was running, if any; ``error`` the backend's exception
    (``None`` for a hang).
    """

    def __init__(
        self, request: Request | None, error: BaseException | None, *, hung: bool = False
    ) -> None:
        what = "hung" if hung else f"failed: {type(error).__name__}"
        super().__init__(what)
        self.request = request
        self.error = error
        self.hung = hung


def _close_quietly(backend_job: Job[Backend]) -> Callable[[], None]:
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
        self.in_flight = 0
        self.current: Request | None = None
        self.completed = 0
        self.failed = 0
        self.restarts = 0
        self.busy_s = 0.0
        self.backend: Backend | None = None
        #: Set when the actor's supervising task has ended (created by :meth:`configure`).
        self.finished: anyio.Event
        self._table = table
        self._factory = factory
        self._clock = clock
        self._on_capacity = on_capacity
        self._worker: Worker | None = None
        self._open_job: Job[Backend] | None = None
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
        self._table.set_load(self.index, n, self.in_flight)
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
        return ModelSnapshot(
            name=self.name,
            replica=self.replica,
            device=self.spec.device,
            state=self.state,
            queue_len=len(self.mailbox),
            in_flight=self.in_flight,
            ewma_request_s=per_request,
            ewma_token_s=per_token,
            utilisation=self._table.util(self.index),
            busy_s=self.busy_s,
            restarts=self.restarts,
            completed=self.completed,
            failed=self.failed,
        )

    # -- the context ------------------------------------------------------------------------
    def begin_open(self) -> Job[Backend]:
        """Start opening a fresh context on a fresh worker; finish with :meth:`finish_open`."""
        assert self._make_worker is not None, "configure() first"
        self.retire_context()
        self._worker = self._make_worker(f"zeta-{self.name}-{self.replica}")
        job = self._open_job = self._worker.submit(partial(self._factory, self.spec, self.replica))
        return job

    async def finish_open(self, job: Job[Backend]) -> None:
        """Wait for the open; on failure retire the worker and raise the factory's error."""
        await job.wait()
        if job.error is not None:
            self.retire_context()
            raise job.error
        self.backend = job.value

    async def open(self) -> None:
        await self.finish_open(self.begin_open())

    def retire_context(self) -> Job[object] | None:
        """Give the context up: its worker closes it after any running call, then stops."""
        worker, job = self._worker, self._open_job
        self._worker = None
        self._open_job = None
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
            job = worker.submit(partial(backend.complete, params))
        if not await self._await_job(job):
            raise ContextFailure(None, None, hung=True)
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
        """Called by the watchdog: give up on the running call if it made no progress (no
        token) for ``timeout`` seconds. Keeping this off the per-request path means a call costs
        no cancel scope and no timer. Returns whether it gave up."""
        job = self._job
        # ``returned``: the call is over and only waits for a busy event loop to notice.
        if job is None or job.finished or job.returned:
            self._watched = (None, 0, 0.0)
            return False
        request = self.current
        progress = request.progress if request is not None else 0
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
        """Serve the mailbox until it is closed and empty.

        Raises:
            ContextFailure: the context crashed or hung; the supervisor restarts it.
        """
        mailbox = self.mailbox
        clock = self._clock
        handle = self._handle
        assert handle is not None
        while True:
            try:
                request = await mailbox.receive(clock)
            except anyio.EndOfStream:
                return
            now = clock()
            request.ticket = None
            was_full = len(mailbox) == self.capacity - 1
            if request.deadline is not None and now >= request.deadline:
                request.state = RequestState.NEW
                self._sync()
                request.finish(error=DeadlineExceeded(f"request {request.id} expired in the queue"))
                if was_full:
                    self._on_capacity()
                continue
            request.state = RequestState.RUNNING
            request.started_at = now
            self.current = request
            self.in_flight = 1
            self._sync()
            if was_full:
                self._on_capacity()
            backend, worker = self.backend, self._worker
            assert backend is not None and worker is not None
            payload = request.payload
            if isinstance(payload, CompletionParams):
                on_token = request.token_callback(handle)
                job: Job[Any] = worker.submit(partial(backend.complete, payload, on_token))
            else:
                job = worker.submit(partial(backend.embed, payload.texts))
            try:
                ok = await self._await_job(job)
            finally:
                self.in_flight = 0
                self._sync()
            if not ok:
                raise ContextFailure(request, None, hung=True)
            self.current = None
            self.busy_s += job.elapsed
            error = job.error
            if error is None:
                self.completed += 1
                self._succeed(request, job.value, clock())
            elif isinstance(error, (InvalidInputError, BackendError)):
                # The call failed but the backend says the context is fine.
                self.failed += 1
                request.finish(error=error)
            else:
                self.failed += 1
                raise ContextFailure(request, error)

    def _succeed(self, request: Request, value: Any, now: float) -> None:
        assert request.started_at is not None and request.enqueued_at is not None
        queue_wait = request.started_at - request.enqueued_at
        if isinstance(value, Completion):
            decode = value.service_s - value.first_token_s
            per_token = decode / value.completion_tokens if value.completion_tokens else 0.0
            self._observe(value.first_token_s, per_token, now)
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
            self._observe(value.service_s, self._table.ewma(self.index)[1], now)
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

    def _observe(self, per_request: float, per_token: float, now: float) -> None:
        # A backend's odd timing (negative, NaN) must not take the actor down via the kernel.
        if math.isfinite(per_request) and math.isfinite(per_token) and math.isfinite(now):
            self._table.observe(
                self.index, max(0.0, per_request), max(0.0, per_token), max(0.0, now)
            )
