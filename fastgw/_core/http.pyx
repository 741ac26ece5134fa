# cython: language_level=3, freethreading_compatible=False
"""HTTP/1.1 head parsing, head serialization and body framing: bytes in, plain values out.

Strategy. A head is parsed in two passes over the caller's buffer. The first pass only
looks for the end of the head with memchr('\n'), checking that every LF follows a CR; it
takes a ``scan_from`` hint, so a client that trickles its head byte by byte costs linear
time, not quadratic. The second pass runs once the whole head is there: a table-driven
scan that validates every byte (RFC 9110 5.1, 5.5; RFC 9112 2-6) and records, per field, the
offsets of its name and value and an id for the dozen fields the gateway itself cares
about. Field values and the request-target, the long parts of a head (a bearer token is
~1 KB), are checked 8 bytes per step (``_scan_value``, ``_scan_target``); the table
handles only the word where the run ends. The result is one small object per head holding a copy of the head's bytes and a
C array of offsets: no Python object per field unless a caller asks for one.

The framing decision (RFC 9112 6.3) is made here, not by the caller: a request is
``BODY_NONE``, ``BODY_LENGTH`` or ``BODY_CHUNKED``; a response may also be
``BODY_UNTIL_CLOSE``.

Serialization (``build_request_head`` / ``build_response_head``) copies the fields that
may cross the gateway as bytes, drops hop-by-hop fields (RFC 9110 7.6.1) and the framing
fields, and writes the framing, Host and forwarding fields itself: one allocation.

Decisions, each tested:
- Bare LF line endings are rejected (400), in heads and in chunked framing. RFC 9112 2.2
  allows a recipient to accept them, but a gateway that accepts what the next hop may
  read differently is a request-smuggling vector; no mainstream client sends them.
- Content-Length must appear at most once and be 1*DIGIT (no lists, even of equal values).
- Transfer-Encoding must be exactly ``chunked``; anything else is 501. With
  Content-Length it is 400; in an HTTP/1.0 request it is 400 (RFC 9112 6.1).
- Leading empty lines before a request line are skipped (RFC 9112 2.2).
- 414 is about the target alone (``max_target``), also while the request line is still
  arriving; a method over 1 KiB is 400. Whatever the split of the bytes
  into reads, the same limit is reported (see ``_check_limits``).
- Chunk extensions must follow RFC 9112 7.1.1 exactly (whitespace before the CR is
  tolerated) and trailer lines must be field lines: the body goes upstream with its
  framing as received.

Errors raised: only the classes of ``fastgw.errors`` (each carries its status). Anything
else escaping this module is a bug.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memchr, memcpy

from fastgw.errors import (
    BadRequest,
    BadResponse,
    HeadTooLarge,
    NotImplementedTE,
    URITooLong,
    VersionNotSupported,
)

# ---------------------------------------------------------------------------------------
# Constants (mirrored in http.pxd / http.pyi)

BODY_NONE = 0
BODY_LENGTH = 1
BODY_CHUNKED = 2
BODY_UNTIL_CLOSE = 3

cdef enum:
    K_NONE = 0
    K_LENGTH = 1
    K_CHUNKED = 2
    K_UNTIL_CLOSE = 3

# Hard cap on the field count: the configurable limit (default 100, the figure HAProxy
# and nginx use as their order of magnitude) may not exceed this; it sizes a stack array.
cdef enum:
    MAX_FIELDS_CAP = 256

MAX_FIELDS_LIMIT = MAX_FIELDS_CAP

cdef enum:
    MAX_HEAD_CAP = 1 << 24

# Field ids for the fields the gateway reads or rewrites itself.
cdef enum:
    H_OTHER = 0
    H_HOST = 1
    H_CONTENT_LENGTH = 2
    H_TRANSFER_ENCODING = 3
    H_CONNECTION = 4
    H_KEEP_ALIVE = 5
    H_PROXY_CONNECTION = 6
    H_TE = 7
    H_TRAILER = 8
    H_UPGRADE = 9
    H_EXPECT = 10
    H_X_FORWARDED_FOR = 11
    H_X_FORWARDED_PROTO = 12
    H_X_FORWARDED_HOST = 13
    H_X_REQUEST_ID = 14
    H_VIA = 15
    H_FORWARDED = 16
    H_PROXY_AUTHORIZATION = 17

# Field flags
cdef enum:
    F_CONN_LISTED = 1   # named by a Connection field: hop-by-hop for this message

cdef struct Field:
    uint32_t name_off
    uint32_t val_off
    uint32_t val_len
    uint16_t name_len
    uint8_t hid
    uint8_t flags

# Character classes (RFC 9110 5.6.2 tchar; 5.5 field-vchar / obs-text; RFC 3986 for
# targets, as visible ASCII).
cdef enum:
    C_TCHAR = 1
    C_VALUE = 2      # field-vchar, obs-text, SP, HTAB
    C_TARGET = 4     # VCHAR (0x21-0x7E)
    C_HOST = 8       # reg-name / IP-literal / port characters
    C_DIGIT = 16
    C_HEX = 32

cdef uint8_t CLS[256]
cdef int _init_tables():
    cdef int c
    for c in range(256):
        CLS[c] = 0
    for c in range(0x21, 0x7F):
        CLS[c] |= C_TARGET | C_VALUE
    for c in range(0x80, 0x100):
        CLS[c] |= C_VALUE
    CLS[0x20] |= C_VALUE
    CLS[0x09] |= C_VALUE
    for c in b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        CLS[c] |= C_TCHAR
    for c in b"-._~!$&'()*+,;=:[]%0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        CLS[c] |= C_HOST
    for c in b"0123456789":
        CLS[c] |= C_DIGIT | C_HEX
    for c in b"abcdefABCDEF":
        CLS[c] |= C_HEX
    return 0

_init_tables()

# Interned method objects: a request for a common method allocates no method bytes.
cdef bytes M_GET = b"GET"
cdef bytes M_POST = b"POST"
cdef bytes M_PUT = b"PUT"
cdef bytes M_HEAD = b"HEAD"
cdef bytes M_DELETE = b"DELETE"
cdef bytes M_PATCH = b"PATCH"
cdef bytes M_OPTIONS = b"OPTIONS"

cdef bytes V10 = b"1.0"
cdef bytes V11 = b"1.1"

# ---------------------------------------------------------------------------------------
# Small helpers


cdef inline bint _ieq(const unsigned char* p, const char* lit, Py_ssize_t n) noexcept nogil:
    """Case-insensitive compare of ``n`` tchar bytes against a lowercase literal of
    letters and '-'. OR-ing 0x20 is exact here: among tchars only A-Z map onto a-z and
    nothing maps onto '-' (validated before this is called)."""
    cdef Py_ssize_t i
    for i in range(n):
        if (p[i] | 0x20) != <unsigned char>lit[i]:
            return False
    return True


cdef inline uint8_t _field_id(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef unsigned char c0 = p[0] | 0x20
    if n == 4:
        if c0 == b'h' and _ieq(p, b"host", 4):
            return H_HOST
    elif n == 3:
        if c0 == b'v' and _ieq(p, b"via", 3):
            return H_VIA
    elif n == 2:
        if c0 == b't' and _ieq(p, b"te", 2):
            return H_TE
    elif n == 14:
        if c0 == b'c' and _ieq(p, b"content-length", 14):
            return H_CONTENT_LENGTH
    elif n == 17:
        if c0 == b't' and _ieq(p, b"transfer-encoding", 17):
            return H_TRANSFER_ENCODING
        if c0 == b'x' and _ieq(p, b"x-forwarded-proto", 17):
            return H_X_FORWARDED_PROTO
    elif n == 10:
        if c0 == b'c' and _ieq(p, b"connection", 10):
            return H_CONNECTION
        if c0 == b'k' and _ieq(p, b"keep-alive", 10):
            return H_KEEP_ALIVE
    elif n == 16:
        if c0 == b'p' and _ieq(p, b"proxy-connection", 16):
            return H_PROXY_CONNECTION
        if c0 == b'x' and _ieq(p, b"x-forwarded-host", 16):
            return H_X_FORWARDED_HOST
    elif n == 7:
        if c0 == b't' and _ieq(p, b"trailer", 7):
            return H_TRAILER
        if c0 == b'u' and _ieq(p, b"upgrade", 7):
            return H_UPGRADE
    elif n == 6:
        if c0 == b'e' and _ieq(p, b"expect", 6):
            return H_EXPECT
    elif n == 15:
        if c0 == b'x' and _ieq(p, b"x-forwarded-for", 15):
            return H_X_FORWARDED_FOR
    elif n == 12:
        if c0 == b'x' and _ieq(p, b"x-request-id", 12):
            return H_X_REQUEST_ID
    elif n == 9:
        if c0 == b'f' and _ieq(p, b"forwarded", 9):
            return H_FORWARDED
    elif n == 19:
        if c0 == b'p' and _ieq(p, b"proxy-authorization", 19):
            return H_PROXY_AUTHORIZATION
    return H_OTHER


cdef inline bint _is_hop_by_hop(uint8_t hid) noexcept nogil:
    # RFC 9110 7.6.1, plus Proxy-Connection (a de-facto hop-by-hop field) and the
    # framing fields, which the serializers always write themselves.
    return (hid == H_CONNECTION or hid == H_KEEP_ALIVE or hid == H_PROXY_CONNECTION
            or hid == H_TE or hid == H_TRAILER or hid == H_UPGRADE
            or hid == H_TRANSFER_ENCODING or hid == H_CONTENT_LENGTH
            or hid == H_PROXY_AUTHORIZATION)


# Eight bytes per step (SWAR, "SIMD within a register"). A word is loaded with memcpy
# (one unaligned load, no aliasing trouble) and tested with carry-free byte arithmetic:
# with t = w & 0x7F.. every byte of t is at most 0x7F, so t + 0x60.. and t + 0x01.. never
# carry into the next byte, and each byte's answer lands exactly in its own high bit.
# The answer does not depend on byte order. A word that fails (it holds an HTAB, the CR
# ending the value or the SP ending the target, or an invalid byte) goes through the
# table loop, which finds the exact byte and reports the same error as before.
cdef inline bint _value_word_ok(const unsigned char* q) noexcept nogil:
    """True when all 8 bytes at q are field-vchar / obs-text / SP (RFC 9110 5.5): no
    byte under 0x20 (HTAB is valid but takes the byte loop) and none equal to 0x7F."""
    cdef uint64_t w, t
    memcpy(&w, q, 8)
    t = w & 0x7F7F7F7F7F7F7F7FULL
    # A byte is fine when its high bit is set (obs-text), or when t >= 0x20 (t + 0x60
    # reaches 0x80) and t != 0x7F (t + 0x01 stays under 0x80).
    return ((w | ((t + 0x6060606060606060ULL) & ~(t + 0x0101010101010101ULL)))
            & 0x8080808080808080ULL) == 0x8080808080808080ULL


cdef inline bint _target_word_ok(const unsigned char* q) noexcept nogil:
    """True when all 8 bytes at q are VCHAR (0x21-0x7E), the request-target's bytes."""
    cdef uint64_t w, t
    memcpy(&w, q, 8)
    t = w & 0x7F7F7F7F7F7F7F7FULL
    # High bit clear, t >= 0x21 (t + 0x5F reaches 0x80), t != 0x7F (t + 0x01 stays under).
    return ((~w & (t + 0x5F5F5F5F5F5F5F5FULL) & ~(t + 0x0101010101010101ULL))
            & 0x8080808080808080ULL) == 0x8080808080808080ULL


cdef inline Py_ssize_t _scan_value(const unsigned char* p, Py_ssize_t i,
                                   Py_ssize_t lim) noexcept nogil:
    """The first byte at or after p[i] that is not C_VALUE. p[i:lim] must be readable
    and hold such a byte (a field line always ends with CR)."""
    cdef Py_ssize_t k
    while True:
        while i + 8 <= lim and _value_word_ok(p + i):
            i += 8
        # Byte by byte through one word: an HTAB continues the value, anything else
        # not C_VALUE ends it.
        k = i + 8
        while i < k and (CLS[p[i]] & C_VALUE):
            i += 1
        if i < k:
            return i


cdef inline Py_ssize_t _scan_target(const unsigned char* p, Py_ssize_t i,
                                    Py_ssize_t lim) noexcept nogil:
    """The first byte at or after p[i] that is not C_TARGET. p[i:lim] must be readable
    and hold such a byte (the request line ends with CR)."""
    while i + 8 <= lim and _target_word_ok(p + i):
        i += 8
    # The word test rejects no valid byte, so this stops within the word that failed
    # (or at the SP or CR, when fewer than 8 bytes were left).
    while CLS[p[i]] & C_TARGET:
        i += 1
    return i


cdef inline Py_ssize_t _skip_ows(const unsigned char* p, Py_ssize_t i, Py_ssize_t end) noexcept nogil:
    while i < end and (p[i] == 0x20 or p[i] == 0x09):
        i += 1
    return i


cdef int _err(bint is_request, str msg) except -1:
    if is_request:
        raise BadRequest(msg)
    raise BadResponse(msg)


cdef struct Scan:
    Py_ssize_t head_start   # after skipped leading CRLFs
    Py_ssize_t head_end     # just after the blank line's LF
    Py_ssize_t first_lf     # position of the first LF (end of the start line)


# Size limits are checked so that the answer does not depend on how the head was split
# into reads: each limit is a threshold on the number of bytes a reader has seen, and
# when the bytes at hand already break two limits, the one a reader fed byte by byte
# would have met first is reported. Without this, a whole head and the same head
# trickled in could earn different statuses (414 against 431, 414 against 400).


# A method longer than this is refused (400) while the request line arrives, which bounds
# the scan for its SP. The longest registered method (IANA HTTP Method Registry) has 17
# characters; 1 KiB is far above anything a client sends.
cdef enum:
    MAX_METHOD = 1024


cdef Py_ssize_t _request_line_limit_at(const unsigned char* p, Py_ssize_t s, Py_ssize_t e,
                                       Py_ssize_t max_target, int* kind) noexcept nogil:
    """The request line seen so far is p[s:e] (``e`` is its LF when the line is
    complete). Returns the buffer length at which the line first broke a limit, or -1.
    ``kind`` 1: more than MAX_METHOD bytes before the first SP (400). ``kind`` 2: more
    than ``max_target`` bytes after it without another SP (414). The limit is on the
    target, not the line (RFC 9112 3), so a long method does not turn a target within
    the limit into a 414. Each memchr is bounded by a limit, so a trickled line costs at
    most the limit squared."""
    cdef const unsigned char* sp
    cdef Py_ssize_t t
    sp = <const unsigned char*>memchr(p + s, 0x20, min(e - s, <Py_ssize_t>MAX_METHOD + 1))
    if sp == NULL:
        if e - s > MAX_METHOD:
            kind[0] = 1
            return s + MAX_METHOD + 1
        return -1
    t = (sp - p) + 1
    if e - t <= max_target or memchr(p + t, 0x20, max_target + 1) != NULL:
        return -1
    kind[0] = 2
    return t + max_target + 1


cdef int _check_limits(const unsigned char* p, Py_ssize_t start, Py_ssize_t s,
                       Py_ssize_t e, Py_ssize_t max_head, Py_ssize_t max_target,
                       bint first_line, bint is_request) except -1:
    """Raise when the first ``e`` bytes of the buffer (the head starts at ``start``, the
    start line at ``s``) already break a size limit, without having seen an end there."""
    cdef int kind = 0
    cdef Py_ssize_t at_line = -1
    if is_request and first_line:
        at_line = _request_line_limit_at(p, s, e, max_target, &kind)
    if e - start > max_head and (at_line < 0 or start + max_head + 1 <= at_line):
        if is_request:
            raise HeadTooLarge("header block over %d bytes" % max_head)
        raise BadResponse("response head over %d bytes" % max_head)
    if at_line >= 0:
        if kind == 1:
            raise BadRequest("request method over %d bytes" % MAX_METHOD)
        raise URITooLong("request target over %d bytes" % max_target)
    return 0


cdef int _find_head_end(const unsigned char* p, Py_ssize_t start, Py_ssize_t n,
                        Py_ssize_t scan_from, Py_ssize_t max_head, Py_ssize_t max_target,
                        bint is_request, Scan* out) except -1:
    """Pass one: find the blank line ending the head. Returns 1 when found, 0 when more
    bytes are needed. Raises on a bare LF or an exceeded size limit. Every LF before
    ``scan_from`` must have been checked by an earlier call on the same head."""
    cdef Py_ssize_t i = start
    cdef const unsigned char* q
    # Below this many bytes the start line cannot break a limit (see _check_limits).
    cdef Py_ssize_t line_cap = min(<Py_ssize_t>MAX_METHOD, max_target + 1)
    if is_request:
        # RFC 9112 2.2: ignore empty lines before a request line. They count against
        # the head size limit, so a stream of CRLFs cannot grow the buffer forever.
        while i + 1 < n and p[i] == 0x0D and p[i + 1] == 0x0A:
            i += 2
    out.head_start = i
    # The start line is scanned from its beginning on every call: it is bounded by the
    # limits below, so a trickled start line costs at most their square, not the head's.
    q = <const unsigned char*>memchr(p + i, 0x0A, n - i)
    if q == NULL:
        _check_limits(p, start, out.head_start, n, max_head, max_target, True, is_request)
        return 0
    i = q - p
    if i - out.head_start > line_cap or i - start > max_head:
        _check_limits(p, start, out.head_start, i, max_head, max_target, True, is_request)
    if i == out.head_start or p[i - 1] != 0x0D:
        _err(is_request, "bare LF line ending")
    out.first_lf = i
    i += 1
    if scan_from > n:
        scan_from = n   # a stale hint must not send memchr past the buffer
    if scan_from > i:
        i = scan_from
    while True:
        q = <const unsigned char*>memchr(p + i, 0x0A, n - i)
        if q == NULL:
            _check_limits(p, start, out.head_start, n, max_head, max_target, False,
                          is_request)
            return 0
        i = q - p
        if i - start > max_head:
            _check_limits(p, start, out.head_start, i, max_head, max_target, False,
                          is_request)
        if p[i - 1] != 0x0D:
            _err(is_request, "bare LF line ending")
        if p[i - 2] == 0x0A:
            # "\r\n\r\n": the LF at i-2 had its CR checked when it was found.
            out.head_end = i + 1
            if i + 1 - start > max_head:
                _check_limits(p, start, out.head_start, i + 1, max_head, max_target, False,
                              is_request)
            return 1
        i += 1


cdef class Head:
    """Common part of a parsed head: the head's bytes and field offsets into them."""

    cdef readonly bytes raw
    cdef readonly int version
    cdef readonly bint keep_alive
    cdef readonly int body_kind
    cdef readonly int64_t content_length
    cdef readonly Py_ssize_t head_len
    cdef Field* fields
    cdef int nfields
    cdef Py_ssize_t conn_off
    cdef Py_ssize_t conn_len
    cdef readonly bint upgrade

    def __init__(self, *args, **kwargs):
        # A head without raw bytes would crash the accessors and the serializers.
        raise TypeError("heads are made by parse_request_head / parse_response_head")

    def __dealloc__(self):
        if self.fields != NULL:
            PyMem_Free(self.fields)
            self.fields = NULL

    @property
    def http_version(self):
        return V11 if self.version == 11 else V10

    def __len__(self):
        return self.nfields

    @property
    def headers(self):
        """All fields as sent: a list of (name, value) bytes pairs, names in original case."""
        cdef const char* p = PyBytes_AS_STRING(self.raw)
        cdef int i
        cdef Field* f
        out = []
        for i in range(self.nfields):
            f = &self.fields[i]
            out.append((PyBytes_FromStringAndSize(p + f.name_off, f.name_len),
                        PyBytes_FromStringAndSize(p + f.val_off, f.val_len)))
        return out

    cdef int _find(self, bytes name, int after) except -2:
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(self.raw)
        cdef const unsigned char* nm = <const unsigned char*>PyBytes_AS_STRING(name)
        cdef Py_ssize_t n = len(name)
        cdef int i
        cdef Py_ssize_t j
        cdef Field* f
        for i in range(after + 1, self.nfields):
            f = &self.fields[i]
            if f.name_len != n:
                continue
            for j in range(n):
                if _lower(p[f.name_off + j]) != _lower(nm[j]):
                    break
            else:
                return i
        return -1

    def get(self, bytes name not None, default=None):
        """The value of the first field called ``name`` (any case), or ``default``."""
        cdef int i = self._find(name, -1)
        if i < 0:
            return default
        cdef Field* f = &self.fields[i]
        return PyBytes_FromStringAndSize(PyBytes_AS_STRING(self.raw) + f.val_off, f.val_len)

    def get_all(self, bytes name not None):
        """The values of every field called ``name`` (any case), in order."""
        out = []
        cdef int i = self._find(name, -1)
        cdef Field* f
        while i >= 0:
            f = &self.fields[i]
            out.append(PyBytes_FromStringAndSize(PyBytes_AS_STRING(self.raw) + f.val_off,
                                                 f.val_len))
            i = self._find(name, i)
        return out

    def __contains__(self, bytes name not None):
        return self._find(name, -1) >= 0


cdef inline unsigned char _lower(unsigned char c) noexcept nogil:
    if 0x41 <= c <= 0x5A:
        return c | 0x20
    return c


@cython.final
cdef class RequestHead(Head):
    """A parsed request head. ``target`` is the request-target as sent; ``path`` is the
    origin-form part of it (for an absolute-form target, RFC 9112 3.2.2, the path and
    query after the authority); ``host`` is the authority the request is for."""

    cdef readonly bytes method
    cdef readonly bytes target
    cdef readonly bint expect_continue
    cdef readonly bint absolute_form
    cdef Py_ssize_t host_off      # into raw; -1 when absent
    cdef Py_ssize_t host_len
    cdef Py_ssize_t path_start    # into target

    @property
    def host(self):
        if self.host_off < 0:
            return None
        return PyBytes_FromStringAndSize(PyBytes_AS_STRING(self.raw) + self.host_off,
                                         self.host_len)

    @property
    def path(self):
        if self.path_start == 0:
            return self.target
        if self.path_start >= len(self.target):
            return b"/"
        if self.target[self.path_start] == 0x3F:   # "?": empty path before the query
            return b"/" + self.target[self.path_start:]
        return self.target[self.path_start:]

    def __repr__(self):
        return "<RequestHead %r %r HTTP/%s fields=%d>" % (
            self.method, self.target, self.http_version.decode(), self.nfields)


@cython.final
cdef class ResponseHead(Head):
    """A parsed response head."""

    cdef readonly int status
    cdef readonly bytes reason

    def __repr__(self):
        return "<ResponseHead %d %r fields=%d>" % (self.status, self.reason, self.nfields)


cdef inline bytes _method_obj(const unsigned char* p, Py_ssize_t n):
    if n == 3:
        if p[0] == b'G' and p[1] == b'E' and p[2] == b'T':
            return M_GET
        if p[0] == b'P' and p[1] == b'U' and p[2] == b'T':
            return M_PUT
    elif n == 4:
        if p[0] == b'P' and p[1] == b'O' and p[2] == b'S' and p[3] == b'T':
            return M_POST
        if p[0] == b'H' and p[1] == b'E' and p[2] == b'A' and p[3] == b'D':
            return M_HEAD
    elif n == 6 and p[0] == b'D' and (<const char*>p)[:6] == b"DELETE":
        return M_DELETE
    elif n == 5 and p[0] == b'P' and (<const char*>p)[:5] == b"PATCH":
        return M_PATCH
    elif n == 7 and p[0] == b'O' and (<const char*>p)[:7] == b"OPTIONS":
        return M_OPTIONS
    return PyBytes_FromStringAndSize(<const char*>p, n)


cdef int _parse_version(const unsigned char* p, Py_ssize_t i, Py_ssize_t end,
                        bint is_request) except -1:
    """HTTP-version at p[i:end] (RFC 9112 2.3): 10 or 11; 505 for another well-formed
    version, 400 (or 502 for a response) for anything else."""
    if (end - i == 8 and p[i] == b'H' and p[i + 1] == b'T' and p[i + 2] == b'T'
            and p[i + 3] == b'P' and p[i + 4] == b'/' and (CLS[p[i + 5]] & C_DIGIT)
            and p[i + 6] == b'.' and (CLS[p[i + 7]] & C_DIGIT)):
        if p[i + 5] == b'1' and p[i + 7] == b'1':
            return 11
        if p[i + 5] == b'1' and p[i + 7] == b'0':
            return 10
        if is_request:
            raise VersionNotSupported("HTTP version not supported")
        raise BadResponse("unsupported HTTP version in response")
    if is_request:
        raise BadRequest("malformed HTTP version")
    raise BadResponse("malformed HTTP version in response")


cdef int _parse_fields(const unsigned char* p, Py_ssize_t i, Py_ssize_t end,
                       Field* fields, int max_fields, Py_ssize_t base,
                       bint is_request) except -1:
    """Pass two over the field lines in p[i:end] (end is just after the final CRLF CRLF).
    Fills ``fields`` (offsets relative to ``base``); returns the number of fields."""
    cdef int nf = 0
    cdef Py_ssize_t ns, ne, vs, ve, line_end
    cdef Field* f
    cdef unsigned char c
    cdef Py_ssize_t lim = end   # the value scan may read words up to here
    end -= 2   # the blank line's CRLF
    while i < end:
        c = p[i]
        if c == 0x20 or c == 0x09:
            _err(is_request, "obsolete line folding")
        ns = i
        while CLS[p[i]] & C_TCHAR:
            i += 1
        ne = i
        if p[i] != b':':
            if ne == ns:
                _err(is_request, "empty or invalid field name")
            if p[i] == 0x20 or p[i] == 0x09:
                _err(is_request, "whitespace between field name and colon")
            _err(is_request, "invalid character in field name")
        if ne == ns:
            _err(is_request, "empty field name")
        if ne - ns > 0xFFFF:
            # Field.name_len is 16 bits; only a max_head_bytes over 64 KiB gets here.
            if is_request:
                raise HeadTooLarge("field name over 65535 bytes")
            raise BadResponse("field name over 65535 bytes")
        i += 1
        while p[i] == 0x20 or p[i] == 0x09:
            i += 1
        vs = i
        i = _scan_value(p, i, lim)
        # Every line ends with CRLF (pass one checked each LF has its CR).
        if p[i] != 0x0D or p[i + 1] != 0x0A:
            _err(is_request, "invalid character in field value")
        line_end = i
        ve = i
        while ve > vs and (p[ve - 1] == 0x20 or p[ve - 1] == 0x09):
            ve -= 1
        if nf >= max_fields:
            if is_request:
                raise HeadTooLarge("more than %d header fields" % max_fields)
            raise BadResponse("more than %d header fields in response" % max_fields)
        f = &fields[nf]
        f.name_off = <uint32_t>(ns - base)
        f.name_len = <uint16_t>(ne - ns)
        f.val_off = <uint32_t>(vs - base)
        f.val_len = <uint32_t>(ve - vs)
        f.hid = _field_id(p + ns, ne - ns)
        f.flags = 0
        nf += 1
        i = line_end + 2
    return nf


cdef bint _token_ieq(const unsigned char* p, Py_ssize_t n, const char* lit,
                     Py_ssize_t ln) noexcept nogil:
    if n != ln:
        return False
    cdef Py_ssize_t k
    for k in range(n):
        if _lower(p[k]) != <unsigned char>lit[k]:
            return False
    return True


cdef int _apply_framing(Head h, const unsigned char* p, bint is_request,
                        bint* expect_continue, Py_ssize_t* host_off,
                        Py_ssize_t* host_len) except -1:
    """Walk the recorded fields once: framing, connection options, Host, Expect.
    ``p`` points at h.raw."""
    cdef int i, n_cl = 0, n_te = 0, n_host = 0
    cdef Field* f
    cdef Py_ssize_t s, e, k, ts, e2
    cdef int64_t cl = 0
    cdef bint chunked_last = False, te_bad = False, saw_close = False, saw_ka = False
    cdef bint saw_upgrade_tok = False
    cdef bint has_conn = False
    cdef unsigned char c
    for i in range(h.nfields):
        f = &h.fields[i]
        if f.hid == H_OTHER:
            continue
        s = f.val_off
        e = s + f.val_len
        if f.hid == H_CONTENT_LENGTH:
            n_cl += 1
            if n_cl > 1:
                _err(is_request, "more than one Content-Length field")
            if s == e:
                _err(is_request, "empty Content-Length")
            if e - s > 18:
                _err(is_request, "Content-Length too large")
            cl = 0
            for k in range(s, e):
                c = p[k]
                if not (CLS[c] & C_DIGIT):
                    _err(is_request, "malformed Content-Length")
                cl = cl * 10 + (c - 48)
        elif f.hid == H_TRANSFER_ENCODING:
            n_te += 1
            # A comma-separated list of codings; across repeated fields too (RFC 9110 5.3).
            k = s
            while k <= e:
                ts = k
                while k < e and p[k] != b',':
                    k += 1
                # trim OWS around this element
                while ts < k and (p[ts] == 0x20 or p[ts] == 0x09):
                    ts += 1
                e2 = k
                while e2 > ts and (p[e2 - 1] == 0x20 or p[e2 - 1] == 0x09):
                    e2 -= 1
                if e2 > ts:
                    if chunked_last or not _token_ieq(p + ts, e2 - ts, b"chunked", 7):
                        te_bad = True
                    chunked_last = True
                k += 1
        elif f.hid == H_CONNECTION:
            has_conn = True
            k = s
            while k <= e:
                ts = k
                while k < e and p[k] != b',':
                    k += 1
                while ts < k and (p[ts] == 0x20 or p[ts] == 0x09):
                    ts += 1
                e2 = k
                while e2 > ts and (p[e2 - 1] == 0x20 or p[e2 - 1] == 0x09):
                    e2 -= 1
                if e2 > ts:
                    if _token_ieq(p + ts, e2 - ts, b"close", 5):
                        saw_close = True
                        # Every option names a hop-by-hop field, "close" too (RFC 9110
                        # 7.6.1). keep-alive and upgrade need no marking: Keep-Alive is
                        # always dropped, and Upgrade must survive in a 101.
                        _mark_conn_listed(h, p, p + ts, e2 - ts)
                    elif _token_ieq(p + ts, e2 - ts, b"keep-alive", 10):
                        saw_ka = True
                    elif _token_ieq(p + ts, e2 - ts, b"upgrade", 7):
                        saw_upgrade_tok = True
                    else:
                        _mark_conn_listed(h, p, p + ts, e2 - ts)
                k += 1
        elif f.hid == H_HOST:
            # Host is a request field (RFC 9110 7.2); in a response it is just a field,
            # and a 400-style check there would turn a valid answer into a 502.
            if not is_request:
                continue
            n_host += 1
            host_off[0] = s
            host_len[0] = e - s
            for k in range(s, e):
                if not (CLS[p[k]] & C_HOST):
                    raise BadRequest("invalid character in Host")
        elif f.hid == H_EXPECT:
            if _token_ieq(p + s, e - s, b"100-continue", 12):
                expect_continue[0] = True
        elif f.hid == H_UPGRADE:
            h.upgrade = True
    if not saw_upgrade_tok:
        h.upgrade = False
    if h.version == 11:
        h.keep_alive = not saw_close
    else:
        h.keep_alive = saw_ka and not saw_close
    if is_request:
        if h.version == 11 and n_host != 1:
            raise BadRequest("missing Host field" if n_host == 0 else "more than one Host field")
        if n_host > 1:
            raise BadRequest("more than one Host field")
    if n_te:
        if n_cl:
            _err(is_request, "both Transfer-Encoding and Content-Length")
        if is_request and h.version == 10:
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
        if te_bad or not chunked_last:
            if is_request:
                raise NotImplementedTE("unsupported transfer coding")
            # RFC 9112 6.3 (5): a response whose final coding is not chunked is read
            # until the connection closes; we support only chunked, so be strict.
            raise BadResponse("unsupported transfer coding in response")
        h.body_kind = K_CHUNKED
    elif n_cl:
        h.body_kind = K_LENGTH
        h.content_length = cl
    else:
        h.body_kind = K_NONE
    return 0


cdef void _mark_conn_listed(Head h, const unsigned char* p, const unsigned char* tok,
                            Py_ssize_t n) noexcept:
    cdef int i
    cdef Field* f
    for i in range(h.nfields):
        f = &h.fields[i]
        if _names_ieq(p + f.name_off, f.name_len, tok, n):
            f.flags |= F_CONN_LISTED


cdef inline bint _names_ieq(const unsigned char* a, Py_ssize_t na, const unsigned char* b,
                            Py_ssize_t nb) noexcept nogil:
    if na != nb:
        return False
    cdef Py_ssize_t k
    for k in range(na):
        if _lower(a[k]) != _lower(b[k]):
            return False
    return True


cdef int _check_head_limit(Py_ssize_t max_head_bytes) except -1:
    # Field offsets are uint32 and the limit arithmetic in pass one must not overflow;
    # 16 MiB is some 500 times the 32 KiB default, far beyond any sane configuration.
    if max_head_bytes < 1 or max_head_bytes > MAX_HEAD_CAP:
        raise ValueError("max_head_bytes must be within 1..%d" % MAX_HEAD_CAP)
    return 0


cdef int _store_fields(Head h, Field* fields, int nf) except -1:
    if nf:
        h.fields = <Field*>PyMem_Malloc(nf * sizeof(Field))
        if h.fields == NULL:
            raise MemoryError()
        memcpy(h.fields, fields, nf * sizeof(Field))
    h.nfields = nf
    return 0


def parse_request_head(buf, Py_ssize_t start=0, *, Py_ssize_t scan_from=0,
                       Py_ssize_t max_head_bytes=32768, int max_fields=100,
                       Py_ssize_t max_target=8192):
    """Parse the request head starting at ``buf[start]``.

    Returns a ``RequestHead``, or None when the head is not complete yet. Pass
    ``scan_from=len(buf) - 3`` on the next call (after appending bytes) so that a head
    trickling in is scanned once. ``head.head_len`` is the number of bytes the head
    took from ``start`` (leading empty lines included): the body starts there.

    Raises BadRequest (400), URITooLong (414), HeadTooLarge (431), NotImplementedTE (501)
    or VersionNotSupported (505). The connection is to be closed after any of them.
    """
    cdef Py_buffer view
    cdef Scan sc
    cdef Field fields[MAX_FIELDS_CAP]
    cdef RequestHead h
    cdef const unsigned char* p
    cdef const unsigned char* r
    cdef Py_ssize_t n, i, ms, me, ts, te, nf
    if max_fields > MAX_FIELDS_CAP or max_fields < 1:
        raise ValueError("max_fields must be within 1..%d" % MAX_FIELDS_CAP)
    _check_head_limit(max_head_bytes)
    if max_target < 1:
        raise ValueError("max_target must be positive")
    if max_target > max_head_bytes:
        max_target = max_head_bytes   # no target is longer than its head; no overflow
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        p = <const unsigned char*>view.buf
        n = view.len
        if start < 0 or start > n:
            raise ValueError("start out of range")
        if not _find_head_end(p, start, n, scan_from, max_head_bytes, max_target, True,
                              &sc):
            return None
        # Request line: method SP request-target SP HTTP-version (RFC 9112 3).
        i = sc.head_start
        ms = i
        while CLS[p[i]] & C_TCHAR:
            i += 1
        me = i
        if me == ms or p[i] != 0x20:
            raise BadRequest("malformed request line")
        i += 1
        ts = i
        i = _scan_target(p, i, sc.head_end)
        te = i
        if te == ts:
            raise BadRequest("malformed request line")
        if p[i] != 0x20:
            if p[i] == 0x0D and i + 1 == sc.first_lf:
                raise BadRequest("HTTP/0.9 request line")
            raise BadRequest("invalid character in request target")
        if te - ts > max_target:
            raise URITooLong("request target over %d bytes" % max_target)
        i += 1
        h = RequestHead.__new__(RequestHead)
        h.version = _parse_version(p, i, sc.first_lf - 1, True)
        h.raw = PyBytes_FromStringAndSize(<const char*>p + sc.head_start,
                                          sc.head_end - sc.head_start)
        r = <const unsigned char*>PyBytes_AS_STRING(h.raw)
        h.head_len = sc.head_end - start
        h.method = _method_obj(p + ms, me - ms)
        h.target = PyBytes_FromStringAndSize(<const char*>p + ts, te - ts)
        h.host_off = -1
        h.host_len = 0
        h.path_start = 0
        nf = _parse_fields(p, sc.first_lf + 1, sc.head_end, fields, max_fields,
                           sc.head_start, True)
        _store_fields(h, fields, <int>nf)
        _apply_framing(h, r, True, &h.expect_continue, &h.host_off, &h.host_len)
        _classify_target(h, p + ts, te - ts, sc.head_start, ts)
        if h.expect_continue and h.version == 10:
            h.expect_continue = False   # RFC 9110 10.1.1: ignore for HTTP/1.0
        return h
    finally:
        PyBuffer_Release(&view)


cdef int _classify_target(RequestHead h, const unsigned char* t, Py_ssize_t n,
                          Py_ssize_t head_start, Py_ssize_t target_pos) except -1:
    """Origin-form, absolute-form, authority-form or asterisk-form (RFC 9112 3.2)."""
    cdef Py_ssize_t i, a
    if t[0] == b'/':
        return 0
    if n == 1 and t[0] == b'*':
        if h.method is not M_OPTIONS:
            raise BadRequest("asterisk-form target outside OPTIONS")
        return 0
    # absolute-form: scheme "://" authority path-abempty [ "?" query ]
    i = 0
    while i < n and t[i] != b':' and t[i] != b'/':
        i += 1
    if i + 2 < n and t[i] == b':' and t[i + 1] == b'/' and t[i + 2] == b'/' and i > 0:
        a = i + 3
        i = a
        while i < n and t[i] != b'/' and t[i] != b'?':
            if not (CLS[t[i]] & C_HOST) or t[i] == b'@':
                raise BadRequest("invalid authority in absolute-form target")
            i += 1
        if i == a:
            raise BadRequest("empty authority in absolute-form target")
        h.absolute_form = True
        # RFC 9112 3.2.2: the target's authority replaces Host.
        h.host_off = (target_pos - head_start) + a
        h.host_len = i - a
        # path-abempty may be empty, with or without a query: "http://h?q" is valid
        # (RFC 3986 3.3) and means "/?q" in origin-form (RFC 9112 3.2.1); ``path``
        # supplies the "/".
        h.path_start = i if i < n else n
        return 0
    if h.method == b"CONNECT":
        return 0   # authority-form; the router refuses CONNECT.
    raise BadRequest("malformed request target")


def parse_response_head(buf, Py_ssize_t start=0, *, bint request_was_head=False,
                        Py_ssize_t scan_from=0, Py_ssize_t max_head_bytes=65536,
                        int max_fields=100):
    """Parse a response head starting at ``buf[start]``; None when incomplete.

    ``request_was_head`` makes the body empty (RFC 9112 6.3 (1)). 1xx, 204 and 304
    responses have no body; a response with neither Content-Length nor chunked is read
    until the connection closes. Raises BadResponse (status 502) on anything malformed.
    """
    cdef Py_buffer view
    cdef Scan sc
    cdef Field fields[MAX_FIELDS_CAP]
    cdef ResponseHead h
    cdef const unsigned char* p
    cdef Py_ssize_t n, i, nf, rs
    cdef int status
    cdef bint dummy = False
    cdef Py_ssize_t d1 = 0, d2 = 0
    if max_fields > MAX_FIELDS_CAP or max_fields < 1:
        raise ValueError("max_fields must be within 1..%d" % MAX_FIELDS_CAP)
    _check_head_limit(max_head_bytes)
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        p = <const unsigned char*>view.buf
        n = view.len
        if start < 0 or start > n:
            raise ValueError("start out of range")
        if not _find_head_end(p, start, n, scan_from, max_head_bytes, 0, False, &sc):
            return None
        # status-line = HTTP-version SP status-code SP [ reason-phrase ]  (RFC 9112 4)
        i = sc.head_start
        if sc.first_lf - 1 - i < 12 or p[i + 8] != 0x20:
            raise BadResponse("malformed status line")
        h = ResponseHead.__new__(ResponseHead)
        h.version = _parse_version(p, i, i + 8, False)
        i += 9
        if not ((CLS[p[i]] & C_DIGIT) and (CLS[p[i + 1]] & C_DIGIT)
                and (CLS[p[i + 2]] & C_DIGIT)):
            raise BadResponse("malformed status code")
        status = (p[i] - 48) * 100 + (p[i + 1] - 48) * 10 + (p[i + 2] - 48)
        if status < 100:
            raise BadResponse("status code out of range")
        i += 3
        if p[i] == 0x20:
            i += 1
        elif p[i] != 0x0D:
            raise BadResponse("malformed status line")
        rs = i
        while i < sc.first_lf - 1:
            if not (CLS[p[i]] & C_VALUE):
                raise BadResponse("invalid character in reason phrase")
            i += 1
        h.status = status
        h.reason = PyBytes_FromStringAndSize(<const char*>p + rs, sc.first_lf - 1 - rs)
        h.raw = PyBytes_FromStringAndSize(<const char*>p + sc.head_start,
                                          sc.head_end - sc.head_start)
        h.head_len = sc.head_end - start
        nf = _parse_fields(p, sc.first_lf + 1, sc.head_end, fields, max_fields,
                           sc.head_start, False)
        _store_fields(h, fields, <int>nf)
        _apply_framing(h, <const unsigned char*>PyBytes_AS_STRING(h.raw), False,
                       &dummy, &d1, &d2)
        if request_was_head or status < 200 or status == 204 or status == 304:
            h.body_kind = K_NONE
            h.content_length = 0
        elif h.body_kind == K_NONE:
            h.body_kind = K_UNTIL_CLOSE
            h.keep_alive = False
        if status == 101:
            h.keep_alive = False
        return h
    finally:
        PyBuffer_Release(&view)


# ---------------------------------------------------------------------------------------
# Serialization


cdef inline char* _put(char* w, const char* s, Py_ssize_t n) noexcept nogil:
    memcpy(w, s, n)
    return w + n


cdef Py_ssize_t _dec_len(int64_t v) noexcept nogil:
    cdef Py_ssize_t n = 1
    while v >= 10:
        v //= 10
        n += 1
    return n


cdef char* _put_dec(char* w, int64_t v) noexcept nogil:
    cdef Py_ssize_t n = _dec_len(v)
    cdef Py_ssize_t k = n
    while k > 0:
        k -= 1
        w[k] = <char>(48 + v % 10)
        v //= 10
    return w + n


cdef class StripSet:
    """Extra request field names (exact, any case) and name prefixes to drop before a
    head goes upstream, e.g. the identity namespace a client must never set. Built once
    per configuration."""

    cdef list names
    cdef list prefixes

    def __init__(self, names=(), prefixes=()):
        self.names = [bytes(x).lower() for x in names]
        self.prefixes = [bytes(x).lower() for x in prefixes]

    cdef bint matches(self, const unsigned char* p, Py_ssize_t n):
        cdef bytes s
        cdef const unsigned char* q
        cdef Py_ssize_t ln, k
        for s in self.names:
            ln = len(s)
            if ln == n:
                q = <const unsigned char*>PyBytes_AS_STRING(s)
                for k in range(n):
                    if _lower(p[k]) != q[k]:
                        break
                else:
                    return True
        for s in self.prefixes:
            ln = len(s)
            if ln <= n:
                q = <const unsigned char*>PyBytes_AS_STRING(s)
                for k in range(ln):
                    if _lower(p[k]) != q[k]:
                        break
                else:
                    return True
        return False


cdef bytes _EMPTY = b""


cdef inline bint _appendable(Field* f) noexcept nogil:
    """Whether a received X-Forwarded-For / Via value is carried into the one fastgw
    appends to. Empty values are skipped (an empty list element means nothing, RFC 9110
    5.6.1) and so are fields the sender's Connection named: those are hop-by-hop and
    must not be forwarded in any form (RFC 9110 7.6.1)."""
    return f.val_len != 0 and not (f.flags & F_CONN_LISTED)


def build_request_head(RequestHead h not None, *, bytes target=None, bytes host not None,
                       bytes client_ip=None, bytes proto=None, bytes request_id=None,
                       bint xff_append=True, bytes via=None, bytes extra=None,
                       StripSet strip=None, bytes method=None):
    """The head fastgw sends upstream for ``h``: HTTP/1.1, always keep-alive.

    Drops hop-by-hop fields (RFC 9110 7.6.1: Connection and every field it names,
    Keep-Alive, Proxy-Connection, TE, Trailer, Upgrade, Proxy-Authorization), the
    framing fields (re-written from ``h.body_kind``), Host, and the forwarding fields
    fastgw sets: X-Forwarded-Proto, X-Forwarded-Host, X-Request-Id, Forwarded,
    X-Forwarded-For and Via. With ``client_ip``, X-Forwarded-For is the client's
    values (non-empty, not named by Connection) then ``client_ip`` when ``xff_append``,
    else ``client_ip`` alone; without it there is none. Via is likewise the client's
    values then ``via``, or absent when ``via`` is None. ``extra`` is pre-rendered field
    lines (each ending CRLF) added last; ``host``, ``extra`` and the other values are
    written as given (the caller validated them). ``strip`` names more fields to drop.
    ``target`` defaults to ``h.path``.
    """
    cdef const char* p = PyBytes_AS_STRING(h.raw)
    cdef Py_ssize_t total = 0, k
    cdef int i
    cdef Field* f
    cdef uint8_t hid
    cdef bint keep
    cdef Py_ssize_t xff_prev = 0   # bytes of previous XFF values, with ", " joins
    cdef int n_xff = 0, n_via = 0
    cdef Py_ssize_t via_prev = 0
    # Which fields are copied: 1 bit each, on the stack.
    cdef uint8_t copy[MAX_FIELDS_CAP]
    if target is None:
        target = h.path
    if method is None:
        method = h.method
    total += len(method) + 1 + len(target) + 11          # "M T HTTP/1.1\r\n"
    total += 6 + len(host) + 2                            # "Host: h\r\n"
    for i in range(h.nfields):
        f = &h.fields[i]
        hid = f.hid
        keep = True
        if hid != H_OTHER:
            if _is_hop_by_hop(hid) or hid == H_HOST or hid == H_X_FORWARDED_PROTO \
                    or hid == H_X_FORWARDED_HOST or hid == H_X_REQUEST_ID \
                    or hid == H_FORWARDED:
                keep = False
            elif hid == H_X_FORWARDED_FOR:
                keep = False
                if xff_append and client_ip is not None and _appendable(f):
                    if n_xff:
                        xff_prev += 2
                    xff_prev += f.val_len
                    n_xff += 1
            elif hid == H_VIA:
                keep = False
                if via is not None and _appendable(f):
                    if n_via:
                        via_prev += 2
                    via_prev += f.val_len
                    n_via += 1
        if keep and (f.flags & F_CONN_LISTED):
            keep = False
        if keep and strip is not None and strip.matches(
                <const unsigned char*>p + f.name_off, f.name_len):
            keep = False
        copy[i] = keep
        if keep:
            total += f.name_len + 2 + f.val_len + 2
    if h.body_kind == K_LENGTH:
        total += 16 + _dec_len(h.content_length) + 2
    elif h.body_kind == K_CHUNKED:
        total += 28
    if client_ip is not None:
        total += 17 + xff_prev + (2 if n_xff else 0) + len(client_ip) + 2
    if proto is not None:
        total += 19 + len(proto) + 2
    if h.host_off >= 0:
        total += 18 + h.host_len + 2
    if request_id is not None:
        total += 14 + len(request_id) + 2
    if via is not None:
        total += 5 + via_prev + (2 if n_via else 0) + len(via) + 2
    if extra is not None:
        total += len(extra)
    total += 2
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* w = PyBytes_AS_STRING(out)
    cdef char* w0 = w
    w = _put(w, PyBytes_AS_STRING(method), len(method))
    w[0] = b' '
    w += 1
    w = _put(w, PyBytes_AS_STRING(target), len(target))
    w = _put(w, b" HTTP/1.1\r\nHost: ", 17)
    w = _put(w, PyBytes_AS_STRING(host), len(host))
    w = _put(w, b"\r\n", 2)
    for i in range(h.nfields):
        if copy[i]:
            f = &h.fields[i]
            w = _put(w, p + f.name_off, f.name_len)
            w = _put(w, b": ", 2)
            w = _put(w, p + f.val_off, f.val_len)
            w = _put(w, b"\r\n", 2)
    if h.body_kind == K_LENGTH:
        w = _put(w, b"Content-Length: ", 16)
        w = _put_dec(w, h.content_length)
        w = _put(w, b"\r\n", 2)
    elif h.body_kind == K_CHUNKED:
        w = _put(w, b"Transfer-Encoding: chunked\r\n", 28)
    if client_ip is not None:
        w = _put(w, b"X-Forwarded-For: ", 17)
        if n_xff:
            k = 0
            for i in range(h.nfields):
                f = &h.fields[i]
                if f.hid == H_X_FORWARDED_FOR and _appendable(f):
                    if k:
                        w = _put(w, b", ", 2)
                    w = _put(w, p + f.val_off, f.val_len)
                    k += 1
            w = _put(w, b", ", 2)
        w = _put(w, PyBytes_AS_STRING(client_ip), len(client_ip))
        w = _put(w, b"\r\n", 2)
    if proto is not None:
        w = _put(w, b"X-Forwarded-Proto: ", 19)
        w = _put(w, PyBytes_AS_STRING(proto), len(proto))
        w = _put(w, b"\r\n", 2)
    if h.host_off >= 0:
        w = _put(w, b"X-Forwarded-Host: ", 18)
        w = _put(w, p + h.host_off, h.host_len)
        w = _put(w, b"\r\n", 2)
    if request_id is not None:
        w = _put(w, b"X-Request-Id: ", 14)
        w = _put(w, PyBytes_AS_STRING(request_id), len(request_id))
        w = _put(w, b"\r\n", 2)
    if via is not None:
        w = _put(w, b"Via: ", 5)
        if n_via:
            k = 0
            for i in range(h.nfields):
                f = &h.fields[i]
                if f.hid == H_VIA and _appendable(f):
                    if k:
                        w = _put(w, b", ", 2)
                    w = _put(w, p + f.val_off, f.val_len)
                    k += 1
            w = _put(w, b", ", 2)
        w = _put(w, PyBytes_AS_STRING(via), len(via))
        w = _put(w, b"\r\n", 2)
    if extra is not None:
        w = _put(w, PyBytes_AS_STRING(extra), len(extra))
    w = _put(w, b"\r\n", 2)
    assert w - w0 == total
    return out


def build_response_head(ResponseHead h not None, *, int body_kind=-1, bint close=False,
                        bint keep_alive_10=False, bytes extra=None, StripSet strip=None,
                        bytes via=None):
    """The head fastgw sends downstream for the upstream response ``h``.

    Drops hop-by-hop and framing fields like ``build_request_head``; writes the framing
    for ``body_kind`` (default: ``h.body_kind``; pass BODY_CHUNKED to re-frame a
    read-until-close body for an HTTP/1.1 client), ``Connection: close`` when ``close``,
    ``Connection: keep-alive`` when ``keep_alive_10`` (an HTTP/1.0 client that asked for
    it), appends ``via`` to Via, then ``extra`` field lines. Always answers HTTP/1.1
    (RFC 9110 6.2: a server sends its own highest version).
    """
    cdef const char* p = PyBytes_AS_STRING(h.raw)
    cdef Py_ssize_t total = 0, k
    cdef int i
    cdef Field* f
    cdef uint8_t hid
    cdef bint keep
    cdef uint8_t copy[MAX_FIELDS_CAP]
    cdef int n_via = 0
    cdef Py_ssize_t via_prev = 0
    if body_kind < 0:
        body_kind = h.body_kind
    total += 13 + len(h.reason) + 2      # "HTTP/1.1 200 " reason CRLF
    for i in range(h.nfields):
        f = &h.fields[i]
        hid = f.hid
        keep = not (_is_hop_by_hop(hid) and not (hid == H_UPGRADE and h.status == 101))
        if (hid == H_CONTENT_LENGTH and body_kind == K_NONE and h.body_kind == K_NONE
                and h.status >= 200 and h.status != 204):
            # A HEAD or 304 response states the length the body would have had (RFC
            # 9110 8.6): relay it, it frames nothing.
            keep = True
        if hid == H_PROXY_AUTHORIZATION:
            keep = True   # not a response field; copy as an ordinary one
        if hid == H_VIA and via is not None:
            keep = False
            if _appendable(f):
                if n_via:
                    via_prev += 2
                via_prev += f.val_len
                n_via += 1
        if keep and (f.flags & F_CONN_LISTED):
            keep = False
        if keep and strip is not None and strip.matches(
                <const unsigned char*>p + f.name_off, f.name_len):
            keep = False
        copy[i] = keep
        if keep:
            total += f.name_len + 2 + f.val_len + 2
    if body_kind == K_LENGTH:
        total += 16 + _dec_len(h.content_length) + 2
    elif body_kind == K_CHUNKED:
        total += 28
    if h.status == 101:
        total += 21
    elif close:
        total += 19
    elif keep_alive_10:
        total += 24
    if via is not None:
        total += 5 + via_prev + (2 if n_via else 0) + len(via) + 2
    if extra is not None:
        total += len(extra)
    total += 2
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* w = PyBytes_AS_STRING(out)
    cdef char* w0 = w
    w = _put(w, b"HTTP/1.1 ", 9)
    w = _put_dec(w, h.status)
    w[0] = b' '
    w += 1
    w = _put(w, PyBytes_AS_STRING(h.reason), len(h.reason))
    w = _put(w, b"\r\n", 2)
    for i in range(h.nfields):
        if copy[i]:
            f = &h.fields[i]
            w = _put(w, p + f.name_off, f.name_len)
            w = _put(w, b": ", 2)
            w = _put(w, p + f.val_off, f.val_len)
            w = _put(w, b"\r\n", 2)
    if body_kind == K_LENGTH:
        w = _put(w, b"Content-Length: ", 16)
        w = _put_dec(w, h.content_length)
        w = _put(w, b"\r\n", 2)
    elif body_kind == K_CHUNKED:
        w = _put(w, b"Transfer-Encoding: chunked\r\n", 28)
    if h.status == 101:
        w = _put(w, b"Connection: upgrade\r\n", 21)
    elif close:
        w = _put(w, b"Connection: close\r\n", 19)
    elif keep_alive_10:
        w = _put(w, b"Connection: keep-alive\r\n", 24)
    if via is not None:
        w = _put(w, b"Via: ", 5)
        if n_via:
            k = 0
            for i in range(h.nfields):
                f = &h.fields[i]
                if f.hid == H_VIA and _appendable(f):
                    if k:
                        w = _put(w, b", ", 2)
                    w = _put(w, p + f.val_off, f.val_len)
                    k += 1
            w = _put(w, b", ", 2)
        w = _put(w, PyBytes_AS_STRING(via), len(via))
        w = _put(w, b"\r\n", 2)
    if extra is not None:
        w = _put(w, PyBytes_AS_STRING(extra), len(extra))
    w = _put(w, b"\r\n", 2)
    assert w - w0 == total
    return out


# ---------------------------------------------------------------------------------------
# Chunked body framing (RFC 9112 7.1)

cdef enum:
    S_SIZE = 0          # reading chunk-size hex digits (at least one seen when ndig > 0)
    S_EXT = 1           # after the size: chunk-ext until CR (sub-state in ext_st)
    S_SIZE_LF = 2       # saw CR after the size line, need LF
    S_DATA = 3
    S_DATA_CR = 4
    S_DATA_LF = 5
    S_TRAILER_START = 6 # at the start of a trailer line (or the final CRLF)
    S_TRAILER = 7       # inside a trailer field value
    S_TRAILER_LF = 8
    S_FINAL_LF = 9
    S_DONE = 10
    S_TRAILER_NAME = 11 # inside a trailer field name
    S_FAILED = 12       # raised once; every later call raises too

# chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
# chunk-ext-val = token / quoted-string  (RFC 9112 7.1.1). The body is forwarded with its
# framing as received, so the grammar is enforced exactly: a next hop that reads a
# sloppy size line differently ("5 abc", "5;=x") is a request-smuggling vector. The one
# leniency is whitespace before the CR, which senders are known to emit and which no
# reader can take for anything else.
cdef enum:
    X_BWS = 0           # after the size or a value: SP/HTAB, ";" or CR
    X_NAME_BWS = 1      # after ";": SP/HTAB or the first tchar of a name
    X_NAME = 2
    X_AFTER_NAME = 3    # SP/HTAB after a name: "=", ";" or CR
    X_VAL_BWS = 4       # after "=": SP/HTAB, a token or a quoted-string
    X_VAL = 5
    X_QUOTED = 6
    X_QPAIR = 7         # after "\" inside a quoted-string

# Size-line limit: chunk-size plus extensions. Nothing legitimate comes close; 4 KiB is
# the order of magnitude of nginx's large_client_header_buffers for one line.
cdef enum:
    DEF_MAX_CHUNK_LINE = 4096


@cython.final
cdef class ChunkedReader:
    """Incremental validator/decoder of a chunked body.

    ``scan(buf, start, end)`` consumes framing and data from ``buf[start:end]`` and
    returns the position it stopped at: everything in between belongs to the body and
    may be forwarded as-is; it stops early only at the end of the body (``done``).
    ``decode`` does the same and also returns the chunk data bytes. Malformed framing
    (bare LF, bad hex, a size of 16 hex digits or more, a chunk-ext outside RFC 9112
    7.1.1, a line over ``max_line`` bytes, a malformed trailer field, trailers over
    ``max_trailer_bytes``, control characters) raises BadRequest (or BadResponse when
    ``response`` is true); the reader is then unusable.
    """

    cdef int state
    cdef int64_t remaining
    cdef int ndig
    cdef Py_ssize_t line_len
    cdef Py_ssize_t trailer_bytes
    cdef readonly Py_ssize_t max_line
    cdef readonly Py_ssize_t max_trailer_bytes
    cdef bint response
    cdef readonly int64_t body_bytes
    cdef unsigned char ext_st

    def __init__(self, *, Py_ssize_t max_line=DEF_MAX_CHUNK_LINE,
                 Py_ssize_t max_trailer_bytes=32768, bint response=False):
        self.max_line = max_line
        self.max_trailer_bytes = max_trailer_bytes
        self.response = response
        self.state = S_SIZE
        self.remaining = 0
        self.ndig = 0
        self.line_len = 0
        self.trailer_bytes = 0
        self.body_bytes = 0
        self.ext_st = X_BWS

    @property
    def done(self):
        return self.state == S_DONE

    cdef int _bad(self, str msg) except -1:
        # Framing is in doubt from here on: never resume from a half-updated state.
        self.state = S_FAILED
        if self.response:
            raise BadResponse(msg)
        raise BadRequest(msg)

    cdef int _ext(self, unsigned char c) except -1:
        """One byte of a chunk-ext; returns 1 at the CR ending the size line."""
        cdef unsigned char x = self.ext_st
        if x == X_QUOTED:
            if c == b'"':
                x = X_BWS
            elif c == b'\\':
                x = X_QPAIR
            elif not (CLS[c] & C_VALUE):
                self._bad("invalid character in chunk extension")
        elif x == X_QPAIR:
            if not (CLS[c] & C_VALUE):
                self._bad("invalid character in chunk extension")
            x = X_QUOTED
        elif c == 0x20 or c == 0x09:
            if x == X_NAME:
                x = X_AFTER_NAME
            elif x == X_VAL:
                x = X_BWS
        elif c == 0x0D:
            if x == X_NAME_BWS or x == X_VAL_BWS:
                self._bad("chunk extension without a name or value")
            return 1
        elif c == b';':
            if x == X_NAME_BWS or x == X_VAL_BWS:
                self._bad("chunk extension without a name or value")
            x = X_NAME_BWS
        elif c == b'=':
            if x != X_NAME and x != X_AFTER_NAME:
                self._bad("malformed chunk extension")
            x = X_VAL_BWS
        elif c == b'"':
            if x != X_VAL_BWS:
                self._bad("malformed chunk extension")
            x = X_QUOTED
        elif CLS[c] & C_TCHAR:
            if x == X_NAME_BWS:
                x = X_NAME
            elif x == X_VAL_BWS:
                x = X_VAL
            elif x != X_NAME and x != X_VAL:
                self._bad("malformed chunk extension")
        else:
            self._bad("invalid character in chunk extension")
        self.ext_st = x
        return 0

    cdef Py_ssize_t _run(self, const unsigned char* p, Py_ssize_t i, Py_ssize_t end,
                         list out) except -1:
        cdef unsigned char c
        cdef Py_ssize_t take
        cdef int st = self.state
        if st == S_FAILED:
            self._bad("chunked body already rejected")
        while i < end and st != S_DONE:
            c = p[i]
            if st == S_DATA:
                take = end - i
                if take > self.remaining:
                    take = <Py_ssize_t>self.remaining
                if out is not None:
                    out.append(PyBytes_FromStringAndSize(<const char*>p + i, take))
                self.remaining -= take
                self.body_bytes += take
                i += take
                if self.remaining == 0:
                    st = S_DATA_CR
                continue
            i += 1
            if st == S_SIZE:
                if CLS[c] & C_HEX:
                    # 15 hex digits (under 2**60) keep the int64 arithmetic exact.
                    if self.ndig >= 15:
                        self._bad("chunk size too large")
                    self.remaining = self.remaining * 16 + (
                        (c - 48) if c <= b'9' else ((c | 0x20) - 87))
                    self.ndig += 1
                    self.line_len += 1
                    continue
                if self.ndig == 0:
                    self._bad("malformed chunk size")
                if c == 0x0D:
                    st = S_SIZE_LF
                elif c == b';' or c == 0x20 or c == 0x09:
                    st = S_EXT
                    self.line_len += 1
                    self.ext_st = X_NAME_BWS if c == b';' else X_BWS
                else:
                    self._bad("malformed chunk size")
            elif st == S_EXT:
                self.line_len += 1
                if self.line_len > self.max_line:
                    self._bad("chunk size line too long")
                if self._ext(c):
                    st = S_SIZE_LF
            elif st == S_SIZE_LF:
                if c != 0x0A:
                    self._bad("chunk size line without CRLF")
                self.line_len = 0
                self.ndig = 0
                if self.remaining == 0:
                    st = S_TRAILER_START
                else:
                    st = S_DATA
            elif st == S_DATA_CR:
                if c != 0x0D:
                    self._bad("chunk data not followed by CRLF")
                st = S_DATA_LF
            elif st == S_DATA_LF:
                if c != 0x0A:
                    self._bad("chunk data not followed by CRLF")
                st = S_SIZE
            elif st == S_TRAILER_START:
                # trailer-section = *( field-line CRLF ) (RFC 9112 7.1.2), field-line as in
                # a head (RFC 9112 5): a name, a colon, a value; no obs-fold.
                if c == 0x0D:
                    st = S_FINAL_LF
                elif CLS[c] & C_TCHAR:
                    st = S_TRAILER_NAME
                    self._count_trailer()
                else:
                    self._bad("malformed trailer field")
            elif st == S_TRAILER_NAME:
                self._count_trailer()
                if c == b':':
                    st = S_TRAILER
                elif not (CLS[c] & C_TCHAR):
                    self._bad("malformed trailer field")
            elif st == S_TRAILER:
                self._count_trailer()
                if c == 0x0D:
                    st = S_TRAILER_LF
                elif not (CLS[c] & C_VALUE):
                    self._bad("invalid character in trailer field")
            elif st == S_TRAILER_LF:
                if c != 0x0A:
                    self._bad("bare CR in trailer section")
                st = S_TRAILER_START
            elif st == S_FINAL_LF:
                if c != 0x0A:
                    self._bad("chunked body not terminated by CRLF")
                st = S_DONE
        self.state = st
        return i

    cdef int _count_trailer(self) except -1:
        self.trailer_bytes += 1
        if self.trailer_bytes > self.max_trailer_bytes:
            self._bad("trailer section too large")
        return 0

    def scan(self, buf, Py_ssize_t start=0, Py_ssize_t end=-1):
        """Advance over ``buf[start:end]``; return where it stopped (see the class)."""
        cdef Py_buffer view
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
        try:
            if end < 0 or end > view.len:
                end = view.len
            if start < 0 or start > end:
                raise ValueError("start out of range")
            return self._run(<const unsigned char*>view.buf, start, end, None)
        finally:
            PyBuffer_Release(&view)

    def decode(self, buf, Py_ssize_t start=0, Py_ssize_t end=-1):
        """Like ``scan``; returns ``(position, [data bytes, ...])``."""
        cdef Py_buffer view
        cdef list out = []
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
        try:
            if end < 0 or end > view.len:
                end = view.len
            if start < 0 or start > end:
                raise ValueError("start out of range")
            pos = self._run(<const unsigned char*>view.buf, start, end, out)
            return pos, out
        finally:
            PyBuffer_Release(&view)
