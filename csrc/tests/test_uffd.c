/* ss_uffd.c and ss_ptrace.c: async uffd-wp + PAGEMAP_SCAN on our own memory, then
 * on a forked child into which a userfaultfd() is injected with ptrace.
 * Run under ASan by tests/test_c_asan.py. Skips (prints "skip", exits 0) where
 * the kernel lacks the features; the Python suite checks availability itself. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ss_proc.h"
#include "ss_ptrace.h"
#include "ss_test.h"
#include "ss_uffd.h"

#define FLAGS (SS_PM_SCAN_WP_MATCHING | SS_PM_SCAN_CHECK_WPASYNC)

static size_t ps;

static void test_self(void)
{
    int uffd = ss_uffd_create(O_CLOEXEC | O_NONBLOCK | SS_UFFD_USER_MODE_ONLY);
    CHECK(uffd >= 0);
    uint64_t got = 0;
    CHECK(ss_uffd_api(uffd, SS_UFFD_FEATURE_WP_ASYNC | SS_UFFD_FEATURE_WP_UNPOPULATED, &got) == 0);
    /* 16 registered pages followed by 4 unregistered ones */
    uint8_t *buf = mmap(NULL, 20 * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(buf != MAP_FAILED);
    memset(buf, 1, 8 * ps); /* half populated, half not */
    uint64_t base = (uint64_t)(uintptr_t)buf;
    CHECK(ss_uffd_register_wp(uffd, base, 16 * ps) == 0);
    int pm = ss_pagemap_open(getpid());
    CHECK(pm >= 0);
    uint64_t we = 0, out[32];
    size_t stored = 0;
    CHECK(ss_scan_written(pm, base, base + 16 * ps, ps, FLAGS, NULL, 0, &we, &stored) == 0);
    CHECK(ss_scan_written(pm, base, base + 16 * ps, ps, FLAGS, out, 32, &we, &stored) == 0);
    buf[1 * ps] = 2;
    buf[5 * ps + 17] = 2;
    buf[12 * ps] = 2; /* an unpopulated page */
    buf[13 * ps] = 2;
    /* a cap of 3 stops the walk after 3 pages; the rest comes next call */
    ssize_t n = ss_scan_written(pm, base, base + 16 * ps, ps, FLAGS, out, 3, &we, &stored);
    CHECK(n == 3 && stored == 3);
    CHECK(out[0] == base + ps && out[1] == base + 5 * ps && out[2] == base + 12 * ps);
    n = ss_scan_written(pm, we, base + 16 * ps, ps, FLAGS, out, 32, &we, &stored);
    CHECK(n == 1 && out[0] == base + 13 * ps);
    CHECK(ss_scan_written(pm, base, base + 16 * ps, ps, FLAGS, out, 32, &we, &stored) == 0);
    /* an unregistered VMA in the range: -EPERM, pages before it still stored */
    CHECK(mprotect(buf + 16 * ps, 4 * ps, PROT_READ) == 0); /* separate VMA */
    buf[2 * ps] = 3;
    n = ss_scan_written(pm, base, base + 20 * ps, ps, FLAGS, out, 32, &we, &stored);
    CHECK(n == -EPERM);
    CHECK(stored == 1 && out[0] == base + 2 * ps);
    /* the general scan for pages neither present nor swapped: after arming,
     * unpopulated pages hold uffd-wp markers, which count as "swapped"; a page
     * dropped with MADV_DONTNEED (anonymous: no marker) is the only hole */
    CHECK(madvise(buf + 5 * ps, ps, MADV_DONTNEED) == 0);
    uint64_t regs[3 * 8];
    n = ss_pagemap_scan(pm, base, base + 16 * ps, 0, SS_PAGE_IS_PRESENT | SS_PAGE_IS_SWAPPED,
                        SS_PAGE_IS_PRESENT | SS_PAGE_IS_SWAPPED, 0,
                        SS_PAGE_IS_WPALLOWED | SS_PAGE_IS_PRESENT, 0, regs, 8, &we);
    CHECK(n == 1);
    CHECK(regs[0] == base + 5 * ps && regs[1] == base + 6 * ps);
    CHECK(ss_uffd_unregister(uffd, base, 16 * ps) == 0);
    uint64_t ent[16];
    CHECK(ss_pagemap_read(pm, base, 16, ps, ent) == 16);
    for (int i = 0; i < 16; i++)
        CHECK(!(ent[i] & SS_PM_UFFD_WP));
    close(pm);
    close(uffd);
    munmap(buf, 20 * ps);
}

static void test_inject(void)
{
    uint8_t *buf = mmap(NULL, 8 * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(buf, 1, 8 * ps);
    int cmd[2], ack[2];
    CHECK(pipe(cmd) == 0 && pipe(ack) == 0);
    pid_t child = fork();
    if (child == 0) {
        unsigned char i;
        close(cmd[1]);
        close(ack[0]);
        while (read(cmd[0], &i, 1) == 1) { /* blocks in read(2): ERESTARTSYS */
            buf[i * ps] ^= 0xff;
            if (write(ack[1], &i, 1) != 1)
                _exit(3);
        }
        _exit(0);
    }
    close(cmd[0]);
    close(ack[1]);
    alarm(20); /* a hang is a failure, not a stuck suite */
    usleep(50000);
    uint64_t vdso = getauxval(AT_SYSINFO_EHDR), insn = 0;
    CHECK(vdso != 0);
    CHECK(ss_find_syscall_insn(child, vdso, vdso + 2 * ps, &insn) == 0);
    uint64_t args[6] = {0};
    int64_t ret = 0;
    struct ss_inject_info info;
    CHECK(ss_inject_syscall(child, insn, SYS_getpid, args, 2000, &ret, &info) == 0);
    CHECK(ret == child);
    CHECK(info.was_in_syscall && info.orig_syscall == SYS_read && info.orig_ret == -512);

    int pidfd = (int)syscall(SYS_pidfd_open, child, 0);
    CHECK(pidfd >= 0);
    int uffd = -1;
    CHECK(ss_inject_userfaultfd(child, child, pidfd, insn,
                                O_CLOEXEC | O_NONBLOCK | SS_UFFD_USER_MODE_ONLY, 2000, &uffd,
                                &info) == 0);
    CHECK(uffd >= 0 && info.ncalls == 2 && info.ret[1] == 0);
    CHECK(ss_uffd_api(uffd, SS_UFFD_FEATURE_WP_ASYNC | SS_UFFD_FEATURE_WP_UNPOPULATED, NULL) == 0);
    uint64_t base = (uint64_t)(uintptr_t)buf; /* same address in the child */
    CHECK(ss_uffd_register_wp(uffd, base, 8 * ps) == 0);
    int pm = ss_pagemap_open(child);
    uint64_t we, out[8];
    size_t stored;
    CHECK(ss_scan_written(pm, base, base + 8 * ps, ps, FLAGS, NULL, 0, &we, &stored) == 0);
    unsigned char i = 6, a = 0;
    CHECK(write(cmd[1], &i, 1) == 1); /* the read we interrupted must get it */
    CHECK(read(ack[0], &a, 1) == 1 && a == 6);
    if (a != 6) {
        kill(child, SIGKILL);
        waitpid(child, NULL, 0);
        return;
    }
    ssize_t n = ss_scan_written(pm, base, base + 8 * ps, ps, FLAGS, out, 8, &we, &stored);
    CHECK(n == 1 && out[0] == base + 6 * ps);
    uint8_t page[4096];
    uint8_t ok = 0;
    uint64_t addr = base + 6 * ps;
    CHECK(ss_read_pages(child, &addr, 1, ps, page, &ok) == 1 && ok && page[0] == 0xfe);
    CHECK(ss_uffd_unregister(uffd, base, 8 * ps) == 0);
    close(uffd);
    close(pm);
    close(pidfd);
    /* bad thread id: a clean error */
    CHECK(ss_inject_syscall(0x7ffffff0, insn, SYS_getpid, args, 200, &ret, &info) == -ESRCH);
    close(cmd[1]);
    int st = 0;
    CHECK(waitpid(child, &st, 0) == child);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    munmap(buf, 8 * ps);
}

/* An injected call that blocks past the timeout (pause() here): the thread is
 * then running inside it, not in a stop. It must be interrupted and get its
 * own registers and signal mask back, and go on as if nothing happened; a
 * signal sent meanwhile (blocked during our call) is delivered afterwards. */
static volatile sig_atomic_t got_usr1;
static void on_usr1(int sig)
{
    (void)sig;
    got_usr1 = 1;
}

struct late_kill {
    pid_t pid;
    int sig, delay_us;
};
static void *kill_later(void *arg)
{
    struct late_kill *k = arg;
    usleep(k->delay_us);
    kill(k->pid, k->sig);
    return NULL;
}

/* read exactly n bytes within ms milliseconds (a broken child must fail the
 * test, not hang it) */
static int read_within(int fd, void *buf, size_t n, int ms)
{
    size_t got = 0;
    while (got < n) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, ms) != 1)
            return -1;
        ssize_t r = read(fd, (char *)buf + got, n - got);
        if (r <= 0)
            return -1;
        got += (size_t)r;
    }
    return 0;
}

#define CRUNCH_N 300000000L
static __attribute__((noinline)) uint64_t crunch(long n)
{
    uint64_t x = 88172645463325252ull, acc = 0;
    for (long k = 0; k < n; k++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        acc += x >> 60;
    }
    return acc ^ x;
}

static int tracer_and_blocked(pid_t pid, char *tracer, char *blocked)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f)) {
        sscanf(line, "TracerPid: %31s", tracer);
        sscanf(line, "SigBlk: %31s", blocked);
    }
    fclose(f);
    return 0;
}

static int proc_state(pid_t pid)
{
    char path[64], line[256];
    int state = '?';
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return state;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "State: %c", (char *)&state) == 1)
            break;
    fclose(f);
    return state & 0xff;
}

/* mode 0: the child is blocked in read(2); 1: it is mid-computation; 2: as 0,
 * but a SIGSTOP (which cannot be blocked) ends the injected pause() within the
 * timeout: the call returns -ERESTARTNOHAND, the child is restored and then
 * stops by job control, and runs on after SIGCONT. */
static void test_inject_timeout(int mode)
{
    int cpu_bound = mode == 1;
    int cmd[2], ack[2];
    CHECK(pipe(cmd) == 0 && pipe(ack) == 0);
    pid_t child = fork();
    if (child == 0) {
        close(cmd[1]);
        close(ack[0]);
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_usr1;
        sa.sa_flags = SA_RESTART; /* the interrupted read(2) restarts */
        sigaction(SIGUSR1, &sa, NULL);
        unsigned char i = 0, out;
        uint64_t acc = 0;
        if (cpu_bound) {
            /* interrupted in user mode, mid-computation: registers carry it */
            if (write(ack[1], "S", 1) != 1)
                _exit(3);
            acc = crunch(CRUNCH_N);
        }
        if (read(cmd[0], &i, 1) != 1)
            _exit(4);
        sigset_t cur;
        sigprocmask(SIG_BLOCK, NULL, &cur);
        out = i;
        if (!got_usr1)
            out = 0xe1; /* the signal sent during our call was lost */
        for (int s = 1; s < 32; s++)
            if (sigismember(&cur, s))
                out = 0xe2; /* our all-blocked mask stayed */
        if (write(ack[1], &out, 1) != 1 || write(ack[1], &acc, 8) != 8)
            _exit(3);
        _exit(0);
    }
    close(cmd[0]);
    close(ack[1]);
    alarm(20);
    unsigned char i = 42, a = 0;
    if (cpu_bound) {
        CHECK(read(ack[0], &a, 1) == 1 && a == 'S');
        usleep(20000);
    } else {
        usleep(50000);
    }
    uint64_t vdso = getauxval(AT_SYSINFO_EHDR), insn = 0;
    CHECK(ss_find_syscall_insn(child, vdso, vdso + 2 * ps, &insn) == 0);
    uint64_t args[6] = {0};
    int64_t ret = 0;
    struct ss_inject_info info;
    struct late_kill k = {child, mode == 2 ? SIGSTOP : SIGUSR1, 80000};
    pthread_t th;
    CHECK(pthread_create(&th, NULL, kill_later, &k) == 0);
    /* pause() never returns by itself: the wait for its syscall-exit stop times out */
    int rc = ss_inject_syscall(child, insn, SYS_pause, args, mode == 2 ? 2000 : 300, &ret, &info);
    pthread_join(th, NULL);
    if (mode == 2) {
        CHECK(rc == 0 && ret == -514); /* -ERESTARTNOHAND */
        int state = '?';
        for (int n = 0; n < 200 && (state = proc_state(child)) != 'T'; n++)
            usleep(10000);
        CHECK(state == 'T'); /* the SIGSTOP took effect after we let go */
    } else {
        CHECK(rc == -ETIMEDOUT);
        CHECK(info.stage == SS_INJECT_STAGE_CALL);
    }
    CHECK(info.restored == 1);
    CHECK(info.was_in_syscall == !cpu_bound);
    /* detached, and its own (empty) mask back; SigBlk is polled because the
     * kernel blocks SIGUSR1 while the child's handler for it runs */
    char tracer[32] = "?", blocked[32] = "?";
    for (int n = 0; n < 100; n++) {
        CHECK(tracer_and_blocked(child, tracer, blocked) == 0);
        if (strcmp(blocked, "0000000000000000") == 0)
            break;
        usleep(10000);
    }
    CHECK(strcmp(tracer, "0") == 0);
    CHECK(strcmp(blocked, "0000000000000000") == 0); /* the child blocks nothing */
    if (mode == 2) {
        kill(child, SIGCONT);
        kill(child, SIGUSR1);
    }
    /* the child is running on: a reply proves it resumed where it was, with its
     * own registers, mask (no signal blocked) and the pending SIGUSR1 delivered */
    CHECK(write(cmd[1], &i, 1) == 1);
    uint64_t acc = 1;
    int replied = read_within(ack[0], &a, 1, 5000) == 0 && read_within(ack[0], &acc, 8, 5000) == 0;
    CHECK(replied);
    CHECK(a == 42);
    CHECK(acc == (cpu_bound ? crunch(CRUNCH_N) : 0));
    if (!replied)
        kill(child, SIGKILL);
    int st = 0;
    CHECK(waitpid(child, &st, 0) == child);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    if (!(WIFEXITED(st) && WEXITSTATUS(st) == 0))
        printf("child status %#x (signal %d)\n", st, WIFSIGNALED(st) ? WTERMSIG(st) : 0);
    close(cmd[1]);
    close(ack[0]);
}

/* The caller of the injection (the "tracker", a forked child here) is SIGKILLed
 * while the injection is paused at `point` by the test hook: the injector task
 * outlives it, finishes and detaches. The target (blocked in read(2), SIGUSR2
 * blocked) must come out untraced, with its mask, and answer its next command. */
static void test_inject_caller_killed(int point)
{
    int cmd[2], ack[2], note[2];
    signal(SIGPIPE, SIG_IGN); /* a dead target is a failed check, not our death */
    CHECK(pipe(cmd) == 0 && pipe(ack) == 0 && pipe(note) == 0);
    pid_t target = fork();
    if (target == 0) {
        sigset_t m;
        sigemptyset(&m);
        sigaddset(&m, SIGUSR2);
        sigprocmask(SIG_BLOCK, &m, NULL);
        unsigned char i;
        close(cmd[1]);
        close(ack[0]);
        while (read(cmd[0], &i, 1) == 1)
            if (write(ack[1], &i, 1) != 1)
                _exit(3);
        _exit(0);
    }
    close(cmd[0]);
    close(ack[1]);
    alarm(20);
    usleep(50000);
    char tracer[32] = "?", before[32] = "?", after[32] = "?";
    CHECK(tracer_and_blocked(target, tracer, before) == 0);
    uint64_t vdso = getauxval(AT_SYSINFO_EHDR), insn = 0;
    CHECK(ss_find_syscall_insn(target, vdso, vdso + 2 * ps, &insn) == 0);
    pid_t tracker = fork();
    if (tracker == 0) {
        close(note[0]);
        int pidfd = (int)syscall(SYS_pidfd_open, target, 0);
        int uffd = -1;
        struct ss_inject_info info;
        ss_inject_test_pause(point, 300, note[1]);
        ss_inject_userfaultfd(target, target, pidfd, insn,
                              O_CLOEXEC | O_NONBLOCK | SS_UFFD_USER_MODE_ONLY, 2000, &uffd, &info);
        _exit(9); /* not reached in time: the test kills us in the pause */
    }
    close(note[1]);
    unsigned char at = 0;
    CHECK(read_within(note[0], &at, 1, 10000) == 0 && at == point);
    kill(tracker, SIGKILL);
    int st = 0;
    CHECK(waitpid(tracker, &st, 0) == tracker && WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
    /* the injector sleeps out the pause, then finishes and detaches */
    int settled = 0;
    for (int k = 0; k < 600 && !settled; k++) {
        usleep(10000);
        CHECK(tracer_and_blocked(target, tracer, after) == 0);
        settled = strcmp(tracer, "0") == 0 && proc_state(target) != 't';
    }
    CHECK(settled);
    CHECK(strcmp(before, after) == 0);
    unsigned char i = 7, a = 0;
    CHECK(write(cmd[1], &i, 1) == 1);
    CHECK(read_within(ack[0], &a, 1, 5000) == 0 && a == 7);
    close(cmd[1]);
    CHECK(waitpid(target, &st, 0) == target);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    if (!(WIFEXITED(st) && WEXITSTATUS(st) == 0))
        printf("point %d: target status %#x (signal %d)\n", point, st,
               WIFSIGNALED(st) ? WTERMSIG(st) : 0);
    close(ack[0]);
    close(note[0]);
}

int main(void)
{
    ps = (size_t)sysconf(_SC_PAGESIZE);
    int probe = ss_uffd_create(O_CLOEXEC | SS_UFFD_USER_MODE_ONLY);
    if (probe < 0) {
        printf("skip: userfaultfd: %s\n", strerror(-probe));
        return 0;
    }
    close(probe);
    test_self();
    test_inject();
    test_inject_timeout(0);
    test_inject_timeout(1);
    test_inject_timeout(2);
    test_inject_caller_killed(SS_INJECT_PAUSE_MASKED);
    test_inject_caller_killed(SS_INJECT_PAUSE_IN_CALL);
    test_inject_caller_killed(SS_INJECT_PAUSE_PUT_BACK);
    TEST_DONE();
}
