# C-level interface of zeta._scoring_c (built from native/_scoring_c.pyx): the typed layout of
# ScoreTable. It lives here, not in native/, because Cython finds a module's .pxd by its
# qualified name (zeta/_scoring_c.pxd); `cimport zeta._scoring_c` from other Cython code uses it.
cimport cython
from libc.stdint cimport int64_t


# What a decision reads of one row, side by side (one base pointer in the scan, not a dozen):
# kept current by the setters.
ctypedef struct _Row:
    double mult                     # m: (queue + in_flight + 1) / slots, at least 1
    double req                      # peak EWMA of per-request service time, seconds
    double tokg                     # tok * g(occupancy the next request runs at)
    double cont                     # contention(util, weight)
    double co                       # co_slow, a multiple of 2**-20, 0..10
    double nudge                    # 0.5 * (occupancy - 1) * slope * tok
    double share                    # min(in_flight, slots) * co: whole quanta
    double busy1                    # 1.0 when in_flight > 0, else 0.0
    Py_ssize_t slot                 # dense number of the row's device


# A device in use, by dense number.
ctypedef struct _Device:
    double busy                     # rows on it with in_flight > 0 (a whole number)
    double harm                     # sum of its rows' share (whole quanta)


@cython.final
cdef class ScoreTable:
    cdef Py_ssize_t _n              # candidates
    cdef Py_ssize_t _k              # kinds (columns of _capable and _penalty)
    cdef Py_ssize_t _rot            # where the next scan starts, 0..n-1
    cdef double _tau                # peak-EWMA decay time constant, seconds, > 0
    cdef double _weight             # contention weight, >= 0
    cdef double _harm_weight        # weight of the harm to others, >= 0
    cdef dict _dense                # device id -> its dense number (0..n-1)
    cdef Py_ssize_t _n_free         # entries of _free in use

    # Five blocks from PyMem_Malloc, owned by the table and freed in __dealloc__.
    cdef _Row* _row                 # [n] per row, what a decision reads
    cdef _Device* _dev              # [n] by dense device number
    cdef int64_t* _queue            # [n] queued messages (the mailbox)
    cdef int64_t* _in_flight        # [n] sequences in the context's slots
    cdef int64_t* _slots            # [n] sequences the context decodes together, 1..256
    cdef int64_t* _device           # [n] device (group id) of the row, 0..MAX_COUNT
    cdef int64_t* _dev_rows         # [n] by dense device number: rows on it
    cdef int64_t* _free             # [n] a stack of device numbers not in use (_n_free of them)
    cdef double* _tok               # [n] peak EWMA of per-token time at one sequence, seconds
    cdef double* _stamp             # [n] time of the latest observation
    cdef double* _util              # [n] device utilisation, 0..1
    cdef double* _scratch           # [n] costs of the latest choose(..., costs=...)
    cdef double* _slope             # [n] step-time growth per extra busy sequence, 0..10
    cdef double* _penalty           # [n * k] extra cost of (candidate, kind), row-major
    cdef unsigned char* _available  # [n] 1 when the candidate can take work
    cdef unsigned char* _capable    # [n * k] 1 when the candidate can serve the kind

    cdef Py_ssize_t _index(self, object i) except -1
    cdef Py_ssize_t _kind(self, object kind) except -1
    cdef void _rebatch(self, Py_ssize_t i) noexcept nogil
    cdef void _leave(self, Py_ssize_t i) noexcept nogil
    cdef void _join(self, Py_ssize_t i) noexcept nogil
    cdef Py_ssize_t _decide(self, Py_ssize_t kind, double est, double* costs) noexcept nogil
