/* ss_lazy.c: the lazy-pages daemon against a forked child that plays CRIU's
 * restored task: it registers a userfaultfd over a mapping, sends it the way
 * `criu restore --lazy-pages` does (pid, then the descriptor by SCM_RIGHTS,
 * then the restore-finished word), and reads its memory back, comparing with
 * the page store it inherited. Checks fault serving, the background fill,
 * zero pages, and REMOVE / UNMAP / REMAP / FORK while pages are still missing.
 * Needs root (non-cooperative uffd events); prints "skip" otherwise.
 * Run under ASan by tests/test_c_asan.py. */
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ss_lazy.h"
#include "ss_test.h"

static size_t ps;

/* A store of n pages at base: page i holds bytes derived from i; every 7th page
 * is a store zero page (row -1); pages i % 50 == 49 are not lazy at all (holes:
 * never touched at the dump, they must read as zeros). */
struct store {
    uint64_t base;
    size_t span;  /* pages in the mapping */
    size_t n;
    uint64_t *addrs;
    int64_t *rows;
    uint8_t *pages;
    size_t nrows;
};

static void fill_page(uint8_t *p, size_t i)
{
    for (size_t k = 0; k < ps; k += 8) {
        uint64_t v = (uint64_t)i * 0x9E3779B97F4A7C15ull ^ k;
        memcpy(p + k, &v, 8);
    }
}

static void store_make(struct store *s, uint64_t base, size_t span)
{
    s->base = base;
    s->span = span;
    s->addrs = calloc(span, sizeof *s->addrs);
    s->rows = calloc(span, sizeof *s->rows);
    s->pages = malloc(span * ps);
    s->n = s->nrows = 0;
    for (size_t i = 0; i < span; i++) {
        if (i % 50 == 49)
            continue;
        s->addrs[s->n] = base + i * ps;
        if (i % 7 == 3) {
            s->rows[s->n] = -1;
        } else {
            fill_page(s->pages + s->nrows * ps, i);
            s->rows[s->n] = (int64_t)s->nrows++;
        }
        s->n++;
    }
}

static void store_free(struct store *s)
{
    free(s->addrs);
    free(s->rows);
    free(s->pages);
}

/* What page i of the original mapping must hold. */
static int page_ok(const uint8_t *p, size_t i)
{
    uint8_t want[65536];
    if (i % 50 == 49 || i % 7 == 3) {
        for (size_t k = 0; k < ps; k++)
            if (p[k])
                return 0;
        return 1;
    }
    fill_page(want, i);
    return memcmp(p, want, ps) == 0;
}

static int is_zero(const uint8_t *p, size_t len)
{
    for (size_t k = 0; k < len; k++)
        if (p[k])
            return 0;
    return 1;
}

static int register_missing(int uffd, void *addr, size_t len)
{
    struct uffdio_register r;
    memset(&r, 0, sizeof r);
    r.range.start = (uint64_t)(uintptr_t)addr;
    r.range.len = len;
    r.mode = UFFDIO_REGISTER_MODE_MISSING;
    return ioctl(uffd, UFFDIO_REGISTER, &r);
}

/* ---------------------------------------------------------------- test 1 */

/* The child: faults on a few pages before "the restore finishes", then reads
 * everything after the background fill has started. Exit code = failures. */
static int child_basic(int sock, uint8_t *map, size_t span)
{
    int bad = 0;
    int uffd = ss_lazy_uffd_open(O_CLOEXEC | O_NONBLOCK, NULL);
    if (uffd < 0 || register_missing(uffd, map, span * ps) < 0)
        return 100;
    if (ss_lazy_send_uffd(sock, -4242, -1) < 0) /* a zombie first: no descriptor */
        return 101;
    if (ss_lazy_send_uffd(sock, getpid(), uffd) < 0)
        return 102;
    close(uffd); /* the restorer closes its copy: the daemon holds the only one */
    /* faults before the finished word: served on demand, nothing prefetched yet */
    size_t early[] = {5, 6, 100, 3, 49, span - 1};
    for (size_t j = 0; j < sizeof early / sizeof early[0]; j++)
        bad += !page_ok(map + early[j] * ps, early[j]);
    if (ss_lazy_send_finished(sock) < 0)
        return 103;
    for (size_t i = span; i-- > 0;)
        bad += !page_ok(map + i * ps, i);
    return bad > 99 ? 99 : bad;
}

/* pieces > 1: the store's rows live in that many separate arrays (a store
 * grown in chunks), runs must stop at their ends */
static void test_basic(int pieces)
{
    size_t span = 1500;
    uint8_t *map = mmap(NULL, span * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                        -1, 0);
    CHECK(map != MAP_FAILED);
    struct store s;
    store_make(&s, (uint64_t)(uintptr_t)map, span);
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        close(sv[0]);
        alarm(60);
        _exit(child_basic(sv[1], map, span));
    }
    close(sv[1]);
    struct ss_lazy_store ls = {.pid = pid, .n = s.n, .addrs = s.addrs, .rows = s.rows,
                               .pages = s.pages, .nrows = s.nrows};
    struct ss_lazy_src src[4];
    uint8_t *copies[4] = {NULL};
    if (pieces > 1) {
        size_t per = (s.nrows + (size_t)pieces - 1) / (size_t)pieces;
        for (int k = 0; k < pieces; k++) {
            size_t first = (size_t)k * per, cnt = first + per > s.nrows ? s.nrows - first : per;
            copies[k] = malloc(cnt * ps);
            memcpy(copies[k], s.pages + first * ps, cnt * ps);
            src[k] = (struct ss_lazy_src){copies[k], first, cnt};
        }
        ls.pages = NULL;
        ls.nrows = 0;
        ls.src = src;
        ls.nsrc = (size_t)pieces;
    }
    uint64_t lat[64];
    struct ss_lazy_opts o = {.page_size = ps, .chunk = 64, .cancel_fd = -1, .lat_ns = lat,
                             .lat_cap = 64};
    struct ss_lazy_stats st;
    int rc = ss_lazy_serve(sv[0], 0, &ls, 1, &o, &st);
    CHECK(rc == 0);
    int status = -1;
    CHECK(waitpid(pid, &status, 0) == pid);
    if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0))
        fprintf(stderr, "basic child status %#x\n", status);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK(st.tasks == 1 && st.zombies == 1);
    CHECK(st.total_pages == s.n);
    /* every store page copied exactly once, by a fault or by the fill; zero
     * pages by either (fault_zero also counts holes touched before the close) */
    CHECK(st.fault_copied + st.prefetch_copied == s.nrows && st.exist == 0);
    CHECK(st.prefetch_zero + st.fault_zero >= s.n - s.nrows);
    /* before the finish: 5, 6, 100 copied; 3 (a store zero page), 49 and span-1
     * (holes) zero-filled; after it, more faults race with the fill */
    CHECK(st.fault_copied >= 3 && st.fault_zero >= 3);
    if (st.fault_copied < 3 || st.fault_zero < 3)
        fprintf(stderr, "pieces %d: faults %llu copied %llu zero %llu woken %llu exist %llu "
                "eagain %llu prefetch %llu\n", pieces, (unsigned long long)st.faults,
                (unsigned long long)st.fault_copied, (unsigned long long)st.fault_zero,
                (unsigned long long)st.fault_woken, (unsigned long long)st.exist,
                (unsigned long long)st.eagain, (unsigned long long)st.prefetch_copied);
    CHECK(st.prefetch_copied > 0);
    CHECK(st.prefetch_ioctls < s.n / 2); /* runs (broken at every store zero page) */
    CHECK(st.faults >= 6 && st.lat_n == (st.faults < 64 ? st.faults : 64));
    CHECK(st.t_finished_ns >= st.t_connected_ns && st.t_filled_ns >= st.t_finished_ns);
    CHECK(st.lost_exited == 0 && st.unreachable == 0 && st.left == 0);
    close(sv[0]);
    for (int k = 0; k < 4; k++)
        free(copies[k]);
    store_free(&s);
    munmap(map, span * ps);
}

/* ---------------------------------------------------------------- test 2 */

/* Layout of the child's mapping (span pages):
 *   [0, 100)     read before the finish: fault path
 *   [100, 200)   MADV_DONTNEED before anything is filled: REMOVE -> zeros
 *   [200, 300)   munmap: UNMAP
 *   [300, 400)   mremap'd onto [200, 300): REMAP, content moves with it
 *   [400, 500)   stays
 *   [500, span)  filled in the background; a fork in the middle of it, and a
 *                second DONTNEED racing with the fill
 */
static int child_events(int sock, uint8_t *map, size_t span)
{
    int bad = 0;
    int uffd = ss_lazy_uffd_open(O_CLOEXEC | O_NONBLOCK, NULL);
    if (uffd < 0 || register_missing(uffd, map, span * ps) < 0)
        return 100;
    if (ss_lazy_send_uffd(sock, getpid(), uffd) < 0)
        return 102;
    close(uffd);
    for (size_t i = 0; i < 100; i++)
        bad += !page_ok(map + i * ps, i);
    if (madvise(map + 100 * ps, 100 * ps, MADV_DONTNEED) < 0)
        return 104;
    for (size_t i = 100; i < 200; i++)
        bad += !is_zero(map + i * ps, ps);
    if (munmap(map + 200 * ps, 100 * ps) < 0)
        return 105;
    uint8_t *moved = mremap(map + 300 * ps, 100 * ps, 100 * ps, MREMAP_MAYMOVE | MREMAP_FIXED,
                            map + 200 * ps);
    /* MREMAP_FIXED onto the hole left by the munmap: the kernel sends
     * UNMAP(destination) first (nothing there), then REMAP */
    if (moved == MAP_FAILED)
        return 106;
    for (size_t j = 0; j < 100; j += 3)
        bad += !page_ok(moved + j * ps, 300 + j);
    if (ss_lazy_send_finished(sock) < 0)
        return 103;
    /* during the fill: a fork (the grandchild checks its own copy) and a REMOVE */
    pid_t g = fork();
    if (g == 0) {
        int gb = 0;
        for (size_t i = span; i-- > 500;)
            gb += !page_ok(map + i * ps, i);
        for (size_t j = 0; j < 100; j++)
            gb += !page_ok(moved + j * ps, 300 + j);
        for (size_t i = 400; i < 500; i++)
            gb += !page_ok(map + i * ps, i);
        _exit(gb > 99 ? 99 : gb);
    }
    if (g < 0)
        return 107;
    if (madvise(map + (span - 64) * ps, 64 * ps, MADV_DONTNEED) < 0)
        return 108;
    for (size_t i = span - 64; i < span; i++)
        bad += !is_zero(map + i * ps, ps);
    for (size_t i = 500; i < span - 64; i++)
        bad += !page_ok(map + i * ps, i);
    for (size_t j = 0; j < 100; j++)
        bad += !page_ok(moved + j * ps, 300 + j);
    for (size_t i = 400; i < 500; i++)
        bad += !page_ok(map + i * ps, i);
    for (size_t i = 0; i < 100; i++)
        bad += !page_ok(map + i * ps, i);
    int status = 0;
    if (waitpid(g, &status, 0) != g || !WIFEXITED(status))
        return 109;
    bad += WEXITSTATUS(status);
    return bad > 99 ? 99 : bad;
}

/* no_prefetch: faults only, so every event meets pages still missing and the
 * counts are exact; with the fill, the events after the finish race with it */
static void test_events(int no_prefetch)
{
    size_t span = 6000;
    uint8_t *map = mmap(NULL, span * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                        -1, 0);
    CHECK(map != MAP_FAILED);
    struct store s;
    store_make(&s, (uint64_t)(uintptr_t)map, span);
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        close(sv[0]);
        alarm(60);
        _exit(child_events(sv[1], map, span));
    }
    close(sv[1]);
    struct ss_lazy_store ls = {.pid = pid, .n = s.n, .addrs = s.addrs, .rows = s.rows,
                               .pages = s.pages, .nrows = s.nrows};
    struct ss_lazy_opts o = {.page_size = ps, .chunk = 16, .cancel_fd = -1,
                             .no_prefetch = no_prefetch};
    struct ss_lazy_stats st;
    int rc = ss_lazy_serve(sv[0], 0, &ls, 1, &o, &st);
    if (rc)
        fprintf(stderr, "events: rc %d pid %d addr %#llx\n", rc, st.err_pid,
                (unsigned long long)st.err_addr);
    CHECK(rc == 0);
    int status = -1;
    CHECK(waitpid(pid, &status, 0) == pid);
    if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0))
        fprintf(stderr, "events child status %#x\n", status);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    /* before the finish (always seen): a REMOVE, the munmap, the mremap */
    CHECK(st.removes >= 1 && st.unmaps >= 1 && st.remaps == 1 && st.forks <= 1);
    if (no_prefetch)
        CHECK(st.removes == 2 && st.forks == 1 && st.prefetch_copied == 0);
    /* the first DONTNEED and the munmap dropped 2 x 98 lazy pages */
    CHECK(st.dropped >= 196);
    CHECK(st.faults >= 100 && st.fault_copied > 0);
    CHECK(st.unreachable == 0 && st.lost_exited == 0);
    close(sv[0]);
    store_free(&s);
    munmap(map, span * ps);
}

/* ---------------------------------------------------------------- test 3 */

/* The protocol's failure cases: CRIU closing the socket before the finished
 * word, the cancel descriptor, and no connection at all. */
static void test_protocol_failures(void)
{
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    int32_t pid = 77;
    CHECK(send(sv[1], &pid, 2, 0) == 2); /* half a pid, then EOF */
    close(sv[1]);
    struct ss_lazy_stats st;
    CHECK(ss_lazy_serve(sv[0], 0, NULL, 0, NULL, &st) == -EPROTO);
    close(sv[0]);

    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    CHECK(ss_lazy_send_uffd(sv[1], -5, -1) == 0);
    close(sv[1]);
    CHECK(ss_lazy_serve(sv[0], 0, NULL, 0, NULL, &st) == -ECONNRESET);
    CHECK(st.zombies == 1);
    close(sv[0]);

    int lsock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(lsock >= 0);
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    snprintf(a.sun_path + 1, sizeof a.sun_path - 1, "ss-lazy-test-%d", (int)getpid());
    CHECK(bind(lsock, (struct sockaddr *)&a,
               (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 +
                           strlen(a.sun_path + 1))) == 0);
    CHECK(listen(lsock, 1) == 0);
    struct ss_lazy_opts o = {.page_size = ps, .cancel_fd = -1, .accept_timeout_ms = 50};
    CHECK(ss_lazy_serve(lsock, SS_LAZY_ACCEPT, NULL, 0, &o, &st) == -ETIMEDOUT);
    int pp[2];
    CHECK(pipe(pp) == 0);
    CHECK(write(pp[1], "x", 1) == 1);
    o.cancel_fd = pp[0];
    o.accept_timeout_ms = 0;
    CHECK(ss_lazy_serve(lsock, SS_LAZY_ACCEPT, NULL, 0, &o, &st) == -ECANCELED);
    close(pp[0]);
    close(pp[1]);
    close(lsock);

    /* a bad store is refused before anything happens */
    uint64_t addrs[2] = {2 * ps, ps};
    int64_t rows[2] = {0, 1};
    struct ss_lazy_store bad = {.pid = 1, .n = 2, .addrs = addrs, .rows = rows,
                                .pages = (const uint8_t *)addrs, .nrows = 2};
    CHECK(ss_lazy_serve(-1, 0, &bad, 1, NULL, &st) == -EINVAL);
    /* a row no piece holds */
    uint64_t one[1] = {ps};
    int64_t far[1] = {5};
    struct ss_lazy_src piece = {(const uint8_t *)addrs, 0, 2};
    struct ss_lazy_store out = {.pid = 1, .n = 1, .addrs = one, .rows = far, .src = &piece,
                                .nsrc = 1};
    CHECK(ss_lazy_serve(-1, 0, &out, 1, NULL, &st) == -ERANGE);
}

/* ---------------------------------------------------------------- test 4 */

/* The fact docs/lazy.md builds on: once the last descriptor of a context is
 * closed (the daemon died), the registered ranges are ordinary memory again and
 * missing pages read as zeros, silently: no fault reaches anyone. */
static void test_close_means_zeros(void)
{
    int uffd = ss_lazy_uffd_open(O_CLOEXEC | O_NONBLOCK, NULL);
    CHECK(uffd >= 0);
    uint8_t *m = mmap(NULL, 4 * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(m != MAP_FAILED);
    CHECK(register_missing(uffd, m, 4 * ps) == 0);
    close(uffd);
    CHECK(is_zero(m, 4 * ps)); /* a hang here would be the other answer (alarm) */
    munmap(m, 4 * ps);
}

int main(void)
{
    ps = (size_t)sysconf(_SC_PAGESIZE);
    signal(SIGPIPE, SIG_IGN);
    alarm(240); /* a hang is a failure, not a stuck suite */
    test_protocol_failures();
    int probe = ss_lazy_uffd_open(O_CLOEXEC, NULL);
    if (probe < 0) {
        if (geteuid() != 0) {
            printf("skip: non-cooperative userfaultfd events need root (%s)\n",
                   strerror(-probe));
            TEST_DONE();
        }
        fprintf(stderr, "userfaultfd with fork/remap/remove/unmap events: %s\n",
                strerror(-probe));
        CHECK(probe >= 0);
        TEST_DONE();
    }
    close(probe);
    test_close_means_zeros();
    test_basic(1);
    test_basic(3);
    test_events(1);
    test_events(0);
    TEST_DONE();
}
