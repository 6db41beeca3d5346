"""Pure-Python reference implementation of the scoring kernel.

The compiled kernel (``native/_scoring_c.pyx``) implements exactly these semantics; tests run
both and check that they agree. Read this file to learn what the kernel does.

Cost of sending one message to candidate ``i``::

    expected = ewma_req[i] + est_tokens * ewma_tok[i]          # seconds of service
    cost     = (queue[i] + in_flight[i] + 1) * expected * contention(util[i]) + penalty[i, kind]
    contention(u) = 1 + weight * min(u, cap) / (1 - min(u, cap))   # M/M/1-like slowdown

A candidate that cannot serve the kind, or is unavailable (dead, down, mailbox full), costs
``inf`` and is never chosen; when no candidate is finite the result is ``NO_CANDIDATE`` (-1).
The cheapest candidate wins. Ties are broken by a rotation: the scan starts at
``rotation % n`` and only a strictly lower cost replaces the current best, so equal candidates
are chosen in turn. A :class:`ScoreTable` starts its rotation at ``seed`` and advances it by one
on every decision, so a seeded run is reproducible.

Service-time estimates follow a peak-sensitive EWMA (Finagle/Linkerd "peak EWMA"): a sample
above the current estimate replaces it at once; a lower one is blended in with weight
``1 - exp(-dt / tau)``, so the estimate decays toward the new level with time constant ``tau``.
"""

from __future__ import annotations

import math
from collections.abc import MutableSequence, Sequence

from ._exceptions import KernelInputError

NO_CANDIDATE = -1
UTIL_CAP = 0.95
INF = math.inf

__all__ = ["NO_CANDIDATE", "ScoreTable", "contention", "peak_ewma", "score"]


def _check(name: str, value: float, upper: float | None = None) -> float:
    """Return ``value`` as a float, or raise for NaN, negative, infinite or out-of-range input."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise KernelInputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0.0:
        raise KernelInputError(f"{name} must be finite and >= 0, got {value!r}")
    if upper is not None and v > upper:
        raise KernelInputError(f"{name} must be <= {upper}, got {value!r}")
    return v


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise KernelInputError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def contention(util: float, weight: float = 1.0) -> float:
    """Slowdown factor for a device at utilisation ``util`` (0..1); 1 when idle."""
    u = util if util < UTIL_CAP else UTIL_CAP
    return 1.0 + weight * u / (1.0 - u)


def peak_ewma(old: float, sample: float, dt: float, tau: float) -> float:
    """One peak-EWMA step: jump up to a new peak at once, decay toward lower samples."""
    if sample >= old:
        return sample
    if dt <= 0.0:
        return old
    w = math.exp(-dt / tau)
    return old * w + sample * (1.0 - w)


def _cost(
    q: int, f: int, req: float, tok: float, util: float, pen: float, est: float, weight: float
) -> float:
    return (q + f + 1) * (req + est * tok) * contention(util, weight) + pen


def score(
    queue: Sequence[int],
    in_flight: Sequence[int],
    ewma_req: Sequence[float],
    ewma_tok: Sequence[float],
    util: Sequence[float],
    capable: Sequence[int],
    penalty: Sequence[float],
    available: Sequence[int],
    est_tokens: float,
    rotation: int = 0,
    costs: MutableSequence[float] | None = None,
    *,
    weight: float = 1.0,
) -> int:
    """Score one message against ``n`` candidates given as parallel arrays; return the index.

    ``capable`` and ``penalty`` are for the message's kind. Returns :data:`NO_CANDIDATE` when
    no candidate is capable and available. If ``costs`` is given, it receives every cost.

    Raises:
        KernelInputError: mismatched lengths, or NaN, negative or infinite values.
    """
    n = len(queue)
    arrays = {
        "in_flight": in_flight, "ewma_req": ewma_req, "ewma_tok": ewma_tok, "util": util,
        "capable": capable, "penalty": penalty, "available": available,
    }  # fmt: skip
    for name, arr in arrays.items():
        if len(arr) != n:
            raise KernelInputError(f"{name} has length {len(arr)}, expected {n} (len(queue))")
    if costs is not None and len(costs) != n:
        raise KernelInputError(f"costs has length {len(costs)}, expected {n}")
    if n == 0:
        raise KernelInputError("no candidates")
    est = _check("est_tokens", est_tokens)
    w = _check("weight", weight)
    _check_count("rotation", rotation)
    best, best_cost = NO_CANDIDATE, INF
    start = rotation % n
    for j in range(n):
        i = (start + j) % n
        q = _check_count(f"queue[{i}]", queue[i])
        f = _check_count(f"in_flight[{i}]", in_flight[i])
        c = _cost(
            q, f, _check(f"ewma_req[{i}]", ewma_req[i]), _check(f"ewma_tok[{i}]", ewma_tok[i]),
            _check(f"util[{i}]", util[i], 1.0), _check(f"penalty[{i}]", penalty[i]), est, w,
        )  # fmt: skip
        if not capable[i] or not available[i]:
            c = INF
        if costs is not None:
            costs[i] = c
        if c < best_cost:
            best, best_cost = i, c
    return best


class ScoreTable:
    """Live state of ``n`` candidates and the per-message decision over it.

    The router owns one table. Actors update load, availability and service-time estimates in
    place; :meth:`choose` scores all candidates for one message without allocating.
    Capability and penalty are per (candidate, kind) pair, kinds numbered ``0..n_kinds-1``.
    All setters validate their input and raise :class:`KernelInputError`.
    """

    def __init__(
        self, n: int, n_kinds: int, *, seed: int = 0, tau: float = 5.0, weight: float = 1.0
    ) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise KernelInputError(f"n must be an integer >= 1, got {n!r}")
        if isinstance(n_kinds, bool) or not isinstance(n_kinds, int) or n_kinds < 1:
            raise KernelInputError(f"n_kinds must be an integer >= 1, got {n_kinds!r}")
        self._n = n
        self._k = n_kinds
        self._rot = _check_count("seed", seed) % n
        self._tau = 1.0
        self._weight = 1.0
        self.set_params(tau=tau, weight=weight)
        self._queue = [0] * n
        self._in_flight = [0] * n
        self._req = [0.0] * n
        self._tok = [0.0] * n
        self._stamp = [0.0] * n
        self._util = [0.0] * n
        self._available = [True] * n
        self._capable = [False] * (n * n_kinds)
        self._penalty = [0.0] * (n * n_kinds)

    # -- shape and parameters -------------------------------------------------------------
    @property
    def n(self) -> int:
        return self._n

    @property
    def n_kinds(self) -> int:
        return self._k

    @property
    def tau(self) -> float:
        return self._tau

    @property
    def weight(self) -> float:
        return self._weight

    def set_params(self, *, tau: float | None = None, weight: float | None = None) -> None:
        """Set the EWMA time constant (seconds, > 0) and the contention weight (>= 0)."""
        if tau is not None:
            t = _check("tau", tau)
            if t <= 0.0:
                raise KernelInputError(f"tau must be > 0, got {tau!r}")
            self._tau = t
        if weight is not None:
            self._weight = _check("weight", weight)

    def _idx(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self._n:
            raise KernelInputError(f"candidate index {i!r} out of range 0..{self._n - 1}")
        return i

    def _kind(self, kind: int) -> int:
        if isinstance(kind, bool) or not isinstance(kind, int) or not 0 <= kind < self._k:
            raise KernelInputError(f"kind {kind!r} out of range 0..{self._k - 1}")
        return kind

    # -- setters --------------------------------------------------------------------------
    def set_capability(self, i: int, kind: int, capable: bool, penalty: float = 0.0) -> None:
        j = self._idx(i) * self._k + self._kind(kind)
        self._penalty[j] = _check("penalty", penalty)
        self._capable[j] = bool(capable)

    def set_available(self, i: int, available: bool) -> None:
        self._available[self._idx(i)] = bool(available)

    def set_load(self, i: int, queue: int, in_flight: int) -> None:
        i = self._idx(i)
        self._queue[i] = _check_count("queue", queue)
        self._in_flight[i] = _check_count("in_flight", in_flight)

    def add_load(self, i: int, queue: int, in_flight: int) -> None:
        """Add (possibly negative) deltas to the load; the result must stay >= 0."""
        i = self._idx(i)
        self.set_load(i, self._queue[i] + queue, self._in_flight[i] + in_flight)

    def set_util(self, i: int, util: float) -> None:
        self._util[self._idx(i)] = _check("util", util, 1.0)

    def set_ewma(self, i: int, per_request: float, per_token: float, now: float) -> None:
        """Overwrite the service-time estimates (a prior, or a calibration result)."""
        i = self._idx(i)
        self._req[i] = _check("per_request", per_request)
        self._tok[i] = _check("per_token", per_token)
        self._stamp[i] = _check("now", now)

    def observe(self, i: int, per_request: float, per_token: float, now: float) -> None:
        """Fold one observed service into candidate ``i``'s estimates (peak EWMA)."""
        i = self._idx(i)
        req = _check("per_request", per_request)
        tok = _check("per_token", per_token)
        t = _check("now", now)
        dt = t - self._stamp[i]
        self._req[i] = peak_ewma(self._req[i], req, dt, self._tau)
        self._tok[i] = peak_ewma(self._tok[i], tok, dt, self._tau)
        if t > self._stamp[i]:
            self._stamp[i] = t

    # -- getters --------------------------------------------------------------------------
    def load(self, i: int) -> tuple[int, int]:
        i = self._idx(i)
        return self._queue[i], self._in_flight[i]

    def ewma(self, i: int) -> tuple[float, float]:
        i = self._idx(i)
        return self._req[i], self._tok[i]

    def util(self, i: int) -> float:
        return self._util[self._idx(i)]

    def available(self, i: int) -> bool:
        return self._available[self._idx(i)]

    def capability(self, i: int, kind: int) -> tuple[bool, float]:
        j = self._idx(i) * self._k + self._kind(kind)
        return self._capable[j], self._penalty[j]

    # -- decisions ------------------------------------------------------------------------
    def cost(self, i: int, kind: int, est_tokens: float) -> float:
        i = self._idx(i)
        j = i * self._k + self._kind(kind)
        est = _check("est_tokens", est_tokens)
        if not self._capable[j] or not self._available[i]:
            return INF
        return _cost(
            self._queue[i], self._in_flight[i], self._req[i], self._tok[i], self._util[i],
            self._penalty[j], est, self._weight,
        )  # fmt: skip

    def choose(
        self, kind: int, est_tokens: float, costs: MutableSequence[float] | None = None
    ) -> int:
        """Return the cheapest candidate for one message, or ``NO_CANDIDATE``.

        Advances the tie-breaking rotation by one. If ``costs`` (length ``n``) is given, it
        receives every candidate's cost.
        """
        k = self._kind(kind)
        est = _check("est_tokens", est_tokens)
        n = self._n
        if costs is not None and len(costs) != n:
            raise KernelInputError(f"costs has length {len(costs)}, expected {n}")
        start = self._rot
        self._rot = (start + 1) % n
        best, best_cost = NO_CANDIDATE, INF
        for j in range(n):
            i = start + j
            if i >= n:
                i -= n
            c = INF
            if self._capable[i * self._k + k] and self._available[i]:
                c = _cost(
                    self._queue[i], self._in_flight[i], self._req[i], self._tok[i],
                    self._util[i], self._penalty[i * self._k + k], est, self._weight,
                )  # fmt: skip
            if costs is not None:
                costs[i] = c
            if c < best_cost:
                best, best_cost = i, c
        return best

    def choose_batch(
        self,
        kinds: Sequence[int],
        est_tokens: Sequence[float],
        out: MutableSequence[int],
        reserve: bool = True,
    ) -> int:
        """Decide for many messages in order; write each choice into ``out``.

        With ``reserve``, each choice adds one to its candidate's queue before the next message
        is scored (what the router does when it enqueues). Returns how many messages found no
        candidate. All inputs are validated before any state changes.
        """
        m = len(kinds)
        if len(est_tokens) != m or len(out) != m:
            raise KernelInputError(
                f"kinds, est_tokens and out must have equal lengths, got "
                f"{m}, {len(est_tokens)}, {len(out)}"
            )
        for x in range(m):
            self._kind(kinds[x])
            _check(f"est_tokens[{x}]", est_tokens[x])
        misses = 0
        for x in range(m):
            c = self.choose(kinds[x], est_tokens[x])
            out[x] = c
            if c == NO_CANDIDATE:
                misses += 1
            elif reserve:
                self._queue[c] += 1
        return misses
