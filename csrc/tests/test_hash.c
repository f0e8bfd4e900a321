#include <stdlib.h>
#include <string.h>

#include "ss_hash.h"
#include "ss_test.h"

int main(void)
{
    enum { PS = 4096, N = 64 };
    uint8_t *pages = calloc(N, PS);
    uint64_t *h = malloc(sizeof(uint64_t) * 2 * N);
    uint8_t zero[N];
    CHECK(pages && h);
    for (int i = 1; i < N; i += 2)
        pages[(size_t)i * PS + (size_t)(i * 37) % PS] = (uint8_t)i;
    CHECK(ss_zero_pages(pages, N, PS, zero) == N / 2);
    for (int i = 0; i < N; i++)
        CHECK(zero[i] == (i % 2 == 0));
    ss_hash_pages(pages, N, PS, 0, h);
    /* Equal content, equal hash; every distinct page a distinct hash. */
    CHECK(h[0] == h[4] && h[1] == h[5]);
    for (int i = 1; i < N; i += 2)
        for (int j = i + 2; j < N; j += 2)
            CHECK(h[2 * i] != h[2 * j] || h[2 * i + 1] != h[2 * j + 1]);
    /* Any single-bit flip anywhere in a page changes the hash. */
    uint64_t base[2], flipped[2];
    ss_hash128(pages + PS, PS, 7, base);
    for (size_t bit = 0; bit < (size_t)PS * 8; bit += 61) {
        pages[PS + bit / 8] ^= (uint8_t)(1u << (bit % 8));
        ss_hash128(pages + PS, PS, 7, flipped);
        CHECK(flipped[0] != base[0] && flipped[1] != base[1]);
        pages[PS + bit / 8] ^= (uint8_t)(1u << (bit % 8));
    }
    /* Odd lengths read no byte past the end (ASan watches), and length matters. */
    for (size_t len = 0; len < 80; len++) {
        uint8_t *buf = malloc(len ? len : 1);
        memset(buf, 0, len ? len : 1);
        uint64_t a[2], b[2];
        ss_hash128(buf, len, 0, a);
        ss_hash128(buf, len + 0 * 1, 0, b);
        CHECK(a[0] == b[0] && a[1] == b[1]);
        if (len) {
            ss_hash128(buf, len - 1, 0, b);
            CHECK(a[0] != b[0] || a[1] != b[1]);
        }
        CHECK(ss_is_zero(buf, len) == 1);
        free(buf);
    }
    free(pages);
    free(h);
    TEST_DONE();
}
