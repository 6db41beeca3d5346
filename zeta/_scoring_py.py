"""Pure-Python reference implementation of the scoring kernel.

The compiled kernel (``native/_scoring_c.pyx``) implements exactly these semantics; tests run
both and check that they agree. Read this file to learn what the kernel does.

Each candidate is a llama.cpp context that decodes up to ``slots[i]`` sequences together
(continuous batching); ``queued[i]`` requests wait in its mailbox and ``busy[i]`` run in its
slots (:meth:`ScoreTable.set_load`). One decoding step with ``k`` busy sequences takes longer
than with one, but less than ``k`` times as long: per-token time at occupancy ``k`` is
``ewma_tok * g(k)`` with ``g(k) = 1 + step_slope * (k - 1)``, and ``ewma_tok`` is the estimate
for one sequence.

Candidates sit on devices (:meth:`ScoreTable.set_device`: an integer group id, the same for
every row on one device; a new row is on device 0). A model is *busy* when ``busy > 0``. While
several models on one device are busy, each one's decoding steps slow down: row ``i``'s by
``co_slow[i]`` (relative) per other busy model on its device (:meth:`ScoreTable.set_co_slow`;
measured on an H100 with three models, about 0.94, 0.59 and 0.24; on a 2-core CPU about 1.0
for two-thread models, 0.0-0.13 for one-thread models beside one other).

Cost of sending one message of ``est_tokens`` output tokens to candidate ``i`` (per row;
``s = slots``): its own expected completion, plus ``harm_weight`` times the delay it adds to
the requests already running on that model and on the models sharing its device, plus its
quality penalty::

    n        = queued + busy + 1                     # requests in the actor, this one included
    k        = min(n, s)                             # occupancy once this request runs
    service  = ewma_req + est_tokens * ewma_tok * g(k)
    ahead    = n - s                                 # requests that must finish before a slot frees
    wait     = max(0, ahead) / s * (ewma_req + est_tokens * ewma_tok * g(s))
    others   = busy models on i's device, i excluded
    own      = (wait + service) * contention(util) * (1 + co_slow * others)
    same     = (k - 1) * est_tokens / 2 * ewma_tok * step_slope
    harm     = sum over the other rows j on i's device of min(busy_j, slots_j) * co_slow_j
    device   = harm * service * contention(util)
    cost     = own + harm_weight * (same + device) + penalty[i, kind]
    contention(u) = 1 + weight * min(u, cap) / (1 - min(u, cap))   # M/M/1-like slowdown

A request sent to an actor with a free slot (``n <= s``) starts at the next step and waits for
nothing; the requests queued ahead of it are admitted at the same step, so they count toward
the occupancy ``k``. A full context finishes ``s`` requests per ``service(s)`` seconds, so each
request ahead adds ``service(s) / s`` of wait. The other busy models on its device slow every
one of its steps (``own``'s last factor).

The two harm terms price what the choice does to others. ``same``: one more sequence in the
batch makes each step ``ewma_tok * step_slope`` longer for the ``k - 1`` sequences it runs with,
for about half of its own tokens on average (a queued request does the same once it runs).
``device``: while this request is served, model ``i`` is busy, so every sequence decoding on
another model of its device runs ``co_slow_j`` slower for about its service time. The device
term is charged whether or not ``i`` is busy already (its current work may end before this
request does) and counts only the *other* rows, so the cost never falls when ``i``'s own load
grows, and never falls when another model on its device gets busier. ``harm_weight = 0``
gives the selfish cost; with ``co_slow = 0`` on every row as well it is the cost before
devices were modelled, to the last bit.

When ``ahead > 0`` then ``k = s`` and ``wait + service = n / s * service(s)``, so the kernel
evaluates exactly (left to right; the harm term is skipped when ``harm_weight == 0``)::

    svc  = ewma_req + est_tokens * tokg
    cost = m * svc * contention(util) * (1.0 + co_slow * others)
    cost = cost + harm_weight * (est_tokens * nudge + harm * svc * contention(util))
    cost = cost + penalty
    m     = n / s if n > s else 1.0                  # kept per row by the setters,
    tokg  = ewma_tok * (1.0 + step_slope * (k - 1))  # like contention(util)
    nudge = 0.5 * (k - 1) * step_slope * ewma_tok    # and this
    harm  = device_harm[device] - share[i]

``share[i] = min(busy, s) * co_slow`` is row ``i``'s share of its device's harm and
``device_harm`` the sum of the shares of the rows on a device; the setters keep both current in
O(1) (a row's share leaves its device's sums and the new one joins), as they keep the count of
busy rows per device. ``co_slow`` is stored rounded to the nearest multiple of
``CO_SLOW_QUANTUM`` (2**-20, about 1e-6), so every share and every sum is a whole number of
quanta: exact in floating point, equal to a recomputation from scratch whatever the order of
the updates (below 2**53 quanta on a device, about 8.6e9: millions of busy rows), and ``harm``
for row ``i`` does not change when only row ``i``'s own load does.

A decision reads a few numbers per row and two per device. With ``slots = 1`` (a new row's
default), ``co_slow = 0`` and ``harm_weight = 0``, ``g = 1`` and ``m = n``, which is the
single-sequence cost ``(queued + busy + 1) * (ewma_req + est_tokens * ewma_tok) * contention +
penalty`` to the last bit.

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
A per-token sample measured with ``busy`` sequences in the context is first normalised to one
sequence, ``per_token / g(busy)`` (``busy`` clamped to ``1..slots``), with the row's
``step_slope`` at the time of the observation.

Inputs are validated: numbers must be real numbers (``str``/``bytes`` are rejected), finite and
``>= 0``; counts and indices must be integers (anything with ``__index__`` except ``bool``).
``slots`` is an integer in ``1..MAX_SLOTS``; ``step_slope`` a number in ``0..MAX_STEP_SLOPE``;
``co_slow`` a number in ``0..MAX_CO_SLOW``; a device id an integer in ``0..MAX_COUNT``.
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
#: Most sequences one context may decode together (``ModelSpec.slots``' upper bound).
MAX_SLOTS = 256
#: Step-time growth per extra busy sequence of a new row: ``g(k) = 1 + slope * (k - 1)``.
#: Measured on CPU: about 0.2 for a small coder, 0.07 for a bigger reasoner.
DEFAULT_STEP_SLOPE = 0.15
#: Largest step slope a table accepts (a step with two sequences 11x slower than with one).
MAX_STEP_SLOPE = 10.0
#: A new row's co-load slowdown per other busy model on its device (unless the table is told
#: another default): within an H100's 0.24..0.94 and a 2-core CPU's 0.0..1.0.
DEFAULT_CO_SLOW = 0.5
#: Largest co-load slowdown a table accepts (each other busy model makes a step 11x slower).
MAX_CO_SLOW = 10.0
#: ``co_slow`` is stored rounded to a multiple of this (2**-20), so per-device sums are exact.
CO_SLOW_QUANTUM = 2.0**-20
_CO_SLOW_SCALE = 2.0**20
INF = math.inf

__all__ = [
    "CO_SLOW_QUANTUM",
    "DEFAULT_CO_SLOW",
    "DEFAULT_STEP_SLOPE",
    "MAX_CO_SLOW",
    "MAX_COST",
    "MAX_COUNT",
    "MAX_SLOTS",
    "MAX_STEP_SLOPE",
    "NO_CANDIDATE",
    "ScoreTable",
]

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


def _check_slots(value: int) -> int:
    """Return ``value`` as an int in ``1..MAX_SLOTS``; anything else raises."""
    v = _check_int("slots", value)
    if not 1 <= v <= MAX_SLOTS:
        raise KernelInputError(f"slots must be >= 1 and <= {MAX_SLOTS}, got {value!r}")
    return v


def _quantize_co_slow(value: float) -> float:
    """``value`` (already validated) rounded to the nearest multiple of ``CO_SLOW_QUANTUM``."""
    return math.floor(value * _CO_SLOW_SCALE + 0.5) * CO_SLOW_QUANTUM


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


def _step(slope: float, k: int) -> float:
    """``g(k)``: per-token time with ``k`` busy sequences, relative to one sequence."""
    return 1.0 + slope * (k - 1)


def _batch(
    queue: int, busy: int, slots: int, slope: float, tok: float
) -> tuple[float, float, float]:
    """A row's ``(m, tokg, nudge)``: the multiplier of one request's service for the requests
    ahead of it, its per-token time at the occupancy ``k`` it will run at, and the time per
    token of its own that it adds to the other sequences of its batch, halved."""
    n = queue + busy + 1
    if n > slots:  # queued behind a full context: n / slots full-batch service times
        return n / slots, tok * _step(slope, slots), 0.5 * (slots - 1) * slope * tok
    # A free slot: starts at the next step.
    return 1.0, tok * _step(slope, n), 0.5 * (n - 1) * slope * tok


def _cost(
    m: float, req: float, tokg: float, cont: float, co: float, others: int,
    nudge: float, harm: float, harm_weight: float, pen: float, est: float,
) -> float:  # fmt: skip
    """Cost of a capable, available candidate from its precomputed per-row values and its
    device's ``others`` (busy models) and ``harm`` (both without the row itself)."""
    svc = req + est * tokg
    c = m * svc * cont * (1.0 + co * others)
    if harm_weight != 0.0:
        c = c + harm_weight * (est * nudge + harm * svc * cont)
    c = c + pen
    # Also catches NaN (0 * inf when a huge weight makes contention overflow).
    return c if c <= MAX_COST else MAX_COST


class ScoreTable:
    """Live state of ``n`` candidates and the per-message decision over it.

    The router owns one table. Actors update load, availability and service-time estimates in
    place; :meth:`choose` scores all candidates for one message without allocating.
    Capability and penalty are per (candidate, kind) pair, kinds numbered ``0..n_kinds-1``;
    a new table has every candidate available, idle, on device 0, with zero estimates, one
    slot, the default step slope, the table's ``co_slow`` and no capabilities.
    All setters validate their input and raise :class:`KernelInputError` before changing state.
    A table is not thread-safe: one owner (the router) mutates it.
    """

    def __init__(
        self,
        n: int,
        n_kinds: int,
        *,
        seed: int = 0,
        tau: float = 5.0,
        weight: float = 1.0,
        harm_weight: float = 1.0,
        co_slow: float = DEFAULT_CO_SLOW,
    ) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise KernelInputError(f"n must be an integer >= 1, got {n!r}")
        if isinstance(n_kinds, bool) or not isinstance(n_kinds, int) or n_kinds < 1:
            raise KernelInputError(f"n_kinds must be an integer >= 1, got {n_kinds!r}")
        self._n = n
        self._k = n_kinds
        self._rot = _check_count("seed", seed, None) % n
        co = _quantize_co_slow(_check("co_slow", co_slow, MAX_CO_SLOW))
        self._queue = [0] * n
        self._in_flight = [0] * n
        self._slots = [1] * n
        self._slope = [DEFAULT_STEP_SLOPE] * n
        self._req = [0.0] * n
        self._tok = [0.0] * n
        self._stamp = [0.0] * n
        self._util = [0.0] * n
        self._cont = [1.0] * n  # contention(util[i], weight), kept current by the setters
        self._mult = [1.0] * n  # _batch(...)[0], kept current by the setters
        self._tokg = [0.0] * n  # _batch(...)[1], likewise
        self._nudge = [0.0] * n  # _batch(...)[2], likewise
        self._available = [True] * n
        self._capable = [False] * (n * n_kinds)
        self._penalty = [0.0] * (n * n_kinds)
        self._co = [co] * n  # co_slow, a multiple of CO_SLOW_QUANTUM
        self._device = [0] * n  # device id
        self._share = [0.0] * n  # min(in_flight, slots) * co: whole quanta
        # Devices in use, numbered densely: a row's device is _slot[i]; the device numbered
        # d has _dev_rows[d] rows, _dev_busy[d] of them busy, and the sum _dev_harm[d] of their
        # _share. A device with no rows gives its number back to _free.
        self._slot = [0] * n
        self._dense = {0: 0}  # device id -> its number
        self._dev_rows = [n] + [0] * (n - 1)
        self._dev_busy = [0] * n
        self._dev_harm = [0.0] * n
        self._free = list(range(n - 1, 0, -1))
        self._tau = 1.0
        self._weight = 1.0
        self._harm_weight = 1.0
        self.set_params(tau=tau, weight=weight, harm_weight=harm_weight)

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

    @property
    def harm_weight(self) -> float:
        """Weight of the delay a choice adds to the requests of others (0: selfish)."""
        return self._harm_weight

    def set_params(
        self,
        *,
        tau: float | None = None,
        weight: float | None = None,
        harm_weight: float | None = None,
    ) -> None:
        """Set the EWMA time constant (seconds, > 0), the contention weight (>= 0) and the
        weight of the harm to others (>= 0); ``None`` keeps a value."""
        t = self._tau if tau is None else _check("tau", tau)
        if t <= 0.0:
            raise KernelInputError(f"tau must be > 0, got {tau!r}")
        w = self._weight if weight is None else _check("weight", weight)
        h = self._harm_weight if harm_weight is None else _check("harm_weight", harm_weight)
        self._tau = t
        self._weight = w
        self._harm_weight = h
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

    def _rebatch(self, i: int) -> None:
        self._mult[i], self._tokg[i], self._nudge[i] = _batch(
            self._queue[i], self._in_flight[i], self._slots[i], self._slope[i], self._tok[i]
        )

    def _leave(self, i: int) -> None:
        """Take row ``i``'s share out of its device's sums (before its share changes)."""
        d = self._slot[i]
        self._dev_harm[d] -= self._share[i]
        if self._in_flight[i] > 0:
            self._dev_busy[d] -= 1

    def _join(self, i: int) -> None:
        """Put row ``i``'s (new) share into its device's sums."""
        d = self._slot[i]
        f, s = self._in_flight[i], self._slots[i]
        share = (f if f < s else s) * self._co[i]
        self._share[i] = share
        self._dev_harm[d] += share
        if f > 0:
            self._dev_busy[d] += 1

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
        """Set candidate ``i``'s mailbox length and busy slots (``0..MAX_COUNT`` each).

        ``in_flight`` is the number of sequences in the context's slots; a count above
        ``slots(i)`` is accepted and costed like requests queued behind a full context.
        """
        i = self._idx(i)
        q = _check_count("queue", queue)
        f = _check_count("in_flight", in_flight)
        self._leave(i)
        self._queue[i] = q
        self._in_flight[i] = f
        self._join(i)
        self._rebatch(i)

    def set_slots(self, i: int, slots: int) -> None:
        """Set how many sequences candidate ``i``'s context decodes together (``1..MAX_SLOTS``)."""
        i = self._idx(i)
        s = _check_slots(slots)
        self._leave(i)
        self._slots[i] = s
        self._join(i)
        self._rebatch(i)

    def set_step_slope(self, i: int, slope: float) -> None:
        """Set candidate ``i``'s step-time growth per extra busy sequence (``0..MAX_STEP_SLOPE``).

        Estimates already folded in keep the normalisation they were observed with.
        """
        i = self._idx(i)
        self._slope[i] = _check("step_slope", slope, MAX_STEP_SLOPE)
        self._rebatch(i)

    def set_device(self, i: int, device: int) -> None:
        """Put candidate ``i`` on ``device`` (a group id in ``0..MAX_COUNT``, shared by the
        rows whose models slow each other down)."""
        i = self._idx(i)
        dev = _check_count("device", device)
        if dev == self._device[i]:
            return
        self._leave(i)
        old = self._slot[i]
        self._dev_rows[old] -= 1
        if self._dev_rows[old] == 0:  # empty: its sums are zero again, exactly
            del self._dense[self._device[i]]
            self._free.append(old)
        d = self._dense.get(dev)
        if d is None:
            d = self._dense[dev] = self._free.pop()
        self._dev_rows[d] += 1
        self._device[i] = dev
        self._slot[i] = d
        self._join(i)

    def set_co_slow(self, i: int, co_slow: float) -> None:
        """Set how much slower candidate ``i``'s steps run per other busy model on its device
        (relative, ``0..MAX_CO_SLOW``; stored rounded to a multiple of ``CO_SLOW_QUANTUM``)."""
        i = self._idx(i)
        co = _quantize_co_slow(_check("co_slow", co_slow, MAX_CO_SLOW))
        self._leave(i)
        self._co[i] = co
        self._join(i)

    def set_util(self, i: int, util: float) -> None:
        """Set candidate ``i``'s device utilisation (0..1)."""
        i = self._idx(i)
        u = _check("util", util, 1.0)
        self._util[i] = u
        self._cont[i] = _contention(u, self._weight)

    def observe(
        self, i: int, per_request: float, per_token: float, now: float, busy: int = 1
    ) -> None:
        """Fold one observed service into candidate ``i``'s estimates (peak EWMA).

        ``per_token`` was measured with ``busy`` sequences in the context (a count, clamped to
        ``1..slots(i)``); it is normalised to one sequence, ``per_token / g(busy)``, before it
        is folded in. ``now`` is the observation time; an observation older than the last one
        (``dt <= 0``) can raise an estimate but never lowers it. A candidate's first observation
        sets its estimates exactly (they start at zero), so observing a prior seeds a new table.
        """
        i = self._idx(i)
        req = _check("per_request", per_request)
        tok = _check("per_token", per_token)
        t = _check("now", now)
        b = _check_count("busy", busy)
        s = self._slots[i]
        tok = tok / _step(self._slope[i], 1 if b < 1 else s if b > s else b)
        dt = t - self._stamp[i]
        self._req[i] = _peak_ewma(self._req[i], req, dt, self._tau)
        self._tok[i] = _peak_ewma(self._tok[i], tok, dt, self._tau)
        if t > self._stamp[i]:
            self._stamp[i] = t
        self._rebatch(i)

    # -- getters --------------------------------------------------------------------------
    def load(self, i: int) -> tuple[int, int]:
        """Candidate ``i``'s ``(queue, in_flight)``: mailbox length and busy slots."""
        i = self._idx(i)
        return self._queue[i], self._in_flight[i]

    def slots(self, i: int) -> int:
        """How many sequences candidate ``i``'s context decodes together."""
        return self._slots[self._idx(i)]

    def step_slope(self, i: int) -> float:
        """Candidate ``i``'s step-time growth per extra busy sequence."""
        return self._slope[self._idx(i)]

    def ewma(self, i: int) -> tuple[float, float]:
        """Candidate ``i``'s ``(per_request, per_token)`` service-time estimates (seconds);
        ``per_token`` is for one sequence in the context."""
        i = self._idx(i)
        return self._req[i], self._tok[i]

    def util(self, i: int) -> float:
        """Candidate ``i``'s device utilisation."""
        return self._util[self._idx(i)]

    def device(self, i: int) -> int:
        """The device (group id) candidate ``i`` is on."""
        return self._device[self._idx(i)]

    def co_slow(self, i: int) -> float:
        """Candidate ``i``'s step slowdown per other busy model on its device."""
        return self._co[self._idx(i)]

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
        hw = self._harm_weight
        for j in range(n):
            i = start + j
            if i >= n:
                i -= n
            c = INF
            p = i * self._k + k
            if self._capable[p] and self._available[i]:
                d = self._slot[i]
                others = self._dev_busy[d] - (1 if self._in_flight[i] > 0 else 0)
                harm = self._dev_harm[d] - self._share[i]
                c = _cost(
                    self._mult[i], self._req[i], self._tokg[i], self._cont[i], self._co[i],
                    others, self._nudge[i], harm, hw, self._penalty[p], est,
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
