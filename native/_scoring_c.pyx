# cython: language_level=3
# binding=False: methods are plain C method descriptors, not CyFunctions; that saves ~8 ns of
# the ~40 ns a per-message ScoreTable.choose call costs (signatures stay in the docstrings).
# cython: binding=False
"""Compiled scoring kernel: the same API and semantics as ``zeta._scoring_py``.

``zeta/_scoring_py.py`` is the specification; read it for what each function computes. This
module keeps the state of a :class:`ScoreTable` in C arrays and scores candidates in a
``nogil`` loop with no Python objects per candidate. Arguments take a fast path when they are
exact ``int`` or ``float`` objects in range; anything else (numpy scalars, bad values) goes to
the reference's own validators, so what is accepted, and every error raised, is the same in
both implementations by construction.

Floating-point results match the reference bit for bit: the cost expression is evaluated in
the same order, and setup.py compiles with ``-ffp-contract=off`` so no FMA changes a rounding.
"""

cimport cython
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.float cimport DBL_MAX
from libc.math cimport INFINITY, exp, floor
from libc.stdint cimport int64_t

import operator

from zeta._exceptions import KernelInputError
from zeta._scoring_py import _check, _check_count, _check_slots

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

NO_CANDIDATE = -1
UTIL_CAP = 0.95
MAX_COUNT = 2**31 - 1
MAX_COST = DBL_MAX
MAX_SLOTS = 256
DEFAULT_STEP_SLOPE = 0.15
MAX_STEP_SLOPE = 10.0
DEFAULT_CO_SLOW = 0.5
MAX_CO_SLOW = 10.0
CO_SLOW_QUANTUM = 2.0**-20

cdef enum:
    _NO_CANDIDATE = -1
    _MAX_COUNT = 2147483647
    _MAX_SLOTS = 256

cdef double _UTIL_CAP = 0.95
cdef double _DEFAULT_STEP_SLOPE = 0.15
cdef double _MAX_STEP_SLOPE = 10.0
cdef double _MAX_CO_SLOW = 10.0
cdef double _CO_SLOW_QUANTUM = 1.0 / 1048576.0  # 2**-20
cdef double _CO_SLOW_SCALE = 1048576.0  # 2**20


# -- scalar kernels (no validation; callers validate) -----------------------------------------

cdef inline double _contention(double u, double weight) noexcept nogil:
    if u > _UTIL_CAP:
        u = _UTIL_CAP
    return 1.0 + weight * u / (1.0 - u)


cdef inline double _peak_ewma(double old, double sample, double dt, double tau) noexcept nogil:
    cdef double w
    if sample >= old:
        return sample
    if dt <= 0.0:
        return old
    w = exp(-dt / tau)
    return old * w + sample * (1.0 - w)


cdef inline double _step(double slope, int64_t k) noexcept nogil:
    return 1.0 + slope * <double>(k - 1)


cdef inline double _quantize_co_slow(double value) noexcept nogil:
    return floor(value * _CO_SLOW_SCALE + 0.5) * _CO_SLOW_QUANTUM


cdef inline double _cost(
    double m, double req, double tokg, double cont, double co, double others,
    double nudge, double harm, double harm_weight, double pen, double est, bint harmed,
) noexcept nogil:
    cdef double svc = req + est * tokg
    cdef double c = m * svc * cont * (1.0 + co * others)
    if harmed:  # harm_weight != 0.0
        c = c + harm_weight * (est * nudge + harm * svc * cont)
    c = c + pen
    if not c <= DBL_MAX:  # inf, or NaN from 0 * inf: saturate, a servable one stays finite
        c = DBL_MAX
    return c


cdef inline Py_ssize_t _scan(
    Py_ssize_t n,
    Py_ssize_t start,
    Py_ssize_t stride,
    const _Row* rows,
    const _Device* devices,
    double harm_weight,
    const unsigned char* capable,
    const double* penalty,
    const unsigned char* available,
    double est,
    double* costs,
    bint harmed,
) noexcept nogil:
    """The decision: cheapest candidate, scanning from ``start``; ties keep the first seen.

    ``harmed`` is ``harm_weight != 0.0``, a constant where this is inlined: one loop each.

    ``capable`` and ``penalty`` are read at ``i * stride`` (one column of the table's row-major
    ``n x n_kinds`` arrays); a row's device sums at ``devices[rows[i].slot]``.
    ``costs``, if not NULL, receives every cost.
    """
    cdef Py_ssize_t best = _NO_CANDIDATE
    cdef double best_cost = INFINITY
    cdef double c
    cdef Py_ssize_t i = start
    cdef Py_ssize_t j, p
    cdef const _Row* r
    cdef const _Device* d
    for j in range(n):
        p = i * stride
        if capable[p] and available[i]:
            r = rows + i
            d = devices + r.slot
            # Whole numbers (of busy models, of quanta): exact, as the reference's ints.
            c = _cost(
                r.mult, r.req, r.tokg, r.cont, r.co, d.busy - r.busy1, r.nudge,
                d.harm - r.share, harm_weight, penalty[p], est, harmed,
            )
        else:
            c = INFINITY
        if costs != NULL:
            costs[i] = c
        if c < best_cost:
            best = i
            best_cost = c
        i += 1
        if i == n:
            i = 0
    return best


# -- validation: fast paths for exact int/float, the reference's validators otherwise --------

cdef double _number(object value, str name, double upper=DBL_MAX) except -1.0:
    """Like ``_scoring_py._check``: a finite float in ``0..upper``."""
    cdef double v
    cdef long long ll
    cdef int overflow = 0
    if type(value) is float:
        v = PyFloat_AS_DOUBLE(value)
        if 0.0 <= v <= upper:
            return v
    elif type(value) is int:
        ll = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow == 0 and ll >= 0 and <double>ll <= upper:
            return <double>ll
    return _check(name, value, None if upper == DBL_MAX else upper)


cdef int64_t _count(object value, str name) except -1:
    """Like ``_scoring_py._check_count``: an integer in ``0..MAX_COUNT``."""
    cdef long long ll
    cdef int overflow = 0
    if type(value) is int:
        ll = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow == 0 and 0 <= ll <= _MAX_COUNT:
            return ll
    return _check_count(name, value)


cdef int64_t _slot_count(object value) except -1:
    """Like ``_scoring_py._check_slots``: an integer in ``1..MAX_SLOTS``."""
    cdef long long ll
    cdef int overflow = 0
    if type(value) is int:
        ll = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow == 0 and 1 <= ll <= _MAX_SLOTS:
            return ll
    return _check_slots(value)


cdef Py_ssize_t _rotation(object value, str name, Py_ssize_t n) except -1:
    """``value % n`` for an integer ``value >= 0`` of any size."""
    cdef long long ll
    cdef int overflow = 0
    if type(value) is int:
        ll = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow == 0 and ll >= 0:
            return ll % n
    return _check_count(name, value, None) % n


cdef Py_ssize_t _in_range(object value, Py_ssize_t n, str what) except -1:
    """An integer in ``0..n-1`` (not a bool), like ``ScoreTable._idx``/``_kind``."""
    cdef long long ll
    cdef int overflow = 0
    if type(value) is int:
        ll = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow == 0 and 0 <= ll < n:
            return ll
    elif not isinstance(value, bool):
        try:
            v = operator.index(value)
        except TypeError:
            pass
        else:
            if 0 <= v < n:
                return v
    raise KernelInputError(f"{what} {value!r} out of range 0..{n - 1}")


# -- the table ----------------------------------------------------------------------------

cdef class ScoreTable:
    """Live state of ``n`` candidates and the per-message decision over it.

    The router owns one table. Actors update load, availability and service-time estimates in
    place; :meth:`choose` scores all candidates for one message without allocating.
    Capability and penalty are per (candidate, kind) pair, kinds numbered ``0..n_kinds-1``;
    a new table has every candidate available, idle, on device 0, with zero estimates, one
    slot, the default step slope, the table's ``co_slow`` and no capabilities.
    All setters validate their input and raise :class:`KernelInputError` before changing state.
    A table is not thread-safe: one owner (the router) mutates it.
    """

    def __cinit__(
        self, n, n_kinds, *, seed=0, tau=5.0, weight=1.0, harm_weight=1.0,
        co_slow=DEFAULT_CO_SLOW,
    ):
        cdef Py_ssize_t i
        cdef double co
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise KernelInputError(f"n must be an integer >= 1, got {n!r}")
        if isinstance(n_kinds, bool) or not isinstance(n_kinds, int) or n_kinds < 1:
            raise KernelInputError(f"n_kinds must be an integer >= 1, got {n_kinds!r}")
        self._n = n
        self._k = n_kinds
        self._rot = _rotation(seed, "seed", self._n)
        co = _quantize_co_slow(_number(co_slow, "co_slow", _MAX_CO_SLOW))
        if self._n > (<Py_ssize_t>1 << 40) // self._k:
            raise MemoryError(f"a table of {n} x {n_kinds} candidates and kinds is too large")
        self._queue = <int64_t*> PyMem_Malloc(6 * self._n * sizeof(int64_t))
        self._tok = <double*> PyMem_Malloc((5 + self._k) * self._n * sizeof(double))
        self._available = <unsigned char*> PyMem_Malloc((1 + self._k) * self._n)
        self._row = <_Row*> PyMem_Malloc(self._n * sizeof(_Row))
        self._dev = <_Device*> PyMem_Malloc(self._n * sizeof(_Device))
        if (
            self._queue == NULL or self._tok == NULL or self._available == NULL
            or self._row == NULL or self._dev == NULL
        ):
            raise MemoryError()
        self._in_flight = self._queue + self._n
        self._slots = self._queue + 2 * self._n
        self._device = self._queue + 3 * self._n
        self._dev_rows = self._queue + 4 * self._n
        self._free = self._queue + 5 * self._n
        self._stamp = self._tok + self._n
        self._util = self._tok + 2 * self._n
        self._scratch = self._tok + 3 * self._n
        self._slope = self._tok + 4 * self._n
        self._penalty = self._tok + 5 * self._n
        self._capable = self._available + self._n
        self._dense = {0: 0}
        self._n_free = self._n - 1
        for i in range(self._n):
            self._row[i].mult = 1.0
            self._row[i].req = 0.0
            self._row[i].tokg = 0.0
            self._row[i].cont = 1.0
            self._row[i].co = co
            self._row[i].nudge = 0.0
            self._row[i].share = 0.0
            self._row[i].busy1 = 0.0
            self._row[i].slot = 0
            self._dev[i].busy = 0.0
            self._dev[i].harm = 0.0
            self._device[i] = 0
            self._dev_rows[i] = 0
            self._free[i] = self._n - 1 - i  # a stack: number 1 is taken first
            self._queue[i] = 0
            self._in_flight[i] = 0
            self._slots[i] = 1
            self._slope[i] = _DEFAULT_STEP_SLOPE
            self._tok[i] = 0.0
            self._stamp[i] = 0.0
            self._util[i] = 0.0
            self._scratch[i] = 0.0
            self._available[i] = 1
        self._dev_rows[0] = self._n
        for i in range(self._n * self._k):
            self._penalty[i] = 0.0
            self._capable[i] = 0
        self._tau = 1.0
        self._weight = 1.0
        self._harm_weight = 1.0
        self.set_params(tau=tau, weight=weight, harm_weight=harm_weight)

    def __dealloc__(self):
        PyMem_Free(self._queue)
        PyMem_Free(self._tok)
        PyMem_Free(self._available)
        PyMem_Free(self._row)
        PyMem_Free(self._dev)

    # -- shape and parameters -------------------------------------------------------------
    @property
    def n(self):
        """Number of candidates."""
        return self._n

    @property
    def n_kinds(self):
        """Number of message kinds (columns of the capability table)."""
        return self._k

    @property
    def tau(self):
        """Time constant (seconds) of the peak EWMA's decay."""
        return self._tau

    @property
    def weight(self):
        """Weight of the utilisation-contention term."""
        return self._weight

    @property
    def harm_weight(self):
        """Weight of the delay a choice adds to the requests of others (0: selfish)."""
        return self._harm_weight

    def set_params(self, *, tau=None, weight=None, harm_weight=None):
        """Set the EWMA time constant (seconds, > 0), the contention weight (>= 0) and the
        weight of the harm to others (>= 0); ``None`` keeps a value."""
        cdef double t = self._tau if tau is None else _number(tau, "tau")
        cdef double w, h
        cdef Py_ssize_t i
        if t <= 0.0:
            raise KernelInputError(f"tau must be > 0, got {tau!r}")
        w = self._weight if weight is None else _number(weight, "weight")
        h = self._harm_weight if harm_weight is None else _number(harm_weight, "harm_weight")
        self._tau = t
        self._weight = w
        self._harm_weight = h
        for i in range(self._n):
            self._row[i].cont = _contention(self._util[i], w)

    cdef Py_ssize_t _index(self, object i) except -1:
        return _in_range(i, self._n, "candidate index")

    cdef Py_ssize_t _kind(self, object kind) except -1:
        return _in_range(kind, self._k, "kind")

    cdef void _rebatch(self, Py_ssize_t i) noexcept nogil:
        """Refresh row ``i``'s ``m``, ``tokg`` and ``nudge`` (``_scoring_py._batch``)."""
        cdef int64_t n = self._queue[i] + self._in_flight[i] + 1
        cdef int64_t s = self._slots[i]
        if n > s:  # queued behind a full context: n / s full-batch service times
            self._row[i].mult = <double>n / <double>s
            self._row[i].tokg = self._tok[i] * _step(self._slope[i], s)
            self._row[i].nudge = 0.5 * <double>(s - 1) * self._slope[i] * self._tok[i]
        else:  # a free slot: starts at the next step
            self._row[i].mult = 1.0
            self._row[i].tokg = self._tok[i] * _step(self._slope[i], n)
            self._row[i].nudge = 0.5 * <double>(n - 1) * self._slope[i] * self._tok[i]

    cdef void _leave(self, Py_ssize_t i) noexcept nogil:
        """Take row ``i``'s share out of its device's sums (before its share changes)."""
        cdef _Row* r = self._row + i
        cdef _Device* d = self._dev + r.slot
        d.harm -= r.share
        d.busy -= r.busy1

    cdef void _join(self, Py_ssize_t i) noexcept nogil:
        """Put row ``i``'s (new) share into its device's sums."""
        cdef _Row* r = self._row + i
        cdef _Device* d = self._dev + r.slot
        cdef int64_t f = self._in_flight[i]
        cdef int64_t s = self._slots[i]
        r.share = <double>(f if f < s else s) * r.co
        r.busy1 = 1.0 if f > 0 else 0.0
        d.harm += r.share
        d.busy += r.busy1

    # -- setters --------------------------------------------------------------------------
    def set_capability(self, i, kind, capable, penalty=0.0):
        """Say whether candidate ``i`` can serve ``kind``, at what extra cost (seconds)."""
        cdef Py_ssize_t j = self._index(i) * self._k + self._kind(kind)
        cdef double p = _number(penalty, "penalty")
        cdef bint c = bool(capable)  # may raise (a numpy array): before any state changes
        self._penalty[j] = p
        self._capable[j] = c

    def set_available(self, i, available):
        """Mark candidate ``i`` as able to take work (alive, up, mailbox not full) or not."""
        self._available[self._index(i)] = bool(available)

    def set_load(self, i, queue, in_flight):
        """Set candidate ``i``'s mailbox length and busy slots (``0..MAX_COUNT`` each).

        ``in_flight`` is the number of sequences in the context's slots; a count above
        ``slots(i)`` is accepted and costed like requests queued behind a full context.
        """
        cdef Py_ssize_t ii = self._index(i)
        cdef int64_t q = _count(queue, "queue")
        cdef int64_t f = _count(in_flight, "in_flight")
        self._leave(ii)
        self._queue[ii] = q
        self._in_flight[ii] = f
        self._join(ii)
        self._rebatch(ii)

    def set_slots(self, i, slots):
        """Set how many sequences candidate ``i``'s context decodes together (``1..MAX_SLOTS``)."""
        cdef Py_ssize_t ii = self._index(i)
        cdef int64_t s = _slot_count(slots)
        self._leave(ii)
        self._slots[ii] = s
        self._join(ii)
        self._rebatch(ii)

    def set_step_slope(self, i, slope):
        """Set candidate ``i``'s step-time growth per extra busy sequence (``0..MAX_STEP_SLOPE``).

        Estimates already folded in keep the normalisation they were observed with.
        """
        cdef Py_ssize_t ii = self._index(i)
        self._slope[ii] = _number(slope, "step_slope", _MAX_STEP_SLOPE)
        self._rebatch(ii)

    def set_device(self, i, device):
        """Put candidate ``i`` on ``device`` (a group id in ``0..MAX_COUNT``, shared by the
        rows whose models slow each other down)."""
        cdef Py_ssize_t ii = self._index(i)
        cdef int64_t dev = _count(device, "device")
        cdef int64_t old, d
        if dev == self._device[ii]:
            return
        self._leave(ii)
        old = self._row[ii].slot
        self._dev_rows[old] -= 1
        if self._dev_rows[old] == 0:  # empty: its sums are zero again, exactly
            del self._dense[self._device[ii]]
            self._free[self._n_free] = old
            self._n_free += 1
        found = self._dense.get(dev)
        if found is None:
            self._n_free -= 1
            d = self._free[self._n_free]
            self._dense[dev] = d
        else:
            d = found
        self._dev_rows[d] += 1
        self._device[ii] = dev
        self._row[ii].slot = d
        self._join(ii)

    def set_co_slow(self, i, co_slow):
        """Set how much slower candidate ``i``'s steps run per other busy model on its device
        (relative, ``0..MAX_CO_SLOW``; stored rounded to a multiple of ``CO_SLOW_QUANTUM``)."""
        cdef Py_ssize_t ii = self._index(i)
        cdef double co = _quantize_co_slow(_number(co_slow, "co_slow", _MAX_CO_SLOW))
        self._leave(ii)
        self._row[ii].co = co
        self._join(ii)

    def set_util(self, i, util):
        """Set candidate ``i``'s device utilisation (0..1)."""
        cdef Py_ssize_t ii = self._index(i)
        cdef double u = _number(util, "util", 1.0)
        self._util[ii] = u
        self._row[ii].cont = _contention(u, self._weight)

    def observe(self, i, per_request, per_token, now, busy=1):
        """Fold one observed service into candidate ``i``'s estimates (peak EWMA).

        ``per_token`` was measured with ``busy`` sequences in the context (a count, clamped to
        ``1..slots(i)``); it is normalised to one sequence, ``per_token / g(busy)``, before it
        is folded in. ``now`` is the observation time; an observation older than the last one
        (``dt <= 0``) can raise an estimate but never lowers it. A candidate's first observation
        sets its estimates exactly (they start at zero), so observing a prior seeds a new table.
        """
        cdef Py_ssize_t ii = self._index(i)
        cdef double req = _number(per_request, "per_request")
        cdef double tok = _number(per_token, "per_token")
        cdef double t = _number(now, "now")
        cdef int64_t b = _count(busy, "busy")
        cdef int64_t s = self._slots[ii]
        cdef double dt = t - self._stamp[ii]
        tok = tok / _step(self._slope[ii], 1 if b < 1 else s if b > s else b)
        self._row[ii].req = _peak_ewma(self._row[ii].req, req, dt, self._tau)
        self._tok[ii] = _peak_ewma(self._tok[ii], tok, dt, self._tau)
        if t > self._stamp[ii]:
            self._stamp[ii] = t
        self._rebatch(ii)

    # -- getters --------------------------------------------------------------------------
    def load(self, i):
        """Candidate ``i``'s ``(queue, in_flight)``: mailbox length and busy slots."""
        cdef Py_ssize_t ii = self._index(i)
        return self._queue[ii], self._in_flight[ii]

    def slots(self, i):
        """How many sequences candidate ``i``'s context decodes together."""
        return self._slots[self._index(i)]

    def step_slope(self, i):
        """Candidate ``i``'s step-time growth per extra busy sequence."""
        return self._slope[self._index(i)]

    def ewma(self, i):
        """Candidate ``i``'s ``(per_request, per_token)`` service-time estimates (seconds);
        ``per_token`` is for one sequence in the context."""
        cdef Py_ssize_t ii = self._index(i)
        return self._row[ii].req, self._tok[ii]

    def util(self, i):
        """Candidate ``i``'s device utilisation."""
        return self._util[self._index(i)]

    def device(self, i):
        """The device (group id) candidate ``i`` is on."""
        return self._device[self._index(i)]

    def co_slow(self, i):
        """Candidate ``i``'s step slowdown per other busy model on its device."""
        return self._row[self._index(i)].co

    def available(self, i):
        """Whether candidate ``i`` can take work."""
        return self._available[self._index(i)] != 0

    def capability(self, i, kind):
        """``(capable, penalty)`` of candidate ``i`` for ``kind``."""
        cdef Py_ssize_t j = self._index(i) * self._k + self._kind(kind)
        return self._capable[j] != 0, self._penalty[j]

    # -- decisions ------------------------------------------------------------------------
    cdef Py_ssize_t _decide(self, Py_ssize_t kind, double est, double* costs) noexcept nogil:
        """One decision; moves the rotation to just past the winner (by one if none)."""
        cdef Py_ssize_t best, after
        if self._harm_weight != 0.0:
            best = _scan(
                self._n, self._rot, self._k, self._row, self._dev, self._harm_weight,
                self._capable + kind, self._penalty + kind, self._available, est, costs, True,
            )
        else:
            best = _scan(
                self._n, self._rot, self._k, self._row, self._dev, self._harm_weight,
                self._capable + kind, self._penalty + kind, self._available, est, costs, False,
            )
        after = (self._rot if best == _NO_CANDIDATE else best) + 1
        self._rot = after if after < self._n else 0
        return best

    @cython.boundscheck(True)  # the costs list can shrink under us (an old item's __del__)
    def choose(self, kind, est_tokens, costs=None):
        """Return the cheapest candidate for one message, or ``NO_CANDIDATE``.

        Moves the tie-breaking rotation to just past the winner (by one when there is none).
        If ``costs`` (length ``n``) is given, it receives every candidate's cost.
        """
        cdef Py_ssize_t k = self._kind(kind)
        cdef double est = _number(est_tokens, "est_tokens")
        cdef Py_ssize_t best, i
        if costs is None:
            return self._decide(k, est, NULL)
        if len(costs) != self._n:
            raise KernelInputError(f"costs has length {len(costs)}, expected {self._n}")
        best = self._decide(k, est, self._scratch)
        for i in range(self._n):
            costs[i] = self._scratch[i]
        return best
