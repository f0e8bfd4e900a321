# Bindings of csrc/ss_lazy.c: statesync's own lazy-pages daemon (the destination of
# a lazy switch-over, serving `criu restore --lazy-pages`). statesync.migration.lazy
# gives it meaning; this converts the page stores, releases the GIL around the
# whole serving loop and raises OSError (with .stats attached) on failure.

cdef extern from "ss_lazy.h" nogil:
    struct ss_lazy_src:
        const uint8_t *base
        uint64_t first_row
        uint64_t nrows
    struct ss_lazy_store:
        int32_t pid
        size_t n
        const uint64_t *addrs
        const int64_t *rows
        const uint8_t *pages
        size_t nrows
        const ss_lazy_src *src
        size_t nsrc
        const uint64_t *breaks
        size_t nbreaks
    struct ss_lazy_remote:
        size_t n
        const uint64_t *addrs
        const uint8_t *pages
        int req_fd
        int supply_fd
    struct ss_lazy_opts:
        size_t page_size
        size_t chunk
        int cancel_fd
        int accept_timeout_ms
        int no_prefetch
        uint64_t *lat_ns
        size_t lat_cap
        int *left_fds
        size_t left_cap
        const ss_lazy_remote *remote
        uint64_t *rlat_ns
        size_t rlat_cap
    struct ss_lazy_stats:
        uint64_t tasks
        uint64_t zombies
        uint64_t forks
        uint64_t remaps
        uint64_t removes
        uint64_t unmaps
        uint64_t faults
        uint64_t fault_copied
        uint64_t fault_zero
        uint64_t fault_woken
        uint64_t prefetch_copied
        uint64_t prefetch_zero
        uint64_t prefetch_ioctls
        uint64_t dropped
        uint64_t exist
        uint64_t unreachable
        uint64_t lost_exited
        uint64_t eagain
        uint64_t total_pages
        uint64_t left
        uint64_t t_start_ns
        uint64_t t_connected_ns
        uint64_t t_finished_ns
        uint64_t t_filled_ns
        uint64_t remote_pages
        uint64_t remote_faults
        uint64_t remote_requested
        uint64_t remote_supplied
        uint64_t remote_placed
        uint64_t remote_exist
        size_t lat_n
        size_t rlat_n
        size_t left_nfds
        int32_t err_pid
        uint64_t err_addr
    unsigned SS_LAZY_ACCEPT
    uint32_t SS_LAZY_RESTORE_FINISHED
    uint64_t SS_LAZY_UFFD_FEATURES
    int64_t SS_LAZY_ROW_REMOTE
    int ss_lazy_serve(int sock, unsigned flags, const ss_lazy_store *stores, size_t nstores,
                      const ss_lazy_opts *opts, ss_lazy_stats *st)
    int ss_lazy_uffd_open(int flags, uint64_t *features)

LAZY_RESTORE_FINISHED = SS_LAZY_RESTORE_FINISHED
LAZY_UFFD_FEATURES = SS_LAZY_UFFD_FEATURES
LAZY_ROW_REMOTE = SS_LAZY_ROW_REMOTE


cdef dict _lazy_stats_dict(ss_lazy_stats *s):
    return {"tasks": s.tasks, "zombies": s.zombies, "forks": s.forks, "remaps": s.remaps,
            "removes": s.removes, "unmaps": s.unmaps, "faults": s.faults,
            "fault_copied": s.fault_copied, "fault_zero": s.fault_zero,
            "fault_woken": s.fault_woken, "prefetch_copied": s.prefetch_copied,
            "prefetch_zero": s.prefetch_zero, "prefetch_ioctls": s.prefetch_ioctls,
            "dropped": s.dropped, "exist": s.exist, "unreachable": s.unreachable,
            "lost_exited": s.lost_exited, "eagain": s.eagain, "total_pages": s.total_pages, "left": s.left,
            "t_start_ns": s.t_start_ns, "t_connected_ns": s.t_connected_ns,
            "t_finished_ns": s.t_finished_ns, "t_filled_ns": s.t_filled_ns,
            "remote_pages": s.remote_pages, "remote_faults": s.remote_faults,
            "remote_requested": s.remote_requested, "remote_supplied": s.remote_supplied,
            "remote_placed": s.remote_placed, "remote_exist": s.remote_exist,
            "err_pid": s.err_pid, "err_addr": s.err_addr}


def lazy_uffd_probe():
    """Open a userfaultfd and ask for the events CRIU's lazy restore needs; returns
    the features granted, or raises OSError (EPERM without privileges, EINVAL when
    the kernel lacks one of them)."""
    cdef uint64_t got = 0
    cdef int fd
    with nogil:
        fd = ss_lazy_uffd_open(0o2000000, &got)  # O_CLOEXEC
    _check(fd, "userfaultfd with fork/remap/remove/unmap events")
    os.close(fd)
    return got


def lazy_serve(int sock, list stores, bint accept=True, size_t page_size=4096,
               size_t chunk=256, int cancel_fd=-1, int accept_timeout_ms=0,
               bint prefetch=True, size_t max_latencies=1 << 20, remote=None):
    """Run the lazy-pages daemon on sock until every restored task is filled.

    stores: list of (pid, addrs, rows, pages, breaks): addrs sorted unique uint64 page
    addresses of the task's lazy pages, rows int64 (row of pages, -1 = zero page),
    pages a C-contiguous (nrows, page_size) uint8 array (read-only views welcome),
    breaks a sorted uint64 array of addresses a copy run must not cross (VMA
    boundaries) or None. accept: sock is listening (accept CRIU's connection).
    remote (post-copy; docs/postcopy.md): None, or (addrs, pages, req_fd, supply_fd):
    the sorted uint64 addresses of the pages still at the source (rows <= LAZY_ROW_REMOTE
    in a store mean remote page k = LAZY_ROW_REMOTE - row), a writable C-contiguous
    (n, page_size) uint8 buffer the supplier fills row k of before it writes k (u64)
    to supply_fd, and req_fd where the daemon writes the k a fault waits for. The
    buffer is shared with the supplier's thread: the daemon only reads row k after k
    was announced. stats["remote_latencies"] = remote fault times in ns (uint64).
    Returns (stats dict, fault service times in ns as a uint64 array). Releases
    the GIL for the whole run. Raises OSError(errno) with .stats, .latencies and
    .left_fds (open descriptors of tasks still missing pages: close them after
    killing the restored tree) on failure."""
    cdef size_t ns = len(stores), i, k, npc = 0
    for st_ in stores:
        if isinstance(st_[3], list):
            npc += len(st_[3])
    cdef ss_lazy_store *cs = <ss_lazy_store *>malloc((ns if ns else 1) * sizeof(ss_lazy_store))
    cdef ss_lazy_src *pcs = <ss_lazy_src *>malloc((npc if npc else 1) * sizeof(ss_lazy_src))
    if cs == NULL or pcs == NULL:
        free(cs)
        free(pcs)
        raise MemoryError()
    cdef size_t used = 0
    cdef const uint64_t[::1] av
    cdef const int64_t[::1] rv
    cdef const uint8_t[:, ::1] pv
    cdef const uint64_t[::1] bv
    cdef const uint64_t[::1] rav
    cdef const uint8_t[:, ::1] rpv
    cdef ss_lazy_remote rm
    rm.n = 0
    rm.addrs = NULL
    rm.pages = NULL
    rm.req_fd = -1
    rm.supply_fd = -1
    keep = []
    try:
        for i in range(ns):
            pid, addrs, rows, pages, breaks = stores[i]
            addrs = np.ascontiguousarray(addrs, dtype=np.uint64)
            rows = np.ascontiguousarray(rows, dtype=np.int64)
            if addrs.shape[0] != rows.shape[0]:
                raise ValueError(f"pid {pid}: {addrs.shape[0]} addresses but "
                                 f"{rows.shape[0]} rows")
            pieces = pages if isinstance(pages, list) else None
            for arr in ([a for _, a in pieces] if pieces is not None else [pages]):
                if arr.ndim != 2 or (arr.shape[0] and arr.shape[1] != page_size):
                    raise ValueError(f"pid {pid}: pages have shape {arr.shape}, expected "
                                     f"(n, {page_size})")
            cs[i].pid = <int32_t>int(pid)
            cs[i].n = addrs.shape[0]
            cs[i].addrs = NULL
            cs[i].rows = NULL
            cs[i].pages = NULL
            cs[i].nrows = 0
            cs[i].src = NULL
            cs[i].nsrc = 0
            cs[i].breaks = NULL
            cs[i].nbreaks = 0
            if addrs.shape[0]:
                av = addrs
                rv = rows
                keep += [av, rv]
                cs[i].addrs = &av[0]
                cs[i].rows = &rv[0]
            if pieces is not None:
                cs[i].src = &pcs[used]
                cs[i].nsrc = len(pieces)
                for k in range(len(pieces)):
                    first, arr = pieces[k]
                    pcs[used].first_row = <uint64_t>int(first)
                    pcs[used].nrows = arr.shape[0]
                    pcs[used].base = NULL
                    if arr.shape[0]:
                        pv = arr
                        keep.append(pv)
                        pcs[used].base = &pv[0, 0]
                    used += 1
            elif pages.shape[0]:
                pv = pages
                keep.append(pv)
                cs[i].pages = &pv[0, 0]
                cs[i].nrows = pv.shape[0]
            if breaks is not None:
                breaks = np.ascontiguousarray(breaks, dtype=np.uint64)
                if breaks.shape[0]:
                    bv = breaks
                    keep.append(bv)
                    cs[i].breaks = &bv[0]
                    cs[i].nbreaks = bv.shape[0]
        if remote is not None:
            raddrs, rpages, req_fd, supply_fd = remote
            raddrs = np.ascontiguousarray(raddrs, dtype=np.uint64)
            if rpages.ndim != 2 or rpages.shape[0] != raddrs.shape[0] or (
                    rpages.shape[0] and rpages.shape[1] != page_size):
                raise ValueError(f"remote pages have shape {rpages.shape}, expected "
                                 f"({raddrs.shape[0]}, {page_size})")
            if raddrs.shape[0]:
                rav = raddrs
                rpv = rpages
                keep += [rav, rpv]
                rm.n = raddrs.shape[0]
                rm.addrs = &rav[0]
                rm.pages = &rpv[0, 0]
                rm.req_fd = int(req_fd)
                rm.supply_fd = int(supply_fd)
        lat = np.zeros(max(max_latencies, 1), dtype=np.uint64)
        rlat = np.zeros(max(max_latencies, 1), dtype=np.uint64)
        return _lazy_run(sock, cs, ns, accept, page_size, chunk, cancel_fd,
                         accept_timeout_ms, prefetch, lat, max_latencies, &rm, rlat)
    finally:
        free(cs)
        free(pcs)


cdef object _lazy_run(int sock, ss_lazy_store *cs, size_t ns, bint accept, size_t page_size,
                      size_t chunk, int cancel_fd, int accept_timeout_ms, bint prefetch,
                      object lat, size_t max_latencies, ss_lazy_remote *rm, object rlat):
    cdef ss_lazy_opts o
    cdef ss_lazy_stats st
    cdef int rc
    cdef unsigned flags = SS_LAZY_ACCEPT if accept else 0
    o.page_size = page_size
    o.chunk = chunk
    o.cancel_fd = cancel_fd
    o.accept_timeout_ms = accept_timeout_ms
    o.no_prefetch = 0 if prefetch else 1
    o.lat_ns = <uint64_t *>cnp.PyArray_DATA(lat)
    o.lat_cap = max_latencies
    left = np.full(4096, -1, dtype=np.int32)
    o.left_fds = <int *>cnp.PyArray_DATA(left)
    o.left_cap = 4096
    o.remote = rm if rm.n else NULL
    o.rlat_ns = <uint64_t *>cnp.PyArray_DATA(rlat)
    o.rlat_cap = max_latencies
    with nogil:
        rc = ss_lazy_serve(sock, flags, cs, ns, &o, &st)
    stats = _lazy_stats_dict(&st)
    lats = lat[:st.lat_n].copy()
    stats["remote_latencies"] = rlat[:st.rlat_n].copy()
    if rc < 0:
        where = ""
        if st.err_pid:
            where += f" (pid {st.err_pid}"
            where += f", address {st.err_addr:#x})" if st.err_addr else ")"
        exc = OSError(-rc, f"lazy-pages daemon: {os.strerror(-rc)}{where}")
        exc.stats = stats
        exc.latencies = lats
        # descriptors of tasks still missing pages, OPEN: the caller kills the
        # restored tree, then closes them (closing first would let it read zeros)
        exc.left_fds = [int(x) for x in left[:st.left_nfds]]
        raise exc
    return stats, lats
