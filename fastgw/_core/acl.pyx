# cython: language_level=3, freethreading_compatible=False
"""Map matching for HAProxy's match types on bytes keys: values in, plain values out.

Strategy. A ``Map`` is built once from ``(key, value)`` entries in file order and never
changes; a lookup returns the winning entry's value (``lookup``) or its index in file
order (``lookup_index``). Every match type has an index, so the cost of a lookup depends
on the key's length, not on the number of entries:

- ``str``, ``beg``, ``end``, ``dir``, ``dom``: one byte trie, built from the sorted,
  de-duplicated keys in breadth-first layout (the children of a node are contiguous and
  sorted by their first byte, so a step is a binary search among at most 256 bytes) and
  path-compressed (a node per branching point, at most 2n + 1 nodes). ``end`` keys are
  stored reversed and the key is walked from its end. ``dir`` and ``dom`` walk the trie
  from every word start of the key (see below).
- ``sub``: the same trie without path compression, turned into an Aho-Corasick automaton
  (failure links; each state keeps the lowest entry index among the patterns that end
  there or on its failure chain), so one pass over the key finds the winner.
- ``reg``: a literal prefilter. Each regular expression is parsed once with Python's own
  ``re`` parser; from the parse tree we take a set of literal strings one of which every
  match must contain (the longest run of literal bytes, or the alternatives of a group).
  Those literals go into an Aho-Corasick automaton; a lookup runs it over the key, and
  then tries, in file order, only the expressions whose literal occurs in the key plus
  those without any literal. See "Limits" for when that is not constant-time.
- ``ip``: two path-compressed binary tries (IPv4, IPv6) of CIDR prefixes, longest prefix
  match, at most 2n + 1 nodes each; addresses are parsed with ``inet_pton``.

Which entry wins (HAProxy's rule wherever it has one, so an existing HAProxy map gives
the same answers; HAProxy 2.x-3.x ``src/pattern.c`` is the reference):

- identical keys (after case folding): the first in file order, for every type (HAProxy
  keeps only the first of duplicated keys in its trees, and its lists stop at the first).
- ``str``: the exact key. ``beg``: the longest prefix (HAProxy's prefix tree); with
  ``ignore_case`` HAProxy drops the tree and scans in file order, so there the first
  matching prefix in file order wins, as in HAProxy.
- ``end``, ``dir``, ``dom``, ``sub``, ``reg``: HAProxy scans these in file order and
  stops at the first match, so the winner is the matching entry with the lowest index.
  The index finds every matching entry in one walk and keeps the lowest index, which
  gives the same answer without the scan (a longest-suffix rule would be natural for a
  trie but would answer differently from HAProxy).
- ``ip``: the longest matching prefix. An IPv4 key that matches nothing in the IPv4 trie
  is looked up as ``::ffff:a.b.c.d`` in the IPv6 trie; an IPv6 key of the form
  ``::ffff:a.b.c.d`` that matches nothing in the IPv6 trie is looked up as ``a.b.c.d`` in
  the IPv4 trie (HAProxy's ``v4tov6`` / ``v6tov4``).

What each type means (HAProxy's definitions):

- ``dir``: the pattern, with leading and trailing ``/`` and ``?`` removed, equals a run
  of whole segments of the key, where segments are delimited by ``/`` or ``?`` (or the
  key's ends). ``/api`` matches ``/api``, ``/api/x`` and ``/v1/api?q``, not ``/apix``.
- ``dom``: the same with delimiters ``/``, ``?``, ``.`` and ``:``. ``example.com``
  matches ``example.com``, ``a.example.com`` and ``example.com:8080``, not
  ``badexample.com``; note that, as in HAProxy, it also matches ``example.com.evil.net``.
  A ``dir``/``dom`` pattern made only of delimiters matches nothing.
- ``ignore_case``: ASCII case folding (like HAProxy's ``-i``): keys are lowercased when
  the map is built and the key is folded byte by byte during the lookup, so the index
  is kept. For ``reg`` the expressions are compiled with ``re.IGNORECASE`` (ASCII for
  bytes patterns) and the prefilter folds case.
- ``ip`` patterns: ``a.b.c.d``, ``a.b.c.d/n``, ``a.b.c.d/m.m.m.m`` (contiguous mask only)
  and IPv6 ``x:y::z`` or ``x:y::z/n``; host bits are ignored (``10.1.2.3/8`` is
  ``10.0.0.0/8``). Keys are textual addresses (``b"10.1.2.3"``, ``b"2001:db8::1"``); a
  key that is not an address matches nothing.
- The empty pattern (possible from ``Map``, never from a file): ``str`` matches the empty
  key; ``beg``, ``end``, ``sub`` and ``reg`` match every key.

Deliberate differences from HAProxy, each because HAProxy's behaviour there is an
accident of its C strings or its configuration reader:

- keys are compared byte for byte, NUL included (HAProxy's ``strncmp`` stops at NUL);
- IPv4 masks must be contiguous (HAProxy keeps others in an unindexed list) and host
  names are not resolved in ``ip`` maps;
- in map files a line whose first non-blank byte is ``#`` is a comment (HAProxy only
  skips ``#`` in the first column, so an indented ``# note`` becomes a key there);
- ``reg`` uses Python's ``re`` syntax, not PCRE: the common subset is the same, but
  ``(?<name>...)``, ``\\z``, ``\\Q...\\E``, recursion and PCRE verbs are errors.

Limits. ``dir`` and ``dom`` walk the trie from each word start, so their worst case
is the key's length times the longest pattern's (self-similar keys and patterns such as
``a/a/a/...``); the number of entries does not enter. ``reg`` lookups are constant-time
only when the prefilter is selective: an
expression without a usable literal (``^[0-9]+$``) is tried on every lookup, and an
expression whose literal is common (``/``) is tried whenever the key contains it; both
cost what HAProxy's scan costs, per such expression. Building a ``reg`` map costs one
run of Python's regex parser and compiler per expression (tens of microseconds each):
the one type whose build of 100k entries takes seconds, not milliseconds.

Reload. A ``Map`` is immutable once built: a reload builds a new ``Map`` aside and
swaps the one reference the router holds. Swapping a reference is atomic, so a request
sees the old map or the new one, never a mix; whoever still holds the old map keeps
getting the old answers. (A build holds the GIL: building a 100k-entry map stalls the
event loop for its build time, see bench/bench_acl.py.)

Errors raised: ``fastgw.errors.ConfigError`` for a bad kind or a bad entry (bad CIDR,
bad regular expression), naming the source and the line or entry; ``TypeError`` when a
key or value is not ``bytes`` (a caller's bug). Anything else escaping is a bug.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport INT32_MAX, int32_t, uint8_t, uint64_t
from libc.stdlib cimport qsort
from libc.string cimport memchr, memcpy

import os
import re

from fastgw.errors import ConfigError

cdef extern from "arpa/inet.h" nogil:
    int inet_pton(int af, const char* src, void* dst)

cdef extern from "sys/socket.h" nogil:
    int AF_INET
    int AF_INET6

cdef extern from *:
    int __builtin_clzll(unsigned long long x) nogil

# ---------------------------------------------------------------------------------------
# Constants (mirrored in acl.pyi)

KINDS = ("str", "beg", "end", "dir", "dom", "sub", "reg", "ip")

cdef enum:
    K_STR = 0
    K_BEG = 1
    K_END = 2
    K_DIR = 3
    K_DOM = 4
    K_SUB = 5
    K_REG = 6
    K_IP = 7

cdef dict _KIND_IDS = {name: i for i, name in enumerate(KINDS)}

# Keys up to this length are folded / reversed into a stack buffer; longer ones into a
# heap buffer. 512 bytes covers request paths and host names in practice.
cdef enum:
    STACK_KEY = 512

# Node ids are int32: a map whose keys add up to 2 GiB is refused.
cdef Py_ssize_t MAX_TOTAL = 0x7FFFFFF0

cdef uint8_t IDENT[256]
cdef uint8_t LOWER[256]
cdef uint8_t DIR_DELIM[256]
cdef uint8_t DOM_DELIM[256]


cdef int _init_tables():
    cdef int c
    for c in range(256):
        IDENT[c] = c
        LOWER[c] = c + 32 if 65 <= c <= 90 else c
        DIR_DELIM[c] = 0
        DOM_DELIM[c] = 0
    # HAProxy's pat_match_dir / pat_match_dom delimiter sets.
    for c in b"/?":
        DIR_DELIM[c] = 1
    for c in b"/?.:":
        DOM_DELIM[c] = 1
    return 0


_init_tables()


# ---------------------------------------------------------------------------------------
# Byte trie


cdef void* _alloc(Py_ssize_t n, Py_ssize_t size) except NULL:
    cdef void* p = PyMem_Malloc(n * size if n > 0 else 1)
    if p == NULL:
        raise MemoryError()
    return p


cdef struct TrieNode:
    const uint8_t* lab  # edge label from the parent (lab[0] == first[node])
    int32_t lab_len
    int32_t child0      # children: child0 .. child0 + nchild - 1, sorted by first byte
    int32_t nchild
    int32_t term        # payload of the key ending here, or -1
    int32_t fail        # Aho-Corasick only
    int32_t out         # Aho-Corasick only


@cython.final
cdef class _Trie:
    """A byte trie in breadth-first layout, built once from sorted unique keys.

    Node 0 is the root. A node's children are the ``nchild`` nodes from ``child0`` on,
    sorted by ``first[child]`` (the first byte of their edge label). With path
    compression an edge carries ``lab_len`` bytes from ``lab`` (pointing into a key kept
    alive by ``keys``); without it every edge is one byte. ``term`` is the payload of the
    key that ends at the node, or -1. For the Aho-Corasick uses, ``fail`` is the failure
    link and ``out`` either the lowest payload on the failure chain (``sub``) or the
    nearest node with a payload on it (``reg``)."""

    cdef int32_t n
    cdef bint compress
    cdef TrieNode* nodes
    cdef uint8_t* first     # apart from the nodes: the child search reads only these
    cdef list keys

    def __dealloc__(self):
        PyMem_Free(self.nodes)
        PyMem_Free(self.first)

    cdef int build(self, list keys, list payloads, bint compress) except -1:
        """``keys``: sorted unique bytes; ``payloads[i]`` goes to ``term`` of key i."""
        cdef Py_ssize_t m = len(keys)
        cdef Py_ssize_t i, j, total = 0, cap, d2, lo, hi, depth
        cdef int32_t node, c, g, qh = 0, qt = 0
        cdef const uint8_t** kp = NULL
        cdef Py_ssize_t* kl = NULL
        cdef int32_t* q_node = NULL
        cdef Py_ssize_t* q_lo = NULL
        cdef Py_ssize_t* q_hi = NULL
        cdef Py_ssize_t* q_depth = NULL
        cdef bytes k
        cdef uint8_t b
        self.keys = keys
        self.compress = compress
        try:
            kp = <const uint8_t**>_alloc(m, sizeof(uint8_t*))
            kl = <Py_ssize_t*>_alloc(m, sizeof(Py_ssize_t))
            for i in range(m):
                k = <bytes>PyList_GET_ITEM(keys, i)
                kp[i] = <const uint8_t*>PyBytes_AS_STRING(k)
                kl[i] = PyBytes_GET_SIZE(k)
                total += kl[i]
                if total > MAX_TOTAL:
                    raise ConfigError([("<map>", "size", "keys add up to more than 2 GiB")])
            cap = 2 * m + 1 if compress else total + 1
            self.nodes = <TrieNode*>_alloc(cap, sizeof(TrieNode))
            self.first = <uint8_t*>_alloc(cap, sizeof(uint8_t))
            q_node = <int32_t*>_alloc(cap, sizeof(int32_t))
            q_lo = <Py_ssize_t*>_alloc(cap, sizeof(Py_ssize_t))
            q_hi = <Py_ssize_t*>_alloc(cap, sizeof(Py_ssize_t))
            q_depth = <Py_ssize_t*>_alloc(cap, sizeof(Py_ssize_t))

            self.n = 1
            self.first[0] = 0
            self.nodes[0].lab = NULL
            self.nodes[0].lab_len = 0
            q_node[0] = 0
            q_lo[0] = 0
            q_hi[0] = m
            q_depth[0] = 0
            qt = 1
            while qh < qt:
                node = q_node[qh]
                lo = q_lo[qh]
                hi = q_hi[qh]
                depth = q_depth[qh]
                qh += 1
                self.nodes[node].term = -1
                # Sorted and unique: a key equal to the node's prefix comes first.
                if lo < hi and kl[lo] == depth:
                    self.nodes[node].term = <int32_t>(<object>PyList_GET_ITEM(payloads, lo))
                    lo += 1
                # Count the groups (one per distinct next byte), then lay them out.
                g = 0
                i = lo
                while i < hi:
                    b = kp[i][depth]
                    j = i + 1
                    while j < hi and kp[j][depth] == b:
                        j += 1
                    g += 1
                    i = j
                self.nodes[node].child0 = self.n
                self.nodes[node].nchild = g
                c = self.n
                self.n += g
                i = lo
                while i < hi:
                    b = kp[i][depth]
                    j = i + 1
                    while j < hi and kp[j][depth] == b:
                        j += 1
                    d2 = depth + 1
                    if compress:
                        # Longest common prefix of the group = of its first and last.
                        while (d2 < kl[i] and d2 < kl[j - 1]
                               and kp[i][d2] == kp[j - 1][d2]):
                            d2 += 1
                    self.nodes[c].lab = kp[i] + depth
                    self.nodes[c].lab_len = <int32_t>(d2 - depth)
                    self.first[c] = b
                    q_node[qt] = c
                    q_lo[qt] = i
                    q_hi[qt] = j
                    q_depth[qt] = d2
                    qt += 1
                    c += 1
                    i = j
        finally:
            PyMem_Free(kp)
            PyMem_Free(kl)
            PyMem_Free(q_node)
            PyMem_Free(q_lo)
            PyMem_Free(q_hi)
            PyMem_Free(q_depth)
        return 0

    cdef int link(self, bint min_out) except -1:
        """Aho-Corasick failure links over an uncompressed trie. Node ids are in
        breadth-first order, so a node's failure target is final before its children
        are linked. ``min_out``: ``out`` = lowest ``term`` on the failure chain (``sub``);
        else ``out`` = nearest node with a ``term`` on the chain, or -1 (``reg``)."""
        cdef int32_t u, c, f, x, end
        cdef uint8_t b
        self.nodes[0].fail = 0
        if min_out:
            self.nodes[0].out = self.nodes[0].term if self.nodes[0].term >= 0 else INT32_MAX
        else:
            self.nodes[0].out = -1
        for u in range(self.n):
            end = self.nodes[u].child0 + self.nodes[u].nchild
            for c in range(self.nodes[u].child0, end):
                b = self.first[c]
                if u == 0:
                    f = 0
                else:
                    f = self.nodes[u].fail
                    while True:
                        x = _child(self, f, b)
                        if x >= 0:
                            f = x
                            break
                        if f == 0:
                            break
                        f = self.nodes[f].fail
                self.nodes[c].fail = f
                if min_out:
                    x = self.nodes[f].out
                    if self.nodes[c].term >= 0 and self.nodes[c].term < x:
                        x = self.nodes[c].term
                    self.nodes[c].out = x
                else:
                    self.nodes[c].out = f if self.nodes[f].term >= 0 else self.nodes[f].out
        return 0


cdef inline int32_t _child(_Trie t, int32_t node, uint8_t b) noexcept nogil:
    cdef int32_t lo = t.nodes[node].child0
    cdef int32_t hi = lo + t.nodes[node].nchild
    cdef int32_t mid
    cdef uint8_t c
    while lo < hi:
        mid = (lo + hi) >> 1
        c = t.first[mid]
        if c == b:
            return mid
        if c < b:
            lo = mid + 1
        else:
            hi = mid
    return -1


cdef inline int32_t _advance(_Trie t, int32_t state, uint8_t b) noexcept nogil:
    """The Aho-Corasick automaton's next state from ``state`` on byte ``b``: the child
    on ``b``, else the same asked of the failure links, down to the root."""
    cdef int32_t x
    while True:
        x = _child(t, state, b)
        if x >= 0:
            return x
        if state == 0:
            return 0
        state = t.nodes[state].fail


cdef inline Py_ssize_t _step(_Trie t, int32_t* node, const uint8_t* q, Py_ssize_t pos,
                             Py_ssize_t n, const uint8_t* tab) noexcept nogil:
    """Follow one edge of a compressed trie from ``node`` reading ``q[pos:]``: the new
    position, or -1 when no edge matches."""
    cdef int32_t c = _child(t, node[0], tab[q[pos]])
    cdef int32_t L, k
    cdef const uint8_t* lab
    if c < 0:
        return -1
    L = t.nodes[c].lab_len
    if L > n - pos:
        return -1
    lab = t.nodes[c].lab
    for k in range(1, L):
        if tab[q[pos + k]] != lab[k]:
            return -1
    node[0] = c
    return pos + L


cdef int32_t _walk_exact(_Trie t, const uint8_t* q, Py_ssize_t n,
                         const uint8_t* tab) noexcept nogil:
    cdef int32_t node = 0
    cdef Py_ssize_t pos = 0
    while pos < n:
        pos = _step(t, &node, q, pos, n, tab)
        if pos < 0:
            return -1
    return t.nodes[node].term


cdef int32_t _walk_longest(_Trie t, const uint8_t* q, Py_ssize_t n,
                           const uint8_t* tab) noexcept nogil:
    """Payload of the longest key that is a prefix of q."""
    cdef int32_t node = 0
    cdef int32_t best = t.nodes[0].term
    cdef Py_ssize_t pos = 0
    while pos < n:
        pos = _step(t, &node, q, pos, n, tab)
        if pos < 0:
            break
        if t.nodes[node].term >= 0:
            best = t.nodes[node].term
    return best


cdef int32_t _walk_lowest(_Trie t, const uint8_t* q, Py_ssize_t start, Py_ssize_t n,
                          const uint8_t* tab, const uint8_t* delim,
                          int32_t best) noexcept nogil:
    """Lowest payload among keys that are a prefix of q[start:] (and, with ``delim``,
    end at the end of q or before a delimiter), or ``best`` if lower; -1 means none."""
    cdef int32_t node = 0
    cdef int32_t v
    cdef Py_ssize_t pos = start
    v = t.nodes[0].term
    if v >= 0 and (best < 0 or v < best) and (
            delim == NULL or pos == n or delim[q[pos]]):
        best = v
    while pos < n:
        pos = _step(t, &node, q, pos, n, tab)
        if pos < 0:
            break
        v = t.nodes[node].term
        if v >= 0 and (best < 0 or v < best) and (
                delim == NULL or pos == n or delim[q[pos]]):
            best = v
    return best


cdef int32_t _walk_words(_Trie t, const uint8_t* q, Py_ssize_t n, const uint8_t* tab,
                         const uint8_t* delim) noexcept nogil:
    """HAProxy's match_word: from every word start (start of q, or after a delimiter,
    on a byte that is not one), the keys that match up to the end of q or a delimiter.
    Keys are stored without leading/trailing delimiters."""
    cdef int32_t best = -1
    cdef Py_ssize_t c = 0
    cdef bint may = True
    while c < n:
        if delim[q[c]]:
            may = True
        elif may:
            best = _walk_lowest(t, q, c, n, tab, delim, best)
            may = False
        c += 1
    return best


cdef int32_t _scan_sub(_Trie t, const uint8_t* q, Py_ssize_t n,
                       const uint8_t* tab) noexcept nogil:
    cdef int32_t state = 0
    cdef int32_t best = t.nodes[0].out
    cdef Py_ssize_t i
    for i in range(n):
        state = _advance(t, state, tab[q[i]])
        if t.nodes[state].out < best:
            best = t.nodes[state].out
    return -1 if best == INT32_MAX else best


# ---------------------------------------------------------------------------------------
# IP prefixes: a path-compressed binary trie per family


cdef inline int _bit(uint64_t hi, uint64_t lo, int i) noexcept nogil:
    if i < 64:
        return <int>((hi >> (63 - i)) & 1)
    return <int>((lo >> (127 - i)) & 1)


cdef inline int _common(uint64_t ahi, uint64_t alo, uint64_t bhi, uint64_t blo) noexcept nogil:
    """Length of the common leading bits of two 128-bit values."""
    cdef uint64_t x = ahi ^ bhi
    if x:
        return __builtin_clzll(x)
    x = alo ^ blo
    if x:
        return 64 + __builtin_clzll(x)
    return 128


cdef inline void _mask(uint64_t* hi, uint64_t* lo, int plen) noexcept nogil:
    if plen <= 0:
        hi[0] = 0
        lo[0] = 0
    elif plen <= 64:
        hi[0] &= (<uint64_t>0xFFFFFFFFFFFFFFFF) << (64 - plen)
        lo[0] = 0
    else:
        lo[0] &= (<uint64_t>0xFFFFFFFFFFFFFFFF) << (128 - plen)


cdef struct IPNode:
    uint64_t hi         # the prefix, masked to plen bits (IPv4 in the top 32 bits)
    uint64_t lo
    int32_t kid[2]      # children by the bit after the prefix, or -1
    int32_t term        # payload of the entry with exactly this prefix, or -1
    int32_t plen


@cython.final
cdef class _IPTrie:
    """Prefixes as 128-bit values (IPv4 in the top 32 bits). Node 0 is the /0 root.
    Every node is a prefix; a node that no entry names is a branching point. Nodes are
    32-byte structs in one array, so a step down costs one cache line."""

    cdef IPNode* nodes
    cdef int32_t n
    cdef int width

    def __dealloc__(self):
        PyMem_Free(self.nodes)

    cdef int init(self, Py_ssize_t entries, int width) except -1:
        self.width = width
        self.nodes = <IPNode*>_alloc(2 * entries + 1, sizeof(IPNode))
        self.n = 0
        self._new(0, 0, 0, -1)
        return 0

    cdef inline int32_t _new(self, uint64_t hi, uint64_t lo, int plen,
                             int32_t term) noexcept nogil:
        cdef int32_t x = self.n
        cdef IPNode* nd = &self.nodes[x]
        self.n += 1
        nd.hi = hi
        nd.lo = lo
        _mask(&nd.hi, &nd.lo, plen)
        nd.plen = plen
        nd.term = term
        nd.kid[0] = -1
        nd.kid[1] = -1
        return x

    cdef void insert(self, uint64_t hi, uint64_t lo, int plen, int32_t payload) noexcept nogil:
        """Insert a masked prefix; an existing payload for the same prefix stays (the
        first in file order wins). At most two nodes per insert, so 2n + 1 in all."""
        cdef IPNode* nodes = self.nodes
        cdef int32_t node = 0, c, x, y
        cdef int b, cp
        while True:
            if nodes[node].plen == plen:
                if nodes[node].term < 0:
                    nodes[node].term = payload
                return
            b = _bit(hi, lo, nodes[node].plen)
            c = nodes[node].kid[b]
            if c < 0:
                nodes[node].kid[b] = self._new(hi, lo, plen, payload)
                return
            cp = _common(hi, lo, nodes[c].hi, nodes[c].lo)
            if cp > plen:
                cp = plen
            if cp > nodes[c].plen:
                cp = nodes[c].plen
            if cp == nodes[c].plen:
                node = c            # c's prefix is a prefix of ours: go down
                continue
            if cp == plen:
                # Ours is a prefix of c's: insert between node and c.
                x = self._new(hi, lo, plen, payload)
                nodes[x].kid[_bit(nodes[c].hi, nodes[c].lo, plen)] = c
                nodes[node].kid[b] = x
                return
            # They part at bit cp: a branching node with both below it.
            x = self._new(hi, lo, cp, -1)
            y = self._new(hi, lo, plen, payload)
            nodes[x].kid[_bit(hi, lo, cp)] = y
            nodes[x].kid[_bit(nodes[c].hi, nodes[c].lo, cp)] = c
            nodes[node].kid[b] = x
            return

    cdef int32_t longest(self, uint64_t hi, uint64_t lo) noexcept nogil:
        cdef const IPNode* nodes = self.nodes
        cdef const IPNode* nd = nodes
        cdef int32_t c
        cdef int32_t best = nodes[0].term
        while nd.plen < self.width:
            c = nd.kid[_bit(hi, lo, nd.plen)]
            if c < 0:
                break
            nd = &nodes[c]
            if _common(hi, lo, nd.hi, nd.lo) < nd.plen:
                break
            if nd.term >= 0:
                best = nd.term
        return best


cdef inline uint64_t _be64(const uint8_t* p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v = (v << 8) | p[i]
    return v


cdef int _parse_addr(const char* s, Py_ssize_t n, uint64_t* hi, uint64_t* lo) noexcept nogil:
    """Textual address -> 4 or 6 (and the value, IPv4 in the top 32 bits), 0 if none."""
    cdef char buf[64]
    cdef uint8_t raw[16]
    cdef int fam = AF_INET
    cdef Py_ssize_t i
    if n <= 0 or n >= 64 or memchr(s, 0, n) != NULL:
        return 0
    memcpy(buf, s, n)
    buf[n] = 0
    for i in range(n):
        if s[i] == 58:                          # ':'
            fam = AF_INET6
            break
    if inet_pton(fam, buf, raw) != 1:
        return 0
    if fam == AF_INET:
        hi[0] = (<uint64_t>raw[0] << 56) | (<uint64_t>raw[1] << 48) | (
            <uint64_t>raw[2] << 40) | (<uint64_t>raw[3] << 32)
        lo[0] = 0
        return 4
    hi[0] = _be64(raw)
    lo[0] = _be64(raw + 8)
    return 6


# _parse_cidr errors
cdef enum:
    E_ADDR = -1
    E_LEN = -2
    E_MASK = -3


cdef int _parse_cidr(const char* s, Py_ssize_t n, uint64_t* hi, uint64_t* lo,
                     int* plen) noexcept nogil:
    """``addr``, ``addr/len`` or ``a.b.c.d/m.m.m.m`` -> family (4 or 6) with the masked
    prefix, or an E_* code."""
    cdef Py_ssize_t slash = -1, i
    cdef int fam, width, v
    cdef uint64_t mhi, mlo, inv
    for i in range(n):
        if s[i] == 47:                          # '/'
            slash = i
            break
    fam = _parse_addr(s, n if slash < 0 else slash, hi, lo)
    if fam == 0:
        return E_ADDR
    width = 32 if fam == 4 else 128
    if slash < 0:
        plen[0] = width
        return fam
    s += slash + 1
    n -= slash + 1
    if fam == 4 and memchr(s, 46, n) != NULL:
        if _parse_addr(s, n, &mhi, &mlo) != 4:
            return E_LEN
        # Contiguous: the inverted mask (32 bits) is 2^k - 1.
        inv = (~mhi) >> 32
        if inv & (inv + 1):
            return E_MASK
        v = 0
        while v < 32 and (mhi >> (63 - v)) & 1:
            v += 1
        plen[0] = v
    else:
        if n < 1 or n > 3:
            return E_LEN
        v = 0
        for i in range(n):
            if s[i] < 48 or s[i] > 57:           # '0'..'9'
                return E_LEN
            v = v * 10 + (s[i] - 48)
        if v > width:
            return E_LEN
        plen[0] = v
    _mask(hi, lo, plen[0])
    return fam


cdef uint64_t V4MAPPED_HI = 0
cdef uint64_t V4MAPPED_LO = 0x0000FFFF00000000


# ---------------------------------------------------------------------------------------
# Regular expressions: literal prefilter + confirmation in file order

import re._constants as _sre_c
import re._parser as _sre_parse

try:
    import re._compiler as _sre_compile

    def _compile_parsed(tree, flags):
        return _sre_compile.compile(tree, flags)

    # Decided once: compiling the tree we already parsed saves a second parse; if this
    # Python's private compiler does not take a tree, parse twice.
    if _compile_parsed(_sre_parse.parse(b"a(b)", 0), 0).search(b"xab") is None:
        raise TypeError
except Exception:  # pragma: no cover - depends on the Python version
    _compile_parsed = None

_LITERAL = _sre_c.LITERAL
_SUBPATTERN = _sre_c.SUBPATTERN
_BRANCH = _sre_c.BRANCH
_REPEATS = tuple(
    getattr(_sre_c, name)
    for name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
    if hasattr(_sre_c, name)
)
_ATOMIC = getattr(_sre_c, "ATOMIC_GROUP", None)
_FOLD_FLAGS = re.IGNORECASE | re.LOCALE


cdef object _better(object a, object b):
    """The more selective of two literal sets: the one whose shortest literal is
    longer; on a tie, the one with fewer alternatives. None is no set."""
    if a is None:
        return b
    if b is None:
        return a
    ma = min(len(x) for x in a)
    mb = min(len(x) for x in b)
    if mb > ma or (mb == ma and len(b) < len(a)):
        return b
    return a


cdef object _required(object items, bint map_icase):
    """A list of literals one of which occurs in every match of the sequence ``items``
    (sre parse tree), or None. Only structure that is certain counts: a run of literal
    items, a group, a repeat of at least once, an alternation whose every branch has a
    set. A group that turns case folding on is skipped in a case-sensitive map."""
    best = None
    run = bytearray()
    for op, av in items:
        if op is _LITERAL:
            run.append(av)
            continue
        if run:
            best = _better(best, [bytes(run)])
            run = bytearray()
        if op is _SUBPATTERN:
            add_flags = av[1]
            if (add_flags & re.LOCALE) or (add_flags & re.IGNORECASE and not map_icase):
                continue
            best = _better(best, _required(av[3], map_icase))
        elif op is _BRANCH:
            alts = []
            for branch in av[1]:
                sub = _required(branch, map_icase)
                if sub is None:
                    alts = None
                    break
                alts.extend(sub)
            if alts:
                best = _better(best, sorted(set(alts)))
        elif op in _REPEATS:
            if av[0] >= 1:
                best = _better(best, _required(av[2], map_icase))
        elif _ATOMIC is not None and op is _ATOMIC:
            best = _better(best, _required(av, map_icase))
    if run:
        best = _better(best, [bytes(run)])
    return best


cdef int _cmp_i32(const void* a, const void* b) noexcept nogil:
    cdef int32_t x = (<const int32_t*>a)[0]
    cdef int32_t y = (<const int32_t*>b)[0]
    return (x > y) - (x < y)


cdef Py_ssize_t _sort_unique(int32_t* v, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i, k = 0
    if n <= 1:
        return n
    qsort(v, n, sizeof(int32_t), _cmp_i32)
    for i in range(1, n):
        if v[i] != v[k]:
            k += 1
            v[k] = v[i]
    return k + 1


@cython.final
cdef class _Vec:
    """A growable int32 buffer local to one lookup (lookups stay reentrant)."""

    cdef int32_t* v
    cdef Py_ssize_t n
    cdef Py_ssize_t cap

    def __dealloc__(self):
        PyMem_Free(self.v)

    cdef int push(self, int32_t x) except -1:
        cdef int32_t* nv
        if self.n == self.cap:
            self.cap = 16 if self.cap == 0 else self.cap * 2
            nv = <int32_t*>_alloc(self.cap, sizeof(int32_t))
            if self.n:
                memcpy(nv, self.v, self.n * sizeof(int32_t))
            PyMem_Free(self.v)
            self.v = nv
        self.v[self.n] = x
        self.n += 1
        return 0


@cython.final
cdef class _RegSet:
    cdef list regs            # compiled patterns, in file order
    cdef _Trie lits           # Aho-Corasick over the literals; term = literal id
    cdef int32_t* lit_start   # literal id -> range in lit_regs (CSR)
    cdef int32_t* lit_regs    # entry indices, ascending per literal
    cdef int32_t* always      # entries without a literal, ascending
    cdef Py_ssize_t n_always

    def __dealloc__(self):
        PyMem_Free(self.lit_start)
        PyMem_Free(self.lit_regs)
        PyMem_Free(self.always)

    cdef int build(self, list regs, list factors, bint icase) except -1:
        cdef dict by_lit = {}
        cdef list always = []
        cdef list lits
        cdef Py_ssize_t i, k, total = 0
        self.regs = regs
        for i, fac in enumerate(factors):
            if fac is None:
                always.append(i)
                continue
            for lit in fac:
                by_lit.setdefault(lit.lower() if icase else lit, []).append(i)
        lits = sorted(by_lit)
        self.lits = _Trie()
        self.lits.build(lits, list(range(len(lits))), False)
        self.lits.link(False)
        for lit in lits:
            total += len(by_lit[lit])
        self.lit_start = <int32_t*>_alloc(len(lits) + 1, sizeof(int32_t))
        self.lit_regs = <int32_t*>_alloc(total, sizeof(int32_t))
        k = 0
        for i, lit in enumerate(lits):
            self.lit_start[i] = <int32_t>k
            for x in by_lit[lit]:       # ascending: appended in file order
                self.lit_regs[k] = x
                k += 1
        self.lit_start[len(lits)] = <int32_t>k
        self.n_always = len(always)
        self.always = <int32_t*>_alloc(self.n_always, sizeof(int32_t))
        for i, x in enumerate(always):
            self.always[i] = x
        return 0

    cdef Py_ssize_t find(self, bytes key, bint icase) except -2:
        cdef const uint8_t* q = <const uint8_t*>PyBytes_AS_STRING(key)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(key)
        cdef const uint8_t* tab = IDENT
        cdef _Trie t = self.lits
        cdef _Vec hits = _Vec()
        cdef _Vec cands = _Vec()
        cdef int32_t state = 0, x, o
        cdef Py_ssize_t i, j, a, nc
        if icase:
            tab = LOWER
        # 1. Literals that occur in the key.
        if t.n > 1:
            for i in range(n):
                state = _advance(t, state, tab[q[i]])
                o = state if t.nodes[state].term >= 0 else t.nodes[state].out
                while o > 0:
                    hits.push(t.nodes[o].term)
                    o = t.nodes[o].out
        hits.n = _sort_unique(hits.v, hits.n)
        # 2. Their expressions, ascending and unique.
        for i in range(hits.n):
            for j in range(self.lit_start[hits.v[i]], self.lit_start[hits.v[i] + 1]):
                cands.push(self.lit_regs[j])
        nc = _sort_unique(cands.v, cands.n)
        # 3. Merge with the literal-less ones and confirm in file order.
        i = 0
        a = 0
        regs = self.regs
        while i < nc or a < self.n_always:
            if a >= self.n_always or (i < nc and cands.v[i] < self.always[a]):
                x = cands.v[i]
                i += 1
            else:
                x = self.always[a]
                a += 1
            if (<object>PyList_GET_ITEM(regs, x)).search(key) is not None:
                return x
        return -1


cdef object _compile_reg(bytes pattern, bint icase):
    """(compiled pattern, literal factor) or raises re.error & co."""
    cdef int flags = re.IGNORECASE if icase else 0
    tree = _sre_parse.parse(pattern, flags)
    if tree.state.flags & _FOLD_FLAGS and not icase:
        fac = None           # (?i) or (?L) for the whole pattern: no exact literal
    elif tree.state.flags & re.LOCALE:
        fac = None
    else:
        fac = _required(tree, icase)
    if _compile_parsed is not None:
        rx = _compile_parsed(tree, flags)
    else:  # pragma: no cover
        rx = re.compile(pattern, flags)
    return rx, fac


# ---------------------------------------------------------------------------------------
# Map


cdef str _where(object lines, Py_ssize_t i):
    if lines is None:
        return f"entries[{i}]"
    return f"line {lines[i]}"


@cython.final
cdef class Map:
    """An immutable map of one HAProxy match type, built from ``(key, value)`` entries
    in file order. See the module docstring for what matches and which entry wins.

    Build once (at config load or reload), then call ``lookup`` from the hot path: one
    call, no Python object made (``reg`` aside): the stored value is returned. A reload
    builds a new ``Map`` and swaps the reference: a request sees the old map or the new
    one, never a mix.

    Raises ``ConfigError`` (source, ``entries[i]``, message) for an unknown kind or a bad
    entry (bad CIDR, bad regular expression); ``TypeError`` if a key or value is not
    bytes."""

    cdef int _kind
    cdef bint _ignore_case
    cdef list _keys
    cdef list _values
    cdef object _lines
    cdef str _source
    cdef _Trie _trie
    cdef _IPTrie _v4
    cdef _IPTrie _v6
    cdef _RegSet _reg

    def __init__(self, str kind not None, entries, *, bint ignore_case=False,
                 str source not None="<entries>"):
        self._build(kind, list(entries), ignore_case, source, None)

    cdef int _build(self, str kind, list entries, bint ignore_case, str source,
                    object lines) except -1:
        cdef Py_ssize_t i, n = len(entries)
        cdef list keys = []
        cdef list values = []
        cdef list problems = []
        cdef dict first
        cdef bytes k, v, nk
        cdef int fam = 0, plen = 0
        cdef uint64_t hi = 0, lo = 0
        kid = _KIND_IDS.get(kind)
        if kid is None:
            raise ConfigError([(source, "kind", f"unknown match type {kind!r}; expected "
                                f"one of {', '.join(KINDS)}")])
        self._kind = kid
        self._ignore_case = ignore_case
        self._source = source
        self._lines = lines
        for i in range(n):
            k, v = entries[i]
            keys.append(k)
            values.append(v)
        self._keys = keys
        self._values = values

        if self._kind == K_IP:
            self._v4 = _IPTrie()
            self._v6 = _IPTrie()
            self._v4.init(n, 32)
            self._v6.init(n, 128)
            for i in range(n):
                k = <bytes>PyList_GET_ITEM(keys, i)
                fam = _parse_cidr(PyBytes_AS_STRING(k), PyBytes_GET_SIZE(k), &hi, &lo, &plen)
                if fam == 4:
                    self._v4.insert(hi, lo, plen, <int32_t>i)
                elif fam == 6:
                    self._v6.insert(hi, lo, plen, <int32_t>i)
                elif fam == E_MASK:
                    problems.append((source, _where(lines, i),
                                     f"IPv4 mask is not contiguous: {k!r}"))
                elif fam == E_LEN:
                    problems.append((source, _where(lines, i), f"bad prefix length: {k!r}"))
                else:
                    problems.append((source, _where(lines, i),
                                     f"not an IPv4/IPv6 address or CIDR: {k!r}"))
            if problems:
                raise ConfigError(problems)
            return 0

        if self._kind == K_REG:
            regs = []
            factors = []
            for i in range(n):
                k = <bytes>PyList_GET_ITEM(keys, i)
                try:
                    rx, fac = _compile_reg(k, ignore_case)
                except (re.error, OverflowError, RecursionError, ValueError) as e:
                    problems.append((source, _where(lines, i),
                                     f"bad regular expression {k!r}: {e}"))
                    continue
                regs.append(rx)
                factors.append(fac)
            if problems:
                raise ConfigError(problems)
            self._reg = _RegSet()
            self._reg.build(regs, factors, ignore_case)
            return 0

        # String tries: normalize, keep the first index of each distinct key.
        first = {}
        for i in range(n):
            k = <bytes>PyList_GET_ITEM(keys, i)
            nk = k.lower() if ignore_case else k
            if self._kind == K_END:
                nk = nk[::-1]
            elif self._kind == K_DIR or self._kind == K_DOM:
                nk = nk.strip(b"/?" if self._kind == K_DIR else b"/?.:")
                if not nk:
                    continue        # only delimiters: matches nothing (as in HAProxy)
            if nk not in first:
                first[nk] = i
        sk = sorted(first)
        self._trie = _Trie()
        self._trie.build(sk, [first[x] for x in sk], self._kind != K_SUB)
        if self._kind == K_SUB:
            self._trie.link(True)
        return 0

    cdef Py_ssize_t _find(self, bytes key) except -2:
        cdef const uint8_t* q = <const uint8_t*>PyBytes_AS_STRING(key)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(key)
        cdef const uint8_t* tab = IDENT
        cdef int kind = self._kind
        cdef uint8_t sbuf[STACK_KEY]
        cdef uint8_t* buf
        cdef Py_ssize_t i
        cdef int32_t r
        cdef uint64_t hi = 0, lo = 0
        cdef int fam
        if self._ignore_case:
            tab = LOWER
        if kind == K_STR:
            return _walk_exact(self._trie, q, n, tab)
        if kind == K_BEG:
            if self._ignore_case:
                return _walk_lowest(self._trie, q, 0, n, tab, NULL, -1)
            return _walk_longest(self._trie, q, n, tab)
        if kind == K_DIR:
            return _walk_words(self._trie, q, n, tab, DIR_DELIM)
        if kind == K_DOM:
            return _walk_words(self._trie, q, n, tab, DOM_DELIM)
        if kind == K_SUB:
            return _scan_sub(self._trie, q, n, tab)
        if kind == K_END:
            if n <= STACK_KEY:
                buf = sbuf
            else:
                buf = <uint8_t*>_alloc(n, 1)
            try:
                for i in range(n):
                    buf[i] = tab[q[n - 1 - i]]
                r = _walk_lowest(self._trie, buf, 0, n, IDENT, NULL, -1)
            finally:
                if buf != &sbuf[0]:
                    PyMem_Free(buf)
            return r
        if kind == K_IP:
            fam = _parse_addr(<const char*>q, n, &hi, &lo)
            if fam == 4:
                r = self._v4.longest(hi, lo)
                if r < 0:
                    r = self._v6.longest(V4MAPPED_HI, V4MAPPED_LO | (hi >> 32))
                return r
            if fam == 6:
                r = self._v6.longest(hi, lo)
                if r < 0 and hi == V4MAPPED_HI and (lo >> 32) == (V4MAPPED_LO >> 32):
                    r = self._v4.longest((lo & 0xFFFFFFFF) << 32, 0)
                return r
            return -1
        return self._reg.find(key, self._ignore_case)

    def lookup(self, bytes key not None):
        """The winning entry's value, or None. Never raises for a bytes key."""
        cdef Py_ssize_t i = self._find(key)
        if i < 0:
            return None
        return <object>PyList_GET_ITEM(self._values, i)

    def lookup_index(self, bytes key not None):
        """The winning entry's index in file order, or -1."""
        return self._find(key)

    def entry(self, Py_ssize_t index):
        """``(key, value)`` of entry ``index`` as given (not case-folded)."""
        return (self._keys[index], self._values[index])

    def location(self, Py_ssize_t index):
        """Where entry ``index`` came from, as ConfigError names it: ``(source,
        "line N")`` for a map file, ``(source, "entries[i]")`` otherwise."""
        if index < 0 or index >= len(self._keys):
            raise IndexError(index)
        return (self._source, _where(self._lines, index))

    @property
    def kind(self):
        return KINDS[self._kind]

    @property
    def ignore_case(self):
        return bool(self._ignore_case)

    @property
    def source(self):
        return self._source

    def __len__(self):
        return len(self._keys)

    def __repr__(self):
        return (f"<Map {KINDS[self._kind]}{' -i' if self._ignore_case else ''} "
                f"{len(self._keys)} entries from {self._source}>")


# ---------------------------------------------------------------------------------------
# HAProxy map files


def parse_map(bytes data not None, str kind not None, *, bint ignore_case=False,
              str source not None="<map>"):
    """Build a Map from the bytes of an HAProxy-format map file.

    One entry per line: leading spaces and tabs are skipped; the key is the first run
    of bytes up to a space, tab, CR or LF; the value is the rest of the line with the
    surrounding spaces and tabs removed (empty for a key-only line, as in ACL files).
    Blank lines and lines whose first non-blank byte is ``#`` are skipped; a CR ends the
    line (CRLF files). Raises ConfigError with (source, "line N", message) for every bad
    line: a NUL byte, or a key the match type refuses (bad CIDR, bad regex)."""
    cdef list entries = []
    cdef list lines = []
    cdef list problems = []
    cdef Py_ssize_t lineno = 0, cut
    cdef bytes line, rest
    for line in data.split(b"\n"):
        lineno += 1
        cut = line.find(b"\r")
        if cut >= 0:
            line = line[:cut]
        line = line.lstrip(b" \t")
        if not line or line[0] == 0x23:     # '#'
            continue
        if b"\0" in line:
            problems.append((source, f"line {lineno}", "NUL byte in line"))
            continue
        cut = len(line)
        for sep in (line.find(b" "), line.find(b"\t")):
            if 0 <= sep < cut:
                cut = sep
        rest = line[cut:].strip(b" \t")
        entries.append((line[:cut], rest))
        lines.append(lineno)
    m = Map.__new__(Map)
    try:
        (<Map>m)._build(kind, entries, ignore_case, source, lines)
    except ConfigError as e:
        problems.extend(e.problems)
    if problems:
        problems.sort(key=lambda p: int(p[1][5:]) if p[1].startswith("line ") else 0)
        raise ConfigError(problems)
    return m


def load_map_file(path, str kind not None, bint ignore_case=False):
    """Read an HAProxy-format map file and build a Map (see ``parse_map``).

    The one function of the core that does I/O: a single read of the whole file,
    meant for config load and reload, never the hot path. Raises ConfigError (path,
    "line N", message) for bad lines and (path, "file", message) if it cannot be read."""
    source = os.fsdecode(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError([(source, "file", f"cannot read map file: {e.strerror or e}")])
    return parse_map(data, kind, ignore_case=ignore_case, source=source)
