# cython: language_level=3
"""Hot-path histograms: an observation is a few C operations, no Python objects.

The gateway observes request and upstream durations per route and backend on every
request; prometheus-client's Histogram takes a lock and walks Python objects per call.
This keeps plain C arrays (one count per bucket, not cumulative) and a running sum, and
hands Prometheus the cumulative view only when scraped (``snapshot``).

Nothing here reads a clock: durations come in as arguments.
"""

cimport cython
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport uint64_t
from libc.string cimport memset

# Seconds. From 0.5 ms (a warm, small call through a local gateway) to 60 s (a cold start
# on a slow function); roughly x2-x2.5 steps so quantile estimates stay within a step.
DEFAULT_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)


@cython.final
cdef class Histogram:
    """Fixed buckets (upper bounds, increasing); ``observe(v)`` counts ``v`` in the first
    bucket whose bound is >= v, or in the implicit +Inf bucket."""

    cdef double* bounds
    cdef uint64_t* counts      # n + 1 entries: the last is +Inf
    cdef readonly int n
    cdef readonly double sum
    cdef readonly uint64_t count

    def __cinit__(self, bounds=DEFAULT_BUCKETS_S):
        cdef int i
        b = [float(x) for x in bounds]
        if not b or any(b[i] >= b[i + 1] for i in range(len(b) - 1)):
            raise ValueError("bucket bounds must be non-empty and strictly increasing")
        self.n = len(b)
        self.bounds = <double*>PyMem_Malloc(self.n * sizeof(double))
        self.counts = <uint64_t*>PyMem_Malloc((self.n + 1) * sizeof(uint64_t))
        if self.bounds == NULL or self.counts == NULL:
            raise MemoryError()
        for i in range(self.n):
            self.bounds[i] = b[i]
        memset(self.counts, 0, (self.n + 1) * sizeof(uint64_t))

    def __dealloc__(self):
        PyMem_Free(self.bounds)
        PyMem_Free(self.counts)

    cpdef void observe(self, double v):
        # Binary search over at most a few dozen bounds.
        cdef int lo = 0, hi = self.n, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if v <= self.bounds[mid]:
                hi = mid
            else:
                lo = mid + 1
        self.counts[lo] += 1
        self.sum += v
        self.count += 1

    def bounds_list(self):
        return [self.bounds[i] for i in range(self.n)]

    def snapshot(self):
        """``([(upper_bound, cumulative_count), ..., (inf, count)], sum)``."""
        cdef int i
        cdef uint64_t acc = 0
        out = []
        for i in range(self.n):
            acc += self.counts[i]
            out.append((self.bounds[i], acc))
        acc += self.counts[self.n]
        out.append((float("inf"), acc))
        return out, self.sum


# ---------------------------------------------------------------------------------------
# Audit lines: the export format of the audit log, built in C because it runs for every
# request (fastgw.audit batches records and calls this off the request path).

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.mem cimport PyMem_Realloc
from cpython.ref cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.math cimport llround
from libc.string cimport memcpy

import json as _json

cdef tuple _AUDIT_KEYS = (
    b'{"time":', b',"request_id":', b',"client":', b',"route":', b',"backend":',
    b',"endpoint":', b',"status":', b',"decision":', b',"reason":', b',"subject":',
    b',"issuer":', b',"key":', b',"duration_s":', b',"upstream_first_byte_s":',
    b',"bytes_in":', b',"bytes_out":', b',"retries":', b',"trace_id":',
)
AUDIT_FIELD_COUNT = 18


cdef struct Buf:
    char* p
    Py_ssize_t n
    Py_ssize_t cap


cdef int _reserve(Buf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t cap
    cdef char* q
    if b.n + extra <= b.cap:
        return 0
    cap = b.cap * 2 if b.cap else 4096
    while cap < b.n + extra:
        cap *= 2
    q = <char*>PyMem_Realloc(b.p, cap)
    if q == NULL:
        raise MemoryError()
    b.p = q
    b.cap = cap
    return 0


cdef int _add(Buf* b, const char* s, Py_ssize_t n) except -1:
    _reserve(b, n)
    memcpy(b.p + b.n, s, n)
    b.n += n
    return 0


cdef int _add_bytes(Buf* b, bytes s) except -1:
    return _add(b, PyBytes_AS_STRING(s), PyBytes_GET_SIZE(s))


cdef bint _is_hex(const unsigned char* p, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i
    for i in range(n):
        if not ((48 <= p[i] <= 57) or (97 <= p[i] <= 102)):
            return False
    return True


cdef int _add_trace_id(Buf* b, object v) except -1:
    """The trace id of a well-formed W3C traceparent ("vv-<32 hex>-<16 hex>-ff"), else null."""
    cdef const unsigned char* p
    if type(v) is bytes and PyBytes_GET_SIZE(v) == 55:
        p = <const unsigned char*>PyBytes_AS_STRING(v)
        if (p[2] == 45 and p[35] == 45 and p[52] == 45 and _is_hex(p, 2)
                and _is_hex(p + 3, 32) and _is_hex(p + 36, 16) and _is_hex(p + 53, 2)):
            _add(b, "\"", 1)
            _add(b, <const char*>p + 3, 32)
            _add(b, "\"", 1)
            return 0
    return _add(b, "null", 4)


cdef int _add_int(Buf* b, long long v) except -1:
    cdef char tmp[24]
    cdef int k = 24
    cdef bint neg = v < 0
    cdef unsigned long long u = <unsigned long long>(-v if neg else v)
    while True:
        k -= 1
        tmp[k] = <char>(48 + u % 10)
        u //= 10
        if u == 0:
            break
    if neg:
        k -= 1
        tmp[k] = 45
    return _add(b, tmp + k, 24 - k)


cdef int _add_micros(Buf* b, double v) except -1:
    """A float with six decimals, from its rounded count of microseconds (snprintf's %f
    costs several times more, and these are times and durations in seconds)."""
    cdef long long us
    cdef char frac[7]
    cdef int k
    if v != v or v > 9.2e12 or v < -9.2e12:
        return _add(b, "null", 4)
    us = llround(v * 1e6)
    if us < 0:
        _add(b, "-", 1)
        us = -us
    _add_int(b, us // 1000000)
    us = us % 1000000
    frac[0] = 46
    for k in range(6, 0, -1):
        frac[k] = <char>(48 + us % 10)
        us //= 10
    return _add(b, frac, 7)


cdef int _add_value(Buf* b, object v, dict cache) except -1:
    """null, a number, or a JSON string (cached: the strings here are names and codes
    from small sets)."""
    cdef object t
    cdef PyObject* hit
    if v is None:
        return _add(b, "null", 4)
    t = type(v)
    if t is float:
        return _add_micros(b, <double>v)
    if t is int:
        return _add_int(b, <long long>v)
    hit = PyDict_GetItem(cache, v)
    if hit != NULL:
        return _add_bytes(b, <bytes>hit)
    out = _json.dumps(v.decode("latin-1") if t is bytes else str(v)).encode()
    if len(cache) < 4096:
        cache[v] = out
    return _add_bytes(b, out)


def format_audit_lines(list records not None, dict cache not None, double time_offset=0.0):
    """JSON lines (bytes) for audit records: tuples of AUDIT_FIELD_COUNT values in the
    order of fastgw.audit.FIELDS. Request ids and client addresses (fields 1, 2) are
    bytes that need no escaping (validated or generated upstream of this); the trace id
    (field 17) is kept only if it is a well-formed traceparent. ``time_offset`` is added
    to field 0 (records may carry a monotonic clock reading; the offset makes it wall
    time)."""
    cdef Buf b
    cdef tuple rec
    cdef Py_ssize_t i
    cdef object v
    b.p = NULL
    b.n = 0
    b.cap = 0
    try:
        for rec in records:
            if PyTuple_GET_SIZE(rec) != 18:
                raise ValueError("an audit record has 18 fields")
            for i in range(18):
                _add_bytes(&b, <bytes>PyTuple_GET_ITEM(_AUDIT_KEYS, i))
                v = <object>PyTuple_GET_ITEM(rec, i)
                if i == 0 and type(v) is float:
                    _add_micros(&b, <double>v + time_offset)
                elif (i == 1 or i == 2) and type(v) is bytes:
                    _add(&b, "\"", 1)
                    _add_bytes(&b, v)
                    _add(&b, "\"", 1)
                elif i == 17:
                    _add_trace_id(&b, v)
                else:
                    _add_value(&b, v, cache)
            _add(&b, "}\n", 2)
        return PyBytes_FromStringAndSize(b.p, b.n)
    finally:
        PyMem_Free(b.p)
