# cython: language_level=3
"""A file mapped MAP_SHARED by the processes of one machine: state (rate-limit buckets,
budgets) that every ``--workers`` process reads and writes in place, without a Python
object or a message on the way.

Strategy. ``SharedFile.open(path, size_bytes, magic, shape)`` maps a file of one header
page plus ``size_bytes``. The header names the user (``magic``, 8 bytes, a format
version included), this module's own format and the user's ``shape`` (up to 32 bytes:
capacity, record size, anything that changes the layout). An open that finds the file
missing, of another size or with another header zeroes it and reports ``fresh``: the
caller initialises its region and calls ``publish()``, which writes the header last.
Opens serialise on ``flock`` of the file, held by a fresh open until ``publish()``, so
a second process never sees a half-initialised region, and a process that dies while
initialising leaves no header: the next open starts over. A file of a mismatched
layout is thus re-initialised, never misread. Re-initialising a file another process
still has mapped with its old layout would pull the state from under it (and a shrunk
file raises SIGBUS there): every process of a group must open with the same shape,
which is why the supervisor gives its workers the size to use.

Concurrency inside the region is the user's: ``shm.pxd`` declares ``fgw_shm_lock`` and
``fgw_shm_unlock``, a spinlock on a 32-bit word of the region (GCC ``__atomic``
builtins, the owner's pid in the word so that a lock held by a process that died is
taken over). Keep critical sections to a few hundred ns: waiters spin.

Use it from another core module (``budget.pyx``, say)::

    from fastgw._core.shm cimport SharedFile, fgw_shm_lock, fgw_shm_unlock

    f = SharedFile.open(path, nbytes, b"FGWBUD01", shape_bytes)
    region = (<SharedFile>f).region       # page aligned, zeroed when fresh
    if f.fresh:
        ...initialise...
        f.publish()
    # keep a reference to f for as long as region is used; the mapping goes with it

and add the module to setup.py. The mapping is MAP_SHARED over a file: put it on
tmpfs (/dev/shm), or the kernel writes the pages back to disk now and then. A fresh
file's pages are all allocated at open (``posix_fallocate``): a file system without
room for them fails the open, not a later write (which would be SIGBUS).
"""

import fcntl
import os
import struct

from libc.string cimport memcpy

cdef extern from "<sys/mman.h>" nogil:
    void* mmap(void* addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void* addr, size_t length)
    int PROT_READ
    int PROT_WRITE
    int MAP_SHARED
    void* MAP_FAILED

cdef extern from *:
    void __sync_synchronize() noexcept nogil

# One page: the user's region starts page aligned.
cdef enum:
    HEADER = 4096
HEADER_BYTES = HEADER
# This module's own layout of the header; bump it when the header changes.
FORMAT = 1
_HEAD = struct.Struct("<8sIIQ32s")


cdef class SharedFile:
    """A mapping of ``path``; see the module docstring. Unmapped when collected."""

    def __cinit__(self):
        self.fd = -1
        self.base = NULL

    @staticmethod
    def open(path, Py_ssize_t size_bytes, bytes magic not None, bytes shape not None):
        cdef SharedFile self = SharedFile.__new__(SharedFile)
        cdef void* p
        if len(magic) != 8 or len(shape) > 32 or size_bytes <= 0:
            raise ValueError("magic is 8 bytes, shape at most 32, size_bytes > 0")
        self.path = os.fspath(path)
        self.size_bytes = size_bytes
        self.total = <size_t>(HEADER + size_bytes)
        self.header = _HEAD.pack(magic, FORMAT, 0, self.total, shape)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            st = os.fstat(self.fd)
            found = os.pread(self.fd, _HEAD.size, 0) if st.st_size == self.total else b""
            self.fresh = found != self.header
            if self.fresh:
                # Zeroed by dropping every page: new pages read as zeros, and stay
                # unallocated until written (tmpfs). Header first: a crash from here on
                # leaves a file that reads as fresh.
                os.ftruncate(self.fd, 0)
                os.ftruncate(self.fd, self.total)
                # Every page reserved now: a file system that runs out of room later
                # (a small /dev/shm in a container) would raise SIGBUS at a write to
                # the mapping; here it is an OSError at open.
                try:
                    os.posix_fallocate(self.fd, 0, self.total)
                except OSError as e:
                    os.ftruncate(self.fd, 0)
                    raise OSError(
                        e.errno, f"no room for {self.total} bytes in {self.path}: {e.strerror}"
                    ) from None
            p = mmap(NULL, self.total, PROT_READ | PROT_WRITE, MAP_SHARED, self.fd, 0)
            if p == MAP_FAILED:
                raise OSError(f"mmap of {self.path} ({self.total} bytes) failed")
            self.base = p
            self.region = <unsigned char*>p + HEADER
        except BaseException:
            self._close_fd()
            raise
        if not self.fresh:
            self._close_fd()
        return self

    def publish(self):
        """After initialising a fresh region: write the header, let other opens in."""
        cdef const unsigned char* h = self.header
        if self.fresh and self.fd >= 0:
            memcpy(<unsigned char*>self.base + 8, h + 8, len(self.header) - 8)
            _publish_magic(<unsigned char*>self.base, h)
            self._close_fd()

    cdef _close_fd(self):
        if self.fd >= 0:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = -1

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.total)
            self.base = NULL
        if self.fd >= 0:
            os.close(self.fd)


cdef inline void _publish_magic(unsigned char* dst, const unsigned char* magic) noexcept:
    # The magic last, after a full barrier: a reader that sees it sees the region.
    __sync_synchronize()
    memcpy(dst, magic, 8)

