/* The lazy-pages daemon. See ss_lazy.h for the protocol and docs/lazy.md for
 * the design.
 *
 * State per userfaultfd (a "task"; a fork adds one): the task's lazy pages as
 * three parallel arrays sorted by run-time address (addr, row into the store,
 * state), a count of pages still to fill, a sequential cursor for the
 * background fill (only moves forward: the whole fill costs O(pages)) and a
 * read-ahead cursor set by the last fault (locality: the next chunk is copied
 * from just after the faulting page).
 *
 * Ordering rules the kernel imposes (fs/userfaultfd.c, mm/mremap.c):
 *  - FORK, REMAP, REMOVE and UNMAP raise the context's mmap_changing from the
 *    start of the change until the daemon has READ the event; every UFFDIO_COPY
 *    /ZEROPAGE in between fails with EAGAIN (or copies part and then does). So
 *    the daemon's view (its page arrays) is exactly the task's state when it
 *    reads an event, and a copy that returned EAGAIN is simply retried after
 *    the pending events are read.
 *  - Within one read batch the events are applied before the faults.
 *  - mremap over an existing range sends UNMAP(destination), then REMAP, then
 *    UNMAP(the shrunk tail).
 */
#include "ss_lazy.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef __NR_userfaultfd
#define __NR_userfaultfd 323
#endif

#define ST_PENDING 0
#define ST_DONE 1

/* post-copy: what the daemon knows of remote page k */
#define R_NONE 0      /* not asked for, not here */
#define R_ASKED 1     /* requested on req_fd */
#define R_HERE 2      /* row k of the remote buffer holds it */

#define IS_REMOTE(row) ((row) <= SS_LAZY_ROW_REMOTE)
#define REMOTE_K(row) ((size_t)(SS_LAZY_ROW_REMOTE - (row)))

#define SS_MSG_BATCH 64

struct task {
    int fd;                 /* -1 once closed */
    int32_t pid;
    int finished;           /* all filled, dropped or exited: fd closed */
    size_t n;
    uint64_t *addr;
    int64_t *row;
    uint8_t *state;
    size_t remaining;
    size_t cursor;          /* sequential fill: no pending page below it */
    size_t ra;              /* read-ahead start (index), SIZE_MAX: none */
    size_t remote_left;     /* pending entries whose row is remote */
    int remapped;           /* addresses moved: find remote pages by scanning */
    int local_done;         /* the background fill found nothing it can place: only
                             * remote pages not here yet are left (they come by supply) */
    struct ss_lazy_src one;         /* the store when it is one array */
    const struct ss_lazy_src *src;  /* else its pieces (nsrc > 0) */
    size_t nsrc;
    const uint64_t *breaks;
    size_t nbreaks;
};

struct deferred {
    size_t task;
    uint64_t addr;
    uint64_t t0;
};

/* A fault waiting for remote page k. */
struct waiter {
    size_t task;
    uint64_t addr;
    uint64_t t0;
    size_t k;
};

struct daemon {
    const struct ss_lazy_opts *o;
    const struct ss_lazy_remote *rm; /* NULL: no post-copy */
    uint8_t *rstate;                 /* R_* per remote page */
    struct waiter *w;
    size_t nw, capw;
    size_t *sretry;                  /* supplied pages whose placing met EAGAIN */
    size_t nsretry, capsretry;
    int req_retry;                   /* a request met a full pipe: ask again */
    unsigned char sbuf[8];           /* partial index read from supply_fd */
    size_t sbuf_n;
    struct ss_lazy_stats *st;
    size_t ps;
    size_t chunk;
    struct task *t;
    size_t nt, capt;
    struct deferred *def;
    size_t ndef, capdef;
    int finished_restore;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------ tasks */

static void task_close(struct daemon *d, struct task *t)
{
    (void)d;
    if (t->fd >= 0)
        close(t->fd);
    t->fd = -1;
    t->finished = 1;
    free(t->addr);
    free(t->row);
    free(t->state);
    t->addr = NULL;
    t->row = NULL;
    t->state = NULL;
    t->n = 0;
    t->remaining = 0;
}

static void task_exited(struct daemon *d, struct task *t)
{
    d->st->lost_exited += t->remaining;
    task_close(d, t);
}

static struct task *task_add(struct daemon *d)
{
    if (d->nt == d->capt) {
        size_t cap = d->capt ? 2 * d->capt : 8;
        struct task *nt = realloc(d->t, cap * sizeof *nt);
        if (!nt)
            return NULL;
        d->t = nt;
        d->capt = cap;
    }
    struct task *t = &d->t[d->nt++];
    memset(t, 0, sizeof *t);
    t->fd = -1;
    t->ra = SIZE_MAX;
    return t;
}

static int task_alloc(struct task *t, size_t n)
{
    t->n = n;
    t->addr = malloc((n ? n : 1) * sizeof *t->addr);
    t->row = malloc((n ? n : 1) * sizeof *t->row);
    t->state = malloc(n ? n : 1);
    if (!t->addr || !t->row || !t->state)
        return -ENOMEM;
    return 0;
}

/* First index with addr >= a. */
static size_t lower_bound(const uint64_t *v, size_t n, uint64_t a)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v[mid] < a)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Where store row `row` lives, and how many rows follow it in the same piece
 * (*avail); NULL when no piece holds it. */
static const uint8_t *row_ptr(const struct task *t, int64_t row, size_t ps, uint64_t *avail)
{
    const struct ss_lazy_src *v = t->nsrc ? t->src : &t->one;
    size_t n = t->nsrc ? t->nsrc : 1;
    uint64_t r = (uint64_t)row;
    size_t lo = 0, hi = n; /* last piece with first_row <= r */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v[mid].first_row <= r)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (row < 0 || lo == 0)
        return NULL;
    const struct ss_lazy_src *p = &v[lo - 1];
    if (r - p->first_row >= p->nrows || !p->base)
        return NULL;
    if (avail)
        *avail = p->nrows - (r - p->first_row);
    return p->base + (size_t)(r - p->first_row) * ps;
}

static void mark_done(struct task *t, size_t i)
{
    if (t->state[i] == ST_PENDING) {
        t->state[i] = ST_DONE;
        t->remaining--;
        if (IS_REMOTE(t->row[i]))
            t->remote_left--;
    }
}

/* Where the content of row `row` is: the store, or (post-copy) the remote buffer
 * once the page is here (then *avail = 1). NULL: not available. */
static const uint8_t *page_src(const struct daemon *d, const struct task *t, int64_t row,
                               uint64_t *avail)
{
    if (IS_REMOTE(row)) {
        size_t k = REMOTE_K(row);
        if (!d->rm || k >= d->rm->n || d->rstate[k] != R_HERE)
            return NULL;
        if (avail)
            *avail = 1;
        return d->rm->pages + k * d->ps;
    }
    return row_ptr(t, row, d->ps, avail);
}

/* A remote entry the background fill cannot place yet. */
static int remote_waiting(const struct daemon *d, const struct task *t, size_t i)
{
    return IS_REMOTE(t->row[i]) && d->rstate[REMOTE_K(t->row[i])] != R_HERE;
}

/* Drop [start, end): the pages there will never be filled. */
static void drop_range(struct daemon *d, struct task *t, uint64_t start, uint64_t end)
{
    size_t i = lower_bound(t->addr, t->n, start);
    for (; i < t->n && t->addr[i] < end; i++) {
        if (t->state[i] == ST_PENDING) {
            d->st->dropped++;
            mark_done(t, i);
        }
    }
}

/* The range [from, from+len) moved to [to, to+len): move its pages and keep the
 * arrays sorted (a rotation: the moved block is contiguous in both orders). */
static int remap_range(struct daemon *d, struct task *t, uint64_t from, uint64_t to,
                       uint64_t len)
{
    /* Anything the daemon still had at the destination is gone (mremap replaced
     * it; the kernel sent UNMAP for it first): remove those entries outright,
     * the moved ones take their addresses. */
    drop_range(d, t, to, to + len);
    size_t a0 = lower_bound(t->addr, t->n, to), a1 = lower_bound(t->addr, t->n, to + len);
    if (a1 > a0) {
        size_t tail = t->n - a1;
        memmove(t->addr + a0, t->addr + a1, tail * sizeof *t->addr);
        memmove(t->row + a0, t->row + a1, tail * sizeof *t->row);
        memmove(t->state + a0, t->state + a1, tail);
        t->n -= a1 - a0;
    }
    size_t i0 = lower_bound(t->addr, t->n, from);
    size_t i1 = lower_bound(t->addr, t->n, from + len);
    size_t k = i1 - i0;
    if (k == 0)
        return 0;
    uint64_t *ba = malloc(k * sizeof *ba);
    int64_t *br = malloc(k * sizeof *br);
    uint8_t *bs = malloc(k);
    if (!ba || !br || !bs) {
        free(ba);
        free(br);
        free(bs);
        return -ENOMEM;
    }
    for (size_t j = 0; j < k; j++)
        ba[j] = t->addr[i0 + j] - from + to;
    memcpy(br, t->row + i0, k * sizeof *br);
    memcpy(bs, t->state + i0, k);
    /* remove the block */
    size_t tail = t->n - i1;
    memmove(t->addr + i0, t->addr + i1, tail * sizeof *t->addr);
    memmove(t->row + i0, t->row + i1, tail * sizeof *t->row);
    memmove(t->state + i0, t->state + i1, tail);
    size_t m = t->n - k;
    /* insert it where its new addresses belong */
    size_t j = lower_bound(t->addr, m, ba[0]);
    memmove(t->addr + j + k, t->addr + j, (m - j) * sizeof *t->addr);
    memmove(t->row + j + k, t->row + j, (m - j) * sizeof *t->row);
    memmove(t->state + j + k, t->state + j, m - j);
    memcpy(t->addr + j, ba, k * sizeof *ba);
    memcpy(t->row + j, br, k * sizeof *br);
    memcpy(t->state + j, bs, k);
    free(ba);
    free(br);
    free(bs);
    t->cursor = 0; /* the order changed: one more pass finds what is left */
    t->ra = SIZE_MAX;
    t->remapped = 1;
    t->local_done = 0;
    return 0;
}

/* ------------------------------------------------------------------ ioctls */

/* UFFDIO_COPY (src != NULL) or UFFDIO_ZEROPAGE of npages at dst. Returns the
 * number of pages placed (>= 0) and *err = 0, or the pages placed before an
 * error and *err = that errno. */
static size_t place(struct daemon *d, int fd, uint64_t dst, const uint8_t *src, size_t npages,
                    int dontwake, int *err)
{
    size_t len = npages * d->ps;
    int64_t done;
    int r;
    *err = 0;
    if (src) {
        struct uffdio_copy c;
        memset(&c, 0, sizeof c);
        c.dst = dst;
        c.src = (uint64_t)(uintptr_t)src;
        c.len = len;
        c.mode = dontwake ? UFFDIO_COPY_MODE_DONTWAKE : 0;
        r = ioctl(fd, UFFDIO_COPY, &c);
        done = c.copy;
    } else {
        struct uffdio_zeropage z;
        memset(&z, 0, sizeof z);
        z.range.start = dst;
        z.range.len = len;
        z.mode = dontwake ? UFFDIO_ZEROPAGE_MODE_DONTWAKE : 0;
        r = ioctl(fd, UFFDIO_ZEROPAGE, &z);
        done = z.zeropage;
    }
    if (r == 0)
        return npages;
    *err = errno;
    if (done > 0)
        return (size_t)done / d->ps;
    if (done < 0 && done > -4096)
        *err = (int)-done;
    return 0;
}

static void wake(int fd, uint64_t addr, uint64_t len)
{
    struct uffdio_range r = {.start = addr, .len = len};
    (void)ioctl(fd, UFFDIO_WAKE, &r);
}

static int is_exit_errno(int e)
{
    return e == ESRCH || e == ENOSPC;
}

/* ------------------------------------------------------------------ faults */

static void record_latency(struct daemon *d, uint64_t t0)
{
    const struct ss_lazy_opts *o = d->o;
    if (o->lat_ns && d->st->lat_n < o->lat_cap)
        o->lat_ns[d->st->lat_n++] = now_ns() - t0;
}

static int defer_fault(struct daemon *d, size_t ti, uint64_t addr, uint64_t t0)
{
    if (d->ndef == d->capdef) {
        size_t cap = d->capdef ? 2 * d->capdef : 16;
        struct deferred *nd = realloc(d->def, cap * sizeof *nd);
        if (!nd)
            return -ENOMEM;
        d->def = nd;
        d->capdef = cap;
    }
    d->def[d->ndef++] = (struct deferred){ti, addr, t0};
    return 0;
}

/* post-copy: ask the supplier for remote page k (once). A full pipe leaves it
 * R_NONE and asks again on a later turn. */
static void request_remote(struct daemon *d, size_t k)
{
    if (d->rstate[k] != R_NONE)
        return;
    uint64_t v = k;
    ssize_t r = write(d->rm->req_fd, &v, sizeof v);
    if (r == (ssize_t)sizeof v) {
        d->rstate[k] = R_ASKED;
        d->st->remote_requested++;
    } else {
        d->req_retry = 1;
    }
}

/* A fault on remote page k that is not here: the thread stays blocked (no
 * wake) until the page is placed by supply_one(). */
static int wait_remote(struct daemon *d, size_t ti, uint64_t addr, uint64_t t0, size_t k)
{
    if (d->nw == d->capw) {
        size_t cap = d->capw ? 2 * d->capw : 16;
        struct waiter *nw = realloc(d->w, cap * sizeof *nw);
        if (!nw)
            return -ENOMEM;
        d->w = nw;
        d->capw = cap;
    }
    d->w[d->nw++] = (struct waiter){ti, addr, t0, k};
    d->st->remote_faults++;
    d->st->faults++;
    request_remote(d, k);
    return 0;
}

static void record_remote_latency(struct daemon *d, uint64_t t0)
{
    const struct ss_lazy_opts *o = d->o;
    if (o->rlat_ns && d->st->rlat_n < o->rlat_cap)
        o->rlat_ns[d->st->rlat_n++] = now_ns() - t0;
}

/* Serve one fault. A page still to fill is copied (or zero-filled for a store
 * zero page) and the thread woken. Any other address (a hole of the dump, a
 * page already filled by a background copy without wake-up, a dropped page)
 * gets UFFDIO_ZEROPAGE: EEXIST means the page is there and only the thread
 * needs waking; otherwise a zero page is the right content. Never a bare wake
 * for a page that may be missing: the thread would fault again at once.
 * Returns 0, 1 (EAGAIN: deferred) or -errno. */
static int serve_fault(struct daemon *d, size_t ti, uint64_t addr, uint64_t t0)
{
    struct task *t = &d->t[ti];
    if (t->finished)
        return 0;
    addr &= ~(uint64_t)(d->ps - 1);
    size_t i = lower_bound(t->addr, t->n, addr);
    int have = i < t->n && t->addr[i] == addr;
    int err = 0;
    if (have && t->state[i] != ST_PENDING)
        have = 0; /* filled in the background (DONTWAKE) or dropped: see below */
    const uint8_t *src = NULL;
    if (have && IS_REMOTE(t->row[i]) && d->rstate[REMOTE_K(t->row[i])] != R_HERE) {
        /* a thread already waiting for the same page faults again only after a
         * wake: one waiter per (task, page) is enough */
        size_t k = REMOTE_K(t->row[i]);
        for (size_t j = 0; j < d->nw; j++)
            if (d->w[j].task == ti && d->w[j].k == k)
                return 0;
        return wait_remote(d, ti, addr, t0, k);
    }
    if (have && t->row[i] != -1) {
        src = page_src(d, t, t->row[i], NULL);
        if (!src) {
            d->st->err_pid = t->pid;
            d->st->err_addr = addr;
            return -ERANGE;
        }
    }
    size_t got = place(d, t->fd, addr, src, 1, 0, &err);
    if (got == 1 || err == EEXIST) {
        if (err == EEXIST) {
            /* the page is there (a background copy without wake-up, or the
             * process placed it): only the waiting thread needs waking */
            if (have)
                d->st->exist++;
            else
                d->st->fault_woken++;
            wake(t->fd, addr, d->ps);
        } else if (src) {
            d->st->fault_copied++;
        } else {
            d->st->fault_zero++;
        }
        if (have) {
            mark_done(t, i);
            t->ra = i + 1;
        }
        d->st->faults++;
        record_latency(d, t0);
        return 0;
    }
    if (err == EAGAIN) {
        d->st->eagain++;
        return defer_fault(d, ti, addr, t0) < 0 ? -ENOMEM : 1;
    }
    if (is_exit_errno(err)) {
        task_exited(d, t);
        return 0;
    }
    if (err == ENOENT || err == EINVAL) {
        /* no registered VMA there any more (unmapped, or a REMOVE unregistered
         * it): the thread will fault normally once woken */
        wake(t->fd, addr, d->ps);
        if (have) {
            mark_done(t, i);
            d->st->unreachable++;
        }
        d->st->faults++;
        record_latency(d, t0);
        return 0;
    }
    d->st->err_pid = t->pid;
    d->st->err_addr = addr;
    return -err;
}

/* ------------------------------------------------------------------ events */

static int handle_fork(struct daemon *d, size_t ti, int child_fd)
{
    /* d->t may move in task_add: copy what is needed first */
    struct task *nt = task_add(d);
    if (!nt) {
        close(child_fd);
        return -ENOMEM;
    }
    struct task *p = &d->t[ti];
    nt->fd = child_fd;
    nt->pid = p->pid;
    nt->one = p->one;
    nt->src = p->src;
    nt->nsrc = p->nsrc;
    nt->breaks = p->breaks;
    nt->nbreaks = p->nbreaks;
    fcntl(child_fd, F_SETFD, FD_CLOEXEC);
    fcntl(child_fd, F_SETFL, fcntl(child_fd, F_GETFL) | O_NONBLOCK);
    /* the child starts with the parent's remaining pages (the ones already
     * filled were copied by fork) */
    size_t n = p->remaining;
    if (task_alloc(nt, n) < 0)
        return -ENOMEM;
    size_t k = 0;
    for (size_t i = 0; i < p->n; i++) {
        if (p->state[i] == ST_PENDING) {
            nt->addr[k] = p->addr[i];
            nt->row[k] = p->row[i];
            nt->state[k] = ST_PENDING;
            if (IS_REMOTE(p->row[i]))
                nt->remote_left++;
            k++;
        }
    }
    nt->n = k;
    nt->remaining = k;
    nt->remapped = p->remapped;
    d->st->forks++;
    if (k == 0)
        task_close(d, nt); /* nothing to fill: release it at once */
    return 0;
}

static int handle_event(struct daemon *d, size_t ti, const struct uffd_msg *m)
{
    struct task *t = &d->t[ti];
    switch (m->event) {
    case UFFD_EVENT_FORK:
        return handle_fork(d, ti, (int)m->arg.fork.ufd);
    case UFFD_EVENT_REMAP:
        d->st->remaps++;
        if (t->finished)
            return 0;
        return remap_range(d, t, m->arg.remap.from, m->arg.remap.to, m->arg.remap.len);
    case UFFD_EVENT_REMOVE:
    case UFFD_EVENT_UNMAP: {
        uint64_t s = m->arg.remove.start, e = m->arg.remove.end;
        if (m->event == UFFD_EVENT_REMOVE)
            d->st->removes++;
        else
            d->st->unmaps++;
        if (t->finished)
            return 0;
        drop_range(d, t, s, e);
        if (m->event == UFFD_EVENT_REMOVE) {
            /* The VMA stays; unregister the range so later touches are
             * ordinary zero-fill faults that never come here. */
            struct uffdio_range r = {.start = s, .len = e - s};
            if (ioctl(t->fd, UFFDIO_UNREGISTER, &r) < 0 && errno == ENOMEM) {
                task_exited(d, t); /* the kernel says ENOMEM once the mm is gone */
                return 0;
            }
        }
        return 0;
    }
    default:
        d->st->err_pid = t->pid;
        return -EPROTO;
    }
}

/* Read every queued message of task ti: events first, then faults. */
static int drain_task(struct daemon *d, size_t ti)
{
    struct uffd_msg msgs[SS_MSG_BATCH];
    for (;;) {
        struct task *t = &d->t[ti];
        if (t->finished)
            return 0;
        ssize_t r = read(t->fd, msgs, sizeof msgs);
        if (r < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return 0;
            if (is_exit_errno(errno)) {
                task_exited(d, t);
                return 0;
            }
            d->st->err_pid = t->pid;
            return -errno;
        }
        if (r == 0)
            return 0;
        size_t nm = (size_t)r / sizeof msgs[0];
        uint64_t t0 = now_ns();
        for (size_t i = 0; i < nm; i++) {
            if (msgs[i].event == UFFD_EVENT_PAGEFAULT)
                continue;
            int e = handle_event(d, ti, &msgs[i]);
            if (e < 0)
                return e;
        }
        for (size_t i = 0; i < nm; i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            int e = serve_fault(d, ti, msgs[i].arg.pagefault.address, t0);
            if (e < 0)
                return e;
        }
        if (nm < SS_MSG_BATCH)
            return 0;
    }
}

static int retry_deferred(struct daemon *d)
{
    size_t n = d->ndef;
    if (!n)
        return 0;
    struct deferred *copy = malloc(n * sizeof *copy);
    if (!copy)
        return -ENOMEM;
    memcpy(copy, d->def, n * sizeof *copy);
    d->ndef = 0;
    for (size_t i = 0; i < n; i++) {
        int e = serve_fault(d, copy[i].task, copy[i].addr, copy[i].t0);
        if (e < 0) {
            free(copy);
            return e;
        }
    }
    free(copy);
    return 0;
}

/* ------------------------------------------------------------------ background fill */

static int crosses_break(const struct task *t, uint64_t a)
{
    /* a is the start of a page following another in the run: a run must not
     * continue across an address listed in breaks */
    if (!t->breaks || !t->nbreaks)
        return 0;
    size_t j = lower_bound(t->breaks, t->nbreaks, a);
    return j < t->nbreaks && t->breaks[j] == a;
}

/* Length of the run of pending pages from index i: consecutive addresses, rows
 * consecutive (or all zero pages), no break, at most max pages. */
static size_t run_len(const struct daemon *d, const struct task *t, size_t i, size_t max)
{
    size_t k = 1;
    int zero = t->row[i] == -1;
    if (IS_REMOTE(t->row[i]))
        return 1; /* a remote page that is here: one by one */
    while (k < max && i + k < t->n) {
        size_t j = i + k;
        if (t->state[j] != ST_PENDING || t->addr[j] != t->addr[j - 1] + d->ps)
            break;
        if (zero ? t->row[j] != -1 : t->row[j] != t->row[j - 1] + 1)
            break;
        if (crosses_break(t, t->addr[j]))
            break;
        k++;
    }
    return k;
}

/* Copy the run at index i (k pages). Returns 0, 1 on EAGAIN, or -errno. */
static int fill_run(struct daemon *d, struct task *t, size_t i, size_t k)
{
    while (k > 0 && !t->finished) {
        int zero = t->row[i] == -1;
        int remote = IS_REMOTE(t->row[i]);
        const uint8_t *src = NULL;
        if (!zero) {
            uint64_t avail = 0;
            src = page_src(d, t, t->row[i], &avail);
            if (!src) {
                d->st->err_pid = t->pid;
                d->st->err_addr = t->addr[i];
                return -ERANGE;
            }
            if (avail < k)
                k = avail; /* the rest of the run lives in the next piece */
        }
        int err = 0;
        size_t got = place(d, t->fd, t->addr[i], src, k, 1, &err);
        d->st->prefetch_ioctls++;
        for (size_t j = 0; j < got; j++)
            mark_done(t, i + j);
        if (zero)
            d->st->prefetch_zero += got;
        else
            d->st->prefetch_copied += got;
        i += got;
        k -= got;
        if (!err || k == 0)
            continue;
        if (err == EAGAIN) {
            d->st->eagain++;
            return 1;
        }
        if (err == EEXIST) {
            /* the page at i is already there (placed by a fault path, or the
             * process populated it some other way): skip it */
            d->st->exist++;
            if (remote)
                d->st->remote_exist++;
            mark_done(t, i);
            i++;
            k--;
            continue;
        }
        if (is_exit_errno(err)) {
            task_exited(d, t);
            return 0;
        }
        if (err == ENOENT || err == EINVAL) {
            if (k > 1) {
                /* the run spans VMAs the images did not show: page by page */
                for (size_t j = 0; j < k && !t->finished; j++) {
                    int e = fill_run(d, t, i + j, 1);
                    if (e)
                        return e;
                }
                return 0;
            }
            d->st->unreachable++;
            mark_done(t, i);
            i++;
            k--;
            continue;
        }
        d->st->err_pid = t->pid;
        d->st->err_addr = t->addr[i];
        return -err;
    }
    return 0;
}

/* One background chunk for some task. Returns 0 (did work or nothing left),
 * 1 (EAGAIN), -errno. *idle is set when no task has pending pages. */
static int prefetch_step(struct daemon *d, size_t *rr, int *idle)
{
    *idle = 1;
    for (size_t c = 0; c < d->nt; c++) {
        size_t ti = (*rr + c) % d->nt;
        struct task *t = &d->t[ti];
        if (t->finished)
            continue;
        if (t->remaining == 0) {
            task_close(d, t);
            continue;
        }
        if (t->local_done)
            continue; /* only remote pages not here yet: they come by supply */
        *idle = 0;
        size_t i = SIZE_MAX;
        if (t->ra != SIZE_MAX && t->ra < t->n && t->state[t->ra] == ST_PENDING &&
            !remote_waiting(d, t, t->ra))
            i = t->ra;
        t->ra = SIZE_MAX;
        if (i == SIZE_MAX) {
            while (t->cursor < t->n &&
                   (t->state[t->cursor] != ST_PENDING || remote_waiting(d, t, t->cursor)))
                t->cursor++;
            if (t->cursor >= t->n) {
                /* only after a remap reordered the arrays: one more pass */
                t->cursor = 0;
                while (t->cursor < t->n &&
                       (t->state[t->cursor] != ST_PENDING || remote_waiting(d, t, t->cursor)))
                    t->cursor++;
                if (t->cursor >= t->n) {
                    if (t->remote_left) {
                        /* what is left is at the source: supply_one() places it */
                        t->local_done = 1;
                        t->cursor = t->n;
                        continue;
                    }
                    t->remaining = 0;
                    task_close(d, t);
                    continue;
                }
            }
            i = t->cursor;
        }
        size_t k = run_len(d, t, i, d->chunk);
        *rr = (ti + 1) % d->nt;
        int e = fill_run(d, t, i, k);
        if (!t->finished && t->remaining == 0)
            task_close(d, t);
        return e;
    }
    return 0;
}

/* ------------------------------------------------------------------ socket */

static int recv_all(int fd, void *buf, size_t len)
{
    size_t got = 0;
    while (got < len) {
        ssize_t r = recv(fd, (char *)buf + got, len - got, MSG_WAITALL);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return got ? -EPROTO : -ECONNRESET;
        got += (size_t)r;
    }
    return 0;
}

static int recv_fd(int sock)
{
    char byte;
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } u;
    struct msghdr mh;
    memset(&mh, 0, sizeof mh);
    memset(&u, 0, sizeof u);
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = u.buf;
    mh.msg_controllen = sizeof u.buf;
    ssize_t r;
    do {
        r = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC | MSG_WAITALL);
    } while (r < 0 && errno == EINTR);
    if (r < 0)
        return -errno;
    if (r == 0)
        return -ECONNRESET;
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    if (!c || c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS ||
        c->cmsg_len < CMSG_LEN(sizeof(int)))
        return -EPROTO;
    int fd;
    memcpy(&fd, CMSG_DATA(c), sizeof fd);
    if (mh.msg_flags & MSG_CTRUNC) {
        close(fd);
        return -EPROTO;
    }
    return fd;
}

static const struct ss_lazy_store *find_store(const struct ss_lazy_store *s, size_t n,
                                              int32_t pid)
{
    for (size_t i = 0; i < n; i++)
        if (s[i].pid == pid)
            return &s[i];
    return NULL;
}

/* One message from CRIU: a pid (+ fd) or the restore-finished word. */
static int handle_sock(struct daemon *d, int conn, const struct ss_lazy_store *stores,
                       size_t nstores)
{
    int32_t pid;
    int r = recv_all(conn, &pid, sizeof pid);
    if (r < 0)
        return r;
    if ((uint32_t)pid == SS_LAZY_RESTORE_FINISHED) {
        d->finished_restore = 1;
        d->st->t_finished_ns = now_ns();
        return 0;
    }
    if (pid < 0) {
        d->st->zombies++;
        return 0;
    }
    if (pid == 0)
        return -EPROTO;
    int fd = recv_fd(conn);
    if (fd < 0)
        return fd;
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    struct task *t = task_add(d);
    if (!t) {
        close(fd);
        return -ENOMEM;
    }
    t->fd = fd;
    t->pid = pid;
    d->st->tasks++;
    const struct ss_lazy_store *s = find_store(stores, nstores, pid);
    size_t n = s ? s->n : 0;
    if (task_alloc(t, n) < 0)
        return -ENOMEM;
    if (n) {
        memcpy(t->addr, s->addrs, n * sizeof *t->addr);
        memcpy(t->row, s->rows, n * sizeof *t->row);
        t->one.base = s->pages;
        t->one.first_row = 0;
        t->one.nrows = s->nrows;
        t->src = s->src;
        t->nsrc = s->nsrc;
        t->breaks = s->breaks;
        t->nbreaks = s->nbreaks;
    }
    memset(t->state, ST_PENDING, n ? n : 1);
    t->remaining = n;
    for (size_t i = 0; i < n; i++)
        if (IS_REMOTE(t->row[i]))
            t->remote_left++;
    d->st->total_pages += n;
    d->st->remote_pages += t->remote_left;
    /* A task with no lazy pages keeps its descriptor until the restore is
     * finished anyway: its faults (never-touched pages) get zero pages. */
    return 0;
}

/* ------------------------------------------------------------------ post-copy supply */

/* Index of task t's entry for remote page k, or SIZE_MAX. */
static size_t find_remote(const struct daemon *d, const struct task *t, size_t k)
{
    int64_t row = SS_LAZY_ROW_REMOTE - (int64_t)k;
    if (!t->remapped) {
        size_t i = lower_bound(t->addr, t->n, d->rm->addrs[k]);
        return i < t->n && t->row[i] == row ? i : SIZE_MAX;
    }
    for (size_t i = 0; i < t->n; i++) /* addresses moved: rare, O(pages) */
        if (t->row[i] == row)
            return i;
    return SIZE_MAX;
}

static int push_sretry(struct daemon *d, size_t k)
{
    if (d->nsretry == d->capsretry) {
        size_t cap = d->capsretry ? 2 * d->capsretry : 16;
        size_t *n = realloc(d->sretry, cap * sizeof *n);
        if (!n)
            return -ENOMEM;
        d->sretry = n;
        d->capsretry = cap;
    }
    d->sretry[d->nsretry++] = k;
    return 0;
}

/* Remote page k is in row k of the remote buffer: place it in every task that
 * still misses it (before the restore finished: only where a fault waits for
 * it), wake the waiting faults. Never overwrites a present page (EEXIST). */
static int supply_one(struct daemon *d, size_t k)
{
    const uint8_t *src = d->rm->pages + k * d->ps;
    d->rstate[k] = R_HERE;
    int again = 0;
    for (size_t ti = 0; ti < d->nt; ti++) {
        struct task *t = &d->t[ti];
        if (t->finished || !t->remote_left)
            continue;
        if (!d->finished_restore) {
            int waited = 0;
            for (size_t j = 0; j < d->nw && !waited; j++)
                waited = d->w[j].task == ti && d->w[j].k == k;
            if (!waited)
                continue; /* the background fill places it after the finish */
        }
        size_t i = find_remote(d, t, k);
        if (i == SIZE_MAX || t->state[i] != ST_PENDING)
            continue;
        int err = 0;
        size_t got = place(d, t->fd, t->addr[i], src, 1, 0, &err);
        if (got == 1) {
            mark_done(t, i);
            d->st->remote_placed++;
        } else if (err == EEXIST) {
            /* present already (written by the process after it became ordinary
             * memory, or placed otherwise): keep it as it is */
            mark_done(t, i);
            d->st->remote_exist++;
            d->st->exist++;
            wake(t->fd, t->addr[i], d->ps);
        } else if (err == EAGAIN) {
            d->st->eagain++;
            again = 1;
        } else if (is_exit_errno(err)) {
            task_exited(d, t);
        } else if (err == ENOENT || err == EINVAL) {
            d->st->unreachable++;
            mark_done(t, i);
            wake(t->fd, t->addr[i], d->ps);
        } else {
            d->st->err_pid = t->pid;
            d->st->err_addr = t->addr[i];
            return -err;
        }
    }
    if (again)
        return push_sretry(d, k);
    /* the faults that waited for it are woken (by the copy, or above) */
    size_t w = 0;
    for (size_t j = 0; j < d->nw; j++) {
        if (d->w[j].k == k) {
            record_remote_latency(d, d->w[j].t0);
            continue;
        }
        d->w[w++] = d->w[j];
    }
    d->nw = w;
    return 0;
}

/* Read the supplier's announcements (u64 indices); returns 0, -EPIPE on EOF with
 * remote pages missing (1 on a clean EOF), or -errno. */
static int drain_supply(struct daemon *d)
{
    unsigned char buf[4096];
    for (int turn = 0; turn < 16; turn++) {
        size_t have = d->sbuf_n;
        memcpy(buf, d->sbuf, have);
        ssize_t r = read(d->rm->supply_fd, buf + have, sizeof buf - have);
        if (r < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return 0;
            return -errno;
        }
        if (r == 0) {
            for (size_t i = 0; i < d->nt; i++)
                if (!d->t[i].finished && d->t[i].remote_left)
                    for (size_t j = 0; j < d->t[i].n; j++)
                        if (d->t[i].state[j] == ST_PENDING && remote_waiting(d, &d->t[i], j))
                            return -EPIPE;
            return 1;
        }
        size_t tot = have + (size_t)r, n = tot / 8;
        d->sbuf_n = tot - n * 8;
        memcpy(d->sbuf, buf + n * 8, d->sbuf_n);
        for (size_t i = 0; i < n; i++) {
            uint64_t k;
            memcpy(&k, buf + i * 8, 8);
            if (k >= d->rm->n) {
                d->st->err_addr = k;
                return -EPROTO;
            }
            d->st->remote_supplied++;
            int e = supply_one(d, (size_t)k);
            if (e < 0)
                return e;
        }
        if ((size_t)r < sizeof buf - have)
            return 0;
    }
    return 0;
}

static int retry_supply(struct daemon *d)
{
    size_t n = d->nsretry;
    if (!n)
        return 0;
    size_t *copy = malloc(n * sizeof *copy);
    if (!copy)
        return -ENOMEM;
    memcpy(copy, d->sretry, n * sizeof *copy);
    d->nsretry = 0;
    for (size_t i = 0; i < n; i++) {
        int e = supply_one(d, copy[i]);
        if (e < 0) {
            free(copy);
            return e;
        }
    }
    free(copy);
    return 0;
}

static void retry_requests(struct daemon *d)
{
    d->req_retry = 0;
    for (size_t j = 0; j < d->nw; j++)
        request_remote(d, d->w[j].k);
}

/* ------------------------------------------------------------------ main loop */

static int wait_accept(int lsock, int cancel_fd, int timeout_ms)
{
    uint64_t deadline = timeout_ms > 0 ? now_ns() + (uint64_t)timeout_ms * 1000000ull : 0;
    for (;;) {
        struct pollfd p[2] = {{.fd = lsock, .events = POLLIN}, {.fd = cancel_fd, .events = POLLIN}};
        int wait = -1;
        if (deadline) {
            uint64_t now = now_ns();
            if (now >= deadline)
                return -ETIMEDOUT;
            wait = (int)((deadline - now) / 1000000ull) + 1;
        }
        int r = poll(p, cancel_fd >= 0 ? 2 : 1, wait);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (cancel_fd >= 0 && (p[1].revents & (POLLIN | POLLHUP | POLLERR)))
            return -ECANCELED;
        if (p[0].revents & POLLIN) {
            int c = accept4(lsock, NULL, NULL, SOCK_CLOEXEC);
            if (c >= 0)
                return c;
            if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED)
                return -errno;
        }
    }
}

static int all_filled(const struct daemon *d)
{
    for (size_t i = 0; i < d->nt; i++)
        if (!d->t[i].finished)
            return 0;
    return 1;
}

int ss_lazy_serve(int sock, unsigned flags, const struct ss_lazy_store *stores, size_t nstores,
                  const struct ss_lazy_opts *opts, struct ss_lazy_stats *st)
{
    struct ss_lazy_opts defaults;
    if (!opts) {
        memset(&defaults, 0, sizeof defaults);
        defaults.cancel_fd = -1;
        opts = &defaults;
    }
    memset(st, 0, sizeof *st);
    st->t_start_ns = now_ns();
    struct daemon d;
    memset(&d, 0, sizeof d);
    d.o = opts;
    d.st = st;
    d.ps = opts->page_size ? opts->page_size : (size_t)sysconf(_SC_PAGESIZE);
    d.chunk = opts->chunk ? opts->chunk : 256;
    if (d.ps == 0 || (d.ps & (d.ps - 1)))
        return -EINVAL;
    const struct ss_lazy_remote *rm = opts->remote && opts->remote->n ? opts->remote : NULL;
    if (rm) {
        if (!rm->addrs || !rm->pages || rm->req_fd < 0 || rm->supply_fd < 0)
            return -EINVAL;
        for (size_t j = 1; j < rm->n; j++)
            if (rm->addrs[j] <= rm->addrs[j - 1])
                return -EINVAL;
    }
    for (size_t i = 0; i < nstores; i++) {
        const struct ss_lazy_store *s = &stores[i];
        if (s->n && (!s->addrs || !s->rows))
            return -EINVAL;
        struct task probe;
        memset(&probe, 0, sizeof probe);
        probe.one.base = s->pages;
        probe.one.nrows = s->nrows;
        probe.src = s->src;
        probe.nsrc = s->nsrc;
        for (size_t j = 1; j < s->nsrc; j++)
            if (s->src[j].first_row < s->src[j - 1].first_row + s->src[j - 1].nrows)
                return -EINVAL;
        for (size_t j = 0; j < s->n; j++) {
            if (s->addrs[j] % d.ps || (j && s->addrs[j] <= s->addrs[j - 1]))
                return -EINVAL;
            if (s->rows[j] >= 0 && !row_ptr(&probe, s->rows[j], d.ps, NULL))
                return -ERANGE;
            if (IS_REMOTE(s->rows[j]) && (!rm || REMOTE_K(s->rows[j]) >= rm->n))
                return -ERANGE;
        }
    }
    if (rm) {
        d.rm = rm;
        d.rstate = calloc(rm->n, 1);
        if (!d.rstate)
            return -ENOMEM;
    }
    int conn = sock, rc = 0;
    if (flags & SS_LAZY_ACCEPT) {
        conn = wait_accept(sock, opts->cancel_fd, opts->accept_timeout_ms);
        if (conn < 0) {
            free(d.rstate);
            return conn;
        }
    }
    st->t_connected_ns = now_ns();
    int sock_open = 1, backoff = 0, supply_open = rm != NULL;
    size_t rr = 0;
    struct pollfd *pf = NULL;
    size_t *pmap = NULL;
    size_t cap = 0;
    for (;;) {
        if (d.finished_restore && all_filled(&d)) {
            st->t_filled_ns = now_ns();
            break;
        }
        /* poll set: the socket (until finished), the cancel fd, the supply fd
         * (post-copy), every open uffd */
        size_t need = d.nt + 3;
        if (need > cap) {
            struct pollfd *np = realloc(pf, need * sizeof *np);
            size_t *nm = realloc(pmap, need * sizeof *nm);
            if (np)
                pf = np;
            if (nm)
                pmap = nm;
            if (!np || !nm) {
                rc = -ENOMEM;
                break;
            }
            cap = need;
        }
        size_t np = 0;
        int sock_idx = -1, cancel_idx = -1;
        if (sock_open) {
            sock_idx = (int)np;
            pf[np++] = (struct pollfd){.fd = conn, .events = POLLIN};
        }
        if (opts->cancel_fd >= 0) {
            cancel_idx = (int)np;
            pf[np++] = (struct pollfd){.fd = opts->cancel_fd, .events = POLLIN};
        }
        int supply_idx = -1;
        if (supply_open) {
            supply_idx = (int)np;
            pf[np++] = (struct pollfd){.fd = rm->supply_fd, .events = POLLIN};
        }
        size_t first_task = np;
        int work = 0;
        for (size_t i = 0; i < d.nt; i++) {
            if (d.t[i].finished)
                continue;
            if (d.finished_restore && d.t[i].remaining && !d.t[i].local_done &&
                !opts->no_prefetch)
                work = 1;
            pmap[np] = i;
            pf[np++] = (struct pollfd){.fd = d.t[i].fd, .events = POLLIN};
        }
        if (d.finished_restore) {
            /* a task with nothing left to fill is released at once (its holes
             * become ordinary memory), in both modes */
            int closed = 0;
            for (size_t i = 0; i < d.nt; i++) {
                if (!d.t[i].finished && d.t[i].remaining == 0) {
                    task_close(&d, &d.t[i]);
                    closed = 1;
                }
            }
            if (closed)
                continue;
        }
        int timeout = (d.ndef || backoff || d.nsretry || d.req_retry) ? 1 : (work ? 0 : -1);
        backoff = 0;
        int r = poll(pf, np, timeout);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            rc = -errno;
            break;
        }
        if (cancel_idx >= 0 && (pf[cancel_idx].revents & (POLLIN | POLLHUP | POLLERR))) {
            rc = -ECANCELED;
            break;
        }
        for (size_t k = first_task; k < np; k++) {
            if (!pf[k].revents)
                continue;
            size_t ti = pmap[k];
            if (pf[k].revents & (POLLERR | POLLNVAL)) {
                task_exited(&d, &d.t[ti]);
                continue;
            }
            rc = drain_task(&d, ti);
            if (rc < 0)
                goto out;
        }
        rc = retry_deferred(&d);
        if (rc < 0)
            break;
        if (supply_idx >= 0 && pf[supply_idx].revents) {
            rc = drain_supply(&d);
            if (rc == 1) {
                supply_open = 0; /* the supplier is done and nothing waits for it */
                rc = 0;
            }
            if (rc < 0)
                break;
        }
        if (d.nsretry) {
            rc = retry_supply(&d);
            if (rc < 0)
                break;
        }
        if (d.req_retry)
            retry_requests(&d);
        if (sock_idx >= 0 && pf[sock_idx].revents) {
            if (pf[sock_idx].revents & POLLIN) {
                rc = handle_sock(&d, conn, stores, nstores);
                if (rc == -ECONNRESET && d.finished_restore)
                    rc = 0;
                if (rc < 0)
                    break;
            } else {
                rc = d.finished_restore ? 0 : -ECONNRESET;
                if (rc < 0)
                    break;
            }
            if (d.finished_restore) {
                /* CRIU closes its end after the finished word; we are done with it */
                sock_open = 0;
            }
        }
        if (work && d.ndef == 0) {
            int idle = 0;
            int e = prefetch_step(&d, &rr, &idle);
            if (e < 0) {
                rc = e;
                break;
            }
            /* EAGAIN: an mm change is in flight; its event may not be queued
             * yet, so the next poll waits a little instead of spinning */
            backoff = e == 1;
        }
    }
out:
    for (size_t i = 0; i < d.nt; i++) {
        if (!d.t[i].finished) {
            struct task *t = &d.t[i];
            st->left += t->remaining;
            if (rc < 0 && t->remaining && t->fd >= 0 && opts->left_fds &&
                st->left_nfds < opts->left_cap) {
                opts->left_fds[st->left_nfds++] = t->fd; /* handed back open */
                t->fd = -1;
            }
            task_close(&d, t);
        }
    }
    if (!st->t_filled_ns && rc == 0)
        st->t_filled_ns = now_ns();
    if (flags & SS_LAZY_ACCEPT)
        close(conn);
    free(pf);
    free(pmap);
    free(d.t);
    free(d.def);
    free(d.w);
    free(d.sretry);
    free(d.rstate);
    return rc;
}

/* ------------------------------------------------------------------ CRIU's side (tests) */

int ss_lazy_uffd_open(int flags, uint64_t *features)
{
    long fd = syscall(__NR_userfaultfd, flags);
    if (fd < 0)
        return -errno;
    struct uffdio_api api;
    memset(&api, 0, sizeof api);
    api.api = UFFD_API;
    api.features = SS_LAZY_UFFD_FEATURES;
    if (ioctl((int)fd, UFFDIO_API, &api) < 0) {
        int e = errno;
        close((int)fd);
        return -e;
    }
    if (features)
        *features = api.features;
    return (int)fd;
}

int ss_lazy_send_uffd(int sock, int32_t pid, int uffd)
{
    if (send(sock, &pid, sizeof pid, MSG_NOSIGNAL) != (ssize_t)sizeof pid)
        return -errno;
    if (pid < 0)
        return 0;
    char byte = '*';
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } u;
    memset(&u, 0, sizeof u);
    struct msghdr mh;
    memset(&mh, 0, sizeof mh);
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = u.buf;
    mh.msg_controllen = sizeof u.buf;
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &uffd, sizeof uffd);
    return sendmsg(sock, &mh, MSG_NOSIGNAL) == 1 ? 0 : -errno;
}

int ss_lazy_send_finished(int sock)
{
    uint32_t w = SS_LAZY_RESTORE_FINISHED;
    return send(sock, &w, sizeof w, MSG_NOSIGNAL) == (ssize_t)sizeof w ? 0 : -errno;
}
