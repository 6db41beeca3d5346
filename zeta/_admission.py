"""Admission: places a request in an actor's mailbox, waits for room, or says why it can't.

A request asks the router for an actor and is queued there at once when the policy finds one
with room. When every actor the policy may use is full, the request joins a line (one per kind
and priority class, oldest first) for up to its admission timeout;
:meth:`Admission.notify_capacity`, called by the actors whenever room appears, places waiting
requests synchronously, so a freed slot costs about one routing decision per line and a
newcomer cannot take it first.

Waiting requests are placed in the mailbox's order, across kinds: the lowest ``class - waited /
aging_s`` first, the older first among equals. A kind's line must not wait for the others: a
code surge that keeps every mailbox full would otherwise admit each freed slot's code and
simple requests first and starve the reasoning line for as long as the surge lasts (in the
simulator's ``overwhelm`` scenario reasoning waited 4x as long as any other kind). When the
actors are down rather than full, waiting is pointless (they gain no room until a probe brings
them back) and the request is refused at once.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence

import anyio
import anyio.lowlevel

from ._actor import ModelActor
from ._exceptions import (
    DeadlineExceeded,
    ModelUnavailable,
    Overloaded,
    SchedulerClosed,
    TryAgainError,
)
from ._loop import EventLike
from ._request import Request, RequestState
from ._router import Router
from ._snapshot import ActorState
from ._types import SERVED_KINDS, Kind, Priority

__all__ = ["Admission"]


class _RoomWaiter:
    """A request waiting for mailbox room since ``since`` (the ``seq``-th to wait): set
    ``event`` once it was placed (or must give up)."""

    __slots__ = ("error", "event", "seq", "since")

    def __init__(self, event: EventLike, since: float, seq: int) -> None:
        self.event = event
        self.since = since
        self.seq = seq
        self.error: Exception | None = None


class Admission:
    """Routes requests onto actors' mailboxes and keeps the lines of those waiting for room.

    Args:
        router: decides which actor may take a request.
        clock: the scheduler's clock.
        aging_s: seconds of waiting that raise a request by one priority class, as in the
            actors' mailboxes (``math.inf`` disables aging).

    The actors (one per router row, in row order) are attached once built, since each is given
    :meth:`notify_capacity` to call.
    """

    def __init__(
        self, router: Router, clock: Callable[[], float], *, aging_s: float = 10.0
    ) -> None:
        self._router = router
        self._clock = clock
        self._aging = aging_s
        self._actors: tuple[ModelActor, ...] = ()
        #: Whether requests are admitted (the scheduler is running).
        self.open = False
        #: Requests waiting for mailbox room, one line per (kind, priority class), oldest first.
        self._waiting: dict[tuple[Kind, int], OrderedDict[Request, _RoomWaiter]] = {
            (k, int(p)): OrderedDict() for k in SERVED_KINDS for p in Priority
        }
        self._seq = itertools.count()
        self.new_event: Callable[[], EventLike] = anyio.Event

    def attach(self, actors: Sequence[ModelActor]) -> None:
        """The actors to place requests on, one per router row, in row order."""
        self._actors = tuple(actors)

    def dispatch(self, request: Request) -> bool:
        """Queue ``request`` on the actor the policy picks; ``False`` if it picks none."""
        i = self._router.choose(request.route)
        return i is not None and self._actors[i].enqueue(request, self._clock())

    async def admit(self, request: Request) -> None:
        """Queue the request on an actor, waiting for room up to its admission timeout.

        Raises:
            Overloaded, ModelUnavailable: no room (or no live model) within the admission timeout.
            DeadlineExceeded: the deadline passed while waiting for room.
            SchedulerClosed: the scheduler is not running.
        """
        if not self.open:
            await anyio.lowlevel.checkpoint()
            raise SchedulerClosed("the scheduler is not running")
        if self.dispatch(request):
            return
        if self._out_of_service(request):
            # Waiting is for room; a down model gains none until a probe brings it back.
            await anyio.lowlevel.checkpoint()
            raise self._refusal(request)
        wait = request.admission_timeout
        if request.deadline is not None:
            wait = min(wait, request.deadline - self._clock())
        if wait > 0:
            # Join the line of its kind and class; notify_capacity places it when its turn comes.
            line = self._waiting[request.kind, int(request.priority)]
            waiter = line[request] = _RoomWaiter(self.new_event(), self._clock(), next(self._seq))
            try:
                with anyio.move_on_after(wait):
                    await waiter.event.wait()
            finally:
                line.pop(request, None)
            if waiter.error is not None:
                raise waiter.error
            if request.state is not RequestState.NEW:
                return  # admitted (possibly just as the timeout fired)
            if not self.open:
                raise SchedulerClosed("the scheduler closed while the request waited for room")
        else:
            await anyio.lowlevel.checkpoint()
        if request.deadline is not None and self._clock() >= request.deadline:
            raise DeadlineExceeded(f"request {request.id}: deadline passed while waiting for room")
        raise self._refusal(request)

    def _out_of_service(self, request: Request) -> bool:
        """Whether every actor the policy may use for ``request`` is down (or stopped)."""
        actors = self._actors
        return all(
            actors[i].state in (ActorState.DOWN, ActorState.STOPPED)
            for i in self._router.scope(request.route)
        )

    def _refusal(self, request: Request) -> TryAgainError:
        """Why the policy would not place ``request``: no actor it may use is ready
        (:class:`~zeta.ModelUnavailable`), or they are all full (:class:`~zeta.Overloaded`).

        "May use" is the policy's scope (see :meth:`Router.scope`): under ``static`` a ``code``
        request whose coder is down is unavailable, even if the reasoner could serve code.
        """
        kind = request.kind
        scope = self._router.scope(request.route)
        live = [i for i in scope if self._actors[i].state is ActorState.READY]
        if not live:
            names = sorted({self._actors[i].name for i in scope})
            return ModelUnavailable(
                f"every model the policy may use for {kind.value!r} is down or restarting: {names}"
            )
        return Overloaded(
            f"no model can take a {kind.value!r} request now (mailboxes full)",
            retry_after=self._router.retry_after(kind, request.route.est_tokens, live),
        )

    def notify_capacity(self) -> None:
        """Room may have appeared: admit waiting requests in the mailbox's order across lines.

        Called by actors on the loop whenever a full mailbox frees a slot or an actor becomes
        ready. The head with the lowest ``class - waited / aging_s`` (the older among equals) is
        placed first; a line stops at its first request that cannot be placed, the others go on.
        """
        if not self.open:
            return
        lines = [(cls, line) for (_, cls), line in self._waiting.items() if line]
        if not lines:
            return
        now = self._clock()
        aging = self._aging
        while lines:
            best, best_key = 0, (0.0, 0)
            for j, (cls, line) in enumerate(lines):
                head = next(iter(line.values()))
                key = (cls - (now - head.since) / aging, head.seq)
                if j == 0 or key < best_key:
                    best, best_key = j, key
            line = lines[best][1]
            request, waiter = next(iter(line.items()))
            try:
                placed = self.dispatch(request)
            except Exception as exc:  # a buggy user policy: its caller gets the error
                waiter.error = exc
                placed = True
            if placed:
                del line[request]
                waiter.event.set()
            if not placed or not line:
                del lines[best]

    def close(self) -> None:
        """Stop admitting and wake every request waiting for room; each one raises."""
        self.open = False
        for line in self._waiting.values():
            for waiter in line.values():
                waiter.event.set()
            line.clear()
