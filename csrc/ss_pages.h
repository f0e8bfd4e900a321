/* Page-array comparison and gathering for CRIU image deltas.
 *
 * Pages live in one or more "sources": arrays of rows of page_size bytes laid out
 * back to back (typically the mmap of a CRIU pages-N.img file). A page is named
 * by (source index, row). The indexed functions check every index against the
 * sources' sizes before touching memory and return -ERANGE on a bad one, so a
 * caller may pass indices derived from untrusted image files.
 */
#ifndef SS_PAGES_H
#define SS_PAGES_H

#include "ss_common.h"

struct ss_page_src {
    const uint8_t *base;   /* first byte of row 0 */
    uint64_t nrows;        /* rows available at base */
};

/* out[i] = 1 when page i of a differs from page i of b (both n contiguous pages),
 * else 0. Returns the count of differing pages. */
long ss_pages_differ(const uint8_t *a, const uint8_t *b, size_t n, size_t page_size,
                     uint8_t *out);

/* Indexed form: page i of a is sa[ia[i]] row ra[i], page i of b likewise.
 * Returns the count of differing pages, or -ERANGE when an index is out of range
 * (out is then partly written), -EINVAL on a zero page size. */
long ss_pages_differ_idx(const struct ss_page_src *sa, size_t nsa, const int32_t *ia,
                         const int64_t *ra, const struct ss_page_src *sb, size_t nsb,
                         const int32_t *ib, const int64_t *rb, size_t n, size_t page_size,
                         uint8_t *out);

/* Copy page i = s[si[i]] row ri[i] to out + i * page_size for i < n.
 * Returns n, or -ERANGE / -EINVAL as above. */
long ss_pages_gather(const struct ss_page_src *s, size_t ns, const int32_t *si, const int64_t *ri,
                     size_t n, size_t page_size, uint8_t *out);

#endif
