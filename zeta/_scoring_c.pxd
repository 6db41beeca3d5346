# C-level interface of zeta._scoring_c (built from native/_scoring_c.pyx): the typed layout of
# ScoreTable. It lives here, not in native/, because Cython finds a module's .pxd by its
# qualified name (zeta/_scoring_c.pxd); `cimport zeta._scoring_c` from other Cython code uses it.
cimport cython
from libc.stdint cimport int64_t


@cython.final
cdef class ScoreTable:
    cdef Py_ssize_t _n              # candidates
    cdef Py_ssize_t _k              # kinds (columns of _capable and _penalty)
    cdef Py_ssize_t _rot            # where the next scan starts, 0..n-1
    cdef double _tau                # peak-EWMA decay time constant, seconds, > 0
    cdef double _weight             # contention weight, >= 0

    # Three blocks from PyMem_Malloc, owned by the table and freed in __dealloc__.
    cdef int64_t* _queue            # [n] queued messages (the mailbox)
    cdef int64_t* _in_flight        # [n] sequences in the context's slots
    cdef int64_t* _slots            # [n] sequences the context decodes together, 1..256
    cdef double* _req               # [n] peak EWMA of per-request service time, seconds
    cdef double* _tok               # [n] peak EWMA of per-token time at one sequence, seconds
    cdef double* _stamp             # [n] time of the latest observation
    cdef double* _util              # [n] device utilisation, 0..1
    cdef double* _cont              # [n] contention(util[i], weight), kept current by setters
    cdef double* _scratch           # [n] costs of the latest choose(..., costs=...)
    cdef double* _slope             # [n] step-time growth per extra busy sequence, 0..10
    cdef double* _mult              # [n] m: (queue + in_flight + 1) / slots, at least 1
    cdef double* _tokg              # [n] tok * g(occupancy the next request runs at)
    cdef double* _penalty           # [n * k] extra cost of (candidate, kind), row-major
    cdef unsigned char* _available  # [n] 1 when the candidate can take work
    cdef unsigned char* _capable    # [n * k] 1 when the candidate can serve the kind

    cdef Py_ssize_t _index(self, object i) except -1
    cdef Py_ssize_t _kind(self, object kind) except -1
    cdef void _rebatch(self, Py_ssize_t i) noexcept nogil
    cdef Py_ssize_t _decide(self, Py_ssize_t kind, double est, double* costs) noexcept nogil
