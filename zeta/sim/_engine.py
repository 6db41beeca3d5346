"""The discrete-event loop: zeta's router, policies and kernel on simulated models, in virtual time.

:func:`simulate` replays a workload against a :class:`~zeta.sim.Fleet` the way the live
scheduler runs it, with no threads, no event loop and no sleeping. It drives the real
:class:`~zeta._router.Router` (the scoring kernel and the policy objects) and feeds its table the
signals the actors and the supervisor feed it live:

* ``set_slots`` once per row, from the profile (the actor does it when its context opens);
  the step slope stays the kernel's default and the estimates start at zero, as in a fresh
  scheduler, unless ``priors=True`` seeds both from the profile (what a measured profile loaded
  as priors would do);
* ``set_load`` / ``set_available`` whenever a mailbox or the slots change (``Actor._sync``): on
  enqueue, on admission into slots, when a request ends;
* on arrival the policy chooses (``Router.choose``) and the request joins that row's mailbox.
  When the policy places it nowhere the request waits in the line of its kind and priority
  class, oldest first, for up to the admission timeout (``None``: as long as it takes) and is
  refused after that; whenever a full mailbox frees room the waiting requests are placed in the
  mailbox's order across lines, a line stopping at its first request that cannot be placed
  (``Admission.notify_capacity``);
* a replica with a free slot admits from its mailbox at once, highest priority first with aging
  (the actor admits at the next step boundary, a step later), then prefills and decodes
  (:mod:`zeta.sim._context`);
* when a completion ends the kernel observes its time to first token and its per-token decode
  time at the occupancy it ended in (``observe(i, first_token_s, per_token, now, busy)``), an
  embedding its service time with the row's per-token estimate unchanged (``Actor._succeed``);
* every ``sample_interval`` each device's utilisation over the interval (busy models over its
  lanes, at most 1: the host CPU's or the GPU's reading) is written to its models' rows
  (``set_util``), as the default device sampler does.

The run is deterministic for a seed: the seed draws each request's jitter (the same draws under
every policy) and seeds the kernel's rotation and randomised policies.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
import time
from collections import deque
from collections.abc import Sequence

import numpy as np

from .._policies import Policy, RouteRequest, make_policy
from .._router import Router, build_candidates
from .._types import SERVED_KINDS, Priority, Scoring
from ._context import Context, Job
from ._oracle import OraclePolicy
from ._profile import Device, Fleet
from ._stats import SimResult
from ._workload import SimRequest

__all__ = ["ORACLE", "ORACLE_PEN", "simulate"]

#: The name that selects the clairvoyant :class:`~zeta.sim.OraclePolicy` (latency alone).
ORACLE = "oracle"
#: The name that selects it with the kernel's penalties (``OraclePolicy(penalties=True)``).
ORACLE_PEN = "oracle_pen"

#: Prompt length of the observation that seeds a row's estimates with ``priors=True``.
PRIOR_PROMPT = 64


class _Device:
    """The models on one device: how many are busy, and the busy-lane integral since the last
    utilisation sample."""

    __slots__ = ("busy", "contexts", "integral", "lanes", "last")

    def __init__(self, lanes: float) -> None:
        self.lanes = lanes
        self.contexts: list[Context] = []
        self.busy = 0
        self.integral = 0.0
        self.last = 0.0

    def account(self, now: float) -> None:
        share = self.busy / self.lanes
        self.integral += (share if share < 1.0 else 1.0) * (now - self.last)
        self.last = now


class _Run:
    """One replay; see :func:`simulate`."""

    def __init__(
        self,
        fleet: Fleet,
        policy: str | Policy,
        *,
        scoring: Scoring,
        mailbox_capacity: int,
        admission_timeout: float | None,
        aging_s: float,
        sample_interval: float,
        seed: int,
        priors: bool,
    ) -> None:
        if not mailbox_capacity >= 1:
            raise ValueError(f"mailbox_capacity must be >= 1, got {mailbox_capacity!r}")
        if not sample_interval > 0.0:
            raise ValueError(f"sample_interval must be > 0, got {sample_interval!r}")
        if admission_timeout is not None and not admission_timeout >= 0.0:
            raise ValueError(f"admission_timeout must be >= 0 or None, got {admission_timeout!r}")
        self.oracle: OraclePolicy | None = None
        if isinstance(policy, str) and policy in (ORACLE, ORACLE_PEN):
            policy = self.oracle = OraclePolicy(penalties=policy == ORACLE_PEN)
        elif isinstance(policy, OraclePolicy):
            self.oracle = policy
        else:
            policy = make_policy(policy, seed=seed)
        self.policy_name = str(getattr(policy, "name", type(policy).__name__))
        candidates = build_candidates(fleet.specs, mailbox_capacity)
        self.router = router = Router(candidates, policy, scoring=scoring, seed=seed)
        table = self.table = router.table
        by_name = {m.name: m for m in fleet.models}
        self.model_names = tuple(m.name for m in fleet.models)
        self.row_model = [self.model_names.index(c.model) for c in candidates]
        keys: list[Device] = []
        devices: list[_Device] = []
        self.contexts: list[Context] = []
        for c in candidates:
            model = by_name[c.model]
            key = model.spec.device
            if key not in keys:
                keys.append(key)
                devices.append(_Device(fleet.lanes_of(key)))
            d = keys.index(key)
            ctx = Context(c.index, model, d, len(Priority), aging_s)
            devices[d].contexts.append(ctx)
            self.contexts.append(ctx)
            table.set_slots(c.index, model.profile.slots)
        if priors:
            # What Scheduler(priors=fleet.priors()) seeds, but the co-load: here it stays the
            # scoring parameter's, which the calibrator's replays tune through ``scoring``.
            seeds = fleet.priors(PRIOR_PROMPT)
            router.seed({n: dataclasses.replace(p, co_slow=None) for n, p in seeds.items()}, 0.0)
        self.devices = devices
        self.device_of = [devices[ctx.device] for ctx in self.contexts]
        self.peers = [
            [p for p in self.device_of[ctx.index].contexts if p is not ctx] for ctx in self.contexts
        ]
        for ctx in self.contexts:  # an idle model's factor: the others on its device are idle
            ctx.factor = ctx.coload_factor(0)
        if self.oracle is not None:
            self.oracle.bind(self.contexts, self.peers)
        self.capacity = mailbox_capacity
        self.timeout = math.inf if admission_timeout is None else float(admission_timeout)
        self.interval = float(sample_interval)
        self.seed = seed
        self.times = [math.inf] * len(self.contexts)  # each context's next event
        self.enq = 0
        self.aging = float(aging_s)
        # One line per kind and priority class, as in Admission; a job joins at its arrival.
        self.lines: list[deque[Job]] = [deque() for _ in range(len(SERVED_KINDS) * len(Priority))]
        self.timeouts: list[tuple[float, int, Job]] = []
        self.notifying = False
        self.renotify = False
        self.done: list[Job] = []
        self.rule_quality: list[int] = []
        for kind in SERVED_KINDS:
            rule = router.preferred[kind]
            capable = [c.quality for c in candidates if kind in c.kinds]
            if rule is not None:
                self.rule_quality.append(by_name[rule].spec.quality)
            else:
                self.rule_quality.append(min(capable) if capable else 0)

    # -- the table's signals --------------------------------------------------------------------
    def sync(self, ctx: Context) -> None:
        """``Actor._sync``: the row's load and availability."""
        size = ctx.mailbox.size
        i = ctx.index
        self.table.set_load(i, size, ctx.running)
        self.table.set_available(i, size < self.capacity)

    def flip(self, ctx: Context, now: float) -> None:
        """``ctx`` became busy or idle: the co-load of every model on its device changes."""
        busy = ctx.running > 0
        ctx.on = busy
        dev = self.device_of[ctx.index]
        dev.account(now)
        dev.busy += 1 if busy else -1
        n = dev.busy
        times = self.times
        for p in self.peers[ctx.index]:
            f = p.coload_factor(n - 1 if p.on else n)
            if f != p.factor:
                p.advance(now)
                p.factor = f
                p.version += 1
                times[p.index] = p.next_time()
        ctx.factor = ctx.coload_factor(n - 1 if busy else n)

    # -- requests -------------------------------------------------------------------------------
    def dispatch(self, job: Job, now: float) -> bool:
        """Route ``job`` and queue it (starting it at once on a free slot)."""
        if self.oracle is not None:
            self.oracle.prepare(job, now)
        i = self.router.choose(job.route)
        if i is None:
            return False
        ctx = self.contexts[i]
        self.enq += 1
        job.seq = self.enq
        job.enqueued = now
        ctx.advance(now)
        ctx.version += 1
        box = ctx.mailbox
        if ctx.running < ctx.slots and not box.size:  # a free slot: it starts now
            ctx.start(job, now)
            if not ctx.on:
                self.flip(ctx, now)
            self.table.set_load(i, 0, ctx.running)
            self.times[i] = ctx.next_time()
            return True
        box.put(job)
        if ctx.running < ctx.slots:
            self.fill(ctx, now)
        else:
            self.sync(ctx)
        return True

    def arrive(self, job: Job, now: float) -> None:
        if self.dispatch(job, now):
            return
        if self.timeout <= 0.0:
            self.refuse(job)
            return
        job.waiting = True
        self.lines[job.ki * len(Priority) + job.priority].append(job)
        if self.timeout < math.inf:
            heapq.heappush(self.timeouts, (now + self.timeout, job.index, job))

    def refuse(self, job: Job) -> None:
        job.refused = True
        job.waiting = False
        job.ends += 1

    def notify(self, now: float) -> None:
        """Room appeared in a mailbox: place the waiting requests in the mailbox's order across
        lines (lowest ``class - waited / aging_s``, then the oldest); a line stops at its first
        request that cannot be placed, the others go on."""
        if self.notifying:  # placing a request freed room again: go round once more
            self.renotify = True
            return
        self.notifying = True
        aging = self.aging
        try:
            again = True
            while again:
                self.renotify = False
                lines = [line for line in self.lines if line]
                while lines:
                    best, best_key = -1, (math.inf, math.inf, 0)
                    for j, line in enumerate(lines):
                        while line and not line[0].waiting:  # refused at its timeout meanwhile
                            line.popleft()
                        if line:
                            head = line[0]
                            key = (head.priority - (now - head.at) / aging, head.at, head.index)
                            if key < best_key:
                                best, best_key = j, key
                    if best < 0:
                        break
                    line = lines[best]
                    job = line[0]
                    if not self.dispatch(job, now):
                        del lines[best]
                        continue
                    job.waiting = False
                    line.popleft()
                again = self.renotify
        finally:
            self.notifying = False

    def fill(self, ctx: Context, now: float) -> None:
        """Admit from the mailbox into free slots (``ctx`` advanced to ``now``), then sync and
        reschedule it."""
        box = ctx.mailbox
        capacity = self.capacity
        was_full = box.size >= capacity
        while ctx.running < ctx.slots and box.size:
            ctx.start(box.pop(now), now)
        if (ctx.running > 0) != ctx.on:
            self.flip(ctx, now)
        ctx.version += 1
        self.sync(ctx)
        self.times[ctx.index] = ctx.next_time()
        if was_full and box.size < capacity:
            self.notify(now)

    def on_context(self, ctx: Context, now: float) -> None:
        """``ctx``'s announced prefill or sequence end."""
        ctx.advance(now)
        done = self.done
        ctx.on_event(now, done)
        if not done:  # a prefill ended and its sequence decodes: nothing the table sees
            ctx.version += 1
            self.times[ctx.index] = ctx.next_time()
            return
        table = self.table
        i = ctx.index
        running = ctx.running
        busy = running if running < ctx.slots else ctx.slots
        for job in done:
            job.finish = now
            job.ends += 1
            if job.output:
                table.observe(i, job.first - job.started, (now - job.first) / job.output, now, busy)
            else:
                table.observe(i, now - job.started, table.ewma(i)[1], now, 1)
        ctx.running = running - len(done)
        done.clear()
        self.fill(ctx, now)

    def sample(self, now: float) -> bool:
        """The device sampler's tick; whether every device was idle all interval long."""
        table = self.table
        interval = self.interval
        idle = True
        for dev in self.devices:
            dev.account(now)
            util = dev.integral / interval
            dev.integral = 0.0
            util = 0.0 if util < 0.0 else 1.0 if util > 1.0 else util
            idle = idle and util == 0.0 and dev.busy == 0
            for ctx in dev.contexts:
                table.set_util(ctx.index, util)
        return idle

    # -- the loop -------------------------------------------------------------------------------
    def run(self, workload: Sequence[SimRequest]) -> SimResult:
        t0 = time.perf_counter()
        c0 = time.process_time()
        rng = random.Random(self.seed)
        rand = rng.random
        routes: dict[tuple[object, ...], RouteRequest] = {}
        jobs = [
            Job(n, r, 2.0 * rand() - 1.0, 2.0 * rand() - 1.0, routes)
            for n, r in enumerate(workload)
        ]
        order = sorted(jobs, key=lambda j: j.at)
        contexts = self.contexts
        times = self.times
        timeouts = self.timeouts
        inf = math.inf
        interval = self.interval
        next_sample = interval
        n = len(order)
        a = 0
        events = 0
        now = 0.0
        ta = order[0].at if n else inf
        while True:
            tc = min(times)
            tt = timeouts[0][0] if timeouts else inf
            if a >= n and tc == inf and tt == inf:
                break
            if next_sample <= tc and next_sample <= ta and next_sample <= tt:
                now = next_sample
                idle = self.sample(now)
                next_sample = now + interval
                if idle:  # nothing to read until the next event: skip the empty samples
                    nxt = min(tc, ta, tt)
                    if nxt > next_sample:
                        next_sample += math.floor((nxt - next_sample) / interval) * interval
                continue
            if tc < ta and tc <= tt:
                now = tc
                events += 1
                self.on_context(contexts[times.index(tc)], now)
            elif tt < ta:
                now = tt
                job = heapq.heappop(timeouts)[2]
                if job.waiting:
                    self.refuse(job)
            else:
                now = ta
                events += 1
                self.arrive(order[a], now)
                a += 1
                ta = order[a].at if a < n else inf
        for ctx in contexts:
            ctx.advance(now)
        for line in self.lines:  # never silently lost: a request still waiting is refused
            for job in line:
                if job.waiting:
                    self.refuse(job)
        bad = [j.index for j in jobs if j.ends != 1]
        if bad:  # pragma: no cover - a bookkeeping bug
            raise RuntimeError(
                f"requests {bad[:10]} ended {[jobs[b].ends for b in bad[:10]]} times"
            )
        return self.result(jobs, now, events, t0, c0)

    def result(self, jobs: list[Job], end: float, events: int, t0: float, c0: float) -> SimResult:
        row_model = self.row_model
        m = len(jobs)
        at = np.fromiter((j.at for j in jobs), np.float64, m)
        finish = np.fromiter((j.finish for j in jobs), np.float64, m)
        first = np.fromiter((j.first for j in jobs), np.float64, m)
        model = np.fromiter((-1 if j.refused else row_model[j.model] for j in jobs), np.int16, m)
        kind = np.fromiter((j.ki for j in jobs), np.int8, m)
        spilled = np.zeros(m, np.bool_)
        quality = np.zeros(m, np.float64)
        contexts = self.contexts
        rule = self.rule_quality
        for j in jobs:
            if not j.refused:
                ctx = contexts[j.model]
                if j.kind not in ctx.preferred:
                    spilled[j.index] = True
                    quality[j.index] = 1.0 + max(0, ctx.quality - rule[j.ki])
        served = model >= 0
        latency = np.where(served, finish - at, np.nan)
        first_token = np.where(served, first - at, np.nan)
        busy = dict.fromkeys(self.model_names, 0.0)
        for ctx in contexts:
            busy[ctx.name] += ctx.busy_s / end if end > 0 else 0.0
        return SimResult(
            policy=self.policy_name,
            models=self.model_names,
            at=at,
            latency=latency,
            first_token=first_token,
            kind=kind,
            model=model,
            quality=quality,
            spilled=spilled,
            busy_share=busy,
            duration_s=end,
            events=events,
            wall_s=time.perf_counter() - t0,
            cpu_s=time.process_time() - c0,
        )


def simulate(
    fleet: Fleet,
    workload: Sequence[SimRequest],
    policy: str | Policy = "dynamic",
    *,
    scoring: Scoring = Scoring(),
    mailbox_capacity: int = 64,
    admission_timeout: float | None = None,
    aging_s: float = 10.0,
    sample_interval: float = 0.5,
    seed: int = 0,
    priors: bool = False,
) -> SimResult:
    """Replay ``workload`` on ``fleet`` under ``policy``, in virtual time.

    Args:
        fleet: the models, their service profiles and devices.
        workload: the requests (any order; replayed by arrival time).
        policy: a policy name (the shipped ones; ``"oracle"`` for the clairvoyant reference,
            ``"oracle_pen"`` for it with the kernel's penalties) or a policy object, as
            :class:`~zeta.Scheduler` takes it. A policy object keeps its
            state: pass a fresh one per run.
        scoring: the kernel's parameters.
        mailbox_capacity: most requests queued per replica.
        admission_timeout: how long a request waits for mailbox room before it is refused
            (``0``: at once; ``None``: as long as it takes), as the scheduler's option.
        aging_s: seconds of waiting (for mailbox room, or in a mailbox since placed there) that
            raise a request by one priority class.
        sample_interval: seconds between utilisation samples.
        seed: draws the jitter, seeds the kernel's rotation and randomised policies.
        priors: seed each row's estimates (one observation of a typical request at one
            sequence) and its step slope from the profile, as a scheduler that loaded a measured
            profile would start; by default they start as in a fresh scheduler.

    Raises:
        ValueError: a parameter out of range.
    """
    run = _Run(
        fleet,
        policy,
        scoring=scoring,
        mailbox_capacity=mailbox_capacity,
        admission_timeout=admission_timeout,
        aging_s=aging_s,
        sample_interval=sample_interval,
        seed=seed,
        priors=priors,
    )
    return run.run(workload)
