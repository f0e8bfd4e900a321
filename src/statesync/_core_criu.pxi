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


cdef extern from "ss_pages.h" nogil:
    struct ss_pm_error:
        int kind
        uint64_t offset
        uint64_t entry_offset
    long ss_pagemap_decode(const uint8_t *buf, size_t len, size_t pos, size_t max,
                           uint64_t *vaddr, uint64_t *nr_pages, uint32_t *flags,
                           uint64_t *offsets, int *wide, ss_pm_error *err)

PAGEMAP_ERRORS = {
    1: "truncated entry size", 2: "entry size runs past the end of the file",
    3: "truncated varint", 4: "varint longer than 10 bytes",
    5: "unsupported protobuf wire type", 6: "protobuf field number 0",
    7: "length-delimited field runs past the end of its entry",
    8: "truncated fixed-width field", 9: "pagemap entry lacks vaddr",
    10: "pagemap entry lacks nr_pages", 11: "too many entries",
}


def pagemap_decode(const uint8_t[::1] buf not None, size_t pos):
    """Decode the PagemapEntry records of buf[pos:] (see ss_pagemap_decode).

    Returns (vaddr uint64, nr_pages uint64, flags uint32, offsets uint64, wide bool) or,
    for malformed input, (None, message, offset, entry_offset). Output arrays are sized
    by the buffer length (each entry takes at least 4 bytes), never by a field value."""
    cdef size_t n = buf.shape[0]
    if pos > n:
        raise ValueError("pos past the end")
    cdef size_t cap = (n - pos) // 4 + 1
    va = np.empty(cap, dtype=np.uint64)
    nr = np.empty(cap, dtype=np.uint64)
    fl = np.empty(cap, dtype=np.uint32)
    off = np.empty(cap, dtype=np.uint64)
    cdef uint64_t[::1] cva = va, cnr = nr, coff = off
    cdef uint32_t[::1] cfl = fl
    cdef int wide = 0
    cdef ss_pm_error err
    cdef long rc
    cdef const uint8_t *p = &buf[0] if n else NULL
    with nogil:
        rc = ss_pagemap_decode(p, n, pos, cap, &cva[0], &cnr[0], &cfl[0], &coff[0], &wide, &err)
    if rc < 0:
        return None, PAGEMAP_ERRORS.get(err.kind, f"error {err.kind}"), err.offset, err.entry_offset
    return va[:rc].copy(), nr[:rc].copy(), fl[:rc].copy(), off[:rc].copy(), bool(wide)


cdef extern from "ss_pages.h" nogil:
    long ss_pagemap_encode(const uint64_t *vaddr, const uint64_t *nr_pages,
                           const uint32_t *flags, size_t n, int wide, uint8_t *out, size_t cap)
    int SS_PM_ENTRY_MAX


def pagemap_encode(const uint64_t[::1] vaddr not None, const uint64_t[::1] nr_pages not None,
                   const uint32_t[::1] flags not None, bint wide=False):
    """The PagemapEntry records (u32 size + protobuf each) of the runs, as bytes."""
    cdef size_t n = vaddr.shape[0]
    if nr_pages.shape[0] != n or flags.shape[0] != n:
        raise ValueError("arrays differ in length")
    if n == 0:
        return b""
    out = np.empty(n * SS_PM_ENTRY_MAX, dtype=np.uint8)
    cdef uint8_t[::1] o = out
    cdef long rc
    with nogil:
        rc = ss_pagemap_encode(&vaddr[0], &nr_pages[0], &flags[0], n, wide, &o[0], o.shape[0])
    _check(rc, "pagemap_encode")
    return out[:rc].tobytes()
