"""Routing policies: pure objects that pick one candidate (actor) for one request.

A policy sees everything as arguments: the request's routing facts, the live
:class:`~zeta._scoring.ScoreTable` (load, estimates, utilisation, availability) and the static
candidate list. It does no I/O, reads no clock and logs nothing, so tests and simulators drive it
directly. It may keep its own small state (a rotation, a seeded RNG, hysteresis flags).

A policy must only return a candidate that can serve the request's kind and is available
(``table.available(i)``: ready, not down, mailbox not full), or ``None`` when it will not place
the request; the router checks and raises on a violation.

A policy that only ever uses some of the capable candidates for a request (``static`` sends each
kind to one model) may also define ``scope(request, candidates)``, returning those candidates'
indices whatever their load. When the policy declines, the scheduler reads it to tell "every model
it may use is down" (:class:`~zeta.ModelUnavailable`) from "they are all full"
(:class:`~zeta.Overloaded`); without it, every capable candidate is in scope.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ._exceptions import ConfigError
from ._scoring import NO_CANDIDATE, ScoreTable
from ._types import Kind, Priority, check_number

__all__ = [
    "POLICIES",
    "Candidate",
    "DynamicPolicy",
    "JoinShortestQueuePolicy",
    "PeakEwmaPolicy",
    "Policy",
    "PowerOfTwoChoicesPolicy",
    "RoundRobinPolicy",
    "RouteRequest",
    "StaticPolicy",
    "ThresholdPolicy",
    "make_policy",
]


@dataclass(frozen=True, slots=True)
class Candidate:
    """Static facts about one actor (one replica of one model); ``index`` is its table row.

    ``device`` is the model's GPU index (``ModelSpec.device``), ``None`` for the host CPU.
    """

    index: int
    model: str
    replica: int
    kinds: frozenset[Kind]
    preferred: frozenset[Kind]
    quality: int
    capacity: int
    device: int | None = None


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What a policy knows about a request.

    ``kind`` is a served kind (``AUTO`` is resolved before routing) and ``kind_index`` its
    column in the table; ``est_tokens`` is the expected output length the kernel multiplies by
    the per-token estimate; ``difficulty`` is in ``[0, 1]``. ``rows``, when given, pins the
    request to those candidate rows (the replicas of the model a caller named with ``model=``):
    the router places it there itself, and the policy is not asked.
    """

    kind: Kind
    kind_index: int
    est_tokens: float
    difficulty: float = 0.5
    priority: Priority = Priority.NORMAL
    rows: tuple[int, ...] | None = None


class Policy(Protocol):
    """Chooses a candidate index for a request, or ``None`` to decline."""

    name: str

    def choose(
        self, request: RouteRequest, table: ScoreTable, candidates: Sequence[Candidate]
    ) -> int | None: ...


# -- helpers shared by the policies ------------------------------------------------------------
def eligible(
    request: RouteRequest, table: ScoreTable, candidates: Sequence[Candidate]
) -> list[int]:
    """Indices of candidates that can serve the kind and are available now."""
    kind = request.kind
    return [c.index for c in candidates if kind in c.kinds and table.available(c.index)]


def occupancy(table: ScoreTable, i: int) -> float:
    """Queued plus running requests of candidate ``i`` per slot of its context.

    Below 1 while a slot is free (a request sent there starts at the next step), so a candidate
    with a free slot always ranks before one without; with one slot it is the outstanding count.
    """
    queue, busy = table.load(i)
    return (queue + busy) / table.slots(i)


def _service(table: ScoreTable, i: int, est_tokens: float, k: int) -> float:
    """Candidate ``i``'s service time for a request of ``est_tokens`` at occupancy ``k``."""
    per_request, per_token = table.ewma(i)
    return per_request + est_tokens * per_token * (1.0 + table.step_slope(i) * (k - 1))


def slot_wait(table: ScoreTable, i: int, est_tokens: float) -> float:
    """Seconds a new request would wait for a slot of candidate ``i``: none while one is free;
    otherwise each request ahead of it adds a full context's service time over its slots (the
    kernel's wait term)."""
    queue, busy = table.load(i)
    slots = table.slots(i)
    ahead = queue + busy + 1 - slots
    return ahead / slots * _service(table, i, est_tokens, slots) if ahead > 0 else 0.0


def expected_completion(table: ScoreTable, i: int, est_tokens: float) -> float:
    """Wait plus service of a new request at candidate ``i``: the kernel's cost without
    contention and penalties (its evaluation order, so with one slot it is
    ``(outstanding + 1) * expected service``)."""
    queue, busy = table.load(i)
    slots = table.slots(i)
    n = queue + busy + 1
    if n > slots:
        return n / slots * _service(table, i, est_tokens, slots)
    return _service(table, i, est_tokens, n)


def backlog_load(table: ScoreTable, c: Candidate, est_tokens: float, backlog_s: float) -> float:
    """How loaded one candidate is, in ``[0, 1]``, from its live queue (no sampled signal).

    The larger of its fill (queued plus running requests over mailbox capacity plus slots) and
    its backlog (:func:`slot_wait` for a request of ``est_tokens``) over ``backlog_s`` seconds.
    A batch running in the slots is not a backlog: only requests that keep a new one from a
    slot count.
    """
    queue, busy = table.load(c.index)
    fill = (queue + busy) / (c.capacity + table.slots(c.index))
    return min(1.0, max(fill, slot_wait(table, c.index, est_tokens) / backlog_s))


def _primary_models(kind: Kind, candidates: Sequence[Candidate]) -> tuple[str, ...]:
    """The fixed rule's models for ``kind``: best-quality models that prefer it.

    If no model prefers the kind, the best-quality models that can serve it.
    """
    pool = [c for c in candidates if kind in c.preferred] or [
        c for c in candidates if kind in c.kinds
    ]
    if not pool:
        return ()
    best = min(c.quality for c in pool)
    return tuple(dict.fromkeys(c.model for c in pool if c.quality == best))


class _Rotation:
    """Round-robin tie breaking among equally good candidates (deterministic, no RNG)."""

    __slots__ = ("_next",)

    def __init__(self, seed: int = 0) -> None:
        self._next = seed

    def pick_min(self, keyed: Sequence[tuple[float, int]]) -> int | None:
        """The index with the smallest key; equal keys are taken in turn."""
        if not keyed:
            return None
        n = len(keyed)
        start = self._next % n
        best_key, best = keyed[start]
        for j in range(1, n):
            key, i = keyed[(start + j) % n]
            if key < best_key:
                best_key, best = key, i
        self._next = start + 1
        return best


# -- the shipped policies -----------------------------------------------------------------------
class DynamicPolicy:
    """The scoring kernel: cheapest expected completion, with contention and preference penalties."""

    name = "dynamic"

    def choose(
        self, request: RouteRequest, table: ScoreTable, candidates: Sequence[Candidate]
    ) -> int | None:
        i = table.choose(request.kind_index, request.est_tokens)
        return None if i == NO_CANDIDATE else i


class StaticPolicy:
    """The fixed rules: each kind goes to the best-quality model that prefers it, never elsewhere.

    With the usual configuration (coder prefers simple and code, embedder prefers embed, reasoner
    prefers reason) that is: simple/chat -> coder, code -> coder, embed -> embedder,
    reason -> reasoner. Among the chosen model's replicas the least loaded (:func:`occupancy`)
    wins. When that model
    is full or down the request is not placed (no spill), which is what makes it a baseline.
    """

    name = "static"

    def __init__(self) -> None:
        self._rotation = _Rotation()
        self._cache: tuple[Sequence[Candidate], dict[Kind, tuple[str, ...]]] | None = None

    def primary(self, kind: Kind, candidates: Sequence[Candidate]) -> tuple[str, ...]:
        """The models the fixed rule sends ``kind`` to (cached per candidate list)."""
        cache = self._cache
        if cache is None or cache[0] is not candidates:
            cache = self._cache = (candidates, {})
        models = cache[1].get(kind)
        if models is None:
            models = cache[1][kind] = _primary_models(kind, candidates)
        return models

    def scope(self, request: RouteRequest, candidates: Sequence[Candidate]) -> list[int]:
        """The rule's model's replicas: the only candidates this policy ever uses for the kind."""
        models = self.primary(request.kind, candidates)
        return [c.index for c in candidates if c.model in models and request.kind in c.kinds]

    def choose(
        self, request: RouteRequest, table: ScoreTable, candidates: Sequence[Candidate]
    ) -> int | None:
        models = self.primary(request.kind, candidates)
        keyed = [
            (occupancy(table, c.index), c.index)
            for c in candidates
            if c.model in models and request.kind in c.kinds and table.available(c.index)
        ]
        return self._rotation.pick_min(keyed)


class ThresholdPolicy:
    """The fixed rules plus overload spill with hysteresis.

    A model is *overloaded* once its load (mean over available replicas of
    :func:`backlog_load`: the larger of fill and the wait for a slot over ``backlog_s``)
    exceeds ``high``, and stays so until it falls below ``low``. The load is read from the live
    queue and service-time estimates, not from sampled utilisation: a sampled reading lags a
    burst by a sampling interval, and on a shared device it is the same for every model on it.
    While the rule's model is overloaded (or has no available replica), a request spills to
    another capable model that is not overloaded, models preferring the kind first, then by
    quality. Spilling *down* the quality ladder is limited by difficulty: a ``reason`` request
    only spills to a model that does not prefer ``reason`` if its difficulty is at most
    ``max_spill_difficulty``. So with a coder and a reasoner: code goes to the reasoner while the
    coder is overloaded, and easy reasoning goes to the coder while the reasoner is overloaded
    and the coder is not. If nothing better exists the rule's model is used even when overloaded.

    Args:
        high: load above which a model starts spilling (0..1).
        low: load below which it stops (0..high).
        max_spill_difficulty: hardest ``reason`` request that may go to a non-reasoning model.
        backlog_s: wait for a slot (seconds of work ahead) that counts as fully loaded.
    """

    name = "threshold"

    def __init__(
        self,
        high: float = 0.8,
        low: float = 0.5,
        max_spill_difficulty: float = 0.5,
        backlog_s: float = 2.0,
    ) -> None:
        high = check_number(high, "high", 0.0, 1.0)
        low = check_number(low, "low", 0.0, 1.0)
        if not low < high:
            raise ConfigError(f"need 0 <= low < high <= 1, got low={low!r}, high={high!r}")
        max_spill_difficulty = check_number(max_spill_difficulty, "max_spill_difficulty", 0.0, 1.0)
        backlog_s = check_number(backlog_s, "backlog_s", 0.0, 1e6, low_open=True)
        self.backlog_s = backlog_s
        self.high = high
        self.low = low
        self.max_spill_difficulty = max_spill_difficulty
        self._static = StaticPolicy()
        self._rotation = _Rotation()
        self._overloaded: set[str] = set()

    @property
    def overloaded(self) -> frozenset[str]:
        """Models currently in the spilling state."""
        return frozenset(self._overloaded)

    def _model_load(
        self, model: str, est: float, table: ScoreTable, candidates: Sequence[Candidate]
    ) -> float:
        loads = [
            backlog_load(table, c, est, self.backlog_s)
            for c in candidates
            if c.model == model and table.available(c.index)
        ]
        return sum(loads) / len(loads) if loads else 1.0

    def _is_overloaded(
        self, model: str, est: float, table: ScoreTable, candidates: Sequence[Candidate]
    ) -> bool:
        load = self._model_load(model, est, table, candidates)
        if model in self._overloaded:
            if load < self.low:
                self._overloaded.discard(model)
                return False
            return True
        if load > self.high:
            self._overloaded.add(model)
            return True
        return False

    def _pick(
        self, model: str, request: RouteRequest, table: ScoreTable, candidates: Sequence[Candidate]
    ) -> int | None:
        keyed = [
            (backlog_load(table, c, request.est_tokens, self.backlog_s), c.index)
            for c in candidates
            if c.model == model and request.kind in c.kinds and table.available(c.index)
        ]
        return self._rotation.pick_min(keyed)

    def scope(self, request: RouteRequest, candidates: Sequence[Candidate]) -> list[int]:
        """Every capable candidate, except that a ``reason`` request harder than
        ``max_spill_difficulty`` never goes to a model that neither is the rule's nor prefers it."""
        kind = request.kind
        primary = self._static.primary(kind, candidates)
        hard = kind is Kind.REASON and request.difficulty > self.max_spill_difficulty
        return [
            c.index
            for c in candidates
            if kind in c.kinds and (not hard or c.model in primary or kind in c.preferred)
        ]

    def choose(
        self, request: RouteRequest, table: ScoreTable, candidates: Sequence[Candidate]
    ) -> int | None:
        kind = request.kind
        primary = self._static.primary(kind, candidates)
        for model in primary:
            if not self._is_overloaded(model, request.est_tokens, table, candidates):
                i = self._pick(model, request, table, candidates)
                if i is not None:
                    return i
        # Spill: other capable models, those preferring the kind first, then by quality.
        others: dict[str, tuple[bool, int]] = {}
        for c in candidates:
            if kind in c.kinds and c.model not in primary:
                others[c.model] = (kind not in c.preferred, c.quality)
        for model in sorted(others, key=lambda m: (*others[m], m)):
            prefers = not others[model][0]
            if (
                kind is Kind.REASON
                and not prefers
                and request.difficulty > self.max_spill_difficulty
            ):
                continue
            if self._is_overloaded(model, request.est_tokens, table, candidates):
                continue
            i = self._pick(model, request, table, candidates)
            if i is not None:
                return i
        for model in primary:
            i = self._pick(model, request, table, candidates)
            if i is not None:
                return i
        return None


class RoundRobinPolicy:
    """Baseline: capable, available candidates in turn (one rotation per kind)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next: dict[Kind, int] = {}

    def choose(
        self, request: RouteRequest, table: ScoreTable, candidates: Sequence[Candidate]
    ) -> int | None:
        n = len(candidates)
        start = self._next.get(request.kind, 0)
        for j in range(n):
            pos = (start + j) % n
            c = candidates[pos]
            if request.kind in c.kinds and table.available(c.index):
                self._next[request.kind] = pos + 1
                return c.index
        return None


class JoinShortestQueuePolicy:
    """Baseline: the capable, available candidate with the fewest queued plus running requests
    per slot (:func:`occupancy`), so one with a free slot beats one without."""

    name = "jsq"

    def __init__(self) -> None:
        self._rotation = _Rotation()

    def choose(
        self, request: RouteRequest, table: ScoreTable, candidates: Sequence[Candidate]
    ) -> int | None:
        keyed = [(occupancy(table, i), i) for i in eligible(request, table, candidates)]
        return self._rotation.pick_min(keyed)


class PowerOfTwoChoicesPolicy:
    """Baseline: sample two capable, available candidates at random, take the less occupied
    (:func:`occupancy`: queued plus running requests per slot).

    Seeded, so a run is reproducible.
    """

    name = "p2c"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose(
        self, request: RouteRequest, table: ScoreTable, candidates: Sequence[Candidate]
    ) -> int | None:
        pool = eligible(request, table, candidates)
        if len(pool) <= 1:
            return pool[0] if pool else None
        a, b = self._rng.sample(pool, 2)
        return b if occupancy(table, b) < occupancy(table, a) else a


class PeakEwmaPolicy:
    """Baseline: Finagle's peak-EWMA balancer, expected wait plus service time.

    Uses the kernel's peak-EWMA estimates and slot model (:func:`expected_completion`; with one
    slot that is ``(outstanding + 1) * expected service time``) but ignores utilisation and
    preference penalties.
    """

    name = "peak_ewma"

    def __init__(self) -> None:
        self._rotation = _Rotation()

    def choose(
        self, request: RouteRequest, table: ScoreTable, candidates: Sequence[Candidate]
    ) -> int | None:
        est = request.est_tokens
        keyed = [
            (expected_completion(table, i, est), i) for i in eligible(request, table, candidates)
        ]
        return self._rotation.pick_min(keyed)


#: Policy names accepted by ``Scheduler(policy=...)``.
POLICIES: dict[str, type] = {
    "static": StaticPolicy,
    "threshold": ThresholdPolicy,
    "dynamic": DynamicPolicy,
    "round_robin": RoundRobinPolicy,
    "jsq": JoinShortestQueuePolicy,
    "p2c": PowerOfTwoChoicesPolicy,
    "peak_ewma": PeakEwmaPolicy,
}


def make_policy(policy: str | Policy, *, seed: int = 0) -> Policy:
    """A policy object from a name in :data:`POLICIES`, or ``policy`` itself if it is one."""
    if isinstance(policy, str):
        cls = POLICIES.get(policy)
        if cls is None:
            raise ConfigError(f"unknown policy {policy!r}; known: {sorted(POLICIES)}", key="policy")
        instance: Policy = cls(seed=seed) if cls is PowerOfTwoChoicesPolicy else cls()
        return instance
    if not callable(getattr(policy, "choose", None)):
        raise ConfigError(f"a policy needs a choose() method, got {policy!r}", key="policy")
    return policy
