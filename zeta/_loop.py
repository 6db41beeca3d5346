"""The two things the runtime needs of the running event loop, for asyncio and trio alike.

* :class:`EventLike`: an event the loop can wait on (``anyio.Event``, or the loop's own).
* :class:`LoopHandle`: schedules a callback on the loop from any thread, without blocking.

A leaf module: requests, mailboxes and actors all use it, and it imports nothing of zeta's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

__all__ = ["EventLike", "LoopHandle"]


class EventLike(Protocol):
    """What the runtime needs of an event: :class:`anyio.Event`, or the running loop's own
    (``asyncio.Event``, ``trio.Event``), which skips anyio's per-call backend lookup."""

    def set(self) -> object: ...

    def is_set(self) -> bool: ...

    async def wait(self) -> object: ...


class LoopHandle:
    """Schedules a callback on the event loop from any thread, without blocking the caller.

    asyncio: ``loop.call_soon_threadsafe``; trio: ``TrioToken.run_sync_soon``. Both keep FIFO
    order, so a stream's pieces arrive before the completion that follows them.
    """

    __slots__ = ("_call", "new_event")

    def __init__(self, call: Callable[..., object], new_event: Callable[[], EventLike]) -> None:
        self._call = call
        #: Creates an event of the running loop's own kind, for the per-request hot path.
        self.new_event = new_event

    @classmethod
    def current(cls) -> LoopHandle:
        """The handle of the running event loop (asyncio or trio)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            import trio

            return cls(trio.lowlevel.current_trio_token().run_sync_soon, trio.Event)
        return cls(loop.call_soon_threadsafe, asyncio.Event)

    def call_soon(self, fn: Callable[..., object], *args: object) -> bool:
        """Run ``fn(*args)`` on the loop soon; ``False`` if the loop has finished."""
        try:
            self._call(fn, *args)
        except Exception:  # asyncio: RuntimeError (loop closed); trio: RunFinishedError
            return False
        return True
