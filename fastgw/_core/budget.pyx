# cython: language_level=3, freethreading_compatible=False
"""Budget counters keyed by bytes: "spent, this much is left" or "not enough left".

Strategy. A budget is a count of units (requests, or cost units) spent by one key in one
calendar window. The core does not know calendars or clocks: the caller passes a
``window`` id (an int64; fastgw passes the window's end in Unix seconds) and the
``limit``; each counter remembers the window it counts for, and a counter of an older
window (a smaller id) counts as zero. So a new window needs no sweep: the first spend in
it starts the counter over. Window ids of one key only move forward: a spend that comes
with an older id than the stored one (a worker whose clock is a hair behind another's
at a window's end) counts into the stored, newer window. ``spend`` either spends all of ``cost`` or
nothing (it answers -1 when ``cost`` is more than what is left): a budget never goes
over its limit, whatever the order of calls. The limit is not stored: a reload that
lowers it leaves the counter as it is, and nothing is left until the next window.

Table. A set-associative table of fixed size (the number of slots is fixed when the
table is made, so it can live in a file): a key's hash (SipHash-1-3 under a random
128-bit key, as in bucket.pyx, since keys are chosen by clients) picks a set of 8
64-byte slots, and the key lives in one of them. A key of up to 32 bytes is stored
inline; a longer one is stored as a 128-bit keyed digest of it (two SipHash-1-3 runs
under independent keys; a client who does not know the table's key cannot find two
keys with the same digest). A slot, once used, is only ever overwritten, never emptied,
so there is no deletion and no probe run crosses a set.

Eviction. A new key in a full set replaces the slot with the smallest window id there
(with fastgw's ids, window ends: a counter of a past window ends before any counter of
a current one, so counters that count for nothing go first), and of those the least
recently used (a stamp from a counter in the table). Evicting a counter of a current
window forgives what it spent (its key starts from zero): size ``max_keys`` above the
number of keys that spend in one window. Every eviction is counted.

Sharing. With a ``path``, the table is a ``MAP_SHARED`` mapping of that file: it
survives restarts, and every process that maps the same file (``--workers N``) spends
from the same counters. Each set has a 32-bit spinlock, shm.pxd's ``fgw_shm_lock`` (GCC
``__atomic`` builtins; the word holds the owner's pid and the lock of a process that
died is taken over), so a worker killed inside a spend does not wedge the others. (A write torn by such a death loses at most
that one counter: a slot's key length is written last.) The file opens with a header:
magic, version, geometry and the hash key, with a checksum over them; a file whose
header does not match what this build and this ``max_keys`` expect, or is damaged, is
replaced by a fresh one (a new file renamed over the old, so processes that still map
the old file keep a valid mapping) and ``reset_reason`` says why. (shm.pyx's
``SharedFile`` re-initialises a file in place and says only that it did, which suits a
table the supervisor sizes for its workers; a budget file outlives processes and
configs, so a changed ``max_keys`` must neither pull the file from under a process
still mapping it nor go unexplained.) It is never read as
counters. The file is in native byte order and meant for this machine. Without a
``path`` the table is anonymous memory of this process.

Errors raised: ``ValueError`` for arguments no configuration may produce (a negative
cost or limit, a key over 64 KiB, ``max_keys`` out of bounds), ``TypeError`` for a key
that is not bytes, ``OverflowError`` for a number that does not fit 64 bits; ``OSError``
when the file cannot be opened, sized or mapped. Nothing here is an HTTP error.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport INT64_MAX, int64_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from fastgw._core.shm cimport fgw_shm_lock, fgw_shm_unlock
from fastgw._core.siphash cimport fgw_fastrange, fgw_siphash13

import fcntl
import os

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <sys/mman.h>
    #include <sys/types.h>

    static inline uint64_t fgb_add(uint64_t *p, uint64_t v) {
        return __atomic_add_fetch(p, v, __ATOMIC_RELAXED);
    }

    static inline uint64_t fgb_load(uint64_t *p) {
        return __atomic_load_n(p, __ATOMIC_RELAXED);
    }

    static inline void fgb_store16(uint16_t *p, uint16_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }

    static void *fgb_map(int fd, size_t nbytes) {
        void *p = mmap(NULL, nbytes, PROT_READ | PROT_WRITE,
                       fd >= 0 ? MAP_SHARED : (MAP_PRIVATE | MAP_ANONYMOUS), fd, 0);
        return p == MAP_FAILED ? NULL : p;
    }

    static void fgb_unmap(void *p, size_t nbytes) {
        if (p != NULL) munmap(p, nbytes);
    }
    """
    uint64_t fgb_add(uint64_t* p, uint64_t v) noexcept nogil
    uint64_t fgb_load(uint64_t* p) noexcept nogil
    void fgb_store16(uint16_t* p, uint16_t v) noexcept nogil
    void* fgb_map(int fd, size_t nbytes) noexcept nogil
    void fgb_unmap(void* p, size_t nbytes) noexcept nogil

# ---------------------------------------------------------------------------------------
# Bounds and layout (mirrored in budget.pyi).

# The key length is 16 bits in a slot; keys built from a request are far shorter.
MAX_KEY_BYTES = 65535
# 2**28 keys is 16 GiB of slots.
MAX_KEYS_LIMIT = 1 << 28
# Keys up to this length are stored in the slot itself; longer ones as a 128-bit digest.
INLINE_KEY_BYTES = 32
# Slots per set: 8 slots of 64 bytes, 512 bytes read at most per call.
WAYS = 8
# Bumped whenever the file layout changes: an older file is then replaced, not misread.
FILE_VERSION = 1
# b"FGWBUDGT" read as a little-endian u64.
FILE_MAGIC = 0x5447445542574746

cdef enum:
    INLINE = 32
    NWAYS = 8
    HEADER_BYTES = 128

cdef struct Slot:
    uint32_t tag         # high 32 bits of the hash
    uint16_t klen        # 0: never used
    uint16_t flags
    int64_t window
    int64_t spent
    uint64_t used        # recency stamp
    unsigned char key[32]   # the key if klen <= 32, else its 16-byte digest

cdef struct Header:
    uint64_t magic
    uint32_t version
    uint32_t slot_bytes
    uint64_t nsets
    uint64_t ways
    uint64_t k0
    uint64_t k1
    uint64_t check       # a hash of the fields above
    # Shared counters (atomic, relaxed): statistics only.
    uint64_t tick
    uint64_t count
    uint64_t allowed
    uint64_t refused
    uint64_t evictions
    uint64_t pad[4]

# A fixed key for the header checksum: it detects damage, not tampering (whoever may
# write the file may write anything in it).
cdef uint64_t CHECK_K0 = 0x6661737467772d62ULL
cdef uint64_t CHECK_K1 = 0x75646765742d6869ULL
# Independent keys for the two halves of a long key's digest.
cdef uint64_t DIGEST_X0 = 0x9e3779b97f4a7c15ULL
cdef uint64_t DIGEST_X1 = 0xc2b2ae3d27d4eb4fULL

assert sizeof(Slot) == 64
assert sizeof(Header) == HEADER_BYTES


cdef uint64_t _header_check(Header* h) noexcept:
    return fgw_siphash13(CHECK_K0, CHECK_K1, <const unsigned char*>h, 48)


cdef void _init_header(Header* h, uint64_t nsets, bytes seed):
    memset(h, 0, HEADER_BYTES)
    h.magic = FILE_MAGIC
    h.version = FILE_VERSION
    h.slot_bytes = sizeof(Slot)
    h.nsets = nsets
    h.ways = NWAYS
    h.k0 = int.from_bytes(seed[:8], "little")
    h.k1 = int.from_bytes(seed[8:], "little")
    h.check = _header_check(h)


def _geometry(uint64_t max_keys):
    """(sets, bytes of locks, total bytes) for ``max_keys``."""
    cdef uint64_t nsets = (max_keys + NWAYS - 1) // NWAYS
    cdef uint64_t lock_bytes = (nsets * 4 + 63) // 64 * 64
    return nsets, lock_bytes, HEADER_BYTES + lock_bytes + nsets * NWAYS * sizeof(Slot)


@cython.final
cdef class BudgetTable:
    """Budget counters keyed by bytes, at most ``max_keys`` of them; in a file shared
    by processes when ``path`` is given. See the module docstring.

    Make one per gateway and keep it across config reloads."""

    cdef char* base
    cdef size_t nbytes
    cdef Header* hdr
    cdef uint32_t* locks
    cdef Slot* slots
    cdef uint64_t nsets
    cdef uint64_t k0, k1
    cdef bint shared
    cdef uint64_t _max_keys
    cdef object _path
    cdef object _reset_reason
    cdef bint _loaded

    def __cinit__(self, max_keys: int, path: str | None = None):
        cdef uint64_t mk, lock_bytes
        if not 1 <= max_keys <= MAX_KEYS_LIMIT:
            raise ValueError(f"max_keys must be within 1..{MAX_KEYS_LIMIT}, not {max_keys}")
        mk = max_keys
        self._max_keys = mk
        nsets, lb, total = _geometry(mk)
        lock_bytes = lb
        self.nsets = nsets
        self.nbytes = total
        self._path = None if path is None else os.fspath(path)
        self._reset_reason = None
        self._loaded = False
        if self._path is None:
            self.shared = False
            self.base = <char*>fgb_map(-1, self.nbytes)
            if self.base == NULL:
                raise MemoryError()
            _init_header(<Header*>self.base, self.nsets, os.urandom(16))
        else:
            self.shared = True
            self._open_file(self._path)
        self.hdr = <Header*>self.base
        self.locks = <uint32_t*>(self.base + HEADER_BYTES)
        self.slots = <Slot*>(self.base + HEADER_BYTES + lock_bytes)
        self.k0 = self.hdr.k0
        self.k1 = self.hdr.k1

    def __dealloc__(self):
        fgb_unmap(self.base, self.nbytes)
        self.base = NULL

    cdef str _problem(self, int fd):
        """Why the open file cannot be used as it is, or None."""
        cdef Header h
        size = os.fstat(fd).st_size
        if size < HEADER_BYTES:
            return f"file of {size} bytes is shorter than its header"
        raw = os.pread(fd, HEADER_BYTES, 0)
        if len(raw) != HEADER_BYTES:
            return "header could not be read"
        memcpy(&h, PyBytes_AS_STRING(raw), HEADER_BYTES)
        if h.magic != FILE_MAGIC:
            return "not a fastgw budget file (bad magic)"
        if h.version != FILE_VERSION or h.slot_bytes != sizeof(Slot) or h.ways != NWAYS:
            return f"file layout version {h.version}, this build reads {FILE_VERSION}"
        if h.check != _header_check(&h):
            return "header checksum mismatch (damaged file)"
        if h.nsets != self.nsets:
            return (f"file holds {h.nsets * NWAYS} slots, max_keys={self._max_keys} "
                    f"needs {self.nsets * NWAYS}")
        if size != self.nbytes:
            return f"file is {size} bytes, its header says {self.nbytes}"
        return None

    cdef int _open_file(self, str path) except -1:
        cdef int fd
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                # Another process may have replaced the file while we waited for it.
                st, cur = os.fstat(fd), os.stat(path)
                if (st.st_dev, st.st_ino) != (cur.st_dev, cur.st_ino):
                    continue
                if st.st_size == 0:
                    problem = None
                    self._fresh_file(fd)
                else:
                    problem = self._problem(fd)
                    if problem is None:
                        self._loaded = True
                    else:
                        self._reset_reason = problem
                        # A new file renamed over the old one: a process that still maps
                        # the old file keeps a valid mapping of it.
                        tmp = f"{path}.{os.getpid()}.tmp"
                        nfd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                      0o600)
                        try:
                            fcntl.flock(nfd, fcntl.LOCK_EX)
                            self._fresh_file(nfd)
                            os.fsync(nfd)
                            os.replace(tmp, path)
                        except BaseException:
                            os.close(nfd)
                            try:
                                os.unlink(tmp)
                            except OSError:
                                pass
                            raise
                        os.close(fd)
                        fd = nfd
                self.base = <char*>fgb_map(fd, self.nbytes)
                if self.base == NULL:
                    raise OSError(f"{path}: cannot map {self.nbytes} bytes")
                return 0
            finally:
                # Unlock explicitly: the mapping keeps the open file alive, and with it
                # a flock that only a close of the last reference would drop.
                try:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                finally:
                    os.close(fd)

    cdef int _fresh_file(self, int fd) except -1:
        """Size ``fd`` for this geometry (zeros: every slot unused) and write a header."""
        cdef Header h
        os.ftruncate(fd, 0)
        os.ftruncate(fd, self.nbytes)
        _init_header(&h, self.nsets, os.urandom(16))
        os.pwrite(fd, (<char*>&h)[:HEADER_BYTES], 0)
        return 0

    # -----------------------------------------------------------------------------------
    # Public API

    @property
    def max_keys(self) -> int:
        return self._max_keys

    @property
    def path(self):
        """The file, or None for anonymous memory."""
        return self._path

    @property
    def loaded(self) -> bool:
        """True when counters were read from an existing file."""
        return self._loaded

    @property
    def reset_reason(self):
        """Why an existing file was replaced by an empty one, or None."""
        return self._reset_reason

    def spend(self, bytes key not None, long long cost, long long window, long long limit):
        """Spend ``cost`` units of ``key``'s budget of ``limit`` units in ``window``.
        Returns what is left after the spend, or -1 when ``cost`` is more than what is
        left (nothing is spent). A cost of 0 spends nothing and answers what is left."""
        cdef const unsigned char* k = <const unsigned char*>PyBytes_AS_STRING(key)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(key)
        cdef unsigned char digest[16]
        cdef const unsigned char* cmp
        cdef uint64_t h, set_i
        cdef uint32_t tag
        cdef uint32_t* lock
        cdef Slot* s
        cdef Slot* base
        cdef Slot* victim
        cdef int64_t spent, left
        cdef int i
        if cost < 0:
            raise ValueError("cost must be >= 0")
        if limit < 0:
            raise ValueError("limit must be >= 0")
        if n > MAX_KEY_BYTES:
            raise ValueError(f"key of {n} bytes: at most {MAX_KEY_BYTES}")
        h = fgw_siphash13(self.k0, self.k1, k, <size_t>n)
        cmp = self._cmp_bytes(k, n, digest)
        set_i = fgw_fastrange(h, self.nsets)
        tag = <uint32_t>(h >> 32)
        base = &self.slots[set_i * NWAYS]
        lock = &self.locks[set_i]
        if self.shared:
            fgw_shm_lock(lock)
        s = self._find(base, tag, n, cmp)
        if s != NULL:
            if s.window >= window:
                # A caller whose clock is a little behind counts into the newer window.
                window = s.window
                spent = s.spent if s.spent > 0 else 0
            else:
                spent = 0
            left = limit - spent
            if cost > left:
                if self.shared:
                    fgw_shm_unlock(lock)
                fgb_add(&self.hdr.refused, 1)
                return -1
            if cost > 0:
                s.window = window
                s.spent = spent + cost
                s.used = fgb_add(&self.hdr.tick, 1)
            if self.shared:
                fgw_shm_unlock(lock)
            fgb_add(&self.hdr.allowed, 1)
            return left - cost
        if cost > limit:
            if self.shared:
                fgw_shm_unlock(lock)
            fgb_add(&self.hdr.refused, 1)
            return -1
        if cost > 0:
            victim = NULL
            for i in range(NWAYS):
                if base[i].klen == 0:
                    victim = &base[i]
                    break
            if victim == NULL:
                victim = base
                for i in range(1, NWAYS):
                    s = &base[i]
                    if s.window < victim.window or (
                            s.window == victim.window and s.used < victim.used):
                        victim = s
                fgb_add(&self.hdr.evictions, 1)
            else:
                fgb_add(&self.hdr.count, 1)
            # The length last: a torn write leaves an unused slot, not a wrong key.
            fgb_store16(&victim.klen, 0)
            victim.tag = tag
            victim.flags = 0
            victim.window = window
            victim.spent = cost
            victim.used = fgb_add(&self.hdr.tick, 1)
            memcpy(victim.key, cmp, n if n <= INLINE else 16)
            fgb_store16(&victim.klen, <uint16_t>n)
        if self.shared:
            fgw_shm_unlock(lock)
        fgb_add(&self.hdr.allowed, 1)
        return limit - cost

    def remaining(self, bytes key not None, long long window, long long limit) -> int:
        """What ``key`` may still spend in ``window`` (``limit`` for a key not in the
        table, 0 when a lowered limit is below what was spent). Changes nothing."""
        cdef int64_t spent = self._spent(key, window)
        if limit < 0:
            raise ValueError("limit must be >= 0")
        return limit - spent if spent < limit else 0

    def refund(self, bytes key not None, long long cost, long long window) -> None:
        """Give back ``cost`` units spent in ``window`` (a request refused by a later
        budget spends nothing); never below zero, and nothing for another window."""
        cdef const unsigned char* k = <const unsigned char*>PyBytes_AS_STRING(key)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(key)
        cdef unsigned char digest[16]
        cdef const unsigned char* cmp
        cdef uint64_t h, set_i
        cdef Slot* s
        if cost < 0:
            raise ValueError("cost must be >= 0")
        if n > MAX_KEY_BYTES:
            raise ValueError(f"key of {n} bytes: at most {MAX_KEY_BYTES}")
        h = fgw_siphash13(self.k0, self.k1, k, <size_t>n)
        cmp = self._cmp_bytes(k, n, digest)
        set_i = fgw_fastrange(h, self.nsets)
        if self.shared:
            fgw_shm_lock(&self.locks[set_i])
        s = self._find(&self.slots[set_i * NWAYS], <uint32_t>(h >> 32), n, cmp)
        if s != NULL and s.window >= window:
            s.spent = s.spent - cost if s.spent > cost else 0
        if self.shared:
            fgw_shm_unlock(&self.locks[set_i])

    def statistics(self) -> dict:
        """A snapshot of the counters, all plain ints: ``keys`` (slots in use),
        ``max_keys``, ``slots``, ``allowed`` and ``refused`` (spends), ``evictions``,
        ``file_bytes`` (the mapping's size). With a file, the counts are those of every
        process that maps it."""
        return {
            "keys": fgb_load(&self.hdr.count),
            "max_keys": self._max_keys,
            "slots": self.nsets * NWAYS,
            "allowed": fgb_load(&self.hdr.allowed),
            "refused": fgb_load(&self.hdr.refused),
            "evictions": fgb_load(&self.hdr.evictions),
            "file_bytes": self.nbytes,
        }

    def __len__(self) -> int:
        return fgb_load(&self.hdr.count)

    # -----------------------------------------------------------------------------------
    # Internals

    cdef inline const unsigned char* _cmp_bytes(self, const unsigned char* k, Py_ssize_t n,
                                                unsigned char* digest) noexcept:
        """What a slot stores for this key: the key itself, or its 16-byte digest."""
        cdef uint64_t d0, d1
        if n <= INLINE:
            return k
        d0 = fgw_siphash13(self.k0 ^ DIGEST_X0, self.k1, k, <size_t>n)
        d1 = fgw_siphash13(self.k0, self.k1 ^ DIGEST_X1, k, <size_t>n)
        memcpy(digest, &d0, 8)
        memcpy(digest + 8, &d1, 8)
        return digest

    cdef inline Slot* _find(self, Slot* base, uint32_t tag, Py_ssize_t n,
                            const unsigned char* cmp) noexcept:
        """The slot of the key in its set, or NULL. Every slot of the set is looked at
        (an unused slot does not end the search: a torn write may leave one anywhere)."""
        cdef int i
        cdef Slot* s
        cdef size_t m = n if n <= INLINE else 16
        for i in range(NWAYS):
            s = &base[i]
            if s.tag == tag and s.klen == n and memcmp(s.key, cmp, m) == 0:
                return s
        return NULL

    cdef int64_t _spent(self, bytes key, int64_t window) except -2:
        cdef const unsigned char* k = <const unsigned char*>PyBytes_AS_STRING(key)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(key)
        cdef unsigned char digest[16]
        cdef const unsigned char* cmp
        cdef uint64_t h, set_i
        cdef Slot* s
        cdef int64_t spent = 0
        if n > MAX_KEY_BYTES:
            raise ValueError(f"key of {n} bytes: at most {MAX_KEY_BYTES}")
        h = fgw_siphash13(self.k0, self.k1, k, <size_t>n)
        cmp = self._cmp_bytes(k, n, digest)
        set_i = fgw_fastrange(h, self.nsets)
        if self.shared:
            fgw_shm_lock(&self.locks[set_i])
        s = self._find(&self.slots[set_i * NWAYS], <uint32_t>(h >> 32), n, cmp)
        if s != NULL and s.window >= window and s.spent > 0:
            spent = s.spent
        if self.shared:
            fgw_shm_unlock(&self.locks[set_i])
        return spent
