/* Page-array comparison and gathering; see ss_pages.h. */
#include <errno.h>

#include "ss_pages.h"

/* memcmp is glibc's vectorised compare and stops at the first differing byte, which
 * is what a dirty page usually offers early; equal pages are read to the end once. */
static inline int page_differs(const uint8_t *a, const uint8_t *b, size_t ps)
{
    return a == b ? 0 : memcmp(a, b, ps) != 0;
}

long ss_pages_differ(const uint8_t *a, const uint8_t *b, size_t n, size_t page_size,
                     uint8_t *out)
{
    long count = 0;
    if (page_size == 0)
        return -EINVAL;
    for (size_t i = 0; i < n; i++) {
        int d = page_differs(a + i * page_size, b + i * page_size, page_size);
        out[i] = (uint8_t)d;
        count += d;
    }
    return count;
}

static inline const uint8_t *page_at(const struct ss_page_src *s, size_t ns, int32_t si,
                                     int64_t ri, size_t ps)
{
    if (si < 0 || (size_t)si >= ns || ri < 0 || (uint64_t)ri >= s[si].nrows)
        return NULL;
    return s[si].base + (size_t)ri * ps;
}

long ss_pages_differ_idx(const struct ss_page_src *sa, size_t nsa, const int32_t *ia,
                         const int64_t *ra, const struct ss_page_src *sb, size_t nsb,
                         const int32_t *ib, const int64_t *rb, size_t n, size_t page_size,
                         uint8_t *out)
{
    long count = 0;
    if (page_size == 0)
        return -EINVAL;
    for (size_t i = 0; i < n; i++) {
        const uint8_t *pa = page_at(sa, nsa, ia[i], ra[i], page_size);
        const uint8_t *pb = page_at(sb, nsb, ib[i], rb[i], page_size);
        if (!pa || !pb)
            return -ERANGE;
        int d = page_differs(pa, pb, page_size);
        out[i] = (uint8_t)d;
        count += d;
    }
    return count;
}

long ss_pages_gather(const struct ss_page_src *s, size_t ns, const int32_t *si, const int64_t *ri,
                     size_t n, size_t page_size, uint8_t *out)
{
    if (page_size == 0)
        return -EINVAL;
    for (size_t i = 0; i < n; i++) {
        const uint8_t *p = page_at(s, ns, si[i], ri[i], page_size);
        if (!p)
            return -ERANGE;
        memcpy(out + i * page_size, p, page_size);
    }
    return (long)n;
}

/* ---- CRIU pagemap entries ---- */

#define SS_PE_PARENT 1u
#define SS_PE_PRESENT 4u

static int pm_fail(struct ss_pm_error *err, int kind, size_t off, size_t entry_off)
{
    err->kind = kind;
    err->offset = off;
    err->entry_offset = entry_off;
    return -EBADMSG;
}

/* Decode a varint at buf[*p..end); keeps the low 64 bits like protobuf. */
static int pm_varint(const uint8_t *buf, size_t *p, size_t end, uint64_t *out)
{
    uint64_t v = 0;
    unsigned shift = 0;
    size_t i = *p;
    for (int n = 0; n < 10; n++) {
        if (i >= end)
            return SS_PM_TRUNC_VARINT;
        uint8_t b = buf[i++];
        if (shift < 64)
            v |= (uint64_t)(b & 0x7f) << shift;
        shift += 7;
        if (!(b & 0x80)) {
            *p = i;
            *out = v;
            return 0;
        }
    }
    return SS_PM_LONG_VARINT;
}

long ss_pagemap_decode(const uint8_t *buf, size_t len, size_t pos, size_t max, uint64_t *vaddr,
                       uint64_t *nr_pages, uint32_t *flags, uint64_t *offsets, int *wide,
                       struct ss_pm_error *err)
{
    size_t n = 0;
    *wide = 0;
    while (pos < len) {
        size_t eoff = pos;
        if (len - pos < 4)
            return pm_fail(err, SS_PM_TRUNC_SIZE, pos, eoff);
        uint32_t size = (uint32_t)buf[pos] | (uint32_t)buf[pos + 1] << 8 |
                        (uint32_t)buf[pos + 2] << 16 | (uint32_t)buf[pos + 3] << 24;
        pos += 4;
        if (size > len - pos)
            return pm_fail(err, SS_PM_SIZE_PAST_END, eoff, eoff);
        if (n >= max)
            return pm_fail(err, SS_PM_TOO_MANY, eoff, eoff);
        size_t end = pos + size, p = pos;
        uint64_t va = 0, nr32 = 0, nr64 = 0, fl = 0, inpar = 0;
        int has_va = 0, has_nr32 = 0, has_nr64 = 0, has_fl = 0;
        while (p < end) {
            size_t foff = p;
            uint64_t key, val = 0;
            int rc = pm_varint(buf, &p, end, &key);
            if (rc)
                return pm_fail(err, rc, foff, eoff);
            uint64_t field = key >> 3;
            unsigned wt = (unsigned)(key & 7);
            if (field == 0)
                return pm_fail(err, SS_PM_FIELD_ZERO, foff, eoff);
            switch (wt) {
            case 0:
                rc = pm_varint(buf, &p, end, &val);
                if (rc)
                    return pm_fail(err, rc, foff, eoff);
                break;
            case 1:
            case 5: {
                size_t w = wt == 1 ? 8 : 4;
                if (end - p < w)
                    return pm_fail(err, SS_PM_TRUNC_FIXED, foff, eoff);
                p += w;
                continue;  /* no fixed-width fields of interest */
            }
            case 2: {
                uint64_t l;
                rc = pm_varint(buf, &p, end, &l);
                if (rc)
                    return pm_fail(err, rc, foff, eoff);
                if (l > end - p)
                    return pm_fail(err, SS_PM_LEN_PAST_END, foff, eoff);
                p += (size_t)l;
                continue;
            }
            default:
                return pm_fail(err, SS_PM_BAD_WIRETYPE, foff, eoff);
            }
            switch (field) {
            case 1: va = val; has_va = 1; break;
            case 2: nr32 = val; has_nr32 = 1; break;
            case 3: inpar = val; break;
            case 4: fl = val; has_fl = 1; break;
            case 5: nr64 = val; has_nr64 = 1; break;
            default: break;
            }
        }
        if (!has_va)
            return pm_fail(err, SS_PM_NO_VADDR, eoff, eoff);
        if (!has_nr32 && !has_nr64)
            return pm_fail(err, SS_PM_NO_NR_PAGES, eoff, eoff);
        if (has_nr64)
            *wide = 1;
        uint32_t f = has_fl ? (uint32_t)fl : (inpar ? SS_PE_PARENT : SS_PE_PRESENT);
        if (has_fl && inpar)
            f |= SS_PE_PARENT;
        vaddr[n] = va;
        nr_pages[n] = has_nr64 ? nr64 : nr32;
        flags[n] = f;
        offsets[n] = eoff;
        n++;
        pos = end;
    }
    return (long)n;
}

long ss_pagemap_encode(const uint64_t *vaddr, const uint64_t *nr_pages, const uint32_t *flags,
                       size_t n, int wide, uint8_t *out, size_t cap)
{
    size_t pos = 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t m[SS_PM_ENTRY_MAX];
        size_t k = 0;
        m[k++] = 0x08;
        for (uint64_t v = vaddr[i];; v >>= 7) {
            m[k++] = (uint8_t)(v >= 0x80 ? (v & 0x7f) | 0x80 : v);
            if (v < 0x80)
                break;
        }
        m[k++] = 0x10;
        for (uint64_t v = wide ? 0 : nr_pages[i];; v >>= 7) {
            m[k++] = (uint8_t)(v >= 0x80 ? (v & 0x7f) | 0x80 : v);
            if (v < 0x80)
                break;
        }
        m[k++] = 0x20;
        for (uint64_t v = flags[i];; v >>= 7) {
            m[k++] = (uint8_t)(v >= 0x80 ? (v & 0x7f) | 0x80 : v);
            if (v < 0x80)
                break;
        }
        if (wide) {
            m[k++] = 0x28;
            for (uint64_t v = nr_pages[i];; v >>= 7) {
                m[k++] = (uint8_t)(v >= 0x80 ? (v & 0x7f) | 0x80 : v);
                if (v < 0x80)
                    break;
            }
        }
        if (cap - pos < 4 + k)
            return -ENOSPC;
        out[pos] = (uint8_t)k;
        out[pos + 1] = out[pos + 2] = out[pos + 3] = 0;
        memcpy(out + pos + 4, m, k);
        pos += 4 + k;
    }
    return (long)pos;
}
