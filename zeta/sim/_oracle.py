"""A clairvoyant reference policy: the least total latency added, with exact sizes.

The oracle reads what no live policy can: every request's true prompt and output length and
its jitter, the exact state of each context (prefill left, steps left per sequence, mailbox)
and the device co-load. For each capable, available candidate it projects the finish times of
everything in that context with and without the new request (no further arrivals, co-load as
it is now) and charges the difference: the request's own latency plus the delay it imposes on
the requests already there (a longer prefill ahead of them, slower steps in a fuller batch).
The time by which the request extends the candidate's busy period slows the busy models on the
same device (their co-load factor rises by one model); that delay to each of their outstanding
requests, up to its projected finish, is charged too (``harm``). Neither choice dominates: the
harm is priced as if nothing else arrived, which is right for a burst but too cautious under
sustained overload, where the extra throughput of a second busy model serves the arrivals to
come; ``harm=False`` leaves it out.

By default it minimises latency alone over every capable model (capability is the one rule it
keeps): the best achievable latency, a reference no policy should beat; the quality measure
shows what that costs. With ``penalties=True`` it adds the kernel's penalties as ``dynamic``
does (``spill_penalty`` for a kind the model does not prefer, ``quality_penalty`` per quality
rank): "how good could the kernel's trade-off be with perfect information?" under the same
quality rules. (``dynamic`` multiplies its latency estimate by the device's contention factor
before adding penalties, so on a busy device its penalties weigh less than the oracle's.)

It is greedy (one decision at a time, no lookahead at future arrivals), so it is a strong
reference rather than a provable optimum. ``python -m bench policies`` takes, per seed, the
better (by mean latency) of the harm and no-harm variants as its reference, and flags any
policy that beats that on mean latency.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .._policies import Candidate, RouteRequest
from .._scoring import ScoreTable
from ._context import Context, Job

__all__ = ["OraclePolicy"]


class OraclePolicy:
    """Least total latency added, with exact sizes; inside the simulator only.

    The engine binds it to its contexts, and calls :meth:`prepare` with the true job and the
    time before each routing decision; it then routes through the
    :class:`~zeta._router.Router` like any other policy.

    Args:
        penalties: add the kernel's spill and quality penalties to the cost.
        harm: charge the co-load delay to the other models of the device.
    """

    def __init__(self, *, penalties: bool = False, harm: bool = True) -> None:
        self.penalties = penalties
        self.harm = harm
        self.name = "oracle" + ("_pen" if penalties else "") + ("" if harm else "_noharm")
        self._contexts: Sequence[Context] = ()
        self._peers: Sequence[Sequence[Context]] = ()
        self._job: Job | None = None
        self._now = 0.0

    def bind(self, contexts: Sequence[Context], peers: Sequence[Sequence[Context]]) -> None:
        """The contexts, one per candidate row, and for each the others on its device."""
        self._contexts = contexts
        self._peers = peers

    def prepare(self, job: Job, now: float) -> None:
        """The request about to be routed, as the simulator knows it, and the time."""
        self._job = job
        self._now = now

    def choose(
        self, request: RouteRequest, table: ScoreTable, candidates: Sequence[Candidate]
    ) -> int | None:
        job, now = self._job, self._now
        if job is None or job.route is not request:
            raise RuntimeError("OraclePolicy only routes inside zeta.sim.simulate")
        best, best_cost = None, math.inf
        ki = request.kind_index
        for c in candidates:
            i = c.index
            capable, penalty = table.capability(i, ki)
            if not capable or not table.available(i):
                continue
            if not self.penalties:
                penalty = 0.0
            ctx = self._contexts[i]
            base, _, base_end = ctx.project(now)
            total, _, end = ctx.project(now, job)
            cost = total - base + penalty
            if self.harm:
                cost += self._external(ctx, now, base_end, end)
            if cost < best_cost:
                best, best_cost = i, cost
        return best

    def _external(self, ctx: Context, now: float, base_end: float, end: float) -> float:
        """Delay to the other models of ``ctx``'s device while the new request keeps ``ctx``
        busy from ``base_end`` (when it would have gone idle) to ``end``: each busy peer runs
        slower by one more busy model, and each of its requests that ends after ``base_end``
        loses that progress until it ends."""
        if end <= base_end:
            return 0.0
        peers = self._peers[ctx.index]
        busy = sum(1 for p in peers if p.running)
        cost = 0.0
        for p in peers:
            if not p.running:
                continue
            now_f = p.coload_factor(busy - 1)  # p's busy peers once ctx is idle
            then_f = p.coload_factor(busy)
            if then_f <= now_f:
                continue
            lost = 0.0
            for t in p.finish_times(now):
                if t > base_end:
                    lost += (t if t < end else end) - base_end
            cost += lost * (1.0 - now_f / then_f)
        return cost
