#include "ss_codec.h"

#include <errno.h>
#include <stdlib.h>

#include <lz4frame.h>

#include "ss_hash.h"

size_t ss_uleb_put(uint8_t *out, uint64_t v)
{
    size_t n = 0;
    do {
        uint8_t b = (uint8_t)(v & 0x7f);
        v >>= 7;
        out[n++] = (uint8_t)(b | (v ? 0x80 : 0));
    } while (v);
    return n;
}

static inline size_t uleb_len(uint64_t v)
{
    size_t n = 1;
    while (v >>= 7)
        n++;
    return n;
}

int ss_uleb_get(const uint8_t **pp, const uint8_t *end, uint64_t *v)
{
    const uint8_t *p = *pp;
    uint64_t r = 0;
    for (unsigned i = 0; i < SS_ULEB_MAX; i++) {
        if (p >= end)
            return -EINVAL;
        uint8_t b = *p++;
        /* The 10th byte carries bit 63 only. */
        if (i == SS_ULEB_MAX - 1 && b > 1)
            return -EINVAL;
        r |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            /* Minimal form: a multi-byte number never ends in a zero byte. Keeping the
             * encoding canonical makes equal streams byte-identical. */
            if (i > 0 && b == 0)
                return -EINVAL;
            *v = r;
            *pp = p;
            return 0;
        }
    }
    return -EINVAL;
}

/* ---------------------------------------------------------------- XOR delta */

/* Zero gaps shorter than this inside a changed area are carried as literal
 * bytes: splitting the run would cost two length bytes for at most two saved. */
#define XOR_MIN_ZRUN 3

long ss_xor_encode(const uint8_t *newp, const uint8_t *oldp, size_t len, uint8_t *out,
                   size_t cap)
{
    size_t i = 0, o = 0, zstart = 0;
    for (;;) {
        /* Skip the zero run, a word at a time. */
        while (i + 8 <= len && ss_rd64(newp + i) == ss_rd64(oldp + i))
            i += 8;
        while (i < len && newp[i] == oldp[i])
            i++;
        if (i >= len)
            break;
        size_t zrun = i - zstart, nstart = i, last = i;
        /* The changed run ends before XOR_MIN_ZRUN equal bytes in a row (or at the end). */
        for (size_t j = i + 1; j < len && j - last <= XOR_MIN_ZRUN; j++) {
            if (newp[j] != oldp[j])
                last = j;
            if (o + (j - nstart) > cap) /* hopeless already: stop scanning */
                return -ENOSPC;
        }
        size_t nzrun = last + 1 - nstart;
        if (o + uleb_len(zrun) + uleb_len(nzrun) + nzrun > cap)
            return -ENOSPC;
        o += ss_uleb_put(out + o, zrun);
        o += ss_uleb_put(out + o, nzrun);
        for (size_t k = 0; k < nzrun; k++)
            out[o + k] = newp[nstart + k] ^ oldp[nstart + k];
        o += nzrun;
        i = zstart = last + 1;
    }
    return (long)o;
}

int ss_xor_decode(const uint8_t *delta, size_t dlen, uint8_t *page, size_t len)
{
    const uint8_t *p = delta, *end = delta + dlen;
    size_t pos = 0;
    int first = 1;
    while (p < end) {
        uint64_t zrun, nzrun;
        if (ss_uleb_get(&p, end, &zrun) || ss_uleb_get(&p, end, &nzrun))
            return -EINVAL;
        if ((!first && zrun == 0) || nzrun == 0)
            return -EINVAL;
        first = 0;
        if (zrun > len - pos)
            return -EINVAL;
        pos += (size_t)zrun;
        if (nzrun > len - pos || nzrun > (uint64_t)(end - p))
            return -EINVAL;
        for (size_t k = 0; k < (size_t)nzrun; k++)
            page[pos + k] ^= p[k];
        p += nzrun;
        pos += (size_t)nzrun;
    }
    return 0;
}

/* ---------------------------------------------------------------- encoder */

size_t ss_enc_bound(size_t max_pages, size_t page_size)
{
    /* Each page may open its own record: type byte, two ULEB128s, plus the
     * largest per-page body (RAW page; DUP and XOR entries are smaller because
     * XOR is only chosen below page_size). */
    return max_pages * (page_size + 1 + 2 * SS_ULEB_MAX + SS_ULEB_MAX + 8) + 64;
}

static inline const uint8_t *page_at(const uint8_t *base, size_t i, size_t ps)
{
    return base + i * ps;
}

/* Dedup lookup of page i (hash already in hashes); returns the index of an earlier
 * page with identical bytes, or -1. Inserts i when no match was found. */
static long dedup_find_insert(const ss_enc_input *in, ss_dedup_table *tab, size_t i,
                              ss_enc_stats *st)
{
    const uint64_t *h = in->hashes + 2 * i;
    size_t mask = tab->cap - 1, slot = (size_t)(h[0] ^ (h[1] >> 17)) & mask;
    for (size_t probe = 0; probe < tab->cap; probe++, slot = (slot + 1) & mask) {
        uint64_t e = tab->slots[slot];
        if (e == 0) {
            tab->slots[slot] = (uint64_t)i + 1;
            return -1;
        }
        size_t j = (size_t)(e - 1);
        if (j == i)
            return -1; /* already inserted (page re-classified after a short block) */
        const uint64_t *hj = in->hashes + 2 * j;
        if (hj[0] == h[0] && hj[1] == h[1] && j < i) {
            /* Exact, not probable: the sender holds both pages. */
            if (memcmp(page_at(in->pages, i, in->page_size),
                       page_at(in->pages, j, in->page_size), in->page_size) == 0)
                return (long)j;
            st->dedup_hash_hits_rejected++;
        }
    }
    return -1; /* table full: no dedup for this page */
}

long ss_enc_block(const ss_enc_input *in, ss_dedup_table *tab, size_t start, size_t max_pages,
                  uint64_t min_page, uint8_t *out, size_t cap, size_t *consumed,
                  size_t *nrecords, ss_enc_stats *st)
{
    const size_t ps = in->page_size;
    *consumed = 0;
    *nrecords = 0;
    if (start >= in->n || max_pages == 0)
        return 0;
    size_t k = in->n - start < max_pages ? in->n - start : max_pages;
    if (in->pagenos[start] < min_page)
        return -EINVAL;
    for (size_t i = start + 1; i < start + k; i++)
        if (in->pagenos[i] <= in->pagenos[i - 1])
            return -EINVAL;

    uint8_t *kind = malloc(k);
    uint64_t *src = malloc(k * sizeof *src);
    if (!kind || !src) {
        free(kind);
        free(src);
        return -ENOMEM;
    }
    const int dedup = (in->flags & SS_ENC_DEDUP) && tab && tab->cap;
    const int use_xor = (in->flags & SS_ENC_XOR) && in->prev;
    size_t xlimit = in->xor_limit < ps ? in->xor_limit : ps - 1;

    /* Pass 1: classify. */
    for (size_t t = 0; t < k; t++) {
        size_t i = start + t;
        const uint8_t *pg = page_at(in->pages, i, ps);
        if (ss_is_zero(pg, ps)) {
            kind[t] = SS_REC_ZERO;
            continue;
        }
        int have_prev = in->prev && (!in->prev_ok || in->prev_ok[i]);
        int same = have_prev && memcmp(pg, page_at(in->prev, i, ps), ps) == 0;
        if (dedup || same)
            ss_hash128(pg, ps, 0, in->hashes + 2 * i);
        if (dedup) {
            long j = dedup_find_insert(in, tab, i, st);
            if (j >= 0) {
                kind[t] = SS_REC_DUP;
                src[t] = in->pagenos[j];
                continue;
            }
        }
        if (same) {
            kind[t] = SS_REC_DUP;
            src[t] = in->pagenos[i];
            continue;
        }
        kind[t] = SS_REC_RAW;
        if (use_xor && have_prev) {
            /* Trial encoding into the output's tail, which pass 2 has not reached:
             * only the length is kept; pass 2 encodes again in place. */
            long d = ss_xor_encode(pg, page_at(in->prev, i, ps), ps,
                                   out + (cap > xlimit ? cap - xlimit : 0),
                                   cap > xlimit ? xlimit : 0);
            if (d >= 0) {
                kind[t] = SS_REC_XOR;
                src[t] = (uint64_t)d;
            }
        }
    }

    /* Pass 2: emit runs of same-kind, consecutive pages. */
    size_t o = 0, t = 0, nrec = 0;
    uint64_t expected = min_page;
    while (t < k) {
        size_t i0 = start + t;
        uint8_t kd = kind[t];
        size_t run = 1;
        while (t + run < k && kind[t + run] == kd &&
               in->pagenos[i0 + run] == in->pagenos[i0 + run - 1] + 1)
            run++;
        /* Size of the record, to stop the block before a record that does not fit. */
        size_t need = 1 + 2 * SS_ULEB_MAX;
        if (kd == SS_REC_RAW)
            need += run * ps;
        else if (kd == SS_REC_DUP)
            need += run * (SS_ULEB_MAX + 16);
        else if (kd == SS_REC_XOR)
            for (size_t r = 0; r < run; r++)
                need += SS_ULEB_MAX + 8 + (size_t)src[t + r];
        if (o + need > cap) {
            if (kd == SS_REC_RAW && o + 1 + 2 * SS_ULEB_MAX + ps <= cap) {
                run = (cap - o - 1 - 2 * SS_ULEB_MAX) / ps;
            } else {
                break;
            }
        }
        out[o++] = kd;
        o += ss_uleb_put(out + o, in->pagenos[i0] - expected);
        o += ss_uleb_put(out + o, run);
        for (size_t r = 0; r < run; r++) {
            size_t i = i0 + r;
            const uint8_t *pg = page_at(in->pages, i, ps);
            if (kd == SS_REC_RAW) {
                memcpy(out + o, pg, ps);
                o += ps;
            } else if (kd == SS_REC_DUP) {
                o += ss_uleb_put(out + o, src[t + r]);
                for (int w = 0; w < 2; w++)
                    for (int b = 0; b < 8; b++)
                        out[o++] = (uint8_t)(in->hashes[2 * i + w] >> (8 * b));
            } else if (kd == SS_REC_XOR) {
                size_t dlen = (size_t)src[t + r];
                o += ss_uleb_put(out + o, dlen);
                /* Pass 1 hashed every non-zero page already when dedup is on. */
                if (!dedup)
                    ss_hash128(pg, ps, 0, in->hashes + 2 * i);
                for (int b = 0; b < 8; b++)
                    out[o++] = (uint8_t)(in->hashes[2 * i] >> (8 * b));
                long d = ss_xor_encode(pg, page_at(in->prev, i, ps), ps, out + o, dlen);
                if (d != (long)dlen) { /* cannot happen: same inputs as pass 1 */
                    free(kind);
                    free(src);
                    return -EIO;
                }
                o += dlen;
            }
            st->pages[kd]++;
        }
        st->records++;
        nrec++;
        expected = in->pagenos[i0 + run - 1] + 1;
        t += run;
    }
    free(kind);
    free(src);
    if (t == 0)
        return -ENOSPC;
    *consumed = t;
    *nrecords = nrec;
    return (long)o;
}

/* ---------------------------------------------------------------- decoder */

static inline uint64_t rd_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int b = 7; b >= 0; b--)
        v = (v << 8) | p[b];
    return v;
}

#define FAIL(code, at)                        \
    do {                                      \
        err->offset = (size_t)((at) - buf);   \
        err->record = rec;                    \
        return (code);                        \
    } while (0)

int ss_dec_parse(const uint8_t *buf, size_t len, size_t page_size, uint64_t min_page,
                 size_t max_pages, ss_dec_page *out, size_t *npages, size_t *nrecords,
                 ss_dec_err *err)
{
    const uint8_t *p = buf, *end = buf + len;
    size_t n = 0, rec = 0;
    uint64_t expected = min_page;
    int any = 0; /* expected may be 2^64 after the last possible page */
    err->page = 0;
    *npages = 0;
    *nrecords = 0;
    /* ss_dec_page keeps payload offsets in 32 bits (40-byte entries); a longer
     * payload would truncate them. Stream blocks are far smaller (the reader caps
     * block_pages * page_size at 64 MiB by default), so refuse rather than widen. */
    if (len > UINT32_MAX) {
        err->offset = 0;
        err->record = 0;
        return -E2BIG;
    }
    while (p < end) {
        const uint8_t *rstart = p;
        uint8_t kind = *p++;
        uint64_t gap, count;
        if (kind < SS_REC_ZERO || kind > SS_REC_XOR)
            FAIL(-EINVAL, rstart);
        if (ss_uleb_get(&p, end, &gap))
            FAIL(-EINVAL, p);
        if (ss_uleb_get(&p, end, &count))
            FAIL(-EINVAL, p);
        if (count == 0)
            FAIL(-EINVAL, p - 1);
        if (count > max_pages - n)
            FAIL(-E2BIG, p - 1);
        if (any && expected == 0) /* wrapped: previous record ended at 2^64 */
            FAIL(-ERANGE, rstart);
        if (gap > UINT64_MAX - expected || count - 1 > UINT64_MAX - expected - gap)
            FAIL(-ERANGE, rstart);
        uint64_t first = expected + gap;
        any = 1;
        for (uint64_t c = 0; c < count; c++) {
            ss_dec_page *d = &out[n + c];
            memset(d, 0, sizeof *d);
            d->page = first + c;
            d->kind = kind;
            d->rec = (uint32_t)rec;
            if (kind == SS_REC_RAW) {
                if ((size_t)(end - p) < page_size)
                    FAIL(-EINVAL, p);
                d->off = (uint32_t)(p - buf);
                p += page_size;
            } else if (kind == SS_REC_DUP) {
                if (ss_uleb_get(&p, end, &d->src))
                    FAIL(-EINVAL, p);
                if ((size_t)(end - p) < 16)
                    FAIL(-EINVAL, p);
                d->off = (uint32_t)(p - buf);
                p += 16;
            } else if (kind == SS_REC_XOR) {
                uint64_t dlen;
                if (ss_uleb_get(&p, end, &dlen))
                    FAIL(-EINVAL, p);
                if (dlen >= page_size * 2 || (size_t)(end - p) < 8 || dlen > (uint64_t)(end - p - 8))
                    FAIL(-EINVAL, p);
                d->check = rd_le64(p);
                p += 8;
                d->off = (uint32_t)(p - buf);
                d->len = (uint32_t)dlen;
                p += dlen;
            }
        }
        n += (size_t)count;
        expected = first + (count - 1) + 1; /* may wrap to 0 at 2^64: caught above */
        rec++;
    }
    *npages = n;
    *nrecords = rec;
    return 0;
}

int ss_dec_build(const uint8_t *buf, size_t len, size_t page_size, const ss_dec_page *pg,
                 size_t n, const int64_t *src_index, uint8_t *outp, ss_dec_err *err)
{
    for (size_t i = 0; i < n; i++) {
        const ss_dec_page *d = &pg[i];
        uint8_t *row = outp + i * page_size;
        err->page = i;
        err->record = d->rec;
        err->offset = d->off;
        switch (d->kind) {
        case SS_REC_ZERO:
            memset(row, 0, page_size);
            break;
        case SS_REC_RAW:
            if ((size_t)d->off + page_size > len)
                return -EINVAL;
            memcpy(row, buf + d->off, page_size);
            break;
        case SS_REC_XOR: {
            if ((size_t)d->off + d->len > len)
                return -EINVAL;
            if (ss_xor_decode(buf + d->off, d->len, row, page_size))
                return -EINVAL;
            uint64_t h[2];
            ss_hash128(row, page_size, 0, h);
            if (h[0] != d->check)
                return -EBADMSG;
            break;
        }
        case SS_REC_DUP: {
            if ((size_t)d->off + 16 > len)
                return -EINVAL;
            int64_t s = src_index ? src_index[i] : -1;
            if (s >= 0) {
                if ((size_t)s >= i)
                    return -EINVAL;
                memcpy(row, outp + (size_t)s * page_size, page_size);
            }
            uint64_t h[2];
            ss_hash128(row, page_size, 0, h);
            if (h[0] != rd_le64(buf + d->off) || h[1] != rd_le64(buf + d->off + 8))
                return -EBADMSG;
            break;
        }
        default:
            return -EINVAL;
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- LZ4 frames */

static void lz4_prefs(LZ4F_preferences_t *p, size_t len, int level, int checksum)
{
    memset(p, 0, sizeof *p);
    /* 64 KiB blocks: liblz4 then uses its 16-bit match table (inputs < 64 KiB), which
     * compressed memory pages both smaller and faster than 1-4 MiB blocks here. */
    p->frameInfo.blockSizeID = LZ4F_max64KB;
    p->frameInfo.blockMode = LZ4F_blockLinked;      /* matches may reach into the previous block */
    /* The stream's block header hashes the stored bytes (ss_hash128, ~9 GB/s) before
     * they reach the decoder; liblz4's XXH32 content checksum halved decoding speed
     * here (docs/stream-format.md), so it is optional. */
    p->frameInfo.contentChecksumFlag =
        checksum ? LZ4F_contentChecksumEnabled : LZ4F_noContentChecksum;
    p->frameInfo.blockChecksumFlag = LZ4F_noBlockChecksum;
    p->frameInfo.contentSize = (unsigned long long)len;
    p->compressionLevel = level;
    p->autoFlush = 1; /* compress straight from src: no copy into liblz4's staging buffer */
}

size_t ss_lz4f_bound(size_t len)
{
    LZ4F_preferences_t p;
    lz4_prefs(&p, len, 0, 1);
    return LZ4F_compressFrameBound(len, &p);
}

long ss_lz4f_compress(const uint8_t *src, size_t len, uint8_t *dst, size_t cap, int level,
                      int checksum)
{
    LZ4F_preferences_t p;
    lz4_prefs(&p, len, level, checksum);
    if (cap < LZ4F_compressFrameBound(len, &p))
        return -ENOSPC;
    size_t r = LZ4F_compressFrame(dst, cap, src, len, &p);
    if (LZ4F_isError(r))
        return -EIO;
    return (long)r;
}

int ss_lz4f_decompress(const uint8_t *src, size_t len, uint8_t *dst, size_t dst_cap,
                       size_t raw_len)
{
    if (dst_cap < raw_len)
        return -EINVAL;
    LZ4F_dctx *dctx = NULL;
    if (LZ4F_isError(LZ4F_createDecompressionContext(&dctx, LZ4F_VERSION)))
        return -ENOMEM;
    int rc = -EBADMSG;
    LZ4F_frameInfo_t fi;
    size_t spos = len, dpos = 0;
    size_t r = LZ4F_getFrameInfo(dctx, &fi, src, &spos);
    if (LZ4F_isError(r))
        goto out;
    if (fi.contentSize && fi.contentSize != (unsigned long long)raw_len)
        goto out;
    for (;;) {
        size_t dsz = dst_cap - dpos, isz = len - spos;
        r = LZ4F_decompress(dctx, dst + dpos, &dsz, src + spos, &isz, NULL);
        if (LZ4F_isError(r))
            goto out;
        dpos += dsz;
        spos += isz;
        if (r == 0)
            break; /* frame complete, content checksum verified by liblz4 */
        if (dsz == 0 && isz == 0)
            goto out; /* truncated frame, or more content than dst_cap */
        if (dpos > raw_len)
            goto out; /* more content than announced: stop before the buffer's end */
    }
    if (spos == len && dpos == raw_len)
        rc = 0;
out:
    LZ4F_freeDecompressionContext(dctx);
    return rc;
}
