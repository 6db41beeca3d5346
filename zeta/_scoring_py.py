"""Pure-Python reference implementation of the scoring kernel.

The compiled kernel (``native/_scoring_c.pyx``) implements exactly these semantics; tests run
both and check that they agree. Read this file to learn what the kernel does.

Cost of sending one message to candidate ``i``::

    expected = ewma_req[i] + est_tokens * ewma_tok[i]          # seconds of service
    cost     = (queue[i] + in_flight[i] + 1) * expected * contention(util[i]) + penalty[i, kind]
    contention(u) = 1 + weight * min(u, cap) / (1 - min(u, cap))   # M/M/1-like slowdown

A candidate that cannot serve the kind, or is unavailable (dead, down, mailbox full), costs
``inf`` and is never chosen; when no candidate is finite the result is ``NO_CANDIDATE`` (-1).
The cost of a capable, available candidate saturates at ``MAX_COST`` (the largest float), so
huge estimates can never make a servable candidate look unservable.
The cheapest candidate wins. Ties are broken by a rotation: the scan starts at the table's
rotation and only a strictly lower cost replaces the current best. A :class:`ScoreTable` starts
its rotation at ``seed % n`` and moves it to just past each decision's winner (or by one when
there is none), so equal candidates are chosen in turn, round-robin, even with incapable ones
between them; a seeded run is reproducible.

Service-time estimates follow a peak-sensitive EWMA (Finagle/Linkerd "peak EWMA"): a sample
above the current estimate replaces it at once; a lower one is blended in with weight
``1 - exp(-dt / tau)``, so the estimate decays toward the new level with time constant ``tau``.

Inputs are validated: numbers must be real numbers (``str``/``bytes`` are rejected), finite and
``>= 0``; counts and indices must be integers (anything with ``__index__`` except ``bool``).
Anything else raises :class:`~zeta.KernelInputError` before any state changes.
"""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import MutableSequence

from ._exceptions import KernelInputError

NO_CANDIDATE = -1
#: Utilisation is clamped here before the contention formula, which diverges at 1.
UTIL_CAP = 0.95
#: Largest queue or in-flight count a table accepts (a larger one is a bookkeeping bug).
MAX_COUNT = 2**31 - 1
#: Cost of a servable candidate whose estimate overflows; still below ``inf`` (unservable).
MAX_COST = sys.float_info.max
INF = math.inf

__all__ = ["MAX_COST", "MAX_COUNT", "NO_CANDIDATE", "ScoreTable"]

_NOT_NUMBERS = (str, bytes, bytearray)


def _check_real(name: str, value: float) -> float:
    """Return ``value`` as a float of any sign, or raise for NaN, infinite or non-numbers."""
    if isinstance(value, _NOT_NUMBERS):
        raise KernelInputError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise KernelInputError(f"{name} must be a finite number, got {value!r}") from None
    if not math.isfinite(v):
        raise KernelInputError(f"{name} must be finite, got {value!r}")
    return v


def _check(name: str, value: float, upper: float | None = None) -> float:
    """Return ``value`` as a float, or raise for NaN, negative, infinite or out-of-range input."""
    v = _check_real(name, value)
    if v < 0.0:
        raise KernelInputError(f"{name} must be >= 0, got {value!r}")
    if upper is not None and v > upper:
        raise KernelInputError(f"{name} must be <= {upper}, got {value!r}")
    return v


def _check_int(name: str, value: int) -> int:
    """Return ``value`` as an int (any sign); ``bool`` and non-integers raise."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise KernelInputError(f"{name} must be an integer, got {value!r}")


def _check_count(name: str, value: int, upper: int | None = MAX_COUNT) -> int:
    """Return ``value`` as an int in ``0..upper`` (unbounded above if ``upper`` is None)."""
    v = _check_int(name, value)
    if v < 0 or (upper is not None and v > upper):
        bound = "" if upper is None else f" and <= {upper}"
        raise KernelInputError(f"{name} must be >= 0{bound}, got {value!r}")
    return v


def _contention(u: float, weight: float) -> float:
    if u > UTIL_CAP:
        u = UTIL_CAP
    return 1.0 + weight * u / (1.0 - u)


def _peak_ewma(old: float, sample: float, dt: float, tau: float) -> float:
    if sample >= old:
        return sample
    if dt <= 0.0:
        return old
    w = math.exp(-dt / tau)
    return old * w + sample * (1.0 - w)


def _cost(q: int, f: int, req: float, tok: float, cont: float, pen: float, est: float) -> float:
    """Cost of a capable, available candidate; ``cont`` is its precomputed contention."""
    c = (q + f + 1) * (req + est * tok) * cont + pen
    # Also catches NaN (0 * inf when a huge weight makes contention overflow).
    return c if c <= MAX_COST else MAX_COST


class ScoreTable:
    """Live state of ``n`` candidates and the per-message decision over it.

    The router owns one table. Actors update load, availability and service-time estimates in
    place; :meth:`choose` scores all candidates for one message without allocating.
    Capability and penalty are per (candidate, kind) pair, kinds numbered ``0..n_kinds-1``;
    a new table has every candidate available, idle, with zero estimates and no capabilities.
    All setters validate their input and raise :class:`KernelInputError` before changing state.
    A table is not thread-safe: one owner (the router) mutates it.
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
        self._rot = _check_count("seed", seed, None) % n
        self._queue = [0] * n
        self._in_flight = [0] * n
        self._req = [0.0] * n
        self._tok = [0.0] * n
        self._stamp = [0.0] * n
        self._util = [0.0] * n
        self._cont = [1.0] * n  # contention(util[i], weight), kept current by the setters
        self._available = [True] * n
        self._capable = [False] * (n * n_kinds)
        self._penalty = [0.0] * (n * n_kinds)
        self._tau = 1.0
        self._weight = 1.0
        self.set_params(tau=tau, weight=weight)

    # -- shape and parameters -------------------------------------------------------------
    @property
    def n(self) -> int:
        """Number of candidates."""
        return self._n

    @property
    def n_kinds(self) -> int:
        """Number of message kinds (columns of the capability table)."""
        return self._k

    @property
    def tau(self) -> float:
        """Time constant (seconds) of the peak EWMA's decay."""
        return self._tau

    @property
    def weight(self) -> float:
        """Weight of the utilisation-contention term."""
        return self._weight

    def set_params(self, *, tau: float | None = None, weight: float | None = None) -> None:
        """Set the EWMA time constant (seconds, > 0) and the contention weight (>= 0)."""
        t = self._tau if tau is None else _check("tau", tau)
        if t <= 0.0:
            raise KernelInputError(f"tau must be > 0, got {tau!r}")
        w = self._weight if weight is None else _check("weight", weight)
        self._tau = t
        self._weight = w
        self._cont = [_contention(u, w) for u in self._util]

    def _idx(self, i: int) -> int:
        if not isinstance(i, bool):
            try:
                v = operator.index(i)
            except TypeError:
                pass
            else:
                if 0 <= v < self._n:
                    return v
        raise KernelInputError(f"candidate index {i!r} out of range 0..{self._n - 1}")

    def _kind(self, kind: int) -> int:
        if not isinstance(kind, bool):
            try:
                v = operator.index(kind)
            except TypeError:
                pass
            else:
                if 0 <= v < self._k:
                    return v
        raise KernelInputError(f"kind {kind!r} out of range 0..{self._k - 1}")

    # -- setters --------------------------------------------------------------------------
    def set_capability(self, i: int, kind: int, capable: bool, penalty: float = 0.0) -> None:
        """Say whether candidate ``i`` can serve ``kind``, at what extra cost (seconds)."""
        j = self._idx(i) * self._k + self._kind(kind)
        p = _check("penalty", penalty)
        c = bool(capable)  # may raise (a numpy array): before any state changes
        self._penalty[j] = p
        self._capable[j] = c

    def set_available(self, i: int, available: bool) -> None:
        """Mark candidate ``i`` as able to take work (alive, up, mailbox not full) or not."""
        self._available[self._idx(i)] = bool(available)

    def set_load(self, i: int, queue: int, in_flight: int) -> None:
        """Set candidate ``i``'s queued and in-flight message counts (``0..MAX_COUNT``)."""
        i = self._idx(i)
        q = _check_count("queue", queue)
        f = _check_count("in_flight", in_flight)
        self._queue[i] = q
        self._in_flight[i] = f

    def set_util(self, i: int, util: float) -> None:
        """Set candidate ``i``'s device utilisation (0..1)."""
        i = self._idx(i)
        u = _check("util", util, 1.0)
        self._util[i] = u
        self._cont[i] = _contention(u, self._weight)

    def observe(self, i: int, per_request: float, per_token: float, now: float) -> None:
        """Fold one observed service into candidate ``i``'s estimates (peak EWMA).

        ``now`` is the observation time; an observation older than the last one (``dt <= 0``)
        can raise an estimate but never lowers it. A candidate's first observation sets its
        estimates exactly (they start at zero), so observing a prior seeds a new table.
        """
        i = self._idx(i)
        req = _check("per_request", per_request)
        tok = _check("per_token", per_token)
        t = _check("now", now)
        dt = t - self._stamp[i]
        self._req[i] = _peak_ewma(self._req[i], req, dt, self._tau)
        self._tok[i] = _peak_ewma(self._tok[i], tok, dt, self._tau)
        if t > self._stamp[i]:
            self._stamp[i] = t

    # -- getters --------------------------------------------------------------------------
    def load(self, i: int) -> tuple[int, int]:
        """Candidate ``i``'s ``(queue, in_flight)``."""
        i = self._idx(i)
        return self._queue[i], self._in_flight[i]

    def ewma(self, i: int) -> tuple[float, float]:
        """Candidate ``i``'s ``(per_request, per_token)`` service-time estimates (seconds)."""
        i = self._idx(i)
        return self._req[i], self._tok[i]

    def util(self, i: int) -> float:
        """Candidate ``i``'s device utilisation."""
        return self._util[self._idx(i)]

    def available(self, i: int) -> bool:
        """Whether candidate ``i`` can take work."""
        return self._available[self._idx(i)]

    def capability(self, i: int, kind: int) -> tuple[bool, float]:
        """``(capable, penalty)`` of candidate ``i`` for ``kind``."""
        j = self._idx(i) * self._k + self._kind(kind)
        return self._capable[j], self._penalty[j]

    # -- decisions ------------------------------------------------------------------------
    def choose(
        self, kind: int, est_tokens: float, costs: MutableSequence[float] | None = None
    ) -> int:
        """Return the cheapest candidate for one message, or ``NO_CANDIDATE``.

        Moves the tie-breaking rotation to just past the winner (by one when there is none).
        If ``costs`` (length ``n``) is given, it receives every candidate's cost.
        """
        k = self._kind(kind)
        est = _check("est_tokens", est_tokens)
        n = self._n
        if costs is not None and len(costs) != n:
            raise KernelInputError(f"costs has length {len(costs)}, expected {n}")
        start = self._rot
        scanned = [INF] * n
        best, best_cost = NO_CANDIDATE, INF
        for j in range(n):
            i = start + j
            if i >= n:
                i -= n
            c = INF
            p = i * self._k + k
            if self._capable[p] and self._available[i]:
                c = _cost(
                    self._queue[i], self._in_flight[i], self._req[i], self._tok[i],
                    self._cont[i], self._penalty[p], est,
                )  # fmt: skip
            scanned[i] = c
            if c < best_cost:
                best, best_cost = i, c
        after = (start if best == NO_CANDIDATE else best) + 1
        self._rot = after if after < n else 0
        if costs is not None:
            for i in range(n):
                costs[i] = scanned[i]
        return best
