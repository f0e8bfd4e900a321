# Bindings for the page-delta codec (csrc/ss_codec.c), used by statesync.stream.
# Only type conversion and GIL release here; the stream framing is Python.
from libc.string cimport memset
from libc.stdint cimport UINT32_MAX


cdef extern from "errno.h":
    int E2BIG, ERANGE, EBADMSG

cdef extern from "ss_codec.h" nogil:
    ctypedef struct ss_dedup_table:
        uint64_t *slots
        size_t cap
    ctypedef struct ss_enc_input:
        size_t page_size
        size_t n
        const uint64_t *pagenos
        const uint8_t *pages
        const uint8_t *prev
        const uint8_t *prev_ok
        uint64_t *hashes
        uint32_t flags
        size_t xor_limit
    ctypedef struct ss_enc_stats:
        uint64_t records
        uint64_t pages[5]
        uint64_t dedup_hash_hits_rejected
    ctypedef struct ss_dec_page:
        uint64_t page
        uint64_t src
        uint32_t off
        uint32_t len
        uint32_t rec
        uint8_t kind
        uint64_t check
    ctypedef struct ss_dec_err:
        size_t offset
        size_t record
        size_t page
    unsigned SS_ENC_DEDUP, SS_ENC_XOR
    size_t ss_enc_bound(size_t max_pages, size_t page_size)
    long ss_enc_block(const ss_enc_input *inp, ss_dedup_table *tab, size_t start,
                      size_t max_pages, uint64_t min_page, uint8_t *out, size_t cap,
                      size_t *consumed, size_t *nrecords, ss_enc_stats *st)
    long ss_xor_encode(const uint8_t *newp, const uint8_t *oldp, size_t len, uint8_t *out,
                       size_t cap)
    int ss_xor_decode(const uint8_t *delta, size_t dlen, uint8_t *page, size_t len)
    int ss_dec_parse(const uint8_t *buf, size_t len, size_t page_size, uint64_t min_page,
                     size_t max_pages, ss_dec_page *out, size_t *npages, size_t *nrecords,
                     ss_dec_err *err)
    int ss_dec_build(const uint8_t *buf, size_t len, size_t page_size, const ss_dec_page *pg,
                     size_t n, const int64_t *src_index, uint8_t *outp, ss_dec_err *err)
    size_t ss_lz4f_bound(size_t len)
    long ss_lz4f_compress(const uint8_t *src, size_t len, uint8_t *dst, size_t cap, int level,
                          int checksum)
    int ss_lz4f_decompress(const uint8_t *src, size_t len, uint8_t *dst, size_t dst_cap,
                           size_t raw_len)
    size_t SS_LZ4F_SLACK

# numpy view of ss_dec_page (checked against the C layout at import).
DEC_PAGE_DTYPE = np.dtype({
    "names": ["page", "src", "off", "len", "rec", "kind", "check"],
    "formats": [np.uint64, np.uint64, np.uint32, np.uint32, np.uint32, np.uint8, np.uint64],
    "offsets": [0, 8, 16, 20, 24, 28, 32],
    "itemsize": 40,
})
assert sizeof(ss_dec_page) == 40, "ss_dec_page layout changed: update DEC_PAGE_DTYPE"

CODEC_E2BIG = E2BIG
CODEC_ERANGE = ERANGE
CODEC_EBADMSG = EBADMSG


def codec_enc_bound(size_t max_pages, size_t page_size):
    """Worst-case record payload bytes of a block of max_pages pages."""
    return ss_enc_bound(max_pages, page_size)


def xor_encode(const uint8_t[::1] new not None, const uint8_t[::1] old not None, size_t cap):
    """XBZRLE delta of new XOR old as bytes, or None when it exceeds cap bytes."""
    if new.shape[0] != old.shape[0]:
        raise ValueError("xor_encode: pages differ in length")
    out = np.empty(max(cap, 1), dtype=np.uint8)
    cdef uint8_t[::1] o = out
    cdef size_t n = new.shape[0]
    cdef long rc
    if n == 0:
        return b""
    with nogil:
        rc = ss_xor_encode(&new[0], &old[0], n, &o[0], cap)
    if rc < 0:
        return None
    return out[:rc].tobytes()


def xor_decode(const uint8_t[::1] delta not None, const uint8_t[::1] old not None):
    """New page from an XBZRLE delta and the old page; ValueError if malformed."""
    out = np.array(old, dtype=np.uint8, copy=True)
    cdef uint8_t[::1] o = out
    cdef size_t dl = delta.shape[0], n = old.shape[0]
    cdef int rc
    if n == 0:
        if dl:
            raise ValueError("malformed XOR delta")
        return out
    with nogil:
        rc = ss_xor_decode(&delta[0] if dl else NULL, dl, &o[0], n)
    if rc:
        raise ValueError("malformed XOR delta")
    return out


cdef class EncodeSession:
    """State of one encode pass over n pages (dedup table, hash scratch).

    Holds references to the caller's arrays for its lifetime; not thread-safe
    (one session per thread), but releases the GIL inside block().
    """
    cdef ss_enc_input inp
    cdef ss_dedup_table tab
    cdef ss_enc_stats st
    cdef object _keep
    cdef object _hashes
    cdef object _slots

    def __cinit__(self, const uint64_t[::1] pagenos not None, const uint8_t[:, ::1] pages not None,
                  prev, prev_ok, bint dedup, bint xor, size_t xor_limit):
        cdef size_t n = pages.shape[0]
        cdef size_t ps = pages.shape[1]
        cdef const uint8_t[:, ::1] pv
        cdef const uint8_t[::1] pok
        if pagenos.shape[0] != n:
            raise ValueError("pagenos and pages differ in length")
        memset(&self.inp, 0, sizeof(self.inp))
        memset(&self.st, 0, sizeof(self.st))
        self._hashes = np.zeros(2 * n + 2, dtype=np.uint64)
        cdef uint64_t[::1] hv = self._hashes
        cap = 16
        while cap < 2 * n + 2:
            cap *= 2
        self._slots = np.zeros(cap if dedup else 1, dtype=np.uint64)
        cdef uint64_t[::1] sv = self._slots
        self.tab.slots = &sv[0]
        self.tab.cap = cap if dedup else 0
        self.inp.page_size = ps
        self.inp.n = n
        self.inp.pagenos = &pagenos[0] if n else NULL
        self.inp.pages = &pages[0, 0] if n else NULL
        self.inp.hashes = &hv[0]
        self.inp.flags = (SS_ENC_DEDUP if dedup else 0) | (SS_ENC_XOR if xor else 0)
        self.inp.xor_limit = xor_limit
        keep = [pagenos, pages]
        if prev is not None and n:
            pv = prev
            if pv.shape[0] != n or pv.shape[1] != ps:
                raise ValueError("previous must have the shape of pages")
            self.inp.prev = &pv[0, 0]
            keep.append(pv)
            if prev_ok is not None:
                pok = prev_ok
                if pok.shape[0] != n:
                    raise ValueError("previous mask must have one entry per page")
                self.inp.prev_ok = &pok[0]
                keep.append(pok)
        self._keep = keep

    def block(self, size_t start, size_t max_pages, uint64_t min_page, uint8_t[::1] out not None):
        """Encode up to max_pages pages from start into out; returns
        (payload_len, pages_consumed, records). Releases the GIL."""
        cdef size_t consumed = 0, nrec = 0
        cdef long rc
        cdef size_t cap = out.shape[0]
        with nogil:
            rc = ss_enc_block(&self.inp, &self.tab, start, max_pages, min_page, &out[0], cap,
                              &consumed, &nrec, &self.st)
        _check(rc, "encode block")
        return rc, consumed, nrec

    @property
    def stats(self):
        """Dict: records and pages per record kind so far, and rejected hash matches."""
        return {"records": self.st.records, "zero": self.st.pages[1], "raw": self.st.pages[2],
                "dup": self.st.pages[3], "xor": self.st.pages[4],
                "hash_collisions": self.st.dedup_hash_hits_rejected}


def dec_parse(const uint8_t[::1] payload not None, size_t page_size, uint64_t min_page,
              size_t max_pages):
    """Parse a record payload. Returns (rc, pages (DEC_PAGE_DTYPE array), nrecords,
    err_offset, err_record); rc is 0 or a negative errno (see ss_codec.h): -E2BIG
    also for a payload over UINT32_MAX bytes (parsed offsets are 32-bit)."""
    cdef size_t n = payload.shape[0], npages = 0, nrec = 0
    if n > UINT32_MAX:
        return -E2BIG, np.empty(0, dtype=DEC_PAGE_DTYPE), 0, 0, 0
    out = np.empty(max(max_pages, 1), dtype=DEC_PAGE_DTYPE)
    cdef uint8_t[::1] ov = out.view(np.uint8)
    cdef ss_dec_err err
    cdef int rc
    memset(&err, 0, sizeof(err))
    if n == 0:
        return 0, out[:0], 0, 0, 0
    with nogil:
        rc = ss_dec_parse(&payload[0], n, page_size, min_page, max_pages,
                          <ss_dec_page *>&ov[0], &npages, &nrec, &err)
    return rc, out[:npages], nrec, err.offset, err.record


def dec_build(const uint8_t[::1] payload not None, size_t page_size, pages_info,
              const int64_t[::1] src_index not None, uint8_t[:, ::1] out not None):
    """Build contents of parsed pages into out (see ss_dec_build). pages_info must
    be a 1-d DEC_PAGE_DTYPE array (as dec_parse returns). Returns
    (rc, err_offset, err_record, err_page_index)."""
    if not isinstance(pages_info, np.ndarray) or pages_info.dtype != DEC_PAGE_DTYPE \
            or pages_info.ndim != 1:
        raise ValueError("dec_build: pages_info must be a 1-d DEC_PAGE_DTYPE array "
                         "(from dec_parse)")
    cdef const uint8_t[::1] iv = np.ascontiguousarray(pages_info).view(np.uint8)
    cdef size_t n = pages_info.shape[0]
    cdef ss_dec_err err
    cdef int rc
    memset(&err, 0, sizeof(err))
    if <size_t>iv.shape[0] != n * sizeof(ss_dec_page):
        raise ValueError("dec_build: pages_info is not n packed ss_dec_page records")
    if n == 0:
        return 0, 0, 0, 0
    if out.shape[0] < n or out.shape[1] != page_size or src_index.shape[0] < n:
        raise ValueError("dec_build: output or source index too small")
    if payload.shape[0] == 0 or <size_t>payload.shape[0] > UINT32_MAX:
        raise ValueError("dec_build: payload empty or over UINT32_MAX bytes")
    with nogil:
        rc = ss_dec_build(&payload[0], payload.shape[0], page_size,
                          <const ss_dec_page *>&iv[0], n, &src_index[0], &out[0, 0], &err)
    return rc, err.offset, err.record, err.page


LZ4F_SLACK = SS_LZ4F_SLACK


def lz4f_bound(size_t n):
    """Largest LZ4 frame lz4f_compress_into can write for n bytes."""
    return ss_lz4f_bound(n)


def lz4f_compress_into(const uint8_t[::1] src not None, uint8_t[::1] dst not None, int level=0,
                       bint checksum=False):
    """One LZ4 frame of src written at the start of dst; returns its length.
    dst must hold lz4f_bound(len(src)) bytes; checksum adds the frame's content
    checksum. Releases the GIL."""
    cdef size_t n = src.shape[0], cap = dst.shape[0]
    cdef long rc
    cdef uint8_t empty = 0
    with nogil:
        rc = ss_lz4f_compress(&src[0] if n else &empty, n, &dst[0], cap, level, checksum)
    _check(rc, "lz4 frame compression")
    return rc


def lz4f_decompress_into(const uint8_t[::1] src not None, size_t raw_len, uint8_t[::1] dst not None):
    """Decode one complete LZ4 frame that must yield exactly raw_len bytes into dst
    (never writes past dst's end; give LZ4F_SLACK bytes beyond raw_len to decode
    without an internal staging copy). Returns 0 or a negative errno (-EBADMSG:
    corrupt, wrong length or trailing bytes). Releases the GIL."""
    cdef size_t n = src.shape[0]
    cdef int rc
    if raw_len > <size_t>dst.shape[0]:
        raise ValueError("lz4f_decompress_into: dst smaller than raw_len")
    if n == 0 or raw_len == 0:
        return -EBADMSG
    with nogil:
        rc = ss_lz4f_decompress(&src[0], n, &dst[0], dst.shape[0], raw_len)
    return rc
