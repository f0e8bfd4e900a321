/* ss_lazy.c's post-copy path: pages that are not in the store but still "at the
 * source" (struct ss_lazy_remote). A forked child plays the restored task (as in
 * test_lazy.c); a supplier thread plays statesync's post-copy loop: it answers
 * the daemon's requests first and pushes every other remote page in the
 * background, slowly enough that the child's reads fault on pages that have not
 * arrived. Checks: exact content everywhere (a fork in the middle gets its own
 * copy), a page the task made present before its remote content arrived is
 * left as it is (EEXIST), requests before CRIU's restore-finished word are
 * served, and a supplier that goes away with pages missing fails the daemon
 * with -EPIPE and hands the descriptors back open.
 * Needs root (non-cooperative uffd events); prints "skip" otherwise.
 * Run under ASan by tests/test_c_asan.py. */
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ss_lazy.h"
#include "ss_test.h"

static size_t ps;

#define SPAN 2400
#define OWN_PAGE 3      /* remote; the child places its own content there first */
#define OWN_BYTE 0xAB

static int is_remote(size_t i) { return i % 3 == 0; }

static void fill_page(uint8_t *p, size_t i)
{
    for (size_t k = 0; k < ps; k += 8) {
        uint64_t v = (uint64_t)i * 0x9E3779B97F4A7C15ull ^ (k * 31 + 7);
        memcpy(p + k, &v, 8);
    }
}

static int page_ok(const uint8_t *p, size_t i)
{
    uint8_t want[65536];
    if (i == OWN_PAGE) {
        for (size_t k = 0; k < ps; k++)
            if (p[k] != OWN_BYTE)
                return 0;
        return 1;
    }
    fill_page(want, i);
    return memcmp(p, want, ps) == 0;
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

/* ---------------------------------------------------------------- the stores */

struct pc {
    uint64_t *addrs;     /* every page of the mapping (all lazy) */
    int64_t *rows;
    uint8_t *pages;      /* the local store: non-remote pages */
    size_t nrows;
    uint64_t *raddrs;    /* remote pages */
    size_t nr;
    uint8_t *rbuf;       /* the remote buffer the supplier fills */
    uint8_t *source;     /* what the source holds for remote page k */
};

static void pc_make(struct pc *s, uint64_t base)
{
    s->addrs = calloc(SPAN, sizeof *s->addrs);
    s->rows = calloc(SPAN, sizeof *s->rows);
    s->pages = malloc(SPAN * ps);
    s->raddrs = calloc(SPAN, sizeof *s->raddrs);
    s->rbuf = calloc(SPAN, ps);
    s->source = malloc(SPAN * ps);
    s->nrows = s->nr = 0;
    for (size_t i = 0; i < SPAN; i++) {
        s->addrs[i] = base + i * ps;
        if (is_remote(i)) {
            fill_page(s->source + s->nr * ps, i);
            s->raddrs[s->nr] = s->addrs[i];
            s->rows[i] = SS_LAZY_ROW_REMOTE - (int64_t)s->nr++;
        } else {
            fill_page(s->pages + s->nrows * ps, i);
            s->rows[i] = (int64_t)s->nrows++;
        }
    }
}

static void pc_free(struct pc *s)
{
    free(s->addrs);
    free(s->rows);
    free(s->pages);
    free(s->raddrs);
    free(s->rbuf);
    free(s->source);
}

/* ---------------------------------------------------------------- supplier */

struct supplier {
    struct pc *s;
    int req_r, supply_w;
    int push;            /* 0: send nothing, just close after a while */
    size_t requests;     /* requests seen */
    size_t sent;
};

static void supply(struct supplier *sp, size_t k, uint8_t *sentmap)
{
    if (sentmap[k])
        return;
    sentmap[k] = 1;
    memcpy(sp->s->rbuf + k * ps, sp->s->source + k * ps, ps); /* row first */
    uint64_t v = k;
    if (write(sp->supply_w, &v, sizeof v) != (ssize_t)sizeof v)
        abort();
    sp->sent++;
}

static void *supplier_main(void *arg)
{
    struct supplier *sp = arg;
    uint8_t *sentmap = calloc(sp->s->nr, 1);
    size_t next = 0;
    struct timespec slow = {0, 150000}; /* 150 us per pushed page: ~120 ms in all */
    if (!sp->push) {
        nanosleep(&(struct timespec){0, 50000000}, NULL);
        close(sp->supply_w);
        free(sentmap);
        return NULL;
    }
    while (sp->sent < sp->s->nr) {
        /* requests first: the priority path */
        uint64_t req[64];
        ssize_t r = read(sp->req_r, req, sizeof req);
        if (r > 0) {
            for (size_t i = 0; i < (size_t)r / 8; i++) {
                sp->requests++;
                if (req[i] < sp->s->nr)
                    supply(sp, (size_t)req[i], sentmap);
            }
            continue;
        }
        while (next < sp->s->nr && sentmap[next])
            next++;
        if (next < sp->s->nr)
            supply(sp, next, sentmap);
        nanosleep(&slow, NULL);
    }
    close(sp->supply_w);
    free(sentmap);
    return NULL;
}

/* ---------------------------------------------------------------- the task */

static int child_main(int sock, uint8_t *map, int full_check)
{
    int bad = 0;
    int uffd = ss_lazy_uffd_open(O_CLOEXEC | O_NONBLOCK, NULL);
    if (uffd < 0 || register_missing(uffd, map, SPAN * ps) < 0)
        return 100;
    if (ss_lazy_send_uffd(sock, getpid(), uffd) < 0)
        return 102;
    /* the task makes OWN_PAGE present with its own content before the source's
     * copy arrives: the daemon must leave it (EEXIST) */
    uint8_t *own = malloc(ps);
    memset(own, OWN_BYTE, ps);
    struct uffdio_copy c = {.dst = (uint64_t)(uintptr_t)(map + OWN_PAGE * ps),
                            .src = (uint64_t)(uintptr_t)own, .len = ps, .mode = 0};
    if (ioctl(uffd, UFFDIO_COPY, &c) < 0)
        return 104;
    free(own);
    close(uffd);
    /* before the finished word: remote pages by request, local ones from the store */
    size_t early[] = {SPAN - 3, SPAN - 2, 9, 10};
    for (size_t j = 0; j < sizeof early / sizeof early[0]; j++)
        bad += !page_ok(map + early[j] * ps, early[j]);
    if (ss_lazy_send_finished(sock) < 0)
        return 103;
    if (!full_check)
        return bad;
    /* a fork while remote pages are still missing: the grandchild's own copy */
    pid_t g = fork();
    if (g == 0) {
        int gb = 0;
        for (size_t i = 0; i < SPAN; i += 2)
            gb += !page_ok(map + i * ps, i);
        _exit(gb > 99 ? 99 : gb);
    }
    if (g < 0)
        return 105;
    for (size_t i = SPAN; i-- > 0;)
        bad += !page_ok(map + i * ps, i);
    int status = 0;
    if (waitpid(g, &status, 0) != g || !WIFEXITED(status))
        return 106;
    bad += WEXITSTATUS(status);
    return bad > 99 ? 99 : bad;
}

static void run(int push)
{
    uint8_t *map = mmap(NULL, SPAN * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                        -1, 0);
    CHECK(map != MAP_FAILED);
    struct pc s;
    pc_make(&s, (uint64_t)(uintptr_t)map);
    int sv[2], req[2], sup[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    CHECK(pipe2(req, O_CLOEXEC | O_NONBLOCK) == 0);
    CHECK(pipe2(sup, O_CLOEXEC) == 0);
    CHECK(fcntl(sup[0], F_SETFL, O_NONBLOCK) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        close(sv[0]);
        close(req[0]);      /* only the daemon and the supplier hold these */
        close(req[1]);
        close(sup[0]);
        close(sup[1]);
        alarm(60);
        _exit(child_main(sv[1], map, push));
    }
    close(sv[1]);
    struct supplier sp = {.s = &s, .req_r = req[0], .supply_w = sup[1], .push = push};
    pthread_t th;
    CHECK(pthread_create(&th, NULL, supplier_main, &sp) == 0);
    struct ss_lazy_remote rm = {.n = s.nr, .addrs = s.raddrs, .pages = s.rbuf,
                                .req_fd = req[1], .supply_fd = sup[0]};
    struct ss_lazy_store ls = {.pid = pid, .n = SPAN, .addrs = s.addrs, .rows = s.rows,
                               .pages = s.pages, .nrows = s.nrows};
    uint64_t rlat[4096];
    int left[8];
    struct ss_lazy_opts o = {.page_size = ps, .chunk = 64, .cancel_fd = -1, .remote = &rm,
                             .rlat_ns = rlat, .rlat_cap = 4096, .left_fds = left,
                             .left_cap = 8};
    struct ss_lazy_stats st;
    int rc = ss_lazy_serve(sv[0], 0, &ls, 1, &o, &st);
    pthread_join(th, NULL);
    if (push) {
        if (rc)
            fprintf(stderr, "postcopy: rc %d pid %d addr %#llx\n", rc, st.err_pid,
                    (unsigned long long)st.err_addr);
        CHECK(rc == 0);
        int status = -1;
        CHECK(waitpid(pid, &status, 0) == pid);
        if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0))
            fprintf(stderr, "postcopy child status %#x\n", status);
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        CHECK(st.remote_pages == s.nr);
        /* some of the child's reads waited for pages the supplier had not sent yet
         * (before the finish too: SPAN - 3 is remote and the last one pushed) */
        CHECK(st.remote_faults >= 1 && st.remote_requested >= 1 && sp.requests >= 1);
        CHECK(st.rlat_n == st.remote_faults);
        CHECK(st.remote_exist >= 1);            /* OWN_PAGE was not overwritten */
        CHECK(st.remote_supplied == s.nr);
        CHECK(st.left == 0 && st.unreachable == 0); /* the grandchild may exit early */
        CHECK(st.forks == 1);
        fprintf(stderr, "postcopy: %llu remote pages, %llu remote faults, %llu placed, "
                "%llu exist, %llu requested\n", (unsigned long long)st.remote_pages,
                (unsigned long long)st.remote_faults, (unsigned long long)st.remote_placed,
                (unsigned long long)st.remote_exist, (unsigned long long)st.remote_requested);
    } else {
        /* the supplier went away with pages missing: -EPIPE, descriptors back
         * open, the task blocked (not reading zeros) until we kill it */
        CHECK(rc == -EPIPE);
        CHECK(st.left > 0 && st.left_nfds == 1);
        kill(pid, SIGKILL);
        int status = 0;
        CHECK(waitpid(pid, &status, 0) == pid);
        CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
        for (size_t i = 0; i < st.left_nfds; i++)
            close(left[i]);
    }
    close(sv[0]);
    close(req[0]);
    close(req[1]);
    close(sup[0]);
    pc_free(&s);
    munmap(map, SPAN * ps);
}

static void test_bad_remote_rows(void)
{
    uint64_t addrs[1] = {ps};
    int64_t rows[1] = {SS_LAZY_ROW_REMOTE - 3};   /* k = 3, but only 1 remote page */
    uint8_t page[8];
    struct ss_lazy_store ls = {.pid = 1, .n = 1, .addrs = addrs, .rows = rows};
    struct ss_lazy_stats st;
    CHECK(ss_lazy_serve(-1, 0, &ls, 1, NULL, &st) == -ERANGE);   /* no remote at all */
    struct ss_lazy_remote rm = {.n = 1, .addrs = addrs, .pages = page, .req_fd = 0,
                                .supply_fd = 0};
    struct ss_lazy_opts o = {.page_size = ps, .cancel_fd = -1, .remote = &rm};
    CHECK(ss_lazy_serve(-1, 0, &ls, 1, &o, &st) == -ERANGE);
    rm.req_fd = -1;
    CHECK(ss_lazy_serve(-1, 0, &ls, 1, &o, &st) == -EINVAL);
}

int main(void)
{
    ps = (size_t)sysconf(_SC_PAGESIZE);
    signal(SIGPIPE, SIG_IGN);
    alarm(120);
    test_bad_remote_rows();
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
    run(1);
    run(0);
    TEST_DONE();
}
