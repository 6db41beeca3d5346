"""The bounded priority mailbox of one actor.

An anyio memory object stream is strictly FIFO and cannot take back an item once sent, but an
actor's mailbox must serve higher priorities first and must drop a queued request the moment its
caller is cancelled. So the mailbox keeps one FIFO per priority class (an ``OrderedDict`` keyed by
a sequence number: O(1) append, pop and removal) and otherwise follows the memory stream's
contract: bounded ``put_nowait`` raising :class:`anyio.WouldBlock`, an awaitable ``receive`` for
its single consumer, and ``close`` after which ``receive`` drains and then raises
:class:`anyio.EndOfStream`.

Aging keeps low priorities from starving: an item's effective rank is its class minus the time it
has waited divided by ``aging_s``, so after ``aging_s`` seconds a LOW request competes as NORMAL,
and so on. Only the head of each class can be the best of its class (FIFO within a class, equal
aging rate), so choosing the next item costs one comparison per class.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from itertools import count
from typing import Generic, TypeVar

import anyio

from ._loop import EventLike

__all__ = ["PriorityMailbox", "Ticket"]

T = TypeVar("T")


#: Where an item sits in a mailbox: ``(priority class, sequence number)``; used to remove it.
Ticket = tuple[int, int]


class PriorityMailbox(Generic[T]):
    """A bounded mailbox: higher priority (lower class number) first, FIFO within a class.

    Not thread-safe; everything runs on the event loop. There is one consumer (the actor).

    Args:
        capacity: most items queued at once (>= 1).
        classes: number of priority classes, numbered ``0`` (served first) to ``classes - 1``.
        aging_s: seconds of waiting that raise an item by one class; ``math.inf`` disables aging.
    """

    __slots__ = (
        "_aging", "_capacity", "_closed", "_queues", "_seq", "_size", "_waiter", "event_factory",
    )  # fmt: skip

    def __init__(self, capacity: int, *, classes: int = 3, aging_s: float = 10.0) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
            raise ValueError(f"classes must be an integer >= 1, got {classes!r}")
        if not (isinstance(aging_s, (int, float)) and aging_s > 0.0) or math.isnan(aging_s):
            raise ValueError(f"aging_s must be > 0 (math.inf disables aging), got {aging_s!r}")
        self._capacity = capacity
        self._aging = float(aging_s)
        # Per class: seq -> (enqueued_at, item).
        self._queues: tuple[OrderedDict[int, tuple[float, T]], ...] = tuple(
            OrderedDict() for _ in range(classes)
        )
        self._seq = count()
        self._size = 0
        self._closed = False
        self._waiter: EventLike | None = None
        #: Makes the consumer's wake-up events; the actor sets the running loop's own.
        self.event_factory: Callable[[], EventLike] = anyio.Event

    # -- state ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._size

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def full(self) -> bool:
        return self._size >= self._capacity

    @property
    def closed(self) -> bool:
        return self._closed

    # -- producer side ----------------------------------------------------------------------
    def put_nowait(self, item: T, priority: int, enqueued_at: float) -> Ticket:
        """Queue ``item`` in class ``priority``; ``enqueued_at`` is when it started waiting.

        Raises:
            anyio.ClosedResourceError: the mailbox is closed.
            anyio.WouldBlock: the mailbox is full.
        """
        if self._closed:
            raise anyio.ClosedResourceError
        if self._size >= self._capacity:
            raise anyio.WouldBlock
        seq = next(self._seq)
        self._queues[priority][seq] = (enqueued_at, item)
        self._size += 1
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set()
        return (priority, seq)

    def remove(self, ticket: Ticket) -> bool:
        """Take a queued item back (its caller went away); ``False`` if it is no longer queued."""
        if self._queues[ticket[0]].pop(ticket[1], None) is None:
            return False
        self._size -= 1
        return True

    # -- consumer side ----------------------------------------------------------------------
    def pop_nowait(self, now: float) -> T:
        """Remove and return the item to serve next at time ``now``.

        Raises:
            anyio.WouldBlock: empty and open.
            anyio.EndOfStream: empty and closed.
        """
        if self._size == 0:
            raise anyio.EndOfStream if self._closed else anyio.WouldBlock
        best: OrderedDict[int, tuple[float, T]] | None = None
        best_rank = math.inf
        best_seq = 0
        aging = self._aging
        for cls, queue in enumerate(self._queues):
            if not queue:
                continue
            seq = next(iter(queue))
            # Ties between classes go to the older item (lower sequence number).
            rank = cls - (now - queue[seq][0]) / aging
            if best is None or rank < best_rank or (rank == best_rank and seq < best_seq):
                best, best_rank, best_seq = queue, rank, seq
        assert best is not None
        self._size -= 1
        return best.popitem(last=False)[1][1]

    async def receive(self, clock: Callable[[], float]) -> T:
        """Wait for and return the next item, reading ``clock`` for aging when one is taken.

        Raises:
            anyio.EndOfStream: the mailbox is closed and empty.
        """
        while True:
            try:
                return self.pop_nowait(clock())
            except anyio.WouldBlock:
                pass
            waiter = self._waiter = self.event_factory()
            try:
                await waiter.wait()
            finally:
                if self._waiter is waiter:
                    self._waiter = None

    def close(self) -> list[T]:
        """Close the mailbox and return what was queued, in arrival order; wakes the consumer.

        After closing, ``put_nowait`` raises and ``receive`` raises :class:`anyio.EndOfStream`.
        """
        self._closed = True
        items = sorted(
            ((seq, entry[1]) for queue in self._queues for seq, entry in queue.items()),
            key=lambda pair: pair[0],
        )
        for queue in self._queues:
            queue.clear()
        self._size = 0
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set()
        return [item for _, item in items]

    def drain(self) -> list[T]:
        """Empty the mailbox without closing it; return the items in arrival order."""
        items = self.close()
        self._closed = False
        return items
