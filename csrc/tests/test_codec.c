/* Codec tests: round trips, hostile XOR deltas and hostile record payloads.
 * Run under ASan+UBSan by tests/test_c_asan.py: any out-of-bounds access in the
 * parsers fails the suite, not only a wrong result. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <lz4frame.h>

#include "ss_codec.h"
#include "ss_hash.h"
#include "ss_test.h"

#define PS 4096

static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static void test_uleb(void)
{
    uint8_t buf[SS_ULEB_MAX];
    uint64_t vals[] = {0, 1, 127, 128, 300, 16383, 16384, UINT64_MAX >> 1, UINT64_MAX};
    for (size_t k = 0; k < sizeof vals / sizeof vals[0]; k++) {
        size_t n = ss_uleb_put(buf, vals[k]);
        const uint8_t *p = buf;
        uint64_t v = 0;
        CHECK(ss_uleb_get(&p, buf + n, &v) == 0);
        CHECK(v == vals[k] && p == buf + n);
        p = buf; /* truncated */
        if (n > 1)
            CHECK(ss_uleb_get(&p, buf + n - 1, &v) == -EINVAL);
    }
    /* not minimal */
    const uint8_t nm[] = {0x80, 0x00};
    const uint8_t *p = nm;
    uint64_t v;
    CHECK(ss_uleb_get(&p, nm + 2, &v) == -EINVAL);
    /* 11 bytes, and a 10th byte > 1 (overflow) */
    uint8_t longb[11];
    memset(longb, 0x80, 10);
    longb[10] = 0x01;
    p = longb;
    CHECK(ss_uleb_get(&p, longb + 11, &v) == -EINVAL);
    memset(longb, 0xff, 9);
    longb[9] = 0x02;
    p = longb;
    CHECK(ss_uleb_get(&p, longb + 10, &v) == -EINVAL);
    p = longb;
    CHECK(ss_uleb_get(&p, longb, &v) == -EINVAL); /* empty */
}

static void test_xor_roundtrip(void)
{
    uint8_t *oldp = malloc(PS), *newp = malloc(PS), *page = malloc(PS), *out = malloc(2 * PS);
    for (int iter = 0; iter < 2000; iter++) {
        for (size_t i = 0; i < PS; i++)
            oldp[i] = (uint8_t)rnd();
        memcpy(newp, oldp, PS);
        int changes = (int)(rnd() % 64);
        if (iter % 50 == 0)
            changes = PS; /* dense change */
        for (int c = 0; c < changes; c++) {
            size_t at = rnd() % PS, l = 1 + rnd() % 24;
            for (size_t k = at; k < at + l && k < PS; k++)
                newp[k] = (uint8_t)rnd();
        }
        if (iter == 1) { /* first and last byte */
            newp[0] ^= 1;
            newp[PS - 1] ^= 1;
        }
        long n = ss_xor_encode(newp, oldp, PS, out, 2 * PS);
        CHECK(n >= 0);
        if (n < 0)
            continue;
        memcpy(page, oldp, PS);
        CHECK(ss_xor_decode(out, (size_t)n, page, PS) == 0);
        CHECK(memcmp(page, newp, PS) == 0);
        /* bounded output: every cap below n is refused, never overrun (ASan) */
        for (size_t cap = 0; cap < (size_t)n && cap < 64; cap++) {
            uint8_t *small = malloc(cap ? cap : 1);
            CHECK(ss_xor_encode(newp, oldp, PS, small, cap) == -ENOSPC);
            free(small);
        }
        if (n > 0) {
            uint8_t *exact = malloc((size_t)n);
            CHECK(ss_xor_encode(newp, oldp, PS, exact, (size_t)n) == n);
            free(exact);
        }
    }
    /* identical pages encode to nothing */
    CHECK(ss_xor_encode(oldp, oldp, PS, out, 0) == 0);
    free(oldp);
    free(newp);
    free(page);
    free(out);
}

static void test_xor_hostile(void)
{
    uint8_t page[PS];
    memset(page, 0xAA, PS);
    /* run past the page end */
    uint8_t d1[] = {0x80, 0x20, 0x01, 0x00}; /* zrun 4096, nzrun 1 -> beyond */
    CHECK(ss_xor_decode(d1, 3, page, PS) == -EINVAL);
    uint8_t d2[] = {0x00, 0x81, 0x20}; /* nzrun 4097 */
    CHECK(ss_xor_decode(d2, 3, page, PS) == -EINVAL);
    uint8_t d3[] = {0x00, 0x05, 1, 2}; /* nzrun longer than the delta */
    CHECK(ss_xor_decode(d3, sizeof d3, page, PS) == -EINVAL);
    uint8_t d4[] = {0x00, 0x00}; /* empty nzrun */
    CHECK(ss_xor_decode(d4, sizeof d4, page, PS) == -EINVAL);
    uint8_t d5[] = {0x00, 0x01, 7, 0x00, 0x01, 7}; /* zrun 0 after the first pair */
    CHECK(ss_xor_decode(d5, sizeof d5, page, PS) == -EINVAL);
    uint8_t d6[] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x01, 0};
    CHECK(ss_xor_decode(d6, sizeof d6, page, PS) == -EINVAL); /* zrun 2^63 */
    uint8_t d7[] = {0x00}; /* truncated pair */
    CHECK(ss_xor_decode(d7, sizeof d7, page, PS) == -EINVAL);
    uint8_t d8[] = {0x80}; /* truncated ULEB */
    CHECK(ss_xor_decode(d8, sizeof d8, page, PS) == -EINVAL);
    /* exact end is fine */
    uint8_t d9[] = {0xff, 0x1f, 0x01, 0x55}; /* zrun 4095, nzrun 1 */
    CHECK(ss_xor_decode(d9, sizeof d9, page, PS) == 0);
    CHECK(page[PS - 1] == (0xAA ^ 0x55));
    /* random garbage: must never read or write out of bounds */
    for (int iter = 0; iter < 20000; iter++) {
        size_t dl = rnd() % 48;
        uint8_t *d = malloc(dl ? dl : 1);
        for (size_t k = 0; k < dl; k++)
            d[k] = (uint8_t)(iter & 1 ? rnd() : (rnd() % 4 ? rnd() & 0x7f : 0x80 | rnd()));
        uint8_t *pg = malloc(PS);
        memset(pg, 0, PS);
        int rc = ss_xor_decode(d, dl, pg, PS);
        CHECK(rc == 0 || rc == -EINVAL);
        free(pg);
        free(d);
    }
}

/* Encode n pages with prev, parse, build with bases, compare. */
static void test_block_roundtrip(void)
{
    enum { N = 300 };
    uint8_t *pages = calloc(N, PS), *prev = calloc(N, PS);
    uint64_t pagenos[N], hashes[2 * N];
    uint8_t prev_ok[N];
    uint64_t pn = 1000;
    for (size_t i = 0; i < N; i++) {
        pn += 1 + (rnd() % 3 == 0 ? rnd() % 100 : 0);
        pagenos[i] = pn;
        prev_ok[i] = (uint8_t)(rnd() % 8 != 0);
        uint8_t *p = pages + i * PS, *q = prev + i * PS;
        unsigned what = (unsigned)(rnd() % 6);
        for (size_t k = 0; k < PS; k++)
            q[k] = (uint8_t)rnd();
        if (what == 0) {
            memset(p, 0, PS);                        /* zero */
        } else if (what == 1 && i > 10) {
            memcpy(p, pages + (rnd() % i) * PS, PS); /* dup of an earlier page */
        } else if (what == 2) {
            memcpy(p, q, PS);                        /* unchanged */
        } else if (what == 3) {
            memcpy(p, q, PS);                        /* small change: XOR */
            for (int c = 0; c < 5; c++)
                p[rnd() % PS] ^= (uint8_t)(1 + rnd() % 255);
        } else {
            for (size_t k = 0; k < PS; k++)
                p[k] = (uint8_t)rnd();
        }
    }
    ss_enc_input in = {.page_size = PS, .n = N, .pagenos = pagenos, .pages = pages,
                       .prev = prev, .prev_ok = prev_ok, .hashes = hashes,
                       .flags = SS_ENC_DEDUP | SS_ENC_XOR, .xor_limit = PS / 2};
    uint64_t slots[1024] = {0};
    ss_dedup_table tab = {slots, 1024};
    ss_enc_stats st = {0};
    size_t maxp = 64, cap = ss_enc_bound(maxp, PS);
    uint8_t *buf = malloc(cap), *outp = malloc(maxp * PS);
    ss_dec_page *pg = malloc(maxp * sizeof *pg);
    int64_t srcidx[64];
    size_t start = 0, total = 0;
    uint64_t minp = 0;
    /* Decoded content of everything so far, by stream position (DUP sources). */
    uint8_t *decoded = calloc(N, PS);
    while (start < N) {
        size_t consumed, nrec;
        long len = ss_enc_block(&in, &tab, start, maxp, minp, buf, cap, &consumed, &nrec, &st);
        CHECK(len > 0);
        if (len <= 0)
            break;
        size_t np, nr;
        ss_dec_err err;
        CHECK(ss_dec_parse(buf, (size_t)len, PS, minp, maxp, pg, &np, &nr, &err) == 0);
        CHECK(np == consumed && nr == nrec);
        for (size_t j = 0; j < np; j++) {
            size_t i = start + j;
            CHECK(pg[j].page == pagenos[i]);
            srcidx[j] = -1;
            if (pg[j].kind == SS_REC_XOR) {
                CHECK(prev_ok[i]);
                memcpy(outp + j * PS, prev + i * PS, PS);
            } else if (pg[j].kind == SS_REC_DUP) {
                /* find the source: an earlier page of the stream, or the page itself (prev) */
                uint64_t s = pg[j].src;
                if (s == pagenos[i]) {
                    memcpy(outp + j * PS, prev + i * PS, PS);
                } else {
                    size_t k = 0;
                    while (k < i && pagenos[k] != s)
                        k++;
                    CHECK(k < i);
                    if (k >= start)
                        srcidx[j] = (int64_t)(k - start);
                    else
                        memcpy(outp + j * PS, decoded + k * PS, PS);
                }
            }
        }
        CHECK(ss_dec_build(buf, (size_t)len, PS, pg, np, srcidx, outp, &err) == 0);
        CHECK(memcmp(outp, pages + start * PS, np * PS) == 0);
        memcpy(decoded + start * PS, outp, np * PS);
        /* a changed hash byte in any DUP is caught */
        for (size_t j = 0; j < np; j++) {
            if (pg[j].kind == SS_REC_DUP || pg[j].kind == SS_REC_XOR) {
                size_t at = pg[j].kind == SS_REC_DUP ? pg[j].off : pg[j].off;
                if (pg[j].kind == SS_REC_XOR && pg[j].len == 0)
                    continue;
                memcpy(outp + j * PS, pg[j].kind == SS_REC_XOR ? prev + (start + j) * PS
                                                               : pages + (start + j) * PS, PS);
                buf[at] ^= 0x10;
                ss_dec_page one = pg[j];
                int64_t none = -1;
                int rc = ss_dec_build(buf, (size_t)len, PS, &one, 1, &none, outp + j * PS, &err);
                CHECK(rc == -EBADMSG || rc == -EINVAL);
                buf[at] ^= 0x10;
                break;
            }
        }
        total += consumed;
        minp = pagenos[start + consumed - 1] + 1;
        start += consumed;
    }
    CHECK(total == N);
    CHECK(st.pages[SS_REC_ZERO] > 0 && st.pages[SS_REC_DUP] > 0 && st.pages[SS_REC_XOR] > 0 &&
          st.pages[SS_REC_RAW] > 0);
    free(pages);
    free(prev);
    free(buf);
    free(outp);
    free(pg);
    free(decoded);
}

static void test_parse_hostile(void)
{
    enum { MAXP = 8 };
    ss_dec_page pg[MAXP];
    size_t np, nr;
    ss_dec_err err;
    /* absurd count, bad kind, gap overflow, empty count */
    uint8_t a[] = {SS_REC_ZERO, 0x00, 0xff, 0xff, 0xff, 0xff, 0x0f};
    CHECK(ss_dec_parse(a, sizeof a, PS, 0, MAXP, pg, &np, &nr, &err) == -E2BIG);
    uint8_t b[] = {0x09, 0x00, 0x01};
    CHECK(ss_dec_parse(b, sizeof b, PS, 0, MAXP, pg, &np, &nr, &err) == -EINVAL);
    CHECK(err.offset == 0 && err.record == 0);
    uint8_t c[] = {SS_REC_ZERO, 0x00, 0x01, SS_REC_ZERO, 0xff, 0xff, 0xff, 0xff, 0xff,
                   0xff, 0xff, 0xff, 0xff, 0x01, 0x01};
    CHECK(ss_dec_parse(c, sizeof c, PS, 5, MAXP, pg, &np, &nr, &err) == -ERANGE);
    CHECK(err.record == 1 && err.offset == 3);
    uint8_t d[] = {SS_REC_ZERO, 0x00, 0x00};
    CHECK(ss_dec_parse(d, sizeof d, PS, 0, MAXP, pg, &np, &nr, &err) == -EINVAL);
    /* RAW record claiming more bytes than present */
    uint8_t e[] = {SS_REC_RAW, 0x00, 0x01, 1, 2, 3};
    CHECK(ss_dec_parse(e, sizeof e, PS, 0, MAXP, pg, &np, &nr, &err) == -EINVAL);
    /* XOR with dlen past the end */
    uint8_t f[] = {SS_REC_XOR, 0x00, 0x01, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 1};
    CHECK(ss_dec_parse(f, sizeof f, PS, 0, MAXP, pg, &np, &nr, &err) == -EINVAL);
    /* DUP in-block source that is not earlier: refused by build */
    uint8_t g[] = {SS_REC_DUP, 0x00, 0x01, 0x05, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    CHECK(ss_dec_parse(g, sizeof g, PS, 0, MAXP, pg, &np, &nr, &err) == 0 && np == 1);
    uint8_t row[PS];
    int64_t self = 0;
    CHECK(ss_dec_build(g, sizeof g, PS, pg, 1, &self, row, &err) == -EINVAL);
    /* the last page number: a following record must not wrap around */
    uint8_t h[] = {SS_REC_ZERO, 0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x01,
                   SS_REC_ZERO, 0x00, 0x01};
    CHECK(ss_dec_parse(h, 12, PS, 1, MAXP, pg, &np, &nr, &err) == 0 && pg[0].page == UINT64_MAX);
    CHECK(ss_dec_parse(h, sizeof h, PS, 1, MAXP, pg, &np, &nr, &err) == -ERANGE);

    /* random payloads, and random mutations of a valid one: no crash, no overrun */
    uint8_t *buf = malloc(PS * 3);
    uint8_t *outp = malloc(MAXP * PS);
    int64_t srcidx[MAXP];
    for (int iter = 0; iter < 30000; iter++) {
        size_t len = rnd() % 64;
        if (iter % 3 == 0) {
            /* a valid-looking record prefix with random tail */
            buf[0] = (uint8_t)(1 + rnd() % 4);
            buf[1] = (uint8_t)(rnd() % 3);
            buf[2] = (uint8_t)(1 + rnd() % 3);
            for (size_t k = 3; k < len; k++)
                buf[k] = (uint8_t)rnd();
            if (len < 3)
                len = 3;
        } else {
            for (size_t k = 0; k < len; k++)
                buf[k] = (uint8_t)rnd();
        }
        uint8_t *exact = malloc(len ? len : 1);
        memcpy(exact, buf, len);
        int rc = ss_dec_parse(exact, len, PS, rnd() % 4, MAXP, pg, &np, &nr, &err);
        CHECK(rc == 0 || rc == -EINVAL || rc == -E2BIG || rc == -ERANGE);
        if (rc == 0) {
            CHECK(np <= MAXP);
            for (size_t j = 0; j < np; j++)
                srcidx[j] = (int64_t)(rnd() % (j + 2)) - 1;
            memset(outp, 0, MAXP * PS);
            rc = ss_dec_build(exact, len, PS, pg, np, srcidx, outp, &err);
            CHECK(rc == 0 || rc == -EINVAL || rc == -EBADMSG);
        }
        free(exact);
    }
    free(buf);
    free(outp);
}

/* Payloads longer than 4 GiB: parsed page offsets are 32-bit, so the parser must
 * refuse them instead of truncating offsets. The payload is a reserved mapping that
 * is never touched past its first page (RAW records are parsed without reading the
 * page bytes), so this costs no memory. */
static void test_parse_over_4gib(void)
{
    const size_t ps = (size_t)1 << 20;
    const size_t npg = 4097; /* 4097 MiB of RAW data after a 4-byte record header */
    const size_t maplen = 4 + npg * ps;
    uint8_t *buf = mmap(NULL, maplen, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    CHECK(buf != MAP_FAILED);
    if (buf == MAP_FAILED)
        return;
    ss_dec_page *pg = calloc(npg, sizeof *pg);
    size_t np = 0, nr = 0;
    ss_dec_err err;
    buf[0] = SS_REC_RAW;
    buf[1] = 0x00; /* gap 0 */
    buf[2] = 0x81; /* count 4097 (uleb 0x81 0x20) */
    buf[3] = 0x20;
    size_t len = 4 + npg * ps;
    CHECK(len > UINT32_MAX);
    /* the page 4096's data starts at 4 + 4 GiB: it cannot be named by a 32-bit offset */
    CHECK(ss_dec_parse(buf, len, ps, 0, npg, pg, &np, &nr, &err) == -E2BIG);
    CHECK(np == 0 && err.offset == 0);
    /* just under the limit (4095 pages) the same record parses, offsets exact */
    buf[2] = 0xff; /* count 4095 (uleb 0xff 0x1f) */
    buf[3] = 0x1f;
    len = 4 + 4095 * ps;
    CHECK(len <= UINT32_MAX);
    CHECK(ss_dec_parse(buf, len, ps, 0, npg, pg, &np, &nr, &err) == 0);
    CHECK(np == 4095 && nr == 1);
    CHECK(pg[4094].off == 4 + 4094 * ps && pg[4094].page == 4094);
    free(pg);
    munmap(buf, maplen);
}

static void test_lz4(void)
{
    size_t n = 300000;
    uint8_t *src = malloc(n), *out = malloc(n + 16);
    for (size_t i = 0; i < n; i++)
        src[i] = (uint8_t)(i % 97 < 50 ? 0 : rnd() % 7);
    size_t cap = ss_lz4f_bound(n);
    uint8_t *fr = malloc(cap);
    long fl = ss_lz4f_compress(src, n, fr, cap, 0, 1); /* with content checksum */
    CHECK(fl > 0 && (size_t)fl < n);
    CHECK(ss_lz4f_compress(src, n, fr, 10, 0, 1) == -ENOSPC);
    {
        uint8_t *f0 = malloc(cap);
        long l0 = ss_lz4f_compress(src, n, f0, cap, 0, 0);
        CHECK(l0 > 0 && l0 == fl - 4);
        CHECK(ss_lz4f_decompress(f0, (size_t)l0, out, n, n) == 0 && memcmp(out, src, n) == 0);
        free(f0);
    }
    CHECK(ss_lz4f_decompress(fr, (size_t)fl, out, n, n) == 0);
    CHECK(memcmp(out, src, n) == 0);
    uint8_t *roomy = malloc(n + SS_LZ4F_SLACK);
    CHECK(ss_lz4f_decompress(fr, (size_t)fl, roomy, n + SS_LZ4F_SLACK, n) == 0);
    CHECK(memcmp(roomy, src, n) == 0);
    CHECK(ss_lz4f_decompress(fr, (size_t)fl, roomy, n - 1, n) == -EINVAL);
    free(roomy);
    /* wrong expected size either way, truncation, trailing bytes, every bit flip of
     * the first and last 64 bytes and a sample elsewhere: refused, never past raw_len */
    CHECK(ss_lz4f_decompress(fr, (size_t)fl, out, n + 16, n - 1) == -EBADMSG);
    CHECK(ss_lz4f_decompress(fr, (size_t)fl, out, n + 16, n + 1) == -EBADMSG);
    for (size_t cut = 0; cut < (size_t)fl; cut += 1 + cut / 3)
        CHECK(ss_lz4f_decompress(fr, cut, out, n, n) == -EBADMSG);
    uint8_t *longer = malloc((size_t)fl + 1);
    memcpy(longer, fr, (size_t)fl);
    longer[fl] = 0;
    CHECK(ss_lz4f_decompress(longer, (size_t)fl + 1, out, n, n) == -EBADMSG);
    free(longer);
    for (size_t pos = 0; pos < (size_t)fl; pos += (pos < 64 || pos > (size_t)fl - 64) ? 1 : 101) {
        for (int bit = 0; bit < 8; bit += 3) {
            fr[pos] ^= (uint8_t)(1 << bit);
            int rc = ss_lz4f_decompress(fr, (size_t)fl, out, n, n);
            CHECK(rc == -EBADMSG || (rc == 0 && memcmp(out, src, n) == 0));
            fr[pos] ^= (uint8_t)(1 << bit);
        }
    }
    /* a frame of 4 MiB of zeros (no content size) decoded into a 1000-byte budget */
    size_t big = 4u << 20;
    uint8_t *zeros = calloc(1, big);
    LZ4F_preferences_t p;
    memset(&p, 0, sizeof p);
    size_t bcap = LZ4F_compressFrameBound(big, &p);
    uint8_t *bomb = malloc(bcap);
    size_t bl = LZ4F_compressFrame(bomb, bcap, zeros, big, &p);
    CHECK(!LZ4F_isError(bl));
    uint8_t *small = malloc(1000);
    CHECK(ss_lz4f_decompress(bomb, bl, small, 1000, 1000) == -EBADMSG);
    free(small);
    small = malloc(2000);  /* with slack: still refused, still within the buffer */
    CHECK(ss_lz4f_decompress(bomb, bl, small, 2000, 1000) == -EBADMSG);
    free(small);
    free(bomb);
    free(zeros);
    /* random garbage */
    for (int iter = 0; iter < 3000; iter++) {
        size_t gl = rnd() % 40;
        uint8_t *g = malloc(gl ? gl : 1);
        for (size_t k = 0; k < gl; k++)
            g[k] = (uint8_t)rnd();
        if (gl >= 4 && iter % 2) { /* a valid magic number */
            g[0] = 0x04; g[1] = 0x22; g[2] = 0x4d; g[3] = 0x18;
        }
        CHECK(ss_lz4f_decompress(g, gl, out, 64, 64) == -EBADMSG);
        free(g);
    }
    free(src);
    free(out);
    free(fr);
}

int main(void)
{
    test_lz4();
    test_uleb();
    test_xor_roundtrip();
    test_xor_hostile();
    test_block_roundtrip();
    test_parse_hostile();
    test_parse_over_4gib();
    TEST_DONE();
}
