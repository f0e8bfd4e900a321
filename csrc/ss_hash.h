/* Page content hashing and zero-page tests.
 *
 * ss_hash128 is a non-cryptographic 128-bit hash built for two jobs: deciding
 * whether a page changed between two reads (the "hash" tracker) and finding
 * duplicate pages (the stream encoder). Each 64-bit input word enters one of four
 * lanes through a bijective round, so a single changed word always changes the
 * lane state; the 256-bit state is folded into 128 bits at the end. It is not
 * collision-resistant against an adversary: callers that must be exact (dedup)
 * confirm equality with memcmp.
 */
#ifndef SS_HASH_H
#define SS_HASH_H

#include "ss_common.h"

/* Hash len bytes at data into out[0] (low 64 bits) and out[1] (high 64 bits). */
void ss_hash128(const void *data, size_t len, uint64_t seed, uint64_t out[2]);

/* Hash n pages of page_size bytes laid out back to back at pages; out holds 2*n
 * words (lo, hi per page). */
void ss_hash_pages(const uint8_t *pages, size_t n, size_t page_size, uint64_t seed,
                   uint64_t *out);

/* 1 when len bytes at data are all zero, else 0. */
int ss_is_zero(const void *data, size_t len);

/* For n pages: out[i] = 1 when page i is all zero. Returns the count of zero pages. */
size_t ss_zero_pages(const uint8_t *pages, size_t n, size_t page_size, uint8_t *out);

#endif
