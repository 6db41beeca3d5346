"""The caller's side of a streamed completion or chat reply: :class:`TokenStream`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import anyio.lowlevel

from ._admission import Admission
from ._ledger import Ledger
from ._request import CompletionResult, Request
from .telemetry._recorder import Outcome

__all__ = ["TokenStream"]

R = TypeVar("R", covariant=True)


class Reader(Protocol[R]):
    """Turns a completion's pieces and result into what the caller sees (a chat reply's
    :class:`~zeta._chat.ChatReply`): pieces to pass on, the result, then a last piece."""

    tail: str

    def feed(self, piece: str) -> str: ...

    def finish(self, completed: CompletionResult) -> R: ...


class TokenStream(Generic[R]):
    """The pieces of one streamed completion, as an async iterator (see
    :meth:`Scheduler.stream <zeta.Scheduler.stream>` and
    :meth:`~zeta.Scheduler.chat_stream`).

    Also an async context manager whose exit stops the request if it is still running. The
    request is admitted on the first iteration; its end is counted in the ledger once, however
    the stream ends (last piece, error, cancellation, close, or being dropped).
    """

    def __init__(
        self,
        request: Request,
        admission: Admission,
        ledger: Ledger,
        clock: Callable[[], float],
        reader: Reader[R] | None = None,
    ) -> None:
        self._request = request
        self._admission = admission
        self._ledger = ledger
        self._clock = clock
        self._reader = reader
        self._admitted = False
        self._ended = False
        #: The finished completion (:class:`~zeta.CompletionResult`, or a chat stream's
        #: :class:`~zeta.ChatResult`), once the last piece has been consumed.
        self.result: R | None = None

    @property
    def request_id(self) -> int:
        return self._request.id

    @property
    def model(self) -> str | None:
        """The model the request was placed on, once admitted (``None`` before; after a retry
        off a failed model, the one it was retried on)."""
        return self._request.model

    def __aiter__(self) -> TokenStream[R]:
        return self

    async def __anext__(self) -> str:
        if self._ended:
            raise StopAsyncIteration
        request = self._request
        try:
            if not self._admitted:
                self._admitted = True
                await self._admission.admit(request)
            pieces = request.pieces
            assert pieces is not None
            reader = self._reader
            while True:
                if pieces:
                    piece = pieces.popleft()
                    if reader is not None and not (piece := reader.feed(piece)):
                        continue
                    await anyio.lowlevel.checkpoint()
                    return piece
                if request.done:
                    if request.error is not None:
                        raise request.error
                    if reader is None:
                        self.result = request.result
                    else:
                        self.result = reader.finish(request.result)
                    self._end(Outcome.OK)
                    if reader is not None and reader.tail:
                        return reader.tail  # text held back as a possible tool call's start
                    raise StopAsyncIteration
                await request.wait_progress(self._clock)
        except StopAsyncIteration:
            raise
        except BaseException as exc:
            self._end(self._ledger.outcome_of(exc))
            request.abandon()
            raise

    def _end(self, outcome: Outcome) -> None:
        self._ended = True
        self._ledger.record(self._request, outcome)

    async def aclose(self) -> None:
        """Stop the request if it is still running (generation stops at the next token)."""
        if self._close():
            await anyio.lowlevel.checkpoint()

    def _close(self) -> bool:
        """Abandon a live request and count it as cancelled; ``False`` if it had already ended."""
        if self._ended:
            return False
        self._ended = True
        if not self._admitted:
            return False
        # The caller left before the end: whatever happened since, it got no result.
        self._request.abandon()
        self._ledger.record(self._request, Outcome.CANCELLED)
        return True

    async def __aenter__(self) -> TokenStream[R]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # No checkpoint here: a cancellation delivered on exit would replace the result or error
        # the body just saw (and the ledger recorded) with a Cancelled.
        self._close()

    def __del__(self) -> None:
        # Dropped mid-way (e.g. ``break`` out of ``async for`` without closing): stop generating
        # now and count the request on the event loop's thread.
        if self._admitted and not self._ended:
            self._ended = True
            self._ledger.record_orphan(self._request)
