"""One request's state as it moves through the scheduler, and the results callers get back.

A :class:`Request` is owned by the event loop. It knows nothing of actors: the mailbox that
queues it hands it the callable that takes it back out (``withdraw``), so settling a queued
request removes it without the request importing the actor. The only fields a worker thread touches are
``abandoned``, ``attempts`` and ``state`` (read by the token callback: stop generating) and
``streamed``/``progress`` (written by it); all are single attribute loads and stores, safe under
the GIL, and a stale read costs at most one extra token, which the loop side then drops.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio

from ._exceptions import DeadlineExceeded
from ._loop import EventLike, LoopHandle
from ._mailbox import Ticket
from ._policies import RouteRequest
from ._types import Kind, Priority
from .backends._base import CompletionParams, EmbedParams, TokenCallback

__all__ = ["CompletionResult", "EmbeddingResult", "Payload", "Request", "RequestState"]

#: What a request asks of a backend.
Payload = CompletionParams | EmbedParams


@dataclass(frozen=True, slots=True)
class CompletionResult:
    """A finished completion and where and how it was served.

    ``finish_reason`` is ``"length"``, ``"stop"`` or ``"cancelled"``. ``queue_wait_s`` runs from
    admission to the start of the call that produced the result; ``first_token_s`` and
    ``service_s`` are measured by the backend.
    """

    text: str
    model: str
    replica: int
    kind: Kind
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    queue_wait_s: float
    first_token_s: float
    service_s: float
    request_id: int


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    """One vector per input text, in order, and where and how they were computed."""

    vectors: list[list[float]]
    model: str
    replica: int
    prompt_tokens: int
    queue_wait_s: float
    service_s: float
    request_id: int


class RequestState(enum.Enum):
    NEW = "new"  # not in any mailbox (being admitted, or between a failed actor and a retry)
    QUEUED = "queued"  # in ``model``'s mailbox under ``ticket``
    RUNNING = "running"  # ``model``'s actor is executing it
    DONE = "done"  # settled: ``result`` or ``error`` is final (both None: the caller left)


class Request:
    """Internal state of one request. Settled exactly once, by :meth:`finish`."""

    __slots__ = (
        "_new_event",
        "_waiter",
        "abandoned",
        "admission_timeout",
        "attempts",
        "created_at",
        "deadline",
        "enqueued_at",
        "error",
        "id",
        "model",
        "payload",
        "pieces",
        "preferred",
        "progress",
        "recorded",
        "result",
        "route",
        "service_s",
        "started_at",
        "state",
        "streamed",
        "ticket",
        "withdraw",
    )  # fmt: skip

    def __init__(
        self,
        request_id: int,
        payload: Payload,
        route: RouteRequest,
        *,
        created_at: float,
        deadline: float | None,
        admission_timeout: float = 0.0,
        stream: bool = False,
        preferred: str | None = None,
        new_event: Callable[[], EventLike] = anyio.Event,
    ) -> None:
        self.id = request_id
        self.payload = payload
        self.route = route
        self.created_at = created_at
        #: Absolute time on the scheduler's clock, or ``None``.
        self.deadline = deadline
        #: Seconds to wait for mailbox room (``math.inf``: until the deadline).
        self.admission_timeout = admission_timeout
        self.preferred = preferred
        self.state = RequestState.NEW
        #: The model whose mailbox or worker holds it (or last held it).
        self.model: str | None = None
        self.ticket: Ticket | None = None
        #: Takes it back out of the mailbox it is queued in (set by that mailbox's actor).
        self.withdraw: Callable[[Request], None] | None = None
        self.attempts = 0
        self.enqueued_at: float | None = None
        self.started_at: float | None = None
        self.service_s: float | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.abandoned = False
        self.streamed = False
        self.progress = 0
        self.recorded = False
        self.pieces: deque[str] | None = deque() if stream else None
        self._waiter: EventLike | None = None
        self._new_event = new_event

    @property
    def kind(self) -> Kind:
        return self.route.kind

    @property
    def priority(self) -> Priority:
        return self.route.priority

    @property
    def done(self) -> bool:
        return self.state is RequestState.DONE

    # -- settling ---------------------------------------------------------------------------
    def finish(self, result: Any = None, error: BaseException | None = None) -> bool:
        """Settle the request; ``False`` (and nothing changes) if it was already settled.

        A queued request is taken out of its mailbox first, so it never runs.
        """
        if self.state is RequestState.DONE:
            return False
        if self.state is RequestState.QUEUED and self.withdraw is not None:
            self.withdraw(self)
        self.state = RequestState.DONE
        self.result = result
        self.error = error
        self._wake()
        return True

    def abandon(self) -> None:
        """The caller is gone: stop generation at the next token and drop any result."""
        self.abandoned = True
        self.finish()

    def expire(self) -> None:
        """Fail the request with :class:`~zeta.DeadlineExceeded` unless it has settled."""
        if not self.done:
            self.abandoned = True
            self.finish(error=DeadlineExceeded(f"request {self.id}: deadline passed"))

    # -- waiting (event loop) ---------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set()

    async def wait(self) -> None:
        """Wait until settled, or (for a stream) until a new piece arrives."""
        waiter = self._waiter
        if waiter is None:
            waiter = self._waiter = self._new_event()
        await waiter.wait()

    async def wait_done(self, clock: Callable[[], float]) -> None:
        """Wait until settled; at the deadline (on ``clock``) expire it instead."""
        deadline = self.deadline
        if deadline is None:
            while not self.done:
                await self.wait()
            return
        with anyio.move_on_after(deadline - clock()):
            while not self.done:
                await self.wait()
        self.expire()

    async def wait_progress(self, clock: Callable[[], float]) -> None:
        """Wait for a streamed piece or settlement; at the deadline expire it instead."""
        deadline = self.deadline
        if deadline is None:
            await self.wait()
            return
        with anyio.move_on_after(deadline - clock()):
            await self.wait()
            return
        self.expire()

    def push(self, piece: str, attempt: int) -> None:
        """Hand one streamed piece of attempt ``attempt`` to the consumer (on the event loop).

        Pieces of an attempt that was given up are dropped: that is checked here, on the loop,
        because the worker thread's own check can race with the retry.
        """
        if self.pieces is not None and self.state is not RequestState.DONE:
            if attempt == self.attempts:
                self.pieces.append(piece)
                self._wake()

    # -- worker-thread side -----------------------------------------------------------------
    def token_callback(self, handle: LoopHandle) -> TokenCallback:
        """The ``on_token`` callback the backend calls on the worker thread.

        Returning ``False`` stops generation: the caller left, its deadline passed, or this
        attempt was given up (a hung call that resumes after the request was settled or moved to
        another actor must neither feed the stream nor keep its context busy). Stream pieces are
        handed to the event loop without blocking the worker.
        """
        attempt = self.attempts
        done = RequestState.DONE

        def live() -> bool:
            return not self.abandoned and self.attempts == attempt and self.state is not done

        if self.pieces is None:

            def keep_going(piece: str) -> bool:
                if not live():
                    return False
                self.progress += 1
                return True

            return keep_going

        call_soon = handle.call_soon
        push = self.push

        def forward(piece: str) -> bool:
            if not live():
                return False
            self.progress += 1
            self.streamed = True
            call_soon(push, piece, attempt)
            return True

        return forward
