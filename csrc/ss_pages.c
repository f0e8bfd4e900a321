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
