# Page comparison and gathering for CRIU image deltas (csrc/ss_pages.c).
#
# A page set is given as (sources, src_index, row): sources is a list of
# (rows, page_size) uint8 arrays (usually read-only mmaps of pages-N.img files),
# src_index an int32 array and row an int64 array naming each page. C checks every
# index against the sources, so these accept indices derived from untrusted images.

from libc.stdlib cimport malloc, free
from libc.stdint cimport int32_t
cdef extern from "ss_pages.h" nogil:
    struct ss_page_src:
        const uint8_t *base
        uint64_t nrows
    long ss_pages_differ(const uint8_t *a, const uint8_t *b, size_t n, size_t page_size,
                         uint8_t *out)
    long ss_pages_differ_idx(const ss_page_src *sa, size_t nsa, const int32_t *ia,
                             const int64_t *ra, const ss_page_src *sb, size_t nsb,
                             const int32_t *ib, const int64_t *rb, size_t n, size_t page_size,
                             uint8_t *out)
    long ss_pages_gather(const ss_page_src *s, size_t ns, const int32_t *si, const int64_t *ri,
                         size_t n, size_t page_size, uint8_t *out)


cdef ss_page_src *_page_sources(list sources, size_t page_size, list keep) except NULL:
    """C view of a list of (rows, page_size) arrays; keep holds the memoryviews alive."""
    cdef size_t ns = len(sources)
    cdef ss_page_src *s = <ss_page_src *>malloc((ns if ns else 1) * sizeof(ss_page_src))
    cdef const uint8_t[:, ::1] mv
    if s == NULL:
        raise MemoryError()
    for i, arr in enumerate(sources):
        if arr.ndim != 2 or (arr.shape[0] and arr.shape[1] != page_size):
            free(s)
            raise ValueError(f"page source {i} has shape {arr.shape}, expected (n, {page_size})")
        if arr.shape[0] == 0:
            s[i].base = NULL
            s[i].nrows = 0
            continue
        mv = arr
        keep.append(mv)
        s[i].base = &mv[0, 0]
        s[i].nrows = mv.shape[0]
    return s


def pages_differ(const uint8_t[:, ::1] a not None, const uint8_t[:, ::1] b not None):
    """Boolean array: row i of a differs from row i of b. Both (n, page_size).

    Releases the GIL while comparing; thread-safe."""
    if a.shape[0] != b.shape[0] or a.shape[1] != b.shape[1]:
        raise ValueError(f"shape mismatch: ({a.shape[0]}, {a.shape[1]}) vs ({b.shape[0]}, {b.shape[1]})")
    cdef size_t n = a.shape[0], ps = a.shape[1]
    out = np.zeros(n, dtype=np.bool_)
    if n == 0:
        return out
    cdef uint8_t[::1] o = out.view(np.uint8)
    cdef long rc
    with nogil:
        rc = ss_pages_differ(&a[0, 0], &b[0, 0], n, ps, &o[0])
    _check(rc, "pages_differ")
    return out


def pages_differ_indexed(list sa, const int32_t[::1] ia not None, const int64_t[::1] ra not None,
                         list sb, const int32_t[::1] ib not None, const int64_t[::1] rb not None,
                         size_t page_size):
    """Boolean array: page i of set a differs from page i of set b, each page named by
    (source index, row) into its list of (rows, page_size) uint8 arrays.

    Raises OSError(ERANGE) when an index is outside its sources. Releases the GIL."""
    cdef size_t n = ia.shape[0]
    if ra.shape[0] != n or ib.shape[0] != n or rb.shape[0] != n:
        raise ValueError("index arrays differ in length")
    out = np.zeros(n, dtype=np.bool_)
    if n == 0:
        return out
    cdef list keep = []
    cdef ss_page_src *csa = _page_sources(sa, page_size, keep)
    cdef ss_page_src *csb = NULL
    cdef uint8_t[::1] o = out.view(np.uint8)
    cdef long rc
    cdef size_t nsa = len(sa), nsb = len(sb)
    try:
        csb = _page_sources(sb, page_size, keep)
        with nogil:
            rc = ss_pages_differ_idx(csa, nsa, &ia[0], &ra[0], csb, nsb, &ib[0], &rb[0], n,
                                     page_size, &o[0])
    finally:
        free(csa)
        free(csb)
    _check(rc, "pages_differ_indexed")
    return out


def pages_gather(list sources, const int32_t[::1] si not None, const int64_t[::1] ri not None,
                 size_t page_size, uint8_t[:, ::1] out=None):
    """Copy the pages named by (si, ri) into an (n, page_size) uint8 array (out, or a new
    one) and return it. Raises OSError(ERANGE) on an index outside the sources."""
    cdef size_t n = si.shape[0]
    if ri.shape[0] != n:
        raise ValueError("index arrays differ in length")
    if out is None:
        res = np.empty((n, page_size), dtype=np.uint8)
        out = res
    else:
        res = out.base if out.base is not None else out
        if out.shape[0] < n or out.shape[1] != page_size:
            raise ValueError("out is too small")
    if n == 0:
        return res
    cdef list keep = []
    cdef ss_page_src *cs = _page_sources(sources, page_size, keep)
    cdef size_t ns = len(sources)
    cdef long rc
    try:
        with nogil:
            rc = ss_pages_gather(cs, ns, &si[0], &ri[0], n, page_size, &out[0, 0])
    finally:
        free(cs)
    _check(rc, "pages_gather")
    return res
