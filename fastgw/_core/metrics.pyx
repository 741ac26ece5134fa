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
