#include "ss_hash.h"

/* The lane round and its two primes follow xxHash64's published design (Yann
 * Collet, BSD-2); fmix is MurmurHash3's 64-bit finalizer (Austin Appleby, public
 * domain). Both re-implemented here from their descriptions; the 4-lane layout,
 * tail handling and 128-bit fold are our own. K3/K4 are further odd constants of
 * the same families. */
#define K1 0x9E3779B185EBCA87ULL
#define K2 0xC2B2AE3D27D4EB4FULL
#define K3 0x165667B19E3779F9ULL
#define K4 0x85EBCA77C2B2AE63ULL

static inline uint64_t lane_round(uint64_t acc, uint64_t w)
{
    /* For a fixed acc this is a bijection of w (K2 and K1 are odd), so a
     * changed word always yields a changed lane. */
    acc += w * K2;
    acc = ss_rotl64(acc, 31);
    return acc * K1;
}

static inline uint64_t fmix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xFF51AFD7ED558CCDULL;
    x ^= x >> 33;
    x *= 0xC4CEB9FE1A85EC53ULL;
    x ^= x >> 33;
    return x;
}

void ss_hash128(const void *data, size_t len, uint64_t seed, uint64_t out[2])
{
    const uint8_t *p = (const uint8_t *)data;
    const uint8_t *end = p + len;
    uint64_t a = seed + K1 + K2, b = seed + K2, c = seed, d = seed - K1;

    while ((size_t)(end - p) >= 32) {
        a = lane_round(a, ss_rd64(p));
        b = lane_round(b, ss_rd64(p + 8));
        c = lane_round(c, ss_rd64(p + 16));
        d = lane_round(d, ss_rd64(p + 24));
        p += 32;
    }
    /* Tail: whole words go to lane a, then a zero-padded last word carries the
     * remaining bytes; the length is mixed in below so padding cannot collide. */
    while ((size_t)(end - p) >= 8) {
        a = lane_round(a, ss_rd64(p));
        a = ss_rotl64(a, 27) * K3;
        p += 8;
    }
    if (p < end) {
        uint64_t w = 0;
        memcpy(&w, p, (size_t)(end - p));
        b = lane_round(b ^ K4, w);
    }
    uint64_t lo = ss_rotl64(a, 1) + ss_rotl64(b, 7) + ss_rotl64(c, 12) + ss_rotl64(d, 18);
    uint64_t hi = (a * K3) ^ ss_rotl64(b * K4, 23) ^ (c * K2) ^ ss_rotl64(d * K1, 41);
    lo ^= (uint64_t)len * K4;
    hi += (uint64_t)len * K1;
    out[0] = fmix(lo ^ ss_rotl64(hi, 32));
    out[1] = fmix(hi + out[0] * K3);
}

void ss_hash_pages(const uint8_t *pages, size_t n, size_t page_size, uint64_t seed,
                   uint64_t *out)
{
    for (size_t i = 0; i < n; i++)
        ss_hash128(pages + i * page_size, page_size, seed, out + 2 * i);
}

int ss_is_zero(const void *data, size_t len)
{
    const uint8_t *p = (const uint8_t *)data;
    size_t i = 0;
    /* Blocks of 64 bytes OR-ed together: the compiler vectorises this loop, and
     * the early exit keeps non-zero pages cheap (most exit in the first block). */
    for (; i + 64 <= len; i += 64) {
        uint64_t acc = 0;
        for (size_t j = 0; j < 64; j += 8)
            acc |= ss_rd64(p + i + j);
        if (acc)
            return 0;
    }
    for (; i < len; i++)
        if (p[i])
            return 0;
    return 1;
}

size_t ss_zero_pages(const uint8_t *pages, size_t n, size_t page_size, uint8_t *out)
{
    size_t zeros = 0;
    for (size_t i = 0; i < n; i++) {
        out[i] = (uint8_t)ss_is_zero(pages + i * page_size, page_size);
        zeros += out[i];
    }
    return zeros;
}
