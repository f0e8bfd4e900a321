/* statesync C core: conventions shared by every ss_*.c file.
 *
 * - Plain C11 (GNU extensions), no Python headers: every file builds and is
 *   testable on its own (see csrc/tests/).
 * - Functions that can fail return 0 (or a non-negative count) on success and
 *   a negative errno value on failure; they never print and never exit.
 * - Buffers are owned by the caller unless a comment says otherwise.
 * - Nothing here keeps global mutable state: every function is thread-safe
 *   when its arguments are not shared between threads.
 */
#ifndef SS_COMMON_H
#define SS_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define SS_PAGE_SIZE_DEFAULT 4096u

static inline uint64_t ss_rd64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v); /* unaligned-safe; compiles to one load on x86_64 */
    return v;
}

static inline uint64_t ss_rotl64(uint64_t x, unsigned r)
{
    return (x << r) | (x >> ((64 - r) & 63));
}

#endif
