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
from array import array as _array

from zeta._exceptions import KernelInputError
from zeta._scoring_py import _check, _check_count, _check_int, _check_real

__all__ = ["MAX_COST", "MAX_COUNT", "NO_CANDIDATE", "ScoreTable", "contention", "peak_ewma", "score"]

NO_CANDIDATE = -1
UTIL_CAP = 0.95
MAX_COUNT = 2**31 - 1
MAX_COST = DBL_MAX

cdef enum:
    _NO_CANDIDATE = -1
    _MAX_COUNT = 2147483647

cdef double _UTIL_CAP = 0.95


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


cdef inline double _cost(
    int64_t q, int64_t f, double req, double tok, double cont, double pen, double est
) noexcept nogil:
    cdef double c = <double>(q + f + 1) * (req + est * tok) * cont + pen
    if not c <= DBL_MAX:  # inf, or NaN from 0 * inf: saturate, a servable one stays finite
        c = DBL_MAX
    return c


cdef inline Py_ssize_t _scan(
    Py_ssize_t n,
    Py_ssize_t start,
    Py_ssize_t stride,
    const int64_t* queue,
    const int64_t* in_flight,
    const double* req,
    const double* tok,
    const double* cont,
    const unsigned char* capable,
    const double* penalty,
    const unsigned char* available,
    double est,
    double* costs,
) noexcept nogil:
    """The decision: cheapest candidate, scanning from ``start``; ties keep the first seen.

    ``capable`` and ``penalty`` are read at ``i * stride`` (one column of a row-major table).
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
            c = _cost(queue[i], in_flight[i], req[i], tok[i], cont[i], penalty[p], est)
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


cdef inline bint _disjoint(
    const char* a, Py_ssize_t n_a, Py_ssize_t stride_a, size_t size_a,
    const char* b, Py_ssize_t n_b, Py_ssize_t stride_b, size_t size_b,
) noexcept nogil:
    """Whether two non-empty strided 1-D buffers share no byte (strides may be negative)."""
    cdef const char* lo_a = a + (stride_a * (n_a - 1) if stride_a < 0 else 0)
    cdef const char* hi_a = a + (0 if stride_a < 0 else stride_a * (n_a - 1)) + size_a
    cdef const char* lo_b = b + (stride_b * (n_b - 1) if stride_b < 0 else 0)
    cdef const char* hi_b = b + (0 if stride_b < 0 else stride_b * (n_b - 1)) + size_b
    return hi_a <= lo_b or hi_b <= lo_a


# -- validation: fast paths for exact int/float, the reference's validators otherwise --------

cdef inline str _name(str name, Py_ssize_t at):
    return name if at < 0 else f"{name}[{at}]"


cdef double _number(object value, str name, Py_ssize_t at=-1, double upper=DBL_MAX) except -1.0:
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
    return _check(_name(name, at), value, None if upper == DBL_MAX else upper)


cdef int64_t _count(object value, str name, Py_ssize_t at=-1) except -1:
    """Like ``_scoring_py._check_count``: an integer in ``0..MAX_COUNT``."""
    cdef long long ll
    cdef int overflow = 0
    if type(value) is int:
        ll = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow == 0 and 0 <= ll <= _MAX_COUNT:
            return ll
    return _check_count(_name(name, at), value)


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


# -- module-level functions ---------------------------------------------------------------

def contention(util, weight=1.0):
    """Slowdown factor for a device at utilisation ``util`` (0..1); 1 when idle.

    Raises:
        KernelInputError: ``util`` outside 0..1, or ``weight`` negative, NaN or infinite.
    """
    return _contention(_number(util, "util", -1, 1.0), _number(weight, "weight"))


def peak_ewma(old, sample, dt, tau):
    """One peak-EWMA step: jump up to a new peak at once, decay toward lower samples.

    ``dt`` is the time since the previous sample; ``dt <= 0`` (an out-of-order sample) leaves
    a higher estimate unchanged.

    Raises:
        KernelInputError: ``old`` or ``sample`` negative or not finite, ``dt`` not finite, or
            ``tau`` not finite and > 0.
    """
    cdef double o = _number(old, "old")
    cdef double s = _number(sample, "sample")
    cdef double d = _check_real("dt", dt)
    cdef double t = _number(tau, "tau")
    if t <= 0.0:
        raise KernelInputError(f"tau must be > 0, got {tau!r}")
    return _peak_ewma(o, s, d, t)


# boundscheck on: with it off, Cython reads and writes list items unchecked, and the validators
# run Python code (__float__, __index__, __bool__) that may shrink a list after its length check.
@cython.boundscheck(True)
def score(
    queue,
    in_flight,
    ewma_req,
    ewma_tok,
    util,
    capable,
    penalty,
    available,
    est_tokens,
    rotation=0,
    costs=None,
    *,
    weight=1.0,
):
    """Score one message against ``n`` candidates given as parallel arrays; return the index.

    ``capable`` and ``penalty`` are for the message's kind; ``capable`` and ``available`` are
    read as truth values. Returns :data:`NO_CANDIDATE` when no candidate is capable and
    available. If ``costs`` is given, it receives every cost. Every input is validated (in
    index order) before anything is written to ``costs``.

    Raises:
        KernelInputError: mismatched lengths, no candidates, or NaN, negative or infinite values.
    """
    cdef Py_ssize_t n = len(queue)
    cdef Py_ssize_t i, best, start
    cdef double est, w
    cdef int64_t* counts
    cdef double* reals
    cdef unsigned char* ok
    for name, arr in (
        ("in_flight", in_flight), ("ewma_req", ewma_req), ("ewma_tok", ewma_tok),
        ("util", util), ("capable", capable), ("penalty", penalty), ("available", available),
    ):
        if len(arr) != n:
            raise KernelInputError(f"{name} has length {len(arr)}, expected {n} (len(queue))")
    if costs is not None and len(costs) != n:
        raise KernelInputError(f"costs has length {len(costs)}, expected {n}")
    if n == 0:
        raise KernelInputError("no candidates")
    est = _number(est_tokens, "est_tokens")
    w = _number(weight, "weight")
    start = _rotation(rotation, "rotation", n)

    counts = <int64_t*> PyMem_Malloc(2 * n * sizeof(int64_t))
    reals = <double*> PyMem_Malloc(5 * n * sizeof(double))
    ok = <unsigned char*> PyMem_Malloc(n * sizeof(unsigned char))
    try:
        if counts == NULL or reals == NULL or ok == NULL:
            raise MemoryError()
        # reals holds req | tok | cont | penalty | costs, n each
        for i in range(n):
            counts[i] = _count(queue[i], "queue", i)
            counts[n + i] = _count(in_flight[i], "in_flight", i)
            reals[i] = _number(ewma_req[i], "ewma_req", i)
            reals[n + i] = _number(ewma_tok[i], "ewma_tok", i)
            reals[2 * n + i] = _contention(_number(util[i], "util", i, 1.0), w)
            reals[3 * n + i] = _number(penalty[i], "penalty", i)
            ok[i] = bool(capable[i]) and bool(available[i])
        best = _scan(
            n, start, 1, counts, counts + n, reals, reals + n, reals + 2 * n, ok, reals + 3 * n,
            ok, est, reals + 4 * n,
        )
        if costs is not None:
            for i in range(n):
                costs[i] = reals[4 * n + i]
        return best
    finally:
        PyMem_Free(counts)
        PyMem_Free(reals)
        PyMem_Free(ok)


# -- the table ----------------------------------------------------------------------------

cdef class ScoreTable:
    """Live state of ``n`` candidates and the per-message decision over it.

    The router owns one table. Actors update load, availability and service-time estimates in
    place; :meth:`choose` scores all candidates for one message without allocating.
    Capability and penalty are per (candidate, kind) pair, kinds numbered ``0..n_kinds-1``;
    a new table has every candidate available, idle, with zero estimates and no capabilities.
    All setters validate their input and raise :class:`KernelInputError` before changing state.
    A table is not thread-safe: one owner (the router) mutates it. (:meth:`choose_batch`
    releases the GIL while it runs.)
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
        self._queue = <int64_t*> PyMem_Malloc(2 * self._n * sizeof(int64_t))
        self._req = <double*> PyMem_Malloc((7 + self._k) * self._n * sizeof(double))
        self._available = <unsigned char*> PyMem_Malloc((1 + self._k) * self._n)
        if self._queue == NULL or self._req == NULL or self._available == NULL:
            raise MemoryError()
        self._in_flight = self._queue + self._n
        self._tok = self._req + self._n
        self._stamp = self._req + 2 * self._n
        self._util = self._req + 3 * self._n
        self._cont = self._req + 4 * self._n
        self._scratch = self._req + 5 * self._n
        self._penalty = self._req + 6 * self._n
        self._capable = self._available + self._n
        for i in range(self._n):
            self._queue[i] = 0
            self._in_flight[i] = 0
            self._req[i] = 0.0
            self._tok[i] = 0.0
            self._stamp[i] = 0.0
            self._util[i] = 0.0
            self._cont[i] = 1.0
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
        """Set candidate ``i``'s queued and in-flight message counts (``0..MAX_COUNT``)."""
        cdef Py_ssize_t ii = self._index(i)
        cdef int64_t q = _count(queue, "queue")
        cdef int64_t f = _count(in_flight, "in_flight")
        self._queue[ii] = q
        self._in_flight[ii] = f

    def add_load(self, i, queue, in_flight):
        """Add (possibly negative) deltas to the load; the result must stay in ``0..MAX_COUNT``."""
        cdef Py_ssize_t ii = self._index(i)
        cdef long long dq, df
        cdef int over_q = 0, over_f = 0
        if type(queue) is int and type(in_flight) is int:
            dq = PyLong_AsLongLongAndOverflow(queue, &over_q)
            df = PyLong_AsLongLongAndOverflow(in_flight, &over_f)
            if (
                over_q == 0 and over_f == 0
                and -_MAX_COUNT <= dq <= _MAX_COUNT  # so the sums below cannot overflow
                and -_MAX_COUNT <= df <= _MAX_COUNT
                and 0 <= self._queue[ii] + dq <= _MAX_COUNT
                and 0 <= self._in_flight[ii] + df <= _MAX_COUNT
            ):
                self._queue[ii] += dq
                self._in_flight[ii] += df
                return
        self.set_load(
            ii,
            self._queue[ii] + _check_int("queue", queue),
            self._in_flight[ii] + _check_int("in_flight", in_flight),
        )

    def set_util(self, i, util):
        """Set candidate ``i``'s device utilisation (0..1)."""
        cdef Py_ssize_t ii = self._index(i)
        cdef double u = _number(util, "util", -1, 1.0)
        self._util[ii] = u
        self._cont[ii] = _contention(u, self._weight)

    def set_ewma(self, i, per_request, per_token, now):
        """Overwrite the service-time estimates (a prior, or a calibration result)."""
        cdef Py_ssize_t ii = self._index(i)
        cdef double req = _number(per_request, "per_request")
        cdef double tok = _number(per_token, "per_token")
        cdef double t = _number(now, "now")
        self._req[ii] = req
        self._tok[ii] = tok
        self._stamp[ii] = t

    def observe(self, i, per_request, per_token, now):
        """Fold one observed service into candidate ``i``'s estimates (peak EWMA).

        ``now`` is the observation time; an observation older than the last one (``dt <= 0``)
        can raise an estimate but never lowers it.
        """
        cdef Py_ssize_t ii = self._index(i)
        cdef double req = _number(per_request, "per_request")
        cdef double tok = _number(per_token, "per_token")
        cdef double t = _number(now, "now")
        cdef double dt = t - self._stamp[ii]
        self._req[ii] = _peak_ewma(self._req[ii], req, dt, self._tau)
        self._tok[ii] = _peak_ewma(self._tok[ii], tok, dt, self._tau)
        if t > self._stamp[ii]:
            self._stamp[ii] = t

    # -- getters --------------------------------------------------------------------------
    def load(self, i):
        """Candidate ``i``'s ``(queue, in_flight)``."""
        cdef Py_ssize_t ii = self._index(i)
        return self._queue[ii], self._in_flight[ii]

    def ewma(self, i):
        """Candidate ``i``'s ``(per_request, per_token)`` service-time estimates (seconds)."""
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
    def cost(self, i, kind, est_tokens):
        """Cost of sending one message of ``kind`` to candidate ``i`` (``inf`` if it cannot)."""
        cdef Py_ssize_t ii = self._index(i)
        cdef Py_ssize_t j = ii * self._k + self._kind(kind)
        cdef double est = _number(est_tokens, "est_tokens")
        if not self._capable[j] or not self._available[ii]:
            return INFINITY
        return _cost(
            self._queue[ii], self._in_flight[ii], self._req[ii], self._tok[ii], self._cont[ii],
            self._penalty[j], est,
        )

    cdef Py_ssize_t _decide(self, Py_ssize_t kind, double est, double* costs) noexcept nogil:
        """One decision; moves the rotation to just past the winner (by one if none)."""
        cdef Py_ssize_t best = _scan(
            self._n, self._rot, self._k, self._queue, self._in_flight, self._req, self._tok,
            self._cont, self._capable + kind, self._penalty + kind, self._available, est, costs,
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

    cdef Py_ssize_t _run_batch(
        self, const int[:] kinds, const double[:] est_tokens, int[:] out, bint reserve
    ) noexcept nogil:
        """The batch loop over validated inputs; returns the number of misses."""
        cdef Py_ssize_t x, c, kind
        cdef Py_ssize_t misses = 0
        for x in range(kinds.shape[0]):
            kind = kinds[x]
            # Validated already, but another thread may write to the buffer while the GIL is
            # released: never index the table with an unchecked kind.
            if 0 <= kind < self._k:
                c = self._decide(kind, est_tokens[x], NULL)
            else:
                c = _NO_CANDIDATE
            out[x] = <int>c
            if c == _NO_CANDIDATE:
                misses += 1
            elif reserve:
                self._queue[c] += 1
        return misses

    def choose_batch(self, kinds, est_tokens, out, reserve=True):
        """Decide for many messages in order; write each choice into ``out``.

        Equivalent to ``out[x] = choose(kinds[x], est_tokens[x])`` for each ``x``, where, with
        ``reserve``, each choice adds one to its candidate's queue before the next message is
        scored (what the router does when it enqueues). Returns how many messages found no
        candidate. All inputs are validated before any state changes.

        Fast path (validation and decisions without the GIL): ``kinds`` and ``out`` int32
        buffers (``array.array('i')``, ``numpy.int32``; ``out`` writable), ``est_tokens`` a
        float64 buffer (``array.array('d')``, ``numpy.float64``); any stride. Any other
        sequences are accepted too: they are validated element by element, like the reference.
        """
        cdef const int[:] kv
        cdef const double[:] ev
        cdef int[:] ov
        cdef Py_ssize_t m, x, bad = -1
        cdef bint res = reserve
        cdef bint fast = True
        try:
            kv = kinds
            ev = est_tokens
            ov = out
        except (TypeError, ValueError, BufferError):
            fast = False
        if not fast:
            return self._choose_batch_generic(kinds, est_tokens, out, res)
        m = kv.shape[0]
        if ev.shape[0] != m or ov.shape[0] != m:
            raise KernelInputError(
                f"kinds, est_tokens and out must have equal lengths, got "
                f"{m}, {ev.shape[0]}, {ov.shape[0]}"
            )
        # The loop reads kinds[x] and est_tokens[x] after writing out[:x]; if out shares memory
        # with either, the reference (which copies all inputs first) is what the copying path does.
        if m > 0 and not (
            _disjoint(
                <const char*>&ov[0], m, ov.strides[0], sizeof(int),
                <const char*>&kv[0], m, kv.strides[0], sizeof(int),
            )
            and _disjoint(
                <const char*>&ov[0], m, ov.strides[0], sizeof(int),
                <const char*>&ev[0], m, ev.strides[0], sizeof(double),
            )
        ):
            return self._choose_batch_generic(kinds, est_tokens, out, res)
        with nogil:
            for x in range(m):
                if not (0 <= kv[x] < self._k and 0.0 <= ev[x] <= DBL_MAX):
                    bad = x
                    break
        if bad >= 0:  # let the slow paths raise the reference's error for this element
            self._kind(kinds[bad])
            _number(est_tokens[bad], "est_tokens", bad)
            raise KernelInputError(f"message {bad} is invalid")  # unreachable unless they drift
        with nogil:
            m = self._run_batch(kv, ev, ov, res)
        return m

    @cython.boundscheck(True)  # the inputs are Python sequences that validation may shrink
    cdef object _choose_batch_generic(
        self, object kinds, object est_tokens, object out, bint reserve
    ):
        """choose_batch for inputs that are not int32/float64 buffers (or that overlap ``out``).

        Validates each element like the reference and copies them into int32/float64 arrays,
        then decides and writes ``out[x]`` one message at a time, as the reference does, so an
        ``out`` that rejects a write fails at the same message with the same state.
        """
        cdef Py_ssize_t m = len(kinds)
        cdef Py_ssize_t x, c
        cdef Py_ssize_t misses = 0
        cdef int[:] kv
        cdef double[:] ev
        if len(est_tokens) != m or len(out) != m:
            raise KernelInputError(
                f"kinds, est_tokens and out must have equal lengths, got "
                f"{m}, {len(est_tokens)}, {len(out)}"
            )
        # array * m raises MemoryError where m * itemsize would overflow (a huge __len__).
        kv = _array("i", [0]) * m
        ev = _array("d", [0.0]) * m
        for x in range(m):
            kv[x] = self._kind(kinds[x])
            ev[x] = _number(est_tokens[x], "est_tokens", x)
        for x in range(m):
            c = self._decide(kv[x], ev[x], NULL)
            out[x] = c
            if c == _NO_CANDIDATE:
                misses += 1
            elif reserve:
                self._queue[c] += 1
        return misses
