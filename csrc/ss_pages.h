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

/* ---- CRIU pagemap entries ------------------------------------------------------
 * Decode the PagemapEntry records of a pagemap image from buf[pos..len): each is a
 * u32 little-endian size then that many bytes of protobuf {1: vaddr, 2: nr_pages
 * (u32), 3: in_parent, 4: flags, 5: nr_pages (u64, preferred)}; unknown fields are
 * skipped. Flags: the flags field, with PE_PARENT added for in_parent; without a
 * flags field, PE_PARENT if in_parent else PE_PRESENT (old images). Every length is
 * checked against len; nothing is allocated. At most max entries are stored. */
enum ss_pm_err {
    SS_PM_TRUNC_SIZE = 1,   /* fewer than 4 bytes left for an entry size */
    SS_PM_SIZE_PAST_END,    /* entry size runs past the end of the buffer */
    SS_PM_TRUNC_VARINT,     /* varint runs past the end of its entry */
    SS_PM_LONG_VARINT,      /* varint longer than 10 bytes */
    SS_PM_BAD_WIRETYPE,     /* wire type 3, 4, 6 or 7 */
    SS_PM_FIELD_ZERO,       /* field number 0 */
    SS_PM_LEN_PAST_END,     /* length-delimited field runs past its entry */
    SS_PM_TRUNC_FIXED,      /* fixed32/64 field runs past its entry */
    SS_PM_NO_VADDR,         /* entry without vaddr */
    SS_PM_NO_NR_PAGES,      /* entry without nr_pages */
    SS_PM_TOO_MANY,         /* more than max entries */
};

struct ss_pm_error {
    int kind;               /* enum ss_pm_err */
    uint64_t offset;        /* byte offset in buf of the problem */
    uint64_t entry_offset;  /* byte offset of the entry's size field */
};

/* Returns the number of entries decoded, or -EBADMSG with *err filled. *wide is set
 * to 1 when any entry carried field 5 (CRIU >= 4.2 format). */
long ss_pagemap_decode(const uint8_t *buf, size_t len, size_t pos, size_t max, uint64_t *vaddr,
                       uint64_t *nr_pages, uint32_t *flags, uint64_t *offsets, int *wide,
                       struct ss_pm_error *err);

/* Bytes ss_pagemap_encode needs at most per entry. */
#define SS_PM_ENTRY_MAX 48

/* Encode n PagemapEntry records (u32 size + protobuf each) into out (cap bytes), in
 * the field order CRIU writes: wide == 0: {1: vaddr, 2: nr_pages, 4: flags} (CRIU
 * <= 4.1); wide != 0: {1: vaddr, 2: 0, 4: flags, 5: nr_pages} (CRIU >= 4.2).
 * Returns the bytes written, or -ENOSPC when cap is too small (n * SS_PM_ENTRY_MAX
 * always suffices). */
long ss_pagemap_encode(const uint64_t *vaddr, const uint64_t *nr_pages, const uint32_t *flags,
                       size_t n, int wide, uint8_t *out, size_t cap);
