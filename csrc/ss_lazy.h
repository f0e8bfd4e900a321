/* statesync's own lazy-pages daemon: the destination side of a lazy switch-over.
 *
 * `criu restore --lazy-pages` connects to a UNIX stream socket named
 * "lazy-pages.socket" in its work directory and, for every restored task, sends
 * the task's pid (a host-endian int; the pid of the dump, i.e. of pagemap-PID.img)
 * and then the task's userfaultfd as SCM_RIGHTS on a one-byte message; a zombie
 * sends its pid negated and no descriptor. When every task is restored it sends
 * the u32 SS_LAZY_RESTORE_FINISHED on the same connection and closes it. CRIU
 * has already done the UFFDIO_API handshake on these descriptors (features
 * SS_LAZY_UFFD_FEATURES, as many as the kernel has) and its restorer registers
 * every lazy-able VMA (private anonymous, not locked/hugetlb/vdso) in MISSING
 * mode before it closes its own copy: from then on the daemon holds the only
 * reference, and closing it unregisters everything (missing pages then read as
 * zeros: see docs/lazy.md, "If the daemon dies").
 *
 * ss_lazy_serve() is the whole daemon: it receives the descriptors, serves
 * UFFD_EVENT_PAGEFAULT with UFFDIO_COPY from a page store (or UFFDIO_ZEROPAGE
 * for addresses the store does not hold), follows FORK (a new descriptor for the
 * child, which inherits the parent's remaining pages), REMAP (the pages move
 * with the mapping), REMOVE (MADV_DONTNEED: the pages are dropped and the range
 * unregistered) and UNMAP (dropped). Once CRIU reports the restore finished it
 * also copies every remaining page in the background, in runs of chunk pages
 * per ioctl with UFFDIO_COPY_MODE_DONTWAKE, interleaved with the faults, and
 * closes a task's descriptor as soon as its pages are all in place. It returns
 * when every task is filled (or exited).
 *
 * One thread, no global state; the page stores are only read. Times are
 * CLOCK_MONOTONIC nanoseconds.
 */
#ifndef SS_LAZY_H
#define SS_LAZY_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define SS_LAZY_SOCK_NAME "lazy-pages.socket"
#define SS_LAZY_RESTORE_FINISHED 0x52535446u /* "RSTF", CRIU's end-of-restore word */

/* The non-cooperative events CRIU asks for (criu/uffd.c NEED_UFFD_API_FEATURES):
 * UFFD_FEATURE_EVENT_FORK | _REMAP | _REMOVE | _UNMAP. */
#define SS_LAZY_UFFD_FEATURES ((1ull << 1) | (1ull << 2) | (1ull << 3) | (1ull << 6))

/* ss_lazy_serve flags */
#define SS_LAZY_ACCEPT 1u /* sock is a listening socket: accept one connection first */

/* One piece of a page store: nrows rows of page_size bytes at base, holding the
 * store's rows first_row .. first_row + nrows - 1 (a store grown in chunks). */
struct ss_lazy_src {
    const uint8_t *base;
    uint64_t first_row;
    uint64_t nrows;
};

/* The pages of one dumped task (pagemap-<pid>.img). addrs (sorted, unique,
 * page-aligned) are the task's lazy pages; page i's content is row rows[i] of
 * the store, or a zero page when rows[i] < 0. The store is either pages (nrows
 * rows of page_size bytes) or, when nsrc > 0, the pieces src (sorted by
 * first_row, not overlapping). breaks (sorted, may be NULL) are addresses where
 * a copy run must not cross (VMA boundaries of the images): UFFDIO_COPY works
 * inside one VMA only. A run that still fails with ENOENT is retried page by
 * page. Nothing here is copied: it must stay unchanged until the call returns. */
struct ss_lazy_store {
    int32_t pid;
    size_t n;
    const uint64_t *addrs;
    const int64_t *rows;
    const uint8_t *pages;
    size_t nrows;
    const struct ss_lazy_src *src;
    size_t nsrc;
    const uint64_t *breaks;
    size_t nbreaks;
};

/* Post-copy (docs/postcopy.md): a lazy page whose row is <= SS_LAZY_ROW_REMOTE is
 * not in the store yet; it is still at the source. Its content will arrive as
 * row k = SS_LAZY_ROW_REMOTE - row of the remote buffer:
 *  - a fault on it records the faulting thread (it stays blocked), and the
 *    daemon writes k (a host-endian u64) to req_fd, once per page;
 *  - the supplier (statesync's post-copy loop, in another thread or process)
 *    writes the page into row k of pages FIRST, then writes k to supply_fd;
 *    the daemon then places it with UFFDIO_COPY in every task that still
 *    misses it (waking the faults that wait for it). A page already present
 *    (UFFDIO_COPY says EEXIST: placed some other way, or written by the process
 *    after a MADV_DONTNEED made it ordinary memory) is never overwritten.
 * Pages supplied before CRIU's restore-finished word are placed only for a
 * fault that waits on them (their VMAs may not be registered yet), the rest
 * with the background fill after it. EOF on supply_fd while remote pages are
 * still missing fails the daemon with -EPIPE (they can never arrive). */
#define SS_LAZY_ROW_REMOTE (-2)

struct ss_lazy_remote {
    size_t n;               /* remote pages (0: no post-copy) */
    const uint64_t *addrs;  /* their addresses at the dump, sorted and unique (informative
                             * for the supplier; the daemon uses them to find page k) */
    const uint8_t *pages;   /* n rows of page_size bytes, written by the supplier only
                             * before it announces the row; read by the daemon after */
    int req_fd;             /* the daemon writes u64 k here (nonblocking pipe) */
    int supply_fd;          /* the supplier writes u64 k here once row k is filled */
};

struct ss_lazy_opts {
    size_t page_size;     /* 0: sysconf(_SC_PAGESIZE) */
    size_t chunk;         /* pages per background UFFDIO_COPY; 0: 256 */
    int cancel_fd;        /* readable (e.g. a pipe written to) = stop now; -1: none */
    int accept_timeout_ms;/* how long to wait for CRIU's connection; <= 0: forever */
    int no_prefetch;      /* 1: serve faults only (tests, measurements) */
    uint64_t *lat_ns;     /* per-fault service times (may be NULL) */
    size_t lat_cap;
    int *left_fds;        /* on failure, the descriptors of tasks with pages still
                           * missing are handed back here OPEN (may be NULL: closed) */
    size_t left_cap;
    const struct ss_lazy_remote *remote; /* post-copy (may be NULL: every page local) */
    uint64_t *rlat_ns;    /* per-remote-fault times: fault read -> page placed (may be NULL) */
    size_t rlat_cap;
};

struct ss_lazy_stats {
    uint64_t tasks;            /* descriptors received from CRIU */
    uint64_t zombies;          /* negative pids received */
    uint64_t forks, remaps, removes, unmaps;
    uint64_t faults;           /* UFFD_EVENT_PAGEFAULT messages handled */
    uint64_t fault_copied;     /* pages copied to serve a fault */
    uint64_t fault_zero;       /* faults served with a zero page */
    uint64_t fault_woken;      /* faults on pages already filled: UFFDIO_WAKE only */
    uint64_t prefetch_copied;  /* pages copied in the background */
    uint64_t prefetch_zero;    /* store zero pages placed in the background */
    uint64_t prefetch_ioctls;  /* background UFFDIO_COPY/ZEROPAGE calls */
    uint64_t dropped;          /* lazy pages dropped by REMOVE/UNMAP (never needed) */
    uint64_t exist;            /* EEXIST: the page was already there */
    uint64_t unreachable;      /* ENOENT on a single page: no registered VMA there */
    uint64_t lost_exited;      /* pages left when their task exited */
    uint64_t eagain;           /* EAGAIN retries (an mm change was in flight) */
    uint64_t total_pages;      /* lazy pages of the received tasks (forks excluded) */
    uint64_t left;             /* pages still missing in live tasks when the daemon
                                * stopped (0 after a success; after an error or a
                                * cancel they read as zeros from then on) */
    uint64_t t_start_ns;       /* ss_lazy_serve entry */
    uint64_t t_connected_ns;   /* CRIU connected */
    uint64_t t_finished_ns;    /* CRIU's restore-finished word arrived */
    uint64_t t_filled_ns;      /* every task filled (or exited) */
    uint64_t remote_pages;     /* lazy pages of the received tasks still at the source */
    uint64_t remote_faults;    /* faults that had to wait for a remote page */
    uint64_t remote_requested; /* page indices written to req_fd */
    uint64_t remote_supplied;  /* page indices read from supply_fd */
    uint64_t remote_placed;    /* remote pages placed as they arrived (the others were
                                * placed later by a fault or the fill: counted there) */
    uint64_t remote_exist;     /* remote pages found already present: left as they were */
    size_t lat_n;              /* entries written to opts.lat_ns */
    size_t rlat_n;             /* entries written to opts.rlat_ns */
    size_t left_nfds;          /* descriptors handed back in opts.left_fds */
    int32_t err_pid;           /* pid of the task an error concerns (0: none) */
    uint64_t err_addr;         /* address an error concerns (0: none) */
};

/* Run the daemon on sock (listening with SS_LAZY_ACCEPT, else connected to CRIU).
 * Returns 0 when every task is filled, or -errno:
 *   -ECANCELED  cancel_fd became readable;
 *   -ETIMEDOUT  CRIU did not connect within accept_timeout_ms;
 *   -ECONNRESET CRIU closed the socket before the restore-finished word (the
 *               restore failed; CRIU kills what it restored);
 *   -EPROTO     a malformed message from CRIU (or a remote index out of range);
 *   -EPIPE      post-copy: supply_fd reached EOF with remote pages still missing;
 *   -ENOMEM, or the errno of a failing ioctl (err_pid/err_addr say where).
 * On failure the descriptors of tasks that still miss pages go to
 * opts.left_fds, still open: while they are open those tasks block on a missing
 * page instead of reading zeros, so the caller can kill the restored tree first
 * and close them after. Without left_fds (or beyond left_cap) they are closed,
 * and the missing pages read as zeros from then on.
 * The socket is not closed. */
int ss_lazy_serve(int sock, unsigned flags, const struct ss_lazy_store *stores, size_t nstores,
                  const struct ss_lazy_opts *opts, struct ss_lazy_stats *st);

/* What CRIU does before it sends a descriptor: userfaultfd(flags) + UFFDIO_API
 * asking for SS_LAZY_UFFD_FEATURES; *features (may be NULL) gets what the kernel
 * granted. Returns the fd or -errno (-EINVAL: the kernel lacks one of them).
 * For tests and for probing; the daemon never calls it on CRIU's descriptors. */
int ss_lazy_uffd_open(int flags, uint64_t *features);

/* CRIU's side of the protocol, for tests: send pid (+ uffd when pid > 0) on sock,
 * or the restore-finished word with ss_lazy_send_finished. */
int ss_lazy_send_uffd(int sock, int32_t pid, int uffd);
int ss_lazy_send_finished(int sock);

#endif
