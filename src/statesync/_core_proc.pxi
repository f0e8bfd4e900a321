# Bindings of csrc/ss_proc.c: pagemap reads and page reads of another process.
# Type conversion, GIL release and errno mapping only; statesync.proc adds the
# meaning (errors naming the pid, VMA records).

from libc.stdint cimport int64_t as _i64

cdef extern from "ss_proc.h" nogil:
    int ss_pagemap_open(int pid)
    Py_ssize_t ss_pagemap_read(int fd, uint64_t start, size_t npages, size_t page_size,
                               uint64_t *out)
    Py_ssize_t ss_pagemap_select_ex(int fd, uint64_t start, uint64_t end, size_t page_size,
                                    uint64_t mask, uint64_t exclude, uint64_t *out, size_t cap,
                                    uint64_t *next)
    Py_ssize_t ss_read_pages(int pid, const uint64_t *addrs, size_t n, size_t page_size,
                             uint8_t *out, uint8_t *ok)
    Py_ssize_t ss_hash_remote(int pid, const uint64_t *addrs, size_t n, size_t page_size,
                              uint64_t seed, uint64_t *hashes, uint8_t *ok)


def pagemap_open(int pid):
    """Open /proc/PID/pagemap; returns an fd the caller must close."""
    cdef int fd
    with nogil:
        fd = ss_pagemap_open(pid)
    _check(fd, f"open /proc/{pid}/pagemap")
    return fd


def pagemap_read(int fd, uint64_t start, size_t npages, size_t page_size=4096):
    """Raw pagemap entries of npages pages from start: a uint64 array (shorter
    at the end of the address space). Releases the GIL."""
    out = np.empty(npages, dtype=np.uint64)
    cdef uint64_t[::1] o = out
    cdef Py_ssize_t r
    if npages == 0:
        return out
    with nogil:
        r = ss_pagemap_read(fd, start, npages, page_size, &o[0])
    _check(r, "read pagemap")
    return out[:r]


def pagemap_select(int fd, uint64_t start, uint64_t end, uint64_t mask,
                   size_t page_size=4096, size_t chunk=1 << 16, uint64_t exclude=0):
    """Sorted uint64 addresses of the pages in [start, end) whose pagemap entry
    has any bit of mask and no bit of exclude. Memory grows with the result,
    never with the range."""
    parts = []
    buf = np.empty(chunk, dtype=np.uint64)
    cdef uint64_t[::1] b = buf
    cdef uint64_t nxt = start, cur = start
    cdef Py_ssize_t r
    while cur < end:
        with nogil:
            r = ss_pagemap_select_ex(fd, cur, end, page_size, mask, exclude, &b[0], chunk,
                                     &nxt)
        _check(r, "read pagemap")
        if r:
            parts.append(buf[:r].copy())
        if nxt <= cur:
            break
        cur = nxt
    if not parts:
        return np.zeros(0, dtype=np.uint64)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def read_pages(int pid, addrs, size_t page_size=4096):
    """Contents of the pages at addrs (page-aligned uint64): returns
    (contents (n, page_size) uint8, ok bool (n,)). Pages that vanished or cannot
    be read have ok False and zero bytes. Releases the GIL."""
    cdef cnp.ndarray a = np.ascontiguousarray(addrs, dtype=np.uint64)
    cdef size_t n = a.shape[0]
    out = np.empty((n, page_size), dtype=np.uint8)
    okarr = np.zeros(n, dtype=np.bool_)
    if n == 0:
        return out, okarr
    cdef uint64_t[::1] av = a
    cdef uint8_t[:, ::1] ov = out
    cdef uint8_t[::1] kv = okarr.view(np.uint8)
    cdef Py_ssize_t r
    with nogil:
        r = ss_read_pages(pid, &av[0], n, page_size, &ov[0, 0], &kv[0])
    _check(r, f"process_vm_readv pid {pid}")
    return out, okarr


def hash_remote(int pid, addrs, size_t page_size=4096, uint64_t seed=0):
    """128-bit hash of each page at addrs in process pid, read in bounded
    batches: returns (hashes (n, 2) uint64, ok bool (n,)). Releases the GIL."""
    cdef cnp.ndarray a = np.ascontiguousarray(addrs, dtype=np.uint64)
    cdef size_t n = a.shape[0]
    hashes = np.zeros((n, 2), dtype=np.uint64)
    okarr = np.zeros(n, dtype=np.bool_)
    if n == 0:
        return hashes, okarr
    cdef uint64_t[::1] av = a
    cdef uint64_t[:, ::1] hv = hashes
    cdef uint8_t[::1] kv = okarr.view(np.uint8)
    cdef Py_ssize_t r
    with nogil:
        r = ss_hash_remote(pid, &av[0], n, page_size, seed, &hv[0, 0], &kv[0])
    _check(r, f"process_vm_readv pid {pid}")
    return hashes, okarr
