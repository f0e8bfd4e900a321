# Page hashing and zero-page tests (csrc/ss_hash.c).

cdef extern from "ss_hash.h" nogil:
    void ss_hash128(const void *data, size_t len, uint64_t seed, uint64_t *out)
    void ss_hash_pages(const uint8_t *pages, size_t n, size_t page_size, uint64_t seed,
                       uint64_t *out)
    size_t ss_zero_pages(const uint8_t *pages, size_t n, size_t page_size, uint8_t *out)


def hash128(const uint8_t[::1] data not None, uint64_t seed=0):
    """128-bit content hash of a bytes-like object, as (lo, hi) Python ints."""
    cdef uint64_t out[2]
    cdef size_t n = data.shape[0]
    cdef const uint8_t *p = &data[0] if n else NULL
    with nogil:
        ss_hash128(p, n, seed, out)
    return out[0], out[1]


def hash_pages(const uint8_t[:, ::1] pages not None, uint64_t seed=0):
    """Hash each row of an (n, page_size) uint8 array; returns an (n, 2) uint64 array.

    Thread-safe; releases the GIL while hashing.
    """
    cdef size_t n = pages.shape[0], ps = pages.shape[1]
    out = np.empty((n, 2), dtype=np.uint64)
    cdef uint64_t[:, ::1] o = out
    if n == 0 or ps == 0:
        if n:
            for i in range(n):
                ss_hash128(NULL, 0, seed, &o[i, 0])
        return out
    with nogil:
        ss_hash_pages(&pages[0, 0], n, ps, seed, &o[0, 0])
    return out


def zero_pages(const uint8_t[:, ::1] pages not None):
    """Boolean array: True where a row of the (n, page_size) array is all zero."""
    cdef size_t n = pages.shape[0], ps = pages.shape[1]
    out = np.zeros(n, dtype=np.bool_)
    if n == 0 or ps == 0:
        out[:] = True
        return out
    cdef uint8_t[::1] o = out.view(np.uint8)
    with nogil:
        ss_zero_pages(&pages[0, 0], n, ps, &o[0])
    return out
