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
from libc.math cimport INFINITY, exp
from libc.stdint cimport int64_t

import operator

from zeta._exceptions import KernelInputError
from zeta._scoring_py import _check, _check_count, _check_slots

__all__ = [
    "DEFAULT_STEP_SLOPE",
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

cdef enum:
    _NO_CANDIDATE = -1
    _MAX_COUNT = 2147483647
    _MAX_SLOTS = 256

cdef double _UTIL_CAP = 0.95
cdef double _DEFAULT_STEP_SLOPE = 0.15
cdef double _MAX_STEP_SLOPE = 10.0


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


cdef inline double _cost(
    double m, double req, double tokg, double cont, double pen, double est
) noexcept nogil:
    cdef double c = m * (req + est * tokg) * cont + pen
    if not c <= DBL_MAX:  # inf, or NaN from 0 * inf: saturate, a servable one stays finite
        c = DBL_MAX
    return c


cdef inline Py_ssize_t _scan(
    Py_ssize_t n,
    Py_ssize_t start,
    Py_ssize_t stride,
    const double* mult,
    const double* req,
    const double* tokg,
    const double* cont,
    const unsigned char* capable,
    const double* penalty,
    const unsigned char* available,
    double est,
    double* costs,
) noexcept nogil:
    """The decision: cheapest candidate, scanning from ``start``; ties keep the first seen.

    ``capable`` and ``penalty`` are read at ``i * stride`` (one column of the table's row-major
    ``n x n_kinds`` arrays).
    ``costs``, if not NULL, receives every cost.
    """
    cdef Py_ssize_t best = _NO_CANDIDATE
    cdef double best_cost = INFINITY
    cdef double c
    cdef Py_ssize_t i = start
    cdef Py_ssize_t j, p
    for j in range(n):
        p = i * stride
        if capable[p] and available[i]:
            c = _cost(mult[i], req[i], tokg[i], cont[i], penalty[p], est)
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
    a new table has every candidate available, idle, with zero estimates, one slot, the default
    step slope and no capabilities.
    All setters validate their input and raise :class:`KernelInputError` before changing state.
    A table is not thread-safe: one owner (the router) mutates it.
    """

    def __cinit__(self, n, n_kinds, *, seed=0, tau=5.0, weight=1.0):
        cdef Py_ssize_t i
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise KernelInputError(f"n must be an integer >= 1, got {n!r}")
        if isinstance(n_kinds, bool) or not isinstance(n_kinds, int) or n_kinds < 1:
            raise KernelInputError(f"n_kinds must be an integer >= 1, got {n_kinds!r}")
        self._n = n
        self._k = n_kinds
        self._rot = _rotation(seed, "seed", self._n)
        if self._n > (<Py_ssize_t>1 << 40) // self._k:
            raise MemoryError(f"a table of {n} x {n_kinds} candidates and kinds is too large")
        self._queue = <int64_t*> PyMem_Malloc(3 * self._n * sizeof(int64_t))
        self._req = <double*> PyMem_Malloc((10 + self._k) * self._n * sizeof(double))
        self._available = <unsigned char*> PyMem_Malloc((1 + self._k) * self._n)
        if self._queue == NULL or self._req == NULL or self._available == NULL:
            raise MemoryError()
        self._in_flight = self._queue + self._n
        self._slots = self._queue + 2 * self._n
        self._tok = self._req + self._n
        self._stamp = self._req + 2 * self._n
        self._util = self._req + 3 * self._n
        self._cont = self._req + 4 * self._n
        self._scratch = self._req + 5 * self._n
        self._slope = self._req + 6 * self._n
        self._mult = self._req + 7 * self._n
        self._tokg = self._req + 8 * self._n
        self._penalty = self._req + 9 * self._n
        self._capable = self._available + self._n
        for i in range(self._n):
            self._queue[i] = 0
            self._in_flight[i] = 0
            self._slots[i] = 1
            self._slope[i] = _DEFAULT_STEP_SLOPE
            self._req[i] = 0.0
            self._tok[i] = 0.0
            self._stamp[i] = 0.0
            self._util[i] = 0.0
            self._cont[i] = 1.0
            self._mult[i] = 1.0
            self._tokg[i] = 0.0
            self._scratch[i] = 0.0
            self._available[i] = 1
        for i in range(self._n * self._k):
            self._penalty[i] = 0.0
            self._capable[i] = 0
        self._tau = 1.0
        self._weight = 1.0
        self.set_params(tau=tau, weight=weight)

    def __dealloc__(self):
        PyMem_Free(self._queue)
        PyMem_Free(self._req)
        PyMem_Free(self._available)

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

    def set_params(self, *, tau=None, weight=None):
        """Set the EWMA time constant (seconds, > 0) and the contention weight (>= 0)."""
        cdef double t = self._tau if tau is None else _number(tau, "tau")
        cdef double w
        cdef Py_ssize_t i
        if t <= 0.0:
            raise KernelInputError(f"tau must be > 0, got {tau!r}")
        w = self._weight if weight is None else _number(weight, "weight")
        self._tau = t
        self._weight = w
        for i in range(self._n):
            self._cont[i] = _contention(self._util[i], w)

    cdef Py_ssize_t _index(self, object i) except -1:
        return _in_range(i, self._n, "candidate index")

    cdef Py_ssize_t _kind(self, object kind) except -1:
        return _in_range(kind, self._k, "kind")

    cdef void _rebatch(self, Py_ssize_t i) noexcept nogil:
        """Refresh row ``i``'s ``m`` and ``tokg`` (``_scoring_py._batch``)."""
        cdef int64_t n = self._queue[i] + self._in_flight[i] + 1
        cdef int64_t s = self._slots[i]
        if n > s:  # queued behind a full context: n / s full-batch service times
            self._mult[i] = <double>n / <double>s
            self._tokg[i] = self._tok[i] * _step(self._slope[i], s)
        else:  # a free slot: starts at the next step
            self._mult[i] = 1.0
            self._tokg[i] = self._tok[i] * _step(self._slope[i], n)

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
        self._queue[ii] = q
        self._in_flight[ii] = f
        self._rebatch(ii)

    def set_slots(self, i, slots):
        """Set how many sequences candidate ``i``'s context decodes together (``1..MAX_SLOTS``)."""
        cdef Py_ssize_t ii = self._index(i)
        self._slots[ii] = _slot_count(slots)
        self._rebatch(ii)

    def set_step_slope(self, i, slope):
        """Set candidate ``i``'s step-time growth per extra busy sequence (``0..MAX_STEP_SLOPE``).

        Estimates already folded in keep the normalisation they were observed with.
        """
        cdef Py_ssize_t ii = self._index(i)
        self._slope[ii] = _number(slope, "step_slope", _MAX_STEP_SLOPE)
        self._rebatch(ii)

    def set_util(self, i, util):
        """Set candidate ``i``'s device utilisation (0..1)."""
        cdef Py_ssize_t ii = self._index(i)
        cdef double u = _number(util, "util", 1.0)
        self._util[ii] = u
        self._cont[ii] = _contention(u, self._weight)

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
        self._req[ii] = _peak_ewma(self._req[ii], req, dt, self._tau)
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
        return self._req[ii], self._tok[ii]

    def util(self, i):
        """Candidate ``i``'s device utilisation."""
        return self._util[self._index(i)]

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
        cdef Py_ssize_t best = _scan(
            self._n, self._rot, self._k, self._mult, self._req, self._tokg, self._cont,
            self._capable + kind, self._penalty + kind, self._available, est, costs,
        )
        cdef Py_ssize_t after = (self._rot if best == _NO_CANDIDATE else best) + 1
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
