# Bindings of csrc/ss_uffd.c (userfaultfd async write-protect, PAGEMAP_SCAN)
# and csrc/ss_ptrace.c (system-call injection). statesync.tracking gives them
# meaning; these only convert types, release the GIL and raise OSError.

cdef extern from "ss_uffd.h" nogil:
    int ss_uffd_create(int flags)
    int ss_uffd_api(int uffd, uint64_t features, uint64_t *got)
    int ss_uffd_register_wp(int uffd, uint64_t start, uint64_t len)
    int ss_uffd_unregister(int uffd, uint64_t start, uint64_t len)
    Py_ssize_t ss_scan_written(int pagemap_fd, uint64_t start, uint64_t end, size_t page_size,
                               uint64_t scan_flags, uint64_t *out, size_t cap,
                               uint64_t *walk_end, size_t *stored)
    Py_ssize_t ss_pagemap_scan(int pagemap_fd, uint64_t start, uint64_t end, uint64_t flags,
                               uint64_t category_mask, uint64_t inverted, uint64_t anyof_mask,
                               uint64_t return_mask, uint64_t max_pages, uint64_t *regions,
                               size_t nregions, uint64_t *walk_end)
    int SS_UFFD_USER_MODE_ONLY
    uint64_t SS_UFFD_FEATURE_WP_UNPOPULATED
    uint64_t SS_UFFD_FEATURE_WP_ASYNC
    uint64_t SS_PM_SCAN_WP_MATCHING
    uint64_t SS_PM_SCAN_CHECK_WPASYNC
    uint64_t SS_PAGE_IS_WPALLOWED
    uint64_t SS_PAGE_IS_PRESENT
    uint64_t SS_PAGE_IS_SWAPPED

cdef extern from "ss_ptrace.h" nogil:
    struct ss_inject_info:
        int64_t ret[4]
        int ncalls
        int was_in_syscall
        int64_t orig_syscall
        int64_t orig_ret
        int forwarded_signals
        int held_stop
        int stage
        int restored
        int64_t window_ns
    int SS_INJECT_STAGE_CALL
    int SS_INJECT_PAUSE_STOPPED
    int SS_INJECT_PAUSE_MASKED
    int SS_INJECT_PAUSE_IN_CALL
    int SS_INJECT_PAUSE_AFTER_CALL
    int SS_INJECT_PAUSE_IN_CLOSE
    int SS_INJECT_PAUSE_PUT_BACK
    void ss_inject_test_pause(int point, int ms, int notify_fd)
    int ss_find_syscall_insn(int pid, uint64_t start, uint64_t end, uint64_t *addr)
    int ss_inject_userfaultfd(int pid, int tid, int pidfd, uint64_t syscall_addr,
                              int uffd_flags, int timeout_ms, int *out_fd,
                              ss_inject_info *info)
    int ss_inject_syscall(int tid, uint64_t syscall_addr, long nr, const uint64_t *args,
                          int timeout_ms, int64_t *ret, ss_inject_info *info)


UFFD_USER_MODE_ONLY = SS_UFFD_USER_MODE_ONLY
UFFD_FEATURE_WP_UNPOPULATED = SS_UFFD_FEATURE_WP_UNPOPULATED
UFFD_FEATURE_WP_ASYNC = SS_UFFD_FEATURE_WP_ASYNC
PM_SCAN_WP_MATCHING = SS_PM_SCAN_WP_MATCHING
PM_SCAN_CHECK_WPASYNC = SS_PM_SCAN_CHECK_WPASYNC
INJECT_STAGE_CALL = SS_INJECT_STAGE_CALL
# Test hook: where an injection may be paused (see inject_test_pause).
INJECT_PAUSE_POINTS = {"stopped": SS_INJECT_PAUSE_STOPPED, "masked": SS_INJECT_PAUSE_MASKED,
                       "in_call": SS_INJECT_PAUSE_IN_CALL,
                       "after_call": SS_INJECT_PAUSE_AFTER_CALL,
                       "in_close": SS_INJECT_PAUSE_IN_CLOSE,
                       "put_back": SS_INJECT_PAUSE_PUT_BACK}


def uffd_create(int flags):
    """userfaultfd(flags) in this process; returns the fd. Releases the GIL."""
    cdef int r
    with nogil:
        r = ss_uffd_create(flags)
    _check(r, "userfaultfd")
    return r


def uffd_api(int uffd, uint64_t features):
    """UFFDIO_API handshake; returns the features the kernel reports."""
    cdef uint64_t got = 0
    cdef int r
    with nogil:
        r = ss_uffd_api(uffd, features, &got)
    _check(r, "UFFDIO_API")
    return got


def uffd_register_wp(int uffd, uint64_t start, uint64_t length):
    """UFFDIO_REGISTER in write-protect mode. Returns 0 or -errno (not raised:
    a refused VMA is an expected answer the caller decides about)."""
    cdef int r
    with nogil:
        r = ss_uffd_register_wp(uffd, start, length)
    return r


def uffd_unregister(int uffd, uint64_t start, uint64_t length):
    """UFFDIO_UNREGISTER; returns 0 or -errno."""
    cdef int r
    with nogil:
        r = ss_uffd_unregister(uffd, start, length)
    return r


def scan_written(int pagemap_fd, uint64_t start, uint64_t end, uint64_t flags,
                 size_t page_size=4096, size_t chunk=1 << 16, bint arm_only=False):
    """PAGEMAP_SCAN of [start, end) for written pages, with flags (PM_SCAN_*).

    Returns (addrs, err): addrs is a sorted uint64 array of the pages reported
    (and, with PM_SCAN_WP_MATCHING, write-protected again), err is 0 or the
    negative errno that stopped the scan early (-EPERM: a VMA in the range is
    not registered); the pages reported before the error are in addrs.
    arm_only write-protects the range and returns no pages. Releases the GIL.
    """
    cdef uint64_t we = start, cur = start
    cdef size_t stored = 0
    cdef Py_ssize_t r
    if arm_only:
        with nogil:
            r = ss_scan_written(pagemap_fd, start, end, page_size, flags, NULL, 0, &we, &stored)
        return np.zeros(0, dtype=np.uint64), (<long>r if r < 0 else 0)
    parts = []
    buf = np.empty(chunk, dtype=np.uint64)
    cdef uint64_t[::1] b = buf
    cdef long err = 0
    while cur < end:
        with nogil:
            r = ss_scan_written(pagemap_fd, cur, end, page_size, flags, &b[0], chunk, &we,
                                &stored)
        if stored:
            parts.append(buf[:stored].copy())
        if r < 0:
            err = r
            break
        if <size_t>r < chunk or we <= cur:
            break
        cur = we
    if not parts:
        return np.zeros(0, dtype=np.uint64), err
    return (parts[0] if len(parts) == 1 else np.concatenate(parts)), err


def find_syscall_insn(int pid, uint64_t start, uint64_t end):
    """Address of a `syscall` instruction in [start, end) of pid, or None."""
    cdef uint64_t addr = 0
    cdef int r
    with nogil:
        r = ss_find_syscall_insn(pid, start, end, &addr)
    if r == -2:  # ENOENT
        return None
    _check(r, f"read pid {pid} memory")
    return addr


cdef dict _info_dict(ss_inject_info *info):
    return {"ret": [info.ret[i] for i in range(min(info.ncalls, 4))],
            "ncalls": info.ncalls, "was_in_syscall": bool(info.was_in_syscall),
            "orig_syscall": info.orig_syscall, "orig_ret": info.orig_ret,
            "forwarded_signals": info.forwarded_signals, "held_stop": info.held_stop,
            "stage": info.stage, "restored": bool(info.restored),
            "window_ns": info.window_ns}


def inject_userfaultfd(int pid, int tid, int pidfd, uint64_t syscall_addr, int flags,
                       int timeout_ms=2000):
    """Run userfaultfd(flags) inside thread tid of pid, take the descriptor with
    pidfd_getfd and close the target's copy. Returns (fd, info dict); raises
    OSError with the errno (see ss_ptrace.h). Releases the GIL."""
    cdef int fd = -1
    cdef int r
    cdef ss_inject_info info
    with nogil:
        r = ss_inject_userfaultfd(pid, tid, pidfd, syscall_addr, flags, timeout_ms, &fd, &info)
    if r < 0:
        exc = OSError(-r, f"inject userfaultfd into pid {pid}: {os.strerror(-r)}")
        exc.inject_info = _info_dict(&info)
        raise exc
    return fd, _info_dict(&info)


def inject_test_pause(int point, int ms, int notify_fd=-1):
    """For tests only: later injections of this process pause ms milliseconds at
    point (a value of INJECT_PAUSE_POINTS; 0 = off), first writing one byte to
    notify_fd (when >= 0)."""
    ss_inject_test_pause(point, ms, notify_fd)


def inject_syscall(int tid, uint64_t syscall_addr, long nr, args=(), int timeout_ms=2000):
    """Run syscall nr(*args) (up to 6 ints) in thread tid; returns (ret, info)."""
    cdef uint64_t a[6]
    cdef int64_t ret = 0
    cdef int r
    cdef ss_inject_info info
    vals = list(args) + [0] * (6 - len(args))
    if len(vals) != 6:
        raise ValueError("at most 6 syscall arguments")
    for i in range(6):
        a[i] = <uint64_t>(int(vals[i]) & 0xFFFFFFFFFFFFFFFF)
    with nogil:
        r = ss_inject_syscall(tid, syscall_addr, nr, a, timeout_ms, &ret, &info)
    if r < 0:
        exc = OSError(-r, f"inject syscall {nr} into tid {tid}: {os.strerror(-r)}")
        exc.inject_info = _info_dict(&info)
        raise exc
    return ret, _info_dict(&info)


def scan_written_runs(int pagemap_fd, runs, uint64_t flags, size_t page_size=4096):
    """scan_written over each (start, end) row of runs (an (n, 2) uint64 array,
    ascending and disjoint), looping in C. Returns (pages, err, failed_row):
    pages sorted, err 0 or the negative errno that stopped row failed_row (-1
    when none failed); the pages found before the failure are included."""
    cdef cnp.ndarray r = np.ascontiguousarray(runs, dtype=np.uint64).reshape(-1, 2)
    cdef uint64_t[:, ::1] rv = r
    cdef Py_ssize_t nr = r.shape[0], i
    cdef size_t cap = 1 << 16, n = 0, stored = 0
    cdef uint64_t we = 0, cur
    cdef Py_ssize_t res = 0
    out = np.empty(cap, dtype=np.uint64)
    cdef uint64_t[::1] ov = out
    cdef long err = 0
    cdef Py_ssize_t failed = -1
    i = 0
    while i < nr:
        cur = rv[i, 0]
        while cur < rv[i, 1]:
            if n == cap:
                out = np.concatenate([out, np.empty(cap, dtype=np.uint64)])
                cap *= 2
                ov = out
            with nogil:
                res = ss_scan_written(pagemap_fd, cur, rv[i, 1], page_size, flags, &ov[n],
                                      cap - n, &we, &stored)
            n += stored
            if res < 0:
                err = res
                failed = i
                break
            if <size_t>res < cap - (n - stored) or we <= cur:
                break
            cur = we
        if err:
            break
        i += 1
    return out[:n].copy(), err, failed


def not_present_runs(int pagemap_fd, runs, size_t max_regions=4096):
    """Regions (n, 2) of pages that are neither present nor swapped in each
    (start, end) row of runs, one PAGEMAP_SCAN per row, looping in C."""
    cdef cnp.ndarray r = np.ascontiguousarray(runs, dtype=np.uint64).reshape(-1, 2)
    cdef uint64_t[:, ::1] rv = r
    cdef Py_ssize_t nr = r.shape[0], i, k
    regions = np.zeros((max_regions, 3), dtype=np.uint64)
    cdef uint64_t[:, ::1] gv = regions
    cdef uint64_t both = SS_PAGE_IS_PRESENT | SS_PAGE_IS_SWAPPED, we = 0, cur
    cdef Py_ssize_t res
    parts = []
    for i in range(nr):
        cur = rv[i, 0]
        while cur < rv[i, 1]:
            with nogil:
                res = ss_pagemap_scan(pagemap_fd, cur, rv[i, 1], 0, both, both, 0,
                                      both | SS_PAGE_IS_WPALLOWED, 0, &gv[0, 0],
                                      max_regions, &we)
            _check(res, "PAGEMAP_SCAN")
            if res:
                parts.append(regions[:res, :2].copy())
            if <size_t>res < max_regions or we <= cur:
                break
            cur = we
    if not parts:
        return np.zeros((0, 2), dtype=np.uint64)
    return np.concatenate(parts)
