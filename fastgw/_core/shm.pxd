# cython: language_level=3
"""A file mapped MAP_SHARED by several processes, and a spinlock that lives in it.

Declarations for ``fastgw/_core/shm.pyx``; a core module that keeps state shared by the
``--workers`` processes cimports this (see that module's docstring for the protocol).
The lock functions are C inlined into each module that cimports them.
"""

from libc.stdint cimport uint32_t

cdef extern from *:
    """
    #include <errno.h>
    #include <pthread.h>
    #include <sched.h>
    #include <signal.h>
    #include <stdint.h>
    #include <sys/types.h>
    #include <unistd.h>

    /* This process's id for lock words, reset in a forked child (getpid() is a system
       call: too slow for every lock). */
    static uint32_t fgw_shm_me = 0;
    static void fgw_shm_forget_pid(void) { fgw_shm_me = 0; }
    static int fgw_shm_atfork_done = 0;
    static inline uint32_t fgw_shm_pid(void) {
        if (fgw_shm_me == 0) {
            if (!fgw_shm_atfork_done) {
                pthread_atfork(NULL, NULL, fgw_shm_forget_pid);
                fgw_shm_atfork_done = 1;
            }
            fgw_shm_me = (uint32_t)getpid();
        }
        return fgw_shm_me;
    }

    /* A spinlock for processes: the word holds the owner's pid, 0 when free. A waiter
       spins briefly, then yields the CPU; every 1024 yields it checks that the owner
       still exists and takes the lock over from a process that died holding it (the
       state it guarded may be half-updated: acceptable for counters and buckets, never
       for anything that must stay consistent). */
    static inline void fgw_shm_lock(uint32_t *word) {
        uint32_t me = fgw_shm_pid(), seen;
        unsigned long spins = 0;
        for (;;) {
            seen = 0;
            if (__atomic_compare_exchange_n(word, &seen, me, 0, __ATOMIC_ACQUIRE,
                                            __ATOMIC_RELAXED))
                return;
            spins++;
            if (spins < 128) {
    #if defined(__x86_64__) || defined(__i386__)
                __builtin_ia32_pause();
    #endif
                continue;
            }
            sched_yield();
            if ((spins & 1023) == 0 && seen != 0 && seen != me
                    && kill((pid_t)seen, 0) == -1 && errno == ESRCH) {
                if (__atomic_compare_exchange_n(word, &seen, me, 0, __ATOMIC_ACQUIRE,
                                                __ATOMIC_RELAXED))
                    return;
            }
        }
    }

    static inline void fgw_shm_unlock(uint32_t *word) {
        __atomic_store_n(word, 0, __ATOMIC_RELEASE);
    }
    """
    void fgw_shm_lock(uint32_t* word) noexcept nogil
    void fgw_shm_unlock(uint32_t* word) noexcept nogil
    uint32_t fgw_shm_pid() noexcept nogil


cdef class SharedFile:
    cdef readonly str path
    # True when this open (re)initialised the file: the caller sets up its region, then
    # calls publish(); until then other openers wait.
    cdef readonly bint fresh
    cdef readonly Py_ssize_t size_bytes   # the caller's region
    cdef unsigned char* region            # the caller's region (page aligned)
    cdef void* base
    cdef size_t total
    cdef int fd
    cdef bytes header

    cdef _close_fd(self)
