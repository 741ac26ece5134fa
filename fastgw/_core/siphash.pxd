# cython: language_level=3
"""SipHash-1-3 and Lemire's fast range, for the core's hash tables.

C inlined into each module that cimports them (bucket.pyx, budget.pyx): a ``.pxd``
with no ``.pyx``, so there is no module to import at run time and no call through a
C-API table on the hot path.
"""

from libc.stdint cimport uint64_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    /* SipHash-1-3 (Aumasson & Bernstein; the variant CPython uses for str and bytes). */
    #define FGW_ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
    #define FGW_SIPROUND do { \\
        v0 += v1; v1 = FGW_ROTL(v1, 13); v1 ^= v0; v0 = FGW_ROTL(v0, 32); \\
        v2 += v3; v3 = FGW_ROTL(v3, 16); v3 ^= v2; \\
        v0 += v3; v3 = FGW_ROTL(v3, 21); v3 ^= v0; \\
        v2 += v1; v1 = FGW_ROTL(v1, 17); v1 ^= v2; v2 = FGW_ROTL(v2, 32); \\
    } while (0)

    static inline uint64_t fgw_siphash13(uint64_t k0, uint64_t k1, const unsigned char *in,
                                         size_t inlen) {
        uint64_t v0 = 0x736f6d6570736575ULL ^ k0;
        uint64_t v1 = 0x646f72616e646f6dULL ^ k1;
        uint64_t v2 = 0x6c7967656e657261ULL ^ k0;
        uint64_t v3 = 0x7465646279746573ULL ^ k1;
        uint64_t b = ((uint64_t)inlen) << 56;
        const unsigned char *end = in + (inlen & ~(size_t)7);
        uint64_t m;
        for (; in != end; in += 8) {
            memcpy(&m, in, 8);  /* native order: a keyed hash, not a wire format */
            v3 ^= m; FGW_SIPROUND; v0 ^= m;
        }
        switch (inlen & 7) {
            case 7: b |= ((uint64_t)in[6]) << 48; /* fall through */
            case 6: b |= ((uint64_t)in[5]) << 40; /* fall through */
            case 5: b |= ((uint64_t)in[4]) << 32; /* fall through */
            case 4: b |= ((uint64_t)in[3]) << 24; /* fall through */
            case 3: b |= ((uint64_t)in[2]) << 16; /* fall through */
            case 2: b |= ((uint64_t)in[1]) << 8;  /* fall through */
            case 1: b |= ((uint64_t)in[0]); break;
            case 0: break;
        }
        v3 ^= b; FGW_SIPROUND; v0 ^= b;
        v2 ^= 0xff; FGW_SIPROUND; FGW_SIPROUND; FGW_SIPROUND;
        return v0 ^ v1 ^ v2 ^ v3;
    }

    /* Lemire's multiply-shift: a hash onto [0, n) for any n, without a division. */
    static inline uint64_t fgw_fastrange(uint64_t h, uint64_t n) {
        return (uint64_t)(((unsigned __int128)h * n) >> 64);
    }
    """
    uint64_t fgw_siphash13(uint64_t k0, uint64_t k1, const unsigned char* data, size_t n) noexcept nogil
    uint64_t fgw_fastrange(uint64_t h, uint64_t n) noexcept nogil
