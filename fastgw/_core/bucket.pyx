# cython: language_level=3, freethreading_compatible=False
"""Token buckets keyed by bytes: "allowed" or "wait this long", in exact integer math.

Strategy. A bucket is GCRA state (the generic cell rate algorithm of ITU-T I.371, the
form of the token bucket that needs one number per key): its "theoretical arrival time"
``tat``, in integer nanoseconds. With ``interval`` = ns per token and ``tau`` = burst x
interval (both integers, see "Rounding"), a take of ``cost`` tokens at ``now`` is

    base = max(tat, now)
    allowed  iff  base + cost * interval - tau <= now      then  tat = base + cost * interval
    else the wait is  base + cost * interval - tau - now   and nothing is taken

``tat <= now`` means a full bucket (``burst`` tokens); ``tat - now`` is the debt: the time
the bucket needs to be full again, ``(tat - now) / interval`` tokens. A refused take
changes nothing, so asking again after the wait succeeds (if nobody took in between).
``cost`` over ``burst`` can never pass: ``take`` answers ``inf`` and stores nothing.

No drift. ``now`` is rounded to the ns grid once per call and the state only ever moves by
integer additions of ``cost * interval``: there is no accumulated rounding, so after any
number of calls the state is exactly what the formula says, and the bucket grants at most
``burst + elapsed / interval`` tokens over any window, exactly (the tests check it with
integer math on generated sequences). The one rounding is the rate itself, below.

Rounding. ``interval = ceil(1e9 / rate)`` and ``tau = floor(burst * interval)``, computed
exactly from the doubles (128-bit integer math on their mantissas, not float division).
So the enforced rate is ``1e9 / interval <= rate`` and the grid never grants in the
caller's favour; it is exactly ``rate`` whenever 1e9 / rate is a whole number of ns (10/s,
1000/s, 0.5/s), and otherwise slower by less than one ns per token (a relative
``rate / 1e9``: one token in a million at 1000/s). A rate that a double cannot hold, such
as 1/60, is rounded by the double first: 1/60 comes out at 60000000001 ns a token.

Policy changes (config reload). Each bucket remembers the (rate, burst) it was last taken
under (a 16-bit id into a small table of policies). The first take that comes with another
policy, allowed or not, converts the bucket once: its debt is kept in tokens, not in time
(``debt_ns`` is rescaled by ``new_interval / old_interval``, rounded up) and capped at the
new ``tau`` (never emptier than empty). So a reload never refills a bucket: a drained
caller whose rate is lowered stays drained, and a higher burst adds capacity, not the
tokens already spent. (Keeping the raw ``tat`` instead would keep the time-to-full, which
hands a drained caller most of its burst back when its rate is lowered.) The core does not
know when the reload happened: until the key's next take its bucket refills under the old
policy, which is what the caller would have seen had the reload come at that take. One
key is meant to have one policy at a time; a key used under alternating policies is
converted at every switch, rounding up each time. ``peek`` and ``remaining`` answer as if
the conversion happened at their ``now`` and store nothing.

Table. Open addressing with linear probing over 64-byte slots (one cache line each): a
32-bit tag of the hash, the policy id, the key length, ``tat``, ``last_used`` and the key
itself inline when it has at most 40 bytes (an IPv6 address in text, a UUID, "sub:" + a
UUID); a longer key is copied to its own allocation. So a hit on a short key reads one
cache line of the table, and for a table larger than the CPU caches that one miss is the
cost floor (bench/bench_bucket.py measures it against a single random read). At a load of
0.8 a hit reads three slots on average, each a line of its own: the lookup prefetches the
three after the home slot, so their misses overlap (5-10% off a hit at 1M keys, measured
A/B on a shared 2-vCPU VM: 270-310 ns, against 200-300 ns for one random read). The keys are
copies, not references to Python bytes objects: a reference costs a second cache miss on
every hit, since the object lives elsewhere (measured with 49-byte keys, which take the
same path through a pointer: 445 ns a hit at 1M keys against 240 ns inline), plus about 60
bytes of object header per key, and the hash must be recomputable from the slot when
entries move. The hash is SipHash-1-3 (the one CPython uses for bytes) under a random
128-bit key per table, because keys such as client addresses or header values are chosen
by clients, and a predictable hash would let them build long probe chains. Deletion is
backward-shift (no tombstones). The table grows by doubling (each step a rehash in one
call: 55-125 ms measured for the last step on the way to 1M keys) up to the capacity that
holds ``max_keys`` at a load of 0.8, never beyond; with 1M keys that is 1.25M slots:
80 MB, plus 0.3 MB of summaries.

Eviction. At ``max_keys`` a new key evicts a full bucket (``tat <= now``: it loses
nothing, a new bucket for that key starts full anyway); if no bucket is full, the least
recently used one, whose debt is forgiven: that caller may take up to ``burst`` tokens at
once again, so a limit can leak by at most one burst per lossy eviction
(``statistics()["evictions_lossy"]`` counts them). A take that can never pass (``inf``)
and the read-only calls do not count as use. Both searches are exact and keep the hot
path to the one slot: per block of 64 slots the table keeps a lower bound of the ``tat``
and of the ``last_used`` of its buckets (and per 64 blocks a lower bound of those). A take
only raises ``tat`` (except when a reload lowers a debt, which lowers the bound too) and
``last_used``, so the bounds stay valid without being touched. The search for a full
bucket starts at the new key's home block and only opens blocks whose bound is
``<= now``; the LRU search opens the block of the smallest bound. A block whose bound
turns out stale is tightened to its exact minimum and the search goes on. Opening a
block reads 64 consecutive slots (4 KiB); a block can be stale only if a take raised the
value its bound came from, so the work is at most one block scan per earlier take,
amortized. Measured at 1M keys on a shared 2-vCPU VM: evicting a full bucket about 1 us;
an LRU eviction about 2 us median, but one eviction after a busy spell with no full bucket
may rescan much of the table (6 ms seen).

Shared tables. ``BucketTable(max_keys, path)`` keeps the table in the file ``path``,
mapped MAP_SHARED (fastgw/_core/shm.pyx), so that processes on one machine (the
``--workers`` of fastgw/supervisor.py) share every bucket: the slots at their full
capacity from the start (every page reserved when the file is made: 80.5 MB for 1M keys,
the same as a full private table), the block bounds, the policies (at most 4095 distinct
ones) and a ``Shared`` header holding the counters, the hash key and the lock. Every call
takes that lock, a spinlock on a word of the file (``fgw_shm_lock``), for the few hundred
ns of the call; a process that dies holding it is found out by its pid and the lock taken
over. Each process keeps its own map from (rate, burst) to policy id and re-reads the
file's policies when their count or generation (bumped by a renumbering) changed, so ids
stay common to all. A key over 40 bytes cannot point to memory of one process: the slot
keeps a 128-bit keyed digest of it instead (SipHash-1-3 under two more secret keys),
which ``keys()`` lists. The processes must agree on the time: pass CLOCK_MONOTONIC
(``time.monotonic()``), not trio's clock, which has a random offset per process. Every
process must open the file with the same ``max_keys``: another one re-initialises it (see
shm.pyx). Uncontended, the lock costs little: bench/bench_bucket.py measures a take on a
shared table within noise of a private one at 1k keys, and 5-15% slower at 1M keys (the
file's pages are not huge pages: more TLB misses); contended, the waiters spin, then
yield.

Time. ``now`` is a float of seconds (``trio.current_time()``), rounded to the nearest ns.
Between -2**61 and 2**61 ns (73 years) of range is accepted. Floats carry every ns up to
about 104 days (2**53 ns); past that the grid is coarser than the float, and the waits
returned are still ones after which the take succeeds.

Errors raised: ``ValueError`` for arguments no configuration may produce (a negative cost,
a rate or burst out of the bounds below, a non-finite ``now``, a key over 64 KiB),
``OverflowError`` for a cost that does not fit 64 bits, ``TypeError`` for a key that is not
bytes. All three are bugs in the caller: config validation must keep rate and burst within
``MIN_RATE_PER_S``..``MAX_RATE_PER_S`` and ``MAX_TAU_S``. ``MemoryError`` if the table
cannot grow. Nothing in this module is an HTTP error, so none of fastgw.errors applies.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from libc.math cimport INFINITY, isfinite, nextafter
from libc.stdint cimport INT64_MAX, int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset

import os
import struct

from fastgw._core.shm cimport SharedFile, fgw_shm_lock, fgw_shm_unlock
from fastgw._core.siphash cimport fgw_fastrange, fgw_siphash13

cdef extern from *:
    """
    #include <math.h>
    #include <stdint.h>
    #include <stdlib.h>
    #include <string.h>
    #include <sys/mman.h>

    /* ceil(1e9 / rate), exactly, for 1e-6 <= rate <= 1e9: rate = m * 2**e with m an
       integer under 2**53, so 1e9 / rate = 1e9 * 2**-e / m; the numerator stays under
       2**103 for these bounds. */
    static int64_t fgw_interval_ns(double rate) {
        int exp;
        double frac = frexp(rate, &exp);
        uint64_t m = (uint64_t)ldexp(frac, 53);
        int e = exp - 53;
        unsigned __int128 num, den, q;
        if (e <= 0) {
            num = ((unsigned __int128)1000000000u) << (-e);
            den = m;
        } else {
            num = 1000000000u;
            den = ((unsigned __int128)m) << e;
        }
        q = (num + den - 1) / den;
        return (int64_t)q;
    }

    /* floor(b * n) exactly for a finite b >= 0 and 0 < n < 2**60, or -1 when it is at
       least 2**62 (the caller's range check comes after). */
    static int64_t fgw_floor_mul(double b, int64_t n) {
        int exp;
        double frac;
        uint64_t m;
        int e;
        unsigned __int128 p;
        if (b == 0.0) return 0;
        frac = frexp(b, &exp);
        m = (uint64_t)ldexp(frac, 53);
        e = exp - 53;
        p = (unsigned __int128)m * (uint64_t)n;   /* < 2**113 */
        if (e >= 0) {
            if (e >= 15) return -1;                /* b * n >= 2**(52 + 15) */
            p <<= e;
        } else if (e > -128) {
            p >>= (-e);
        } else {
            p = 0;
        }
        if (p >= ((unsigned __int128)1 << 62)) return -1;
        return (int64_t)p;
    }

    /* ceil(x * num / den) for 0 <= x, num, den < 2**63, den > 0, capped at cap. */
    static inline int64_t fgw_rescale_ceil(int64_t x, int64_t num, int64_t den, int64_t cap) {
        unsigned __int128 p = (unsigned __int128)(uint64_t)x * (uint64_t)num;
        unsigned __int128 q = (p + (uint64_t)den - 1) / (uint64_t)den;
        if (q > (unsigned __int128)(uint64_t)cap) return cap;
        return (int64_t)q;
    }

    static inline int64_t fgw_to_ns(double s) { return (int64_t)llround(s * 1e9); }

    /* The slot array: cache-line aligned, and on transparent huge pages when large (one
       TLB entry per 2 MiB instead of per 4 KiB: fewer page walks on random access). */
    static void *fgw_alloc_slots(size_t nbytes) {
        void *p = NULL;
        size_t align = nbytes >= ((size_t)4 << 20) ? ((size_t)2 << 20) : 64;
        if (posix_memalign(&p, align, nbytes) != 0) return NULL;
    #ifdef MADV_HUGEPAGE
        if (align > 64) madvise(p, nbytes, MADV_HUGEPAGE);
    #endif
        memset(p, 0, nbytes);
        return p;
    }
    """
    int64_t fgw_interval_ns(double rate) noexcept nogil
    int64_t fgw_floor_mul(double b, int64_t n) noexcept nogil
    int64_t fgw_rescale_ceil(int64_t x, int64_t num, int64_t den, int64_t cap) noexcept nogil
    int64_t fgw_to_ns(double s) noexcept nogil
    void* fgw_alloc_slots(size_t nbytes) noexcept nogil
    void __builtin_prefetch(const void* p) noexcept nogil

# ---------------------------------------------------------------------------------------
# Bounds (mirrored in bucket.pyi). Each says where its number comes from.

# One token per 11.6 days at the slowest: slower limits are budgets (calendar windows,
# another mechanism). The bound also keeps the exact interval computation within 128 bits.
MIN_RATE_PER_S = 1e-6
# One token per ns: the grid.
MAX_RATE_PER_S = 1e9
# burst x interval (the time an empty bucket takes to fill) is at most 2**60 ns, 36 years:
# with |now| <= 2**61 ns, tat + cost x interval stays under 2**62 and nothing overflows.
MAX_TAU_S = 1152921504.606846976
# The key length is 16 bits in a slot; a key built from a request is far shorter (heads
# are capped at 32 KiB).
MAX_KEY_BYTES = 65535
# 2**28 keys is 21 GiB of slots; slot indexes and the policy table stay small.
MAX_KEYS_LIMIT = 1 << 28
# Keys up to this length live in the slot itself.
INLINE_KEY_BYTES = 40

cdef enum:
    INLINE = 40
    BLOCK_SHIFT = 6          # 64 slots per block, 64 blocks per super block
    BLOCK = 64
    MIN_CAP = 64
    MAX_POLICIES = 65535     # ids 1..65535; 0 marks an empty slot
    SHARED_POLICIES = 4096   # a shared table's policy array: ids 1..4095
    DIGEST = 16              # a long key in a shared table: a 128-bit keyed digest

cdef int64_t INF64 = INT64_MAX
cdef bytes SHARED_MAGIC = b"FGWBKT01"   # the file format of a shared table, version 1
cdef int64_t MAX_TAU_NS = (<int64_t>1) << 60
cdef double MAX_NOW_S = 2305843009.213693952

cdef struct Slot:
    uint32_t tag         # low 32 bits of the hash
    uint16_t policy      # 0: empty slot
    uint16_t klen
    int64_t tat          # ns
    int64_t last_used    # ns, the latest ``now`` of a take on this key
    unsigned char key[40]   # the key if klen <= 40, else a char* to a malloc'd copy

cdef struct Policy:
    double rate
    double burst
    int64_t interval     # ns per token
    int64_t tau          # burst x interval, ns
    int64_t max_cost     # tau // interval: the largest cost that can ever pass

cdef struct Shared:
    # The table-wide state: in the file for a shared table, else allocated.
    uint32_t lock        # fgw_shm_lock (shared tables only)
    uint32_t npol
    uint64_t pol_gen     # bumped when policy ids are renumbered
    uint64_t count
    uint64_t k0, k1      # hash key
    uint64_t k2, k3      # digest key (long keys of a shared table)
    uint64_t n_allowed, n_limited, n_evictions, n_evictions_lossy


cdef object _ZERO = 0.0
cdef object _INF = float("inf")


cdef inline const unsigned char* _slot_key(Slot* s, bint shared) noexcept nogil:
    cdef const unsigned char* p
    if s.klen <= INLINE or shared:
        return s.key
    memcpy(&p, s.key, sizeof(p))
    return p


cdef inline Py_ssize_t _stored_len(Slot* s, bint shared) noexcept nogil:
    # What the slot holds of its key: all of it, or a shared table's digest of a long key.
    return DIGEST if shared and s.klen > INLINE else s.klen


cdef double _wait_s(double now, int64_t now_ns, int64_t wait_ns) noexcept nogil:
    """The float ``w`` to return for a wait of ``wait_ns``: the take succeeds at any float
    time ``t >= now + w``. Usually ``wait_ns / 1e9``; when the float sum the caller will
    form, ``now + w``, would round to before the target (a ``now`` too large for the ns
    grid), it is found through the absolute target instead."""
    cdef int64_t target = now_ns + wait_ns
    cdef double w = <double>wait_ns / 1e9
    cdef double t
    if fgw_to_ns(now + w) >= target:
        return w
    t = <double>target / 1e9
    while fgw_to_ns(t) < target:
        t = nextafter(t, INFINITY)
    w = t - now
    while fgw_to_ns(now + w) < target:
        w = nextafter(w, INFINITY)
    return w


@cython.final
cdef class BucketTable:
    """A table of token buckets keyed by bytes, at most ``max_keys`` of them.

    Make one per worker (or per group of policies that share keys) and keep it across
    config reloads: a bucket keeps its debt when its rate or burst changes.
    """

    cdef Slot* slots
    cdef uint64_t cap            # slots
    cdef uint64_t cap_max
    cdef uint64_t _max_keys
    # Counters, the policy count and the hash key: in the file when shared.
    cdef Shared* sh
    cdef bint shared
    cdef SharedFile file
    cdef uint64_t k0, k1         # hash key
    # Lower bounds per block (64 slots) and per super block (64 blocks).
    cdef int64_t* blk_tat
    cdef int64_t* blk_lru
    cdef int64_t* sup_tat
    cdef int64_t* sup_lru
    cdef uint64_t nblk, nsup
    # Policies: ids 1..npol; a small open-addressing map (rate, burst) -> id.
    cdef Policy* pol
    cdef uint32_t pol_alloc, max_pid
    # The map covers policies 1..known_npol of generation pol_gen (another process may
    # have added or renumbered some since).
    cdef uint16_t* pmap
    cdef uint32_t pmap_cap, known_npol
    cdef uint64_t pol_gen
    cdef double last_rate, last_burst
    cdef uint32_t last_pid
    cdef uint64_t long_key_bytes

    def __cinit__(self, max_keys: int, path=None):
        cdef uint64_t mk
        if not 1 <= max_keys <= MAX_KEYS_LIMIT:
            raise ValueError(f"max_keys must be within 1..{MAX_KEYS_LIMIT}, not {max_keys}")
        mk = max_keys
        self._max_keys = mk
        # Load at most 0.8 when full (linear probing: about 3 slots read per hit at 0.8,
        # 1.5 at 0.5), rounded up to whole blocks.
        self.cap_max = ((mk * 5 + 3) // 4 + BLOCK - 1) // BLOCK * BLOCK
        if self.cap_max < MIN_CAP:
            self.cap_max = MIN_CAP
        self.last_rate = -1.0
        self.last_burst = -1.0
        self.pmap_cap = 32
        self.pmap = <uint16_t*>malloc(self.pmap_cap * sizeof(uint16_t))
        if self.pmap == NULL:
            raise MemoryError()
        memset(self.pmap, 0, self.pmap_cap * sizeof(uint16_t))
        if path is not None:
            self._open_shared(path)
        else:
            self.sh = <Shared*>malloc(sizeof(Shared))
            self.pol_alloc = 16
            self.pol = <Policy*>malloc(self.pol_alloc * sizeof(Policy))
            if self.sh == NULL or self.pol == NULL:
                raise MemoryError()
            memset(self.sh, 0, sizeof(Shared))
            _seed(self.sh)
            self.max_pid = MAX_POLICIES
            self._resize(MIN_CAP if MIN_CAP < self.cap_max else self.cap_max)
        self.k0 = self.sh.k0
        self.k1 = self.sh.k1

    cdef int _open_shared(self, path) except -1:
        """Map the table from ``path`` (see "Shared tables"): every slot up front, the
        policies, the block bounds and the ``Shared`` header in the file."""
        cdef uint64_t cap = self.cap_max, i
        cdef uint64_t nblk = (cap + BLOCK - 1) >> BLOCK_SHIFT
        cdef uint64_t nsup = (nblk + BLOCK - 1) >> BLOCK_SHIFT
        cdef size_t off_pol = (sizeof(Shared) + 63) // 64 * 64
        cdef size_t off_sum = off_pol + SHARED_POLICIES * sizeof(Policy)
        cdef size_t off_slots = (
            (off_sum + (nblk + nsup) * 2 * sizeof(int64_t) + 4095) // 4096 * 4096)
        cdef size_t total = off_slots + cap * sizeof(Slot)
        cdef unsigned char* base
        cdef SharedFile f
        shape = struct.pack("<QQII", self._max_keys, cap, sizeof(Slot), sizeof(Policy))
        f = SharedFile.open(path, total, SHARED_MAGIC, shape)
        base = f.region
        self.sh = <Shared*>base
        self.pol = <Policy*>(base + off_pol)
        self.pol_alloc = SHARED_POLICIES
        self.max_pid = SHARED_POLICIES - 1
        self.blk_tat = <int64_t*>(base + off_sum)
        self.blk_lru = self.blk_tat + nblk
        self.sup_tat = self.blk_lru + nblk
        self.sup_lru = self.sup_tat + nsup
        self.slots = <Slot*>(base + off_slots)
        self.cap = cap
        self.nblk = nblk
        self.nsup = nsup
        self.file = f
        self.shared = True
        if f.fresh:
            for i in range(nblk):
                self.blk_tat[i] = INF64
                self.blk_lru[i] = INF64
            for i in range(nsup):
                self.sup_tat[i] = INF64
                self.sup_lru[i] = INF64
            _seed(self.sh)
            f.publish()
        self.pol_gen = self.sh.pol_gen
        return 0

    @property
    def path(self):
        """The file of a shared table, None for a private one."""
        return self.file.path if self.shared else None

    def __dealloc__(self):
        cdef uint64_t i
        cdef const unsigned char* p
        free(self.pmap)
        if self.shared:
            return   # the mapping goes with self.file
        if self.slots != NULL:
            for i in range(self.cap):
                if self.slots[i].policy != 0 and self.slots[i].klen > INLINE:
                    p = _slot_key(&self.slots[i], False)
                    free(<void*>p)
            free(self.slots)
        free(self.blk_tat)
        free(self.blk_lru)
        free(self.sup_tat)
        free(self.sup_lru)
        free(self.pol)
        free(self.sh)

    # -----------------------------------------------------------------------------------
    # Public API

    @property
    def max_keys(self) -> int:
        return self._max_keys

    def take(self, bytes key not None, long long cost, double now, double rate_per_s,
             double burst):
        """Take ``cost`` tokens from ``key``'s bucket at time ``now`` (seconds), with the
        bucket's ``rate_per_s`` (tokens/s) and ``burst`` (tokens).

        Returns 0.0 when the tokens were taken; else the seconds to wait until they would
        be there (nothing is taken): a take of the same cost at any ``t >= now + wait``
        succeeds if nobody took in between. ``inf`` when ``cost > burst`` (never
        possible). A new key starts with a full bucket. Raises ValueError / OverflowError /
        TypeError on arguments that are bugs (see the module docstring)."""
        cdef int64_t now_ns = self._now_ns(now)
        cdef const unsigned char* k = <const unsigned char*>PyBytes_AS_STRING(key)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(key)
        if cost < 0:
            raise ValueError("cost must be >= 0")
        if n > MAX_KEY_BYTES:
            raise ValueError(f"key of {n} bytes: at most {MAX_KEY_BYTES}")
        cdef double w
        if not self.shared:
            w = self._take(k, n, cost, now, now_ns, rate_per_s, burst)
        else:
            fgw_shm_lock(&self.sh.lock)
            try:
                w = self._take(k, n, cost, now, now_ns, rate_per_s, burst)
            finally:
                fgw_shm_unlock(&self.sh.lock)
        if w == 0.0:
            return _ZERO
        return _INF if w == INFINITY else w

    cdef inline double _take(self, const unsigned char* k, Py_ssize_t n, long long cost,
                             double now, int64_t now_ns, double rate,
                             double burst) except? -1.0:
        cdef uint32_t pid = self._policy(rate, burst)
        cdef Policy* p = &self.pol[pid]
        cdef unsigned char dig[DIGEST]
        cdef uint64_t h
        cdef int64_t i, base, new_tat, wait_ns
        cdef Slot* s
        if cost > p.max_cost:
            self.sh.n_limited += 1
            return INFINITY
        h = self._hash(&k, &n, dig)
        i = self._find(k, n, h)
        if i < 0:
            # A new key: its bucket is full, and cost <= max_cost fits it.
            self.sh.n_allowed += 1
            if cost > 0:
                self._insert(k, n, h, pid, now_ns + cost * p.interval, now_ns)
            return 0.0
        s = &self.slots[i]
        if now_ns > s.last_used:
            s.last_used = now_ns
        if s.policy != pid:
            # A new policy applies from this take on, allowed or not: convert once.
            base = self._converted_tat(s, pid, now_ns)
            if base < s.tat:
                self._lowered(<uint64_t>i, base)
            s.tat = base
            s.policy = <uint16_t>pid
        base = s.tat if s.tat > now_ns else now_ns
        new_tat = base + cost * p.interval
        wait_ns = new_tat - p.tau - now_ns
        if wait_ns <= 0:
            s.tat = new_tat
            self.sh.n_allowed += 1
            return 0.0
        self.sh.n_limited += 1
        return _wait_s(now, now_ns, wait_ns)

    def peek(self, bytes key not None, long long cost, double now, double rate_per_s,
             double burst):
        """What ``take`` would answer, without taking anything, counting anything or
        touching the key's recency (so a peek never keeps a bucket from eviction)."""
        cdef int64_t now_ns = self._now_ns(now)
        if cost < 0:
            raise ValueError("cost must be >= 0")
        if not self.shared:
            return self._peek(key, cost, now, now_ns, rate_per_s, burst)
        fgw_shm_lock(&self.sh.lock)
        try:
            return self._peek(key, cost, now, now_ns, rate_per_s, burst)
        finally:
            fgw_shm_unlock(&self.sh.lock)

    cdef object _peek(self, bytes key, long long cost, double now, int64_t now_ns, double rate,
                      double burst):
        cdef uint32_t pid = self._policy(rate, burst)
        cdef Policy* p = &self.pol[pid]
        cdef int64_t i, wait_ns
        if cost > p.max_cost:
            return _INF
        i = self._find_key(key)
        if i < 0:
            return _ZERO
        wait_ns = self._base(&self.slots[i], pid, now_ns) + cost * p.interval - p.tau - now_ns
        if wait_ns <= 0:
            return _ZERO
        return _wait_s(now, now_ns, wait_ns)

    def remaining(self, bytes key not None, double now, double rate_per_s, double burst) -> int:
        """Whole tokens ``key`` could take at ``now`` (``burst`` rounded down for a key
        not in the table); for the RateLimit response field. Read-only, like ``peek``."""
        cdef int64_t now_ns = self._now_ns(now)
        if not self.shared:
            return self._remaining(key, now_ns, rate_per_s, burst)
        fgw_shm_lock(&self.sh.lock)
        try:
            return self._remaining(key, now_ns, rate_per_s, burst)
        finally:
            fgw_shm_unlock(&self.sh.lock)

    cdef int64_t _remaining(self, bytes key, int64_t now_ns, double rate, double burst) except? -1:
        cdef uint32_t pid = self._policy(rate, burst)
        cdef Policy* p = &self.pol[pid]
        cdef int64_t i, room
        i = self._find_key(key)
        if i < 0:
            return p.max_cost
        room = p.tau - (self._base(&self.slots[i], pid, now_ns) - now_ns)
        return room // p.interval if room > 0 else 0

    def statistics(self) -> dict:
        """A snapshot of the counters, all plain ints: ``keys``, ``max_keys``,
        ``allowed`` and ``limited`` (takes), ``evictions`` (all) and ``evictions_lossy``
        (of a bucket that was not full), ``slots`` and ``memory_bytes`` (what the table
        allocated: slots, summaries, policies, and the bytes of keys over 40 bytes,
        without the allocator's overhead for those). A shared table's counters are
        those of every process using it."""
        return {
            "keys": self.sh.count,
            "max_keys": self._max_keys,
            "allowed": self.sh.n_allowed,
            "limited": self.sh.n_limited,
            "evictions": self.sh.n_evictions,
            "evictions_lossy": self.sh.n_evictions_lossy,
            "slots": self.cap,
            "memory_bytes": self._memory_bytes(),
        }

    def __len__(self) -> int:
        return self.sh.count

    def __contains__(self, key) -> bool:
        if type(key) is not bytes:
            return False
        if not self.shared:
            return self._find_key(key) >= 0
        fgw_shm_lock(&self.sh.lock)
        try:
            return self._find_key(key) >= 0
        finally:
            fgw_shm_unlock(&self.sh.lock)

    def keys(self) -> list:
        """Every key in the table, in no particular order (for tests and the admin
        listener; it copies them all). A shared table lists a key over 40 bytes as its
        16-byte digest (it stores no more of it)."""
        cdef uint64_t i
        cdef list out = []
        cdef Slot* s
        if self.shared:
            fgw_shm_lock(&self.sh.lock)
        try:
            for i in range(self.cap):
                s = &self.slots[i]
                if s.policy != 0:
                    out.append(PyBytes_FromStringAndSize(
                        <const char*>_slot_key(s, self.shared), _stored_len(s, self.shared)))
        finally:
            if self.shared:
                fgw_shm_unlock(&self.sh.lock)
        return out

    # -----------------------------------------------------------------------------------
    # Keys

    cdef inline uint64_t _hash(self, const unsigned char** k, Py_ssize_t* n,
                               unsigned char* dig) noexcept:
        """The hash of key ``*k``; in a shared table a key over 40 bytes is replaced by
        its digest (``*k`` then points at ``dig``, and ``*n`` says 41, the length a
        digest slot records): the slot holds only that, and lookups compare it."""
        if self.shared and n[0] > INLINE:
            _digest(self.sh, k[0], n[0], dig)
            k[0] = dig
            n[0] = INLINE + 1   # the length every digest slot records
            return fgw_siphash13(self.k0, self.k1, dig, DIGEST)
        return fgw_siphash13(self.k0, self.k1, k[0], <size_t>n[0])

    cdef int64_t _find_key(self, bytes key) noexcept:
        cdef const unsigned char* k = <const unsigned char*>PyBytes_AS_STRING(key)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(key)
        cdef unsigned char dig[DIGEST]
        cdef uint64_t h = self._hash(&k, &n, dig)
        return self._find(k, n, h)

    # -----------------------------------------------------------------------------------
    # Policies and time

    cdef inline int64_t _now_ns(self, double now) except? -1:
        if not (-MAX_NOW_S <= now <= MAX_NOW_S):   # also false for NaN
            raise ValueError(f"now={now!r} is not a time within +-2**61 ns")
        return fgw_to_ns(now)

    cdef inline uint32_t _policy(self, double rate, double burst) except 0:
        # The last policy, compared as doubles: NaN never matches and goes to the checks.
        if rate == self.last_rate and burst == self.last_burst and self.pol_gen == self.sh.pol_gen:
            return self.last_pid
        return self._policy_slow(rate, burst)

    cdef uint32_t _policy_slow(self, double rate, double burst) except 0:
        cdef uint64_t hb
        cdef uint32_t j, pid
        cdef int64_t interval, tau
        cdef Policy* p
        if not (MIN_RATE_PER_S <= rate <= MAX_RATE_PER_S):
            raise ValueError(
                f"rate={rate!r}: a rate is within {MIN_RATE_PER_S}..{MAX_RATE_PER_S} per s")
        if not (isfinite(burst) and burst >= 0.0):
            raise ValueError(f"burst={burst!r}: a burst is a finite number >= 0")
        if burst == 0.0:
            burst = 0.0   # -0.0 and 0.0 are one policy
        interval = fgw_interval_ns(rate)
        tau = fgw_floor_mul(burst, interval)
        if tau < 0 or tau > MAX_TAU_NS:
            raise ValueError(
                f"burst={burst!r} at rate={rate!r} takes over {MAX_TAU_S} s to fill")
        if self.pol_gen != self.sh.pol_gen or self.known_npol != self.sh.npol:
            # Another process (of a shared table) added or renumbered policies.
            self._rebuild_pmap(self.pmap_cap)
        hb = self._pol_hash(rate, burst)
        j = <uint32_t>(hb & (self.pmap_cap - 1))
        while self.pmap[j] != 0:
            p = &self.pol[self.pmap[j]]
            if p.rate == rate and p.burst == burst:
                pid = self.pmap[j]
                break
            j = (j + 1) & (self.pmap_cap - 1)
        else:
            pid = self._add_policy(rate, burst, interval, tau)
        self.last_rate = rate
        self.last_burst = burst
        self.last_pid = pid
        return pid

    cdef inline uint64_t _pol_hash(self, double rate, double burst) noexcept:
        cdef uint64_t a, b
        memcpy(&a, &rate, 8)
        memcpy(&b, &burst, 8)
        a = (a ^ (b * 0x9E3779B97F4A7C15ULL)) * 0xBF58476D1CE4E5B9ULL
        return a ^ (a >> 31)

    cdef uint32_t _add_policy(self, double rate, double burst, int64_t interval,
                              int64_t tau) except 0:
        cdef uint32_t pid, j
        cdef Policy* grown
        if self.sh.npol == self.max_pid:
            self._collect_policies()
            if self.sh.npol == self.max_pid:
                raise ValueError(f"over {self.max_pid} distinct (rate, burst) pairs in use")
        if self.sh.npol + 1 >= self.pol_alloc:
            grown = <Policy*>realloc(self.pol, 2 * self.pol_alloc * sizeof(Policy))
            if grown == NULL:
                raise MemoryError()
            self.pol = grown
            self.pol_alloc *= 2
        self.sh.npol += 1
        pid = self.sh.npol
        self.pol[pid].rate = rate
        self.pol[pid].burst = burst
        self.pol[pid].interval = interval
        self.pol[pid].tau = tau
        self.pol[pid].max_cost = tau // interval
        if 2 * (self.sh.npol + 1) > self.pmap_cap:
            self._rebuild_pmap(2 * self.pmap_cap)
        else:
            self._pmap_put(pid)
            self.known_npol = self.sh.npol
        return pid

    cdef void _pmap_put(self, uint32_t pid) noexcept:
        cdef uint32_t j = <uint32_t>(
            self._pol_hash(self.pol[pid].rate, self.pol[pid].burst) & (self.pmap_cap - 1))
        while self.pmap[j] != 0:
            j = (j + 1) & (self.pmap_cap - 1)
        self.pmap[j] = <uint16_t>pid

    cdef int _rebuild_pmap(self, uint32_t new_cap) except -1:
        cdef uint16_t* m
        cdef uint32_t pid
        while 2 * (self.sh.npol + 1) > new_cap:
            new_cap *= 2
        m = <uint16_t*>malloc(new_cap * sizeof(uint16_t))
        if m == NULL:
            raise MemoryError()
        memset(m, 0, new_cap * sizeof(uint16_t))
        free(self.pmap)
        self.pmap = m
        self.pmap_cap = new_cap
        for pid in range(1, self.sh.npol + 1):
            self._pmap_put(pid)
        self.known_npol = self.sh.npol
        self.pol_gen = self.sh.pol_gen
        return 0

    cdef int _collect_policies(self) except -1:
        """Renumber the policies some bucket uses, and forget the others: only when the
        16-bit ids run out (a config would need 65535 distinct limits)."""
        cdef uint32_t* remap = <uint32_t*>malloc((MAX_POLICIES + 1) * sizeof(uint32_t))
        cdef uint64_t i
        cdef uint32_t pid, n = 0
        if remap == NULL:
            raise MemoryError()
        memset(remap, 0, (MAX_POLICIES + 1) * sizeof(uint32_t))
        for i in range(self.cap):
            if self.slots[i].policy != 0:
                remap[self.slots[i].policy] = 1
        for pid in range(1, self.sh.npol + 1):
            if remap[pid]:
                n += 1
                remap[pid] = n
                self.pol[n] = self.pol[pid]
        for i in range(self.cap):
            if self.slots[i].policy != 0:
                self.slots[i].policy = <uint16_t>remap[self.slots[i].policy]
        free(remap)
        self.sh.npol = n
        self.sh.pol_gen += 1
        self.last_rate = -1.0
        self.last_burst = -1.0
        self._rebuild_pmap(self.pmap_cap)
        return 0

    cdef inline int64_t _base(self, Slot* s, uint32_t pid, int64_t now_ns) noexcept:
        """``max(tat, now)`` in the terms of policy ``pid`` (for the read-only calls)."""
        cdef int64_t tat = s.tat
        if s.policy != pid:
            tat = self._converted_tat(s, pid, now_ns)
        return tat if tat > now_ns else now_ns

    cdef int64_t _converted_tat(self, Slot* s, uint32_t pid, int64_t now_ns) noexcept:
        """The ``tat`` of slot ``s`` moved to policy ``pid``: the debt (``tat - now``) is
        rescaled from the old interval to the new one, rounded up, and capped at the new
        ``tau``. A full bucket stays as it is."""
        cdef int64_t debt = s.tat - now_ns
        cdef Policy* p = &self.pol[pid]
        cdef Policy* old = &self.pol[s.policy]
        if debt <= 0:
            return s.tat
        if old.interval != p.interval:
            debt = fgw_rescale_ceil(debt, p.interval, old.interval, INF64)
        if debt > p.tau:
            debt = p.tau
        return now_ns + debt

    # -----------------------------------------------------------------------------------
    # The table

    cdef inline int64_t _find(self, const unsigned char* k, Py_ssize_t n, uint64_t h) noexcept:
        """The slot of key ``k`` or -1."""
        cdef uint64_t i = fgw_fastrange(h, self.cap)
        cdef uint32_t tag = <uint32_t>h
        cdef Slot* s
        if i + 3 < self.cap:
            __builtin_prefetch(&self.slots[i + 1])
            __builtin_prefetch(&self.slots[i + 2])
            __builtin_prefetch(&self.slots[i + 3])
        while True:
            s = &self.slots[i]
            if s.policy == 0:
                return -1
            if (s.tag == tag and s.klen == n
                    and memcmp(_slot_key(s, self.shared), k, _stored_len(s, self.shared)) == 0):
                return <int64_t>i
            i += 1
            if i == self.cap:
                i = 0

    cdef int _insert(self, const unsigned char* k, Py_ssize_t n, uint64_t h, uint32_t pid,
                     int64_t tat, int64_t now_ns) except -1:
        cdef uint64_t i, victim
        cdef int64_t found
        cdef unsigned char* copy = NULL
        cdef Slot* s
        if self.sh.count >= self._max_keys:
            found = self._find_full(now_ns, fgw_fastrange(h, self.cap))
            if found < 0:
                found = self._find_lru()
                self.sh.n_evictions_lossy += 1
            self.sh.n_evictions += 1
            self._delete(<uint64_t>found)
        elif (self.sh.count + 1) * 5 > self.cap * 4 and self.cap < self.cap_max:
            self._resize(_min_u64(self.cap * 2, self.cap_max))
        if n > INLINE and not self.shared:
            copy = <unsigned char*>malloc(n)
            if copy == NULL:
                raise MemoryError()
            memcpy(copy, k, n)
            self.long_key_bytes += <uint64_t>n
        i = fgw_fastrange(h, self.cap)
        while self.slots[i].policy != 0:
            i += 1
            if i == self.cap:
                i = 0
        s = &self.slots[i]
        s.tag = <uint32_t>h
        s.policy = <uint16_t>pid
        s.klen = <uint16_t>n
        s.tat = tat
        s.last_used = now_ns
        if copy == NULL:
            memcpy(s.key, k, DIGEST if n > INLINE else n)   # (a digest when n > INLINE)
        else:
            memcpy(s.key, &copy, sizeof(copy))
        self.sh.count += 1
        self._note(i, tat, now_ns)
        return 0

    cdef inline void _note(self, uint64_t i, int64_t tat, int64_t last_used) noexcept:
        """Slot ``i`` now holds these values: keep the lower bounds lower."""
        cdef uint64_t b = i >> BLOCK_SHIFT
        cdef uint64_t sb = b >> BLOCK_SHIFT
        if tat < self.blk_tat[b]:
            self.blk_tat[b] = tat
            if tat < self.sup_tat[sb]:
                self.sup_tat[sb] = tat
        if last_used < self.blk_lru[b]:
            self.blk_lru[b] = last_used
            if last_used < self.sup_lru[sb]:
                self.sup_lru[sb] = last_used

    cdef void _lowered(self, uint64_t i, int64_t tat) noexcept:
        # A reload lowered this bucket's debt; only then does a take lower a tat.
        self._note(i, tat, INF64)

    cdef inline uint64_t _home(self, Slot* s) noexcept:
        return fgw_fastrange(fgw_siphash13(
            self.k0, self.k1, _slot_key(s, self.shared), _stored_len(s, self.shared)), self.cap)

    cdef void _delete(self, uint64_t i) noexcept:
        """Empty slot ``i`` by backward shift: each later slot of the run moves back
        if its home allows, so lookups never need tombstones."""
        cdef uint64_t j = i, home
        cdef const unsigned char* p
        if self.slots[i].klen > INLINE and not self.shared:
            p = _slot_key(&self.slots[i], False)
            free(<void*>p)
            self.long_key_bytes -= self.slots[i].klen
        while True:
            j += 1
            if j == self.cap:
                j = 0
            if self.slots[j].policy == 0:
                break
            home = self._home(&self.slots[j])
            # Slot j may move to i when i lies cyclically in [home, j).
            if (j > i and (home <= i or home > j)) or (j < i and (home <= i and home > j)):
                self.slots[i] = self.slots[j]
                self._note(i, self.slots[i].tat, self.slots[i].last_used)
                i = j
        self.slots[i].policy = 0
        self.sh.count -= 1

    cdef int _resize(self, uint64_t new_cap) except -1:
        cdef Slot* old = self.slots
        cdef uint64_t old_cap = self.cap, i, j
        cdef Slot* fresh = <Slot*>fgw_alloc_slots(new_cap * sizeof(Slot))
        cdef uint64_t nblk = (new_cap + BLOCK - 1) >> BLOCK_SHIFT
        cdef uint64_t nsup = (nblk + BLOCK - 1) >> BLOCK_SHIFT
        cdef int64_t* bt = <int64_t*>malloc(nblk * sizeof(int64_t))
        cdef int64_t* bl = <int64_t*>malloc(nblk * sizeof(int64_t))
        cdef int64_t* st = <int64_t*>malloc(nsup * sizeof(int64_t))
        cdef int64_t* sl = <int64_t*>malloc(nsup * sizeof(int64_t))
        if fresh == NULL or bt == NULL or bl == NULL or st == NULL or sl == NULL:
            free(fresh)
            free(bt)
            free(bl)
            free(st)
            free(sl)
            raise MemoryError()
        for i in range(nblk):
            bt[i] = INF64
            bl[i] = INF64
        for i in range(nsup):
            st[i] = INF64
            sl[i] = INF64
        free(self.blk_tat)
        free(self.blk_lru)
        free(self.sup_tat)
        free(self.sup_lru)
        self.slots = fresh
        self.cap = new_cap
        self.blk_tat = bt
        self.blk_lru = bl
        self.sup_tat = st
        self.sup_lru = sl
        self.nblk = nblk
        self.nsup = nsup
        if old != NULL:
            for i in range(old_cap):
                if old[i].policy != 0:
                    j = self._home(&old[i])
                    while fresh[j].policy != 0:
                        j += 1
                        if j == new_cap:
                            j = 0
                    fresh[j] = old[i]
                    self._note(j, old[i].tat, old[i].last_used)
            free(old)
        return 0

    # -----------------------------------------------------------------------------------
    # Eviction searches

    cdef int64_t _find_full(self, int64_t now_ns, uint64_t near) noexcept:
        """A slot whose bucket is full (``tat <= now``), or -1 when there is none. The
        search starts at the block of slot ``near`` (the new key's home): an eviction
        frees a slot where the insertion will take one, so the load stays even across
        the table. (Searching from a cursor instead empties one region while the inserts
        fill the rest, whose probe runs then grow without bound.)"""
        cdef uint64_t step, sb, b, nb, k, off, i, i1, first
        cdef int64_t found = -1, m, sup_min
        cdef Slot* s
        first = near >> BLOCK_SHIFT
        sb = first >> BLOCK_SHIFT
        off = first - (sb << BLOCK_SHIFT)
        for step in range(self.nsup):
            if self.sup_tat[sb] <= now_ns:
                sup_min = INF64
                nb = _min_u64((sb + 1) << BLOCK_SHIFT, self.nblk) - (sb << BLOCK_SHIFT)
                for k in range(nb):
                    b = (sb << BLOCK_SHIFT) + (off + k) % nb
                    if found < 0 and self.blk_tat[b] <= now_ns:
                        m = INF64
                        i1 = _min_u64((b + 1) << BLOCK_SHIFT, self.cap)
                        for i in range(b << BLOCK_SHIFT, i1):
                            s = &self.slots[i]
                            if s.policy != 0:
                                if s.tat <= now_ns:
                                    found = <int64_t>i
                                    break
                                if s.tat < m:
                                    m = s.tat
                        if found < 0:
                            self.blk_tat[b] = m   # exact: every slot was read
                    if self.blk_tat[b] < sup_min:
                        sup_min = self.blk_tat[b]
                self.sup_tat[sb] = sup_min
                if found >= 0:
                    return found
            off = 0
            sb += 1
            if sb == self.nsup:
                sb = 0
        return -1

    cdef int64_t _find_lru(self) noexcept:
        """The slot with the smallest ``last_used`` (the table is not empty)."""
        cdef uint64_t sb, b, best_sb, best_b, b1, i, i1
        cdef int64_t m, best, bm
        cdef int64_t arg
        while True:
            best = INF64
            best_sb = 0
            for sb in range(self.nsup):
                if self.sup_lru[sb] < best:
                    best = self.sup_lru[sb]
                    best_sb = sb
            bm = INF64
            best_b = best_sb << BLOCK_SHIFT
            b1 = _min_u64((best_sb + 1) << BLOCK_SHIFT, self.nblk)
            for b in range(best_sb << BLOCK_SHIFT, b1):
                if self.blk_lru[b] < bm:
                    bm = self.blk_lru[b]
                    best_b = b
            if bm != best:
                # The super block's bound was looser than its blocks': tighten, look again.
                self.sup_lru[best_sb] = bm
                continue
            m = INF64
            arg = -1
            i1 = _min_u64((best_b + 1) << BLOCK_SHIFT, self.cap)
            for i in range(best_b << BLOCK_SHIFT, i1):
                if self.slots[i].policy != 0 and self.slots[i].last_used < m:
                    m = self.slots[i].last_used
                    arg = <int64_t>i
            if m == bm:
                # Exact, and no other block's lower bound is below it.
                return arg
            self.blk_lru[best_b] = m
            bm = INF64
            for b in range(best_sb << BLOCK_SHIFT, b1):
                if self.blk_lru[b] < bm:
                    bm = self.blk_lru[b]
            self.sup_lru[best_sb] = bm

    cdef uint64_t _memory_bytes(self) noexcept:
        return (self.cap * sizeof(Slot) + (self.nblk + self.nsup) * 2 * sizeof(int64_t)
                + self.pol_alloc * sizeof(Policy) + self.pmap_cap * sizeof(uint16_t)
                + self.long_key_bytes)


cdef inline uint64_t _min_u64(uint64_t a, uint64_t b) noexcept nogil:
    return a if a < b else b


cdef void _seed(Shared* sh) except *:
    """A new table's random hash and digest keys."""
    seed = os.urandom(32)
    sh.k0 = int.from_bytes(seed[:8], "little")
    sh.k1 = int.from_bytes(seed[8:16], "little")
    sh.k2 = int.from_bytes(seed[16:24], "little")
    sh.k3 = int.from_bytes(seed[24:], "little")


cdef inline void _digest(Shared* sh, const unsigned char* k, Py_ssize_t n,
                         unsigned char* out) noexcept:
    """128 bits of keyed hash: what a shared table keeps of a key over 40 bytes. Two
    keys share a digest with probability 2**-128 (the key is secret), so a long key's
    bucket is its own in every practical sense."""
    cdef uint64_t a = fgw_siphash13(sh.k2, sh.k3, k, <size_t>n)
    cdef uint64_t b = fgw_siphash13(sh.k3, sh.k2, k, <size_t>n)
    memcpy(out, &a, 8)
    memcpy(out + 8, &b, 8)
