/* ss_pages under ASan/UBSan: exact results on known data, every index checked, no
 * read outside the sources even when indices are hostile. */
#include <errno.h>
#include <stdlib.h>

#include "ss_pages.h"
#include "ss_test.h"

#define PS 4096

int main(void)
{
    size_t n = 64;
    /* Exactly-sized heap buffers so ASan catches any read past the end. */
    uint8_t *a = malloc(n * PS), *b = malloc(n * PS), *out = malloc(n);
    for (size_t i = 0; i < n * PS; i++)
        a[i] = b[i] = (uint8_t)(i * 7 + 3);
    b[5 * PS] ^= 1;                 /* first byte of page 5 */
    b[9 * PS + PS - 1] ^= 0x80;     /* last byte of page 9 */
    b[63 * PS + 100] ^= 2;          /* last page */
    CHECK(ss_pages_differ(a, b, n, PS, out) == 3);
    for (size_t i = 0; i < n; i++)
        CHECK(out[i] == (i == 5 || i == 9 || i == 63));
    CHECK(ss_pages_differ(a, a, n, PS, out) == 0);
    CHECK(ss_pages_differ(a, b, 0, PS, out) == 0);
    CHECK(ss_pages_differ(a, b, n, 0, out) == -EINVAL);

    /* Indexed: a as two sources (rows 0..31 and 32..63), b reversed order lookups. */
    struct ss_page_src sa[2] = {{a, 32}, {a + 32 * PS, 32}};
    struct ss_page_src sb[1] = {{b, 64}};
    int32_t ia[64], ib[64];
    int64_t ra[64], rb[64];
    for (int i = 0; i < 64; i++) {
        ia[i] = i / 32;
        ra[i] = i % 32;
        ib[i] = 0;
        rb[i] = i;
    }
    CHECK(ss_pages_differ_idx(sa, 2, ia, ra, sb, 1, ib, rb, 64, PS, out) == 3);
    CHECK(out[5] == 1 && out[9] == 1 && out[63] == 1 && out[6] == 0);

    /* Hostile indices: every kind is refused before any read. */
    int64_t bad_rows[] = {32, -1, INT64_MAX, INT64_MIN};
    for (size_t k = 0; k < sizeof bad_rows / sizeof bad_rows[0]; k++) {
        int64_t r = bad_rows[k];
        CHECK(ss_pages_differ_idx(sa, 2, ia, &r, sb, 1, ib, rb, 1, PS, out) == -ERANGE);
    }
    int32_t bad_src[] = {2, -1, INT32_MAX};
    for (size_t k = 0; k < 3; k++)
        CHECK(ss_pages_differ_idx(sa, 2, &bad_src[k], ra, sb, 1, ib, rb, 1, PS, out) == -ERANGE);
    CHECK(ss_pages_differ_idx(sa, 0, ia, ra, sb, 1, ib, rb, 1, PS, out) == -ERANGE);

    /* Gather: pages come out in the asked order, byte for byte. */
    uint8_t *g = malloc(3 * PS);
    int32_t gs[3] = {1, 0, 1};
    int64_t gr[3] = {31, 0, 0};
    CHECK(ss_pages_gather(sa, 2, gs, gr, 3, PS, g) == 3);
    CHECK(memcmp(g, a + 63 * PS, PS) == 0);
    CHECK(memcmp(g + PS, a, PS) == 0);
    CHECK(memcmp(g + 2 * PS, a + 32 * PS, PS) == 0);
    int64_t gbad = 32;
    CHECK(ss_pages_gather(sa, 2, gs, &gbad, 1, PS, g) == -ERANGE);
    CHECK(ss_pages_gather(sa, 2, gs, gr, 1, 0, g) == -EINVAL);

    free(g);
    free(a);
    free(b);
    free(out);
    TEST_DONE();
}
