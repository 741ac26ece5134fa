# cython: language_level=3
"""Hot-path histograms: an observation is a few C operations, no Python objects.

The gateway observes request and upstream durations per route and backend on every
request; prometheus-client's Histogram takes a lock and walks Python objects per call.
This keeps plain C arrays (one count per bucket, not cumulative) and a running sum, and
hands Prometheus the cumulative view only when scraped (``snapshot``).

The audit log's records are kept the same way (``AuditRing``: one typed call per request
into a preallocated C array) and turned into JSON lines in C when the audit task drains
them; ``format_audit_lines`` is the reference format they are tested against.

Nothing here reads a clock: durations and times come in as arguments.
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


# ---------------------------------------------------------------------------------------
# The audit ring: what the request path hands the audit log. One typed call copies a
# request's values into a preallocated C record (no tuple, nothing for the GC to track);
# the audit task turns every pending record into JSON lines in one pass. Names (route,
# backend, endpoint, decision, reason) come from small sets: each is turned into its JSON
# string once (json.dumps, so escaping is the reference's) and records keep its index.

from cpython.list cimport PyList_GET_ITEM
from cpython.object cimport PyObject_IsTrue
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_XDECREF

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)
    const unsigned char* PyUnicode_1BYTE_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)

cdef enum:
    # Name-table bound: past it (route names from many reloads, odd reasons) the table
    # starts over at the next drain, when no record refers to it.
    _MAX_NAMES = 4096
    # Name fields of a record, by slot.
    _N_ROUTE = 0
    _N_BACKEND = 1
    _N_ENDPOINT = 2
    _N_DECISION = 3
    _N_REASON = 4
    # Bits of _AuditRec.nulls.
    _NULL_FIRST_BYTE = 1
    _NULL_BYTES_IN = 2
    _NULL_BYTES_OUT = 4
    # Room for a line but its names and strings: the keys and "}\n" are 213 bytes, a
    # number at most 21 (sign, 13 integer digits and ".uuuuuu" for a time; 20 for an
    # int), seven numbers, and 34 for the trace id: 394.
    _FIXED_ROOM = 512
    # A drain buffer grown past this (a burst) is given back after the drain.
    _KEEP_BUF_BYTES = 1 << 22


cdef struct _AuditRec:
    double time
    double duration_s
    double first_byte_s
    long long status
    long long bytes_in
    long long bytes_out
    long long retries
    PyObject* request_id     # owned references (None included), released on drain
    PyObject* client
    PyObject* identity
    int names[5]             # indexes into the name table, -1 for null
    int nulls                # _NULL_* bits
    int has_trace
    char trace[32]


cdef inline char* _put(char* p, const char* s, Py_ssize_t n) noexcept:
    memcpy(p, s, n)
    return p + n


# "00" to "99": numbers are written two digits per division.
cdef const char* _D2 = (
    "00010203040506070809101112131415161718192021222324"
    "25262728293031323334353637383940414243444546474849"
    "50515253545556575859606162636465666768697071727374"
    "75767778798081828384858687888990919293949596979899"
)


cdef inline char* _put_uint(char* p, unsigned long long u) noexcept:
    cdef int n = 1
    cdef unsigned long long t = 10
    cdef unsigned int d
    while n < 20 and u >= t:  # digit count, so the digits go straight to their place
        t *= 10
        n += 1
    p += n
    while u >= 100:
        d = <unsigned int>(u % 100)
        u //= 100
        p -= 2
        memcpy(p, _D2 + 2 * d, 2)
    if u >= 10:
        p -= 2
        memcpy(p, _D2 + 2 * u, 2)
    else:
        p -= 1
        p[0] = <char>(48 + u)
    return p + n


cdef inline char* _put_int(char* p, long long v) noexcept:
    """As _add_int, into room reserved by the caller (at most 20 bytes)."""
    if v < 0:
        p[0] = 45
        return _put_uint(p + 1, 0ULL - <unsigned long long>v)
    return _put_uint(p, <unsigned long long>v)


cdef inline char* _put_micros(char* p, double v) noexcept:
    """As _add_micros, into room reserved by the caller (at most 21 bytes). Rounds half
    away from zero as llround does: x - trunc(x) is exact for a double, so comparing it
    with 0.5 is too."""
    cdef double x
    cdef long long us
    cdef unsigned long long u
    cdef unsigned int f
    if v != v or v > 9.2e12 or v < -9.2e12:
        return _put(p, "null", 4)
    x = v * 1e6
    us = <long long>x
    x -= <double>us
    if x >= 0.5:
        us += 1
    elif x <= -0.5:
        us -= 1
    if us < 0:
        p[0] = 45
        p += 1
        u = <unsigned long long>(-us)
    else:
        u = <unsigned long long>us
    p = _put_uint(p, u // 1000000)
    f = <unsigned int>(u % 1000000)
    p[0] = 46
    memcpy(p + 1, _D2 + 2 * (f // 10000), 2)
    memcpy(p + 3, _D2 + 2 * (f // 100 % 100), 2)
    memcpy(p + 5, _D2 + 2 * (f % 100), 2)
    return p + 7


cdef bytes _json_fragment(object v):
    """What format_audit_lines writes for ``v`` (through _add_value)."""
    cdef Buf b
    b.p = NULL
    b.n = 0
    b.cap = 0
    try:
        _add_value(&b, v, {})
        return PyBytes_FromStringAndSize(b.p, b.n)
    finally:
        PyMem_Free(b.p)


cdef int _add_text(Buf* b, object v, dict cache) except -1:
    """A JSON string for ``v``: printable ASCII without quote or backslash is copied as
    is (json.dumps would write the same); anything else goes through _add_value."""
    cdef const unsigned char* s
    cdef Py_ssize_t n, i
    cdef unsigned char c
    if type(v) is str and PyUnicode_IS_ASCII(v):
        s = PyUnicode_1BYTE_DATA(v)
        n = PyUnicode_GET_LENGTH(v)
        for i in range(n):
            c = s[i]
            if c < 32 or c > 126 or c == 34 or c == 92:
                return _add_value(b, v, cache)
        _reserve(b, n + 2)
        b.p[b.n] = 34
        memcpy(b.p + b.n + 1, s, n)
        b.p[b.n + n + 1] = 34
        b.n += n + 2
        return 0
    return _add_value(b, v, cache)


cdef int _add_raw_or_value(Buf* b, object v, dict cache) except -1:
    """Fields 1 and 2 as format_audit_lines writes them: bytes quoted as they are."""
    if type(v) is bytes:
        _reserve(b, PyBytes_GET_SIZE(v) + 2)
        b.p[b.n] = 34
        memcpy(b.p + b.n + 1, PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v))
        b.n += PyBytes_GET_SIZE(v) + 2
        b.p[b.n - 1] = 34
        return 0
    return _add_value(b, v, cache)


@cython.final
cdef class AuditRing:
    """Pending audit records, at most ``capacity``: when full, the oldest record is
    overwritten and counted in ``dropped`` (the request path never waits and memory
    never grows). ``add`` is the request path's one call; ``drain_to_bytes`` formats
    every pending record as format_audit_lines would and empties the ring."""

    cdef _AuditRec* recs
    cdef readonly Py_ssize_t capacity
    cdef Py_ssize_t start
    cdef Py_ssize_t count
    cdef readonly unsigned long long dropped
    cdef dict _name_ids       # name -> index into _name_js
    cdef list _name_js        # JSON string (bytes) of each name
    cdef PyObject* _last[5]   # per name field: the last name seen (owned) and its index
    cdef int _last_id[5]
    cdef dict _cache          # JSON of identity strings that need escaping
    cdef Buf _buf

    def __cinit__(self, Py_ssize_t capacity):
        cdef int i
        if capacity < 1:
            raise ValueError("an audit ring holds at least one record")
        self.capacity = capacity
        # Not touched until used: the pages behind records never reached stay unmapped.
        self.recs = <_AuditRec*>PyMem_Malloc(capacity * sizeof(_AuditRec))
        if self.recs == NULL:
            raise MemoryError()
        self._name_ids = {}
        self._name_js = []
        self._cache = {}
        for i in range(5):
            self._last[i] = NULL
            self._last_id[i] = -1

    def __dealloc__(self):
        cdef Py_ssize_t k
        cdef int i
        if self.recs != NULL:
            for k in range(self.count):
                _release(&self.recs[(self.start + k) % self.capacity])
            PyMem_Free(self.recs)
        for i in range(5):
            Py_XDECREF(self._last[i])
        PyMem_Free(self._buf.p)

    def __len__(self):
        return self.count

    cdef inline int _name(self, int slot, object v) except -2:
        if v is None:
            return -1
        if <PyObject*>v == self._last[slot]:
            return self._last_id[slot]
        return self._name_slow(slot, v)

    cdef int _name_slow(self, int slot, object v) except -2:
        cdef object i = self._name_ids.get(v)
        if i is None:
            frag = _json_fragment(v)
            i = len(self._name_js)
            self._name_ids[v] = i
            self._name_js.append(frag)
        Py_INCREF(v)
        Py_XDECREF(self._last[slot])
        self._last[slot] = <PyObject*>v
        self._last_id[slot] = <int>i
        return self._last_id[slot]

    def add(self, double time, request_id, client, route, backend, endpoint,
            long long status, decision, reason, identity, double duration_s,
            upstream_first_byte_s, bytes_in, bytes_out, long long retries, traceparent, /):
        """Queue one record: the fields of fastgw.audit.FIELDS in order, except that
        ``identity`` (None, or an object with ``subject``, ``issuer`` and ``key``, read
        when formatting: fastgw.identity.Identity is frozen) stands for subject, issuer
        and key, and ``traceparent`` (the header's value or None) for the trace id.
        ``upstream_first_byte_s``, ``bytes_in`` and ``bytes_out`` may be None. Raises
        TypeError for a value of another type (and leaves the ring as it was)."""
        cdef _AuditRec* r
        cdef Py_ssize_t k
        cdef const unsigned char* tp
        cdef int n_route, n_backend, n_endpoint, n_decision, n_reason
        cdef int nulls = 0, has_trace = 0
        cdef double fb = 0.0
        cdef long long b_in = 0, b_out = 0
        # Everything that can raise comes before the slot is taken.
        if upstream_first_byte_s is None:
            nulls |= _NULL_FIRST_BYTE
        else:
            fb = upstream_first_byte_s
        if bytes_in is None:
            nulls |= _NULL_BYTES_IN
        else:
            b_in = bytes_in
        if bytes_out is None:
            nulls |= _NULL_BYTES_OUT
        else:
            b_out = bytes_out
        n_route = self._name(_N_ROUTE, route)
        n_backend = self._name(_N_BACKEND, backend)
        n_endpoint = self._name(_N_ENDPOINT, endpoint)
        n_decision = self._name(_N_DECISION, decision)
        n_reason = self._name(_N_REASON, reason)
        if type(traceparent) is bytes and PyBytes_GET_SIZE(traceparent) == 55:
            # W3C traceparent "vv-<32 hex trace id>-<16 hex>-ff"; kept only if well-formed.
            tp = <const unsigned char*>PyBytes_AS_STRING(traceparent)
            has_trace = (tp[2] == 45 and tp[35] == 45 and tp[52] == 45 and _is_hex(tp, 2)
                         and _is_hex(tp + 3, 32) and _is_hex(tp + 36, 16)
                         and _is_hex(tp + 53, 2))
        if self.count == self.capacity:
            r = &self.recs[self.start]
            _release(r)
            self.start += 1
            if self.start == self.capacity:
                self.start = 0
            self.count -= 1
            self.dropped += 1
        k = self.start + self.count  # no division on this path
        if k >= self.capacity:
            k -= self.capacity
        r = &self.recs[k]
        self.count += 1
        r.time = time
        r.duration_s = duration_s
        r.first_byte_s = fb
        r.status = status
        r.bytes_in = b_in
        r.bytes_out = b_out
        r.retries = retries
        Py_INCREF(request_id)
        r.request_id = <PyObject*>request_id
        Py_INCREF(client)
        r.client = <PyObject*>client
        Py_INCREF(identity)
        r.identity = <PyObject*>identity
        r.names[_N_ROUTE] = n_route
        r.names[_N_BACKEND] = n_backend
        r.names[_N_ENDPOINT] = n_endpoint
        r.names[_N_DECISION] = n_decision
        r.names[_N_REASON] = n_reason
        r.nulls = nulls
        r.has_trace = has_trace
        if has_trace:
            memcpy(r.trace, tp + 3, 32)

    cdef inline char* _put_name(self, char* p, int i) noexcept:
        cdef object js
        if i < 0:
            return _put(p, "null", 4)
        js = <object>PyList_GET_ITEM(self._name_js, i)
        return _put(p, PyBytes_AS_STRING(js), PyBytes_GET_SIZE(js))

    cdef inline Py_ssize_t _name_len(self, int i) noexcept:
        if i < 0:
            return 4
        return PyBytes_GET_SIZE(<object>PyList_GET_ITEM(self._name_js, i))

    cdef int _format(self, _AuditRec* r, double time_offset) except -1:
        cdef Buf* b = &self._buf
        cdef char* p
        cdef object ident = <object>r.identity
        cdef int i
        cdef Py_ssize_t room = _FIXED_ROOM
        for i in range(5):
            room += self._name_len(r.names[i])
        _reserve(b, room)
        p = _put(b.p + b.n, '{"time":', 8)
        p = _put_micros(p, r.time + time_offset)
        p = _put(p, ',"request_id":', 14)
        b.n = p - b.p
        _add_raw_or_value(b, <object>r.request_id, self._cache)
        _add(b, ',"client":', 10)
        _add_raw_or_value(b, <object>r.client, self._cache)
        _reserve(b, room)
        p = _put(b.p + b.n, ',"route":', 9)
        p = self._put_name(p, r.names[_N_ROUTE])
        p = _put(p, ',"backend":', 11)
        p = self._put_name(p, r.names[_N_BACKEND])
        p = _put(p, ',"endpoint":', 12)
        p = self._put_name(p, r.names[_N_ENDPOINT])
        p = _put(p, ',"status":', 10)
        p = _put_int(p, r.status)
        p = _put(p, ',"decision":', 12)
        p = self._put_name(p, r.names[_N_DECISION])
        p = _put(p, ',"reason":', 10)
        p = self._put_name(p, r.names[_N_REASON])
        if ident is None:
            p = _put(p, ',"subject":null,"issuer":null,"key":null', 40)
            b.n = p - b.p
        else:
            p = _put(p, ',"subject":', 11)
            b.n = p - b.p
            v = ident.subject
            if PyObject_IsTrue(v):
                _add_text(b, v, self._cache)
            else:
                _add(b, "null", 4)
            _add(b, ',"issuer":', 10)
            _add_text(b, ident.issuer, self._cache)
            _add(b, ',"key":', 7)
            _add_text(b, ident.key, self._cache)
            _reserve(b, _FIXED_ROOM)
        p = _put(b.p + b.n, ',"duration_s":', 14)
        p = _put_micros(p, r.duration_s)
        p = _put(p, ',"upstream_first_byte_s":', 25)
        if r.nulls & _NULL_FIRST_BYTE:
            p = _put(p, "null", 4)
        else:
            p = _put_micros(p, r.first_byte_s)
        p = _put(p, ',"bytes_in":', 12)
        if r.nulls & _NULL_BYTES_IN:
            p = _put(p, "null", 4)
        else:
            p = _put_int(p, r.bytes_in)
        p = _put(p, ',"bytes_out":', 13)
        if r.nulls & _NULL_BYTES_OUT:
            p = _put(p, "null", 4)
        else:
            p = _put_int(p, r.bytes_out)
        p = _put(p, ',"retries":', 11)
        p = _put_int(p, r.retries)
        p = _put(p, ',"trace_id":', 12)
        if r.has_trace:
            p[0] = 34
            memcpy(p + 1, r.trace, 32)
            p[33] = 34
            p += 34
        else:
            p = _put(p, "null", 4)
        p = _put(p, "}\n", 2)
        b.n = p - b.p
        return 0

    def drain_to_bytes(self, double time_offset=0.0):
        """Every pending record as JSON lines, oldest first, then an empty ring.
        ``time_offset`` is added to each record's time (records carry a monotonic clock
        reading; the offset makes it wall time). If formatting raises (MemoryError, or
        an identity without the attributes), the pending records are discarded all the
        same."""
        cdef Py_ssize_t k = 0, n = self.count, i = self.start
        cdef _AuditRec* r
        self._buf.n = 0
        try:
            while k < n:
                r = &self.recs[i]
                k += 1
                i += 1
                if i == self.capacity:
                    i = 0
                try:
                    self._format(r, time_offset)
                finally:
                    _release(r)
            return PyBytes_FromStringAndSize(self._buf.p, self._buf.n)
        finally:
            while k < n:
                _release(&self.recs[i])
                k += 1
                i += 1
                if i == self.capacity:
                    i = 0
            self.start = 0
            self.count = 0
            if self._buf.cap > _KEEP_BUF_BYTES:
                PyMem_Free(self._buf.p)
                self._buf.p = NULL
                self._buf.cap = 0
            self._buf.n = 0
            if len(self._name_js) > _MAX_NAMES:
                self._forget_names()

    cdef void _forget_names(self) noexcept:
        cdef int i
        self._name_ids.clear()
        del self._name_js[:]
        for i in range(5):
            Py_XDECREF(self._last[i])
            self._last[i] = NULL
            self._last_id[i] = -1

    def name_count(self):
        """How many names the table holds (for tests of its bound)."""
        return len(self._name_js)


cdef inline void _release(_AuditRec* r) noexcept:
    Py_DECREF(<object>r.request_id)
    Py_DECREF(<object>r.client)
    Py_DECREF(<object>r.identity)
