/* ss_pages under ASan/UBSan: exact results on known data, every index checked, no
 * read outside the sources even when indices are hostile. */
#include <errno.h>
#include <stdlib.h>

#include "ss_pages.h"
#include "ss_test.h"

#define PS 4096

static size_t put_varint(uint8_t *p, uint64_t v)
{
    size_t n = 0;
    while (v >= 0x80) {
        p[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    p[n++] = (uint8_t)v;
    return n;
}

/* Append one entry {1: va, 2: nr, 4: flags} (or with field 5 when wide). */
static size_t put_entry(uint8_t *buf, uint64_t va, uint64_t nr, uint32_t fl, int wide)
{
    uint8_t m[64];
    size_t k = 0;
    m[k++] = 0x08;
    k += put_varint(m + k, va);
    m[k++] = 0x10;
    k += put_varint(m + k, wide ? 0 : nr);
    m[k++] = 0x20;
    k += put_varint(m + k, fl);
    if (wide) {
        m[k++] = 0x28;
        k += put_varint(m + k, nr);
    }
    buf[0] = (uint8_t)k;
    buf[1] = buf[2] = buf[3] = 0;
    memcpy(buf + 4, m, k);
    return 4 + k;
}

static void test_pagemap_decode(void)
{
    uint8_t buf[256];
    size_t len = 0;
    len += put_entry(buf + len, 0x7f0000000000ull, 3, 4, 0);
    len += put_entry(buf + len, 0x7f0000010000ull, 1ull << 33, 1, 1);
    /* An old-format entry: {1: va, 2: nr, 3: in_parent=1}, no flags; plus an unknown
     * length-delimited field 9 that must be skipped. */
    uint8_t old[] = {10, 0, 0, 0, 0x08, 0x80, 0x20, 0x10, 0x02, 0x18, 0x01, 0x4a, 0x01, 0xaa};
    memcpy(buf + len, old, sizeof old);
    len += sizeof old;
    uint64_t va[8], nr[8], off[8];
    uint32_t fl[8];
    int wide = -1;
    struct ss_pm_error err;
    CHECK(ss_pagemap_decode(buf, len, 0, 8, va, nr, fl, off, &wide, &err) == 3);
    CHECK(va[0] == 0x7f0000000000ull && nr[0] == 3 && fl[0] == 4 && off[0] == 0);
    CHECK(nr[1] == 1ull << 33 && fl[1] == 1 && wide == 1);
    CHECK(va[2] == 0x1000 && nr[2] == 2 && fl[2] == 1);
    CHECK(ss_pagemap_decode(buf, len, 0, 2, va, nr, fl, off, &wide, &err) == -EBADMSG &&
          err.kind == SS_PM_TOO_MANY);
    /* Every truncation of the buffer is an error (or a clean shorter list), never a
     * read past len: ASan watches an exactly-sized copy. */
    for (size_t cut = 0; cut < len; cut++) {
        uint8_t *c = malloc(cut ? cut : 1);
        memcpy(c, buf, cut);
        long rc = ss_pagemap_decode(c, cut, 0, 8, va, nr, fl, off, &wide, &err);
        CHECK(rc == -EBADMSG || (rc >= 0 && rc < 3));
        if (rc == -EBADMSG)
            CHECK(err.offset <= cut && err.kind >= SS_PM_TRUNC_SIZE && err.kind <= SS_PM_TOO_MANY);
        free(c);
    }
    /* Specific errors. */
    uint8_t longv[] = {12, 0, 0, 0, 0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01};
    CHECK(ss_pagemap_decode(longv, sizeof longv, 0, 8, va, nr, fl, off, &wide, &err) == -EBADMSG &&
          err.kind == SS_PM_LONG_VARINT && err.offset == 4);
    uint8_t wt3[] = {1, 0, 0, 0, 0x0b};
    CHECK(ss_pagemap_decode(wt3, sizeof wt3, 0, 8, va, nr, fl, off, &wide, &err) == -EBADMSG &&
          err.kind == SS_PM_BAD_WIRETYPE);
    uint8_t lenpast[] = {2, 0, 0, 0, 0x4a, 0x7f};
    CHECK(ss_pagemap_decode(lenpast, sizeof lenpast, 0, 8, va, nr, fl, off, &wide, &err) == -EBADMSG &&
          err.kind == SS_PM_LEN_PAST_END);
    uint8_t sizepast[] = {0xff, 0xff, 0xff, 0xff, 0x08};
    CHECK(ss_pagemap_decode(sizepast, sizeof sizepast, 0, 8, va, nr, fl, off, &wide, &err) == -EBADMSG &&
          err.kind == SS_PM_SIZE_PAST_END && err.offset == 0);
    uint8_t nova[] = {2, 0, 0, 0, 0x10, 0x01};
    CHECK(ss_pagemap_decode(nova, sizeof nova, 0, 8, va, nr, fl, off, &wide, &err) == -EBADMSG &&
          err.kind == SS_PM_NO_VADDR);
    /* Random garbage: must terminate with a result or an error, in bounds. */
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (int it = 0; it < 20000; it++) {
        size_t n = (size_t)(x % 48) + 1;
        uint8_t *g = malloc(n);
        for (size_t i = 0; i < n; i++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            g[i] = (uint8_t)x;
        }
        if (n >= 4 && (x & 1)) {  /* a plausible size field half the time */
            g[0] = (uint8_t)(n - 4);
            g[1] = g[2] = g[3] = 0;
        }
        long rc = ss_pagemap_decode(g, n, 0, 8, va, nr, fl, off, &wide, &err);
        CHECK(rc == -EBADMSG || (rc >= 0 && rc <= 8));
        free(g);
    }
}

static void test_pagemap_encode(void)
{
    uint64_t va[3] = {0x1000, 0x7fffffffe000ull, UINT64_MAX & ~0xfffull};
    uint64_t nr[3] = {1, 1ull << 40, 1};
    uint32_t fl[3] = {4, 1 | 2, UINT32_MAX};
    for (int wide = 0; wide < 2; wide++) {
        size_t cap = 3 * SS_PM_ENTRY_MAX;
        uint8_t *out = malloc(cap);
        long len = ss_pagemap_encode(va, nr, fl, 3, wide, out, cap);
        CHECK(len > 0);
        uint64_t dva[4], dnr[4], doff[4];
        uint32_t dfl[4];
        int w = -1;
        struct ss_pm_error err;
        CHECK(ss_pagemap_decode(out, (size_t)len, 0, 4, dva, dnr, dfl, doff, &w, &err) == 3);
        CHECK(w == wide);
        for (int i = 0; i < 3; i++)
            CHECK(dva[i] == va[i] && dnr[i] == nr[i] && dfl[i] == fl[i]);
        CHECK(ss_pagemap_encode(va, nr, fl, 3, wide, out, (size_t)len - 1) == -ENOSPC);
        free(out);
    }
}

int main(void)
{
    test_pagemap_decode();
    test_pagemap_encode();

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
