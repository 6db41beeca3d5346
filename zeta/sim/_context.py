"""One simulated model replica: its mailbox, its slots and an analytic batch of sequences.

Nothing here steps token by token. Between events every decoding sequence of a context advances
at the same rate, one token per step of ``step_s[k - 1] * factor`` seconds (``k`` sequences
decoding, ``factor`` the device's co-load slowdown), so a context keeps one progress counter
``v`` (steps taken since the counter started) and a heap of the marks at which its sequences
end. The only events are a prefill ending and the next sequence ending; the engine recomputes
the next one whenever the occupancy or the co-load changes.

A prefill holds up the decoding of the others (llama.cpp puts a prompt chunk into the step,
which then lasts as long as the chunk), so the prefills of newly admitted requests run one after
another and decoding resumes after them. An embedding is a prefill with nothing to decode, run
between steps like the actor's embedding calls.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterator

from .._policies import RouteRequest
from .._types import KIND_INDEX
from ._profile import SimModel
from ._workload import SimRequest

__all__ = ["Context", "Job", "Mailbox"]


class Job:
    """A request on its way through the simulator, and what happened to it.

    ``u_prefill`` and ``u_decode`` are the request's jitter draws in ``[-1, 1]``; each context
    scales them by its own profile's jitter, so every policy sees the same request sizes.
    Equal routing facts share one :class:`RouteRequest` from ``routes``.
    """

    __slots__ = (
        "at", "dec", "ends", "enqueued", "finish", "first", "index", "ki", "kind", "model",
        "output", "priority", "prompt", "refused", "route", "seq", "started", "u_decode",
        "u_prefill", "waiting", "work",
    )  # fmt: skip

    def __init__(
        self,
        index: int,
        request: SimRequest,
        u_prefill: float,
        u_decode: float,
        routes: dict[tuple[object, ...], RouteRequest],
    ) -> None:
        self.index = index
        self.at = request.at
        self.kind = request.kind
        self.ki = KIND_INDEX[request.kind]
        self.prompt = request.prompt_tokens
        self.output = request.output_tokens
        self.priority = int(request.priority)
        key = (request.kind, request.max_tokens, request.difficulty, request.priority)
        route = routes.get(key)
        if route is None:
            route = routes[key] = RouteRequest(
                request.kind,
                self.ki,
                float(request.max_tokens),
                request.difficulty,
                request.priority,
            )
        self.route = route
        self.u_prefill = u_prefill
        self.u_decode = u_decode
        self.seq = 0  # enqueue order, for FIFO within a priority class
        self.enqueued = math.nan
        self.started = math.nan
        self.first = math.nan
        self.finish = math.nan
        self.work = 0.0  # prefill seconds on the context it runs on, device to itself
        self.dec = 0.0  # decode length in steps, jitter applied
        self.model = -1  # candidate row it ran on
        self.refused = False
        self.waiting = False  # in a line (its kind's and class's), waiting for mailbox room
        self.ends = 0  # how many times it completed or was refused: exactly once at the end


class Mailbox:
    """A bounded priority queue of jobs with aging: the rule of
    :class:`zeta._mailbox.PriorityMailbox`, lowest ``class - waited / aging_s`` first, older
    first on a tie."""

    __slots__ = ("_aging", "_queues", "size")

    def __init__(self, classes: int, aging_s: float) -> None:
        self._aging = aging_s
        self._queues: tuple[deque[Job], ...] = tuple(deque() for _ in range(classes))
        self.size = 0

    def put(self, job: Job) -> None:
        self._queues[job.priority].append(job)
        self.size += 1

    def pop(self, now: float) -> Job:
        best: deque[Job] | None = None
        best_rank = math.inf
        best_seq = 0
        aging = self._aging
        for cls, queue in enumerate(self._queues):
            if queue:
                head = queue[0]
                rank = cls - (now - head.enqueued) / aging
                if best is None or rank < best_rank or (rank == best_rank and head.seq < best_seq):
                    best, best_rank, best_seq = queue, rank, head.seq
        assert best is not None
        self.size -= 1
        return best.popleft()

    def in_order(self) -> Iterator[Job]:
        """Queued jobs by priority class, then arrival (the order ignoring aging)."""
        for queue in self._queues:
            yield from queue


class Context:
    """A replica's analytic state: mailbox, prefills in progress, decoding sequences.

    ``factor`` is the device's co-load slowdown in force; the engine sets it (after
    :meth:`advance`) when another model on the device becomes busy or idle. ``version`` changes
    with every change of state, so a projection of the context can be cached.
    """

    __slots__ = (
        "_finishes", "_projected", "busy_s", "call_s", "coload", "dec", "device", "factor", "index", "jitter",
        "mailbox", "model", "name", "on", "pre", "pre_left", "preferred", "prefill_s", "quality",
        "running", "slots", "step", "t", "v", "version",
    )  # fmt: skip

    def __init__(
        self, index: int, model: SimModel, device: int, classes: int, aging_s: float
    ) -> None:
        p = model.profile
        self.index = index
        self.model = model
        self.name = model.name
        self.device = device
        self.call_s = p.call_s
        self.prefill_s = p.prefill_token_s
        self.step = p.step_s
        self.slots = p.slots
        self.coload = p.coload
        self.jitter = p.jitter
        self.preferred = model.spec.preferred
        self.quality = model.spec.quality
        self.mailbox = Mailbox(classes, aging_s)
        self.pre: deque[Job] = deque()  # admitted, prefilling in turn; the head runs
        self.pre_left = 0.0  # the head's remaining prefill, seconds with the device to itself
        self.dec: list[tuple[float, int, Job]] = []  # (end mark, job index, job), a heap
        self.v = 0.0
        self.t = 0.0
        self.factor = 1.0
        self.running = 0  # admitted and not finished: prefilling plus decoding
        self.on = False  # counted busy on its device
        self.version = 0
        self.busy_s = 0.0
        self._projected: tuple[int, float, float] = (-1, 0.0, 0.0)
        self._finishes: list[float] = []

    # -- sizes on this context -------------------------------------------------------------
    def work_of(self, job: Job) -> float:
        """``job``'s prefill seconds here, device to itself, jitter included."""
        return (self.call_s + self.prefill_s * job.prompt) * (1.0 + self.jitter * job.u_prefill)

    def tokens_of(self, job: Job) -> float:
        """``job``'s decode length here in steps, jitter included (a slower decode is a
        longer one)."""
        return job.output * (1.0 + self.jitter * job.u_decode)

    def coload_factor(self, others: int) -> float:
        """The slowdown while ``others`` other models on the device are busy."""
        coload = self.coload
        return coload[others] if others < len(coload) else coload[-1]

    # -- progress --------------------------------------------------------------------------
    def advance(self, now: float) -> None:
        """Bring the progress up to ``now`` (no event of this context may lie in between)."""
        dt = now - self.t
        if dt > 0.0:
            if self.running:
                self.busy_s += dt
                if self.pre:
                    self.pre_left -= dt / self.factor
                elif self.dec:
                    self.v += dt / (self.step[len(self.dec) - 1] * self.factor)
            self.t = now

    def next_time(self) -> float:
        """When the next prefill or sequence ends (``inf`` when idle)."""
        if self.pre:
            left = self.pre_left
            return self.t + (left if left > 0.0 else 0.0) * self.factor
        dec = self.dec
        if dec:
            left = dec[0][0] - self.v
            return self.t + (left if left > 0.0 else 0.0) * self.step[len(dec) - 1] * self.factor
        return math.inf

    def start(self, job: Job, now: float) -> None:
        """Admit ``job`` into a free slot at ``now`` (after :meth:`advance`)."""
        job.started = now
        job.model = self.index
        job.work = w = self.work_of(job)
        job.dec = self.tokens_of(job)
        pre = self.pre
        if not pre:
            self.pre_left = w
        pre.append(job)
        self.running += 1

    def on_event(self, now: float, done: list[Job]) -> None:
        """The prefill or sequence end that :meth:`next_time` announced has come (after
        :meth:`advance`); jobs that finished are appended to ``done``."""
        pre = self.pre
        if pre:
            job = pre.popleft()
            job.first = now
            if job.dec > 0.0:
                heapq.heappush(self.dec, (self.v + job.dec, job.index, job))
            else:
                done.append(job)
            if pre:
                self.pre_left = pre[0].work
            return
        dec = self.dec
        mark, _, job = heapq.heappop(dec)
        if mark > self.v:
            self.v = mark
        done.append(job)
        limit = self.v + 1e-9
        while dec and dec[0][0] <= limit:
            done.append(heapq.heappop(dec)[2])

    # -- projection (what the clairvoyant oracle reads) ---------------------------------------
    def project(self, now: float, extra: Job | None = None) -> tuple[float, float, float]:
        """Finish times of everything in this context and its mailbox if nothing else arrived
        and the co-load stayed as it is, with ``extra`` queued too (at ``now``, behind the
        queued jobs of its priority class and above; aging is ignored).

        Returns ``(sum of finish times, extra's finish time or nan, last finish time or now)``.
        Without ``extra`` the result is cached until the state changes (a projection of an
        unchanged state gives the same absolute times whenever it is made).
        """
        if extra is None and self._projected[0] == self.version:
            return self._projected[1], math.nan, self._projected[2]
        finishes = self._finishes if extra is None else None
        if finishes is not None:
            finishes.clear()
        f = self.factor
        step = self.step
        slots = self.slots
        dt = now - self.t
        pre_left = self.pre_left
        v = self.v
        if dt > 0.0 and self.running:
            if self.pre:
                pre_left -= dt / f
            elif self.dec:
                v += dt / (step[len(self.dec) - 1] * f)
        t = now
        # (prefill seconds, decode steps, is extra)
        pre: deque[tuple[float, float, bool]] = deque((j.work, j.dec, False) for j in self.pre)
        if pre:
            pre[0] = (pre_left if pre_left > 0.0 else 0.0, pre[0][1], False)
        dec: list[tuple[float, bool]] = [(m, False) for m, _, _ in self.dec]
        heapq.heapify(dec)
        waiting: list[tuple[float, float, bool]] = []
        placed = extra is None
        for job in self.mailbox.in_order():
            if not placed and extra is not None and job.priority > extra.priority:
                waiting.append((self.work_of(extra), self.tokens_of(extra), True))
                placed = True
            waiting.append((self.work_of(job), self.tokens_of(job), False))
        if not placed and extra is not None:
            waiting.append((self.work_of(extra), self.tokens_of(extra), True))
        running = len(pre) + len(dec)
        total = 0.0
        mine = math.nan
        nxt = 0
        n_wait = len(waiting)
        while True:
            while running < slots and nxt < n_wait:
                pre.append(waiting[nxt])
                nxt += 1
                running += 1
            if pre:
                w, d, e = pre.popleft()
                t += w * f
                if d > 0.0:
                    heapq.heappush(dec, (v + d, e))
                    continue
            elif dec:
                mark, e = heapq.heappop(dec)
                if mark > v:
                    t += (mark - v) * step[len(dec)] * f
                    v = mark
            else:
                break
            total += t
            if finishes is not None:
                finishes.append(t)
            running -= 1
            if e:
                mine = t
        if extra is None:
            self._projected = (self.version, total, t)
        return total, mine, t

    def finish_times(self, now: float) -> list[float]:
        """The finish times of everything here, in the order they end, as :meth:`project`
        without ``extra`` finds them (do not modify the list)."""
        self.project(now)
        return self._finishes
