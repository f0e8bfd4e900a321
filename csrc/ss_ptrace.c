/* System-call injection into a running x86_64 process. See ss_ptrace.h. */
#include "ss_ptrace.h"

#include <errno.h>
#include <stdio.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef PTRACE_EVENT_STOP
#define PTRACE_EVENT_STOP 128
#endif
#ifndef PTRACE_GETSIGMASK
#define PTRACE_GETSIGMASK 0x420a
#define PTRACE_SETSIGMASK 0x420b
#endif
#ifndef __NR_pidfd_getfd
#define __NR_pidfd_getfd 438
#endif

#if defined(__x86_64__)
#define SS_HAVE_INJECT 1
#define SS_USER_CS64 0x33
#endif

int ss_find_syscall_insn(int pid, uint64_t start, uint64_t end, uint64_t *addr)
{
    uint8_t buf[4096 + 1];
    if (end <= start || pid <= 0)
        return -EINVAL;
    uint64_t a = start;
    while (a < end) {
        size_t want = end - a > 4096 ? 4096 : (size_t)(end - a);
        /* one extra byte, so a 0f 05 pair split across chunks is found too */
        size_t extra = (end - a > want) ? 1 : 0;
        struct iovec l = {.iov_base = buf, .iov_len = want + extra};
        struct iovec r = {.iov_base = (void *)(uintptr_t)a, .iov_len = want + extra};
        ssize_t got = process_vm_readv(pid, &l, 1, &r, 1, 0);
        if (got < 0)
            return -errno;
        if (got < 2)
            break;
        for (ssize_t i = 0; i + 1 < got; i++)
            if (buf[i] == 0x0f && buf[i + 1] == 0x05) {
                *addr = a + (uint64_t)i;
                return 0;
            }
        a += want;
    }
    return -ENOENT;
}

#ifdef SS_HAVE_INJECT

/* Everything from here to run_job() runs in the injector task (see run_job):
 * a task that shares the tracker's memory, fd table and thread-local storage
 * (no CLONE_SETTLS) but is its own process. It must therefore never write
 * errno, take a libc lock or allocate: every system call it makes is a raw one
 * (rsys), returning the kernel's value (-errno on failure). Its functions are
 * not instrumented by AddressSanitizer, whose per-thread state it would share
 * with the tracker thread that waits for it. */
#define INJECTOR __attribute__((no_sanitize_address))

static inline __attribute__((always_inline, no_sanitize_address)) long rsys(long nr, long a, long b, long c, long d, long e, long f)
{
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}

/* ptrace(2) without libc: 0 or -errno (no PEEK requests are used). */
static inline __attribute__((always_inline, no_sanitize_address)) long pt(long req, int tid, long addr, const void *data)
{
    return rsys(SYS_ptrace, req, tid, addr, (long)data, 0, 0);
}

INJECTOR static int64_t now_ns(void)
{
    struct timespec ts = {0, 0};
    rsys(SYS_clock_gettime, CLOCK_MONOTONIC, (long)&ts, 0, 0, 0, 0);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

INJECTOR static long now_ms(void)
{
    struct timespec ts = {0, 0};
    rsys(SYS_clock_gettime, CLOCK_MONOTONIC, (long)&ts, 0, 0, 0, 0);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

INJECTOR static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (rsys(SYS_nanosleep, (long)&ts, (long)&ts, 0, 0, 0, 0) == -EINTR) {
    }
}

enum { CALL_PLAIN, CALL_UFFD };

/* Test hook (ss_inject_test_pause): the one piece of global state here, set only
 * by tests before an injection. */
static volatile int g_pause_point, g_pause_ms, g_pause_fd = -1;

void ss_inject_test_pause(int point, int ms, int notify_fd)
{
    g_pause_point = point;
    g_pause_ms = ms;
    g_pause_fd = notify_fd;
}

struct job {
    int tid, tgid, pidfd, timeout_ms;
    uint64_t syscall_addr;
    int mode;
    long nr;
    uint64_t args[6];
    int out_fd;
    int rc;
    int stopped; /* the thread is in a ptrace stop; last_st is that stop's status */
    int last_st;
    int pause_point, pause_ms, pause_fd; /* test hook, copied at job_init */
    struct ss_inject_info *info;
};

/* The test hook: at pause point `point` (once per job), write one byte to the
 * notify fd and sleep pause_ms, so that a test can kill the tracker there. */
INJECTOR static void maybe_pause(struct job *j, int point)
{
    if (j->pause_ms <= 0 || j->pause_point != point)
        return;
    j->pause_point = 0;
    char c = (char)point;
    if (j->pause_fd >= 0)
        rsys(SYS_write, j->pause_fd, (long)&c, 1, 0, 0, 0); /* a failure: pause anyway */
    sleep_ms(j->pause_ms);
}

/* stages (ss_inject_info.stage) */
enum {
    ST_SEIZE = 1,
    ST_STOP,
    ST_REGS,
    ST_CALL = SS_INJECT_STAGE_CALL, /* from here on the thread's state was changed */
    ST_GETFD,
    ST_CLOSE,
    ST_RESTORE = 8,
    ST_DONE,
};

/* Wait for the next ptrace stop of tid. Returns 0 with *status, -ESRCH if it
 * died, -ETIMEDOUT. Every ptrace stop of a tracee sends SIGCHLD to its tracer
 * (do_notify_parent_cldstop); the injector keeps SIGCHLD blocked (so it is
 * queued, never ignored) and sleeps in sigtimedwait for it between two WNOHANG
 * waits: it wakes at the stop, not at the next tick of a polling loop. */
INJECTOR static int wait_stop(int tid, int timeout_ms, int *status)
{
    long deadline = now_ms() + timeout_ms;
    for (;;) {
        int st = 0;
        long r = rsys(SYS_wait4, tid, (long)&st, __WALL | WNOHANG, 0, 0, 0);
        if (r < 0) {
            if (r == -EINTR)
                continue;
            return r == -ECHILD ? -ESRCH : (int)r;
        }
        if (r == tid) {
            if (WIFEXITED(st) || WIFSIGNALED(st))
                return -ESRCH;
            if (WIFSTOPPED(st)) {
                *status = st;
                return 0;
            }
            continue;
        }
        long left = deadline - now_ms();
        if (left < 0)
            return -ETIMEDOUT;
        if (left > 10)
            left = 10; /* a lost wake-up costs at most 10 ms */
        struct timespec ts = {0, (left ? left : 1) * 1000000L};
        uint64_t chld = 1ull << (SIGCHLD - 1);
        rsys(SYS_rt_sigtimedwait, (long)&chld, 0, (long)&ts, 8, 0, 0);
    }
}

/* wait_stop for the job's thread, recording that it is now in a stop. */
INJECTOR static int job_wait_stop(struct job *j, int *status)
{
    int r = wait_stop(j->tid, j->timeout_ms, status);
    if (r < 0)
        return r;
    j->stopped = 1;
    j->last_st = *status;
    return 0;
}

INJECTOR static int is_stop_signal(int sig)
{
    return sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU;
}

/* Resume with `how` and wait for a stop matching want (a WSTOPSIG value, or
 * event<<8 for ptrace events). Signal-delivery stops met meanwhile are either
 * passed through (before our calls: deliver) or, for a stop signal during
 * our calls, held. */
INJECTOR static int resume_until(struct job *j, int how, int want_sig, int want_event, int holding)
{
    int sig_to_pass = 0;
    for (;;) {
        long e = pt(how, j->tid, 0, (void *)(long)sig_to_pass);
        if (e < 0)
            return (int)e;
        j->stopped = 0;
        sig_to_pass = 0;
        int st;
        int r = job_wait_stop(j, &st);
        if (r < 0)
            return r;
        int sig = WSTOPSIG(st), event = (unsigned)st >> 16;
        if (event == want_event && sig == want_sig)
            return 0;
        if (event == PTRACE_EVENT_STOP) {
            if (is_stop_signal(sig))
                return -EAGAIN; /* job-control stop: leave it stopped */
            continue;           /* a spurious trap: resume */
        }
        if (event == 0 && !(sig & 0x80)) {
            /* signal-delivery-stop */
            if (holding && is_stop_signal(sig)) {
                j->info->held_stop = sig;
            } else {
                sig_to_pass = sig;
                j->info->forwarded_signals++;
            }
            continue;
        }
        /* a syscall stop we did not ask for: keep going the same way */
    }
}

/* Run one call: regs = base with ip at the syscall instruction. Called at a
 * stop after which the thread returns to user mode. */
INJECTOR static int run_call(struct job *j, const struct user_regs_struct *base, long nr,
                    const uint64_t a[6], int64_t *ret)
{
    struct user_regs_struct r = *base;
    r.rax = (uint64_t)nr;
    r.orig_rax = (uint64_t)-1; /* not in a syscall: no restart adjustment */
    r.rdi = a[0];
    r.rsi = a[1];
    r.rdx = a[2];
    r.r10 = a[3];
    r.r8 = a[4];
    r.r9 = a[5];
    r.rip = j->syscall_addr;
    long e = pt(PTRACE_SETREGS, j->tid, 0, &r);
    if (e < 0)
        return (int)e;
    int rc = resume_until(j, PTRACE_SYSCALL, SIGTRAP | 0x80, 0, 1); /* enter */
    if (rc < 0)
        return rc;
    maybe_pause(j, j->info->stage); /* SS_INJECT_PAUSE_IN_CALL / _IN_CLOSE */
    rc = resume_until(j, PTRACE_SYSCALL, SIGTRAP | 0x80, 0, 1); /* exit */
    if (rc < 0)
        return rc;
    struct user_regs_struct out;
    e = pt(PTRACE_GETREGS, j->tid, 0, &out);
    if (e < 0)
        return (int)e;
    *ret = (int64_t)out.rax;
    if (j->info->ncalls < 4)
        j->info->ret[j->info->ncalls] = *ret;
    j->info->ncalls++;
    return 0;
}

/* Put the saved registers and signal mask back and detach. Called once our
 * calls have begun, whatever state they left the thread in: at a stop
 * (j->stopped, status j->last_st) or running inside an injected call that
 * outlived the timeout (a blocking read(), pause()...). A running thread is
 * not in a ptrace stop, so PTRACE_CONT/SETREGS/DETACH would fail on it with
 * ESRCH: it is first interrupted and waited for, never resumed before it
 * stops. From a syscall stop it goes on to the trap inside get_signal(): any
 * ptrace stop clears a pending interrupt (ptrace_stop()), so PTRACE_INTERRUPT
 * again, then PTRACE_CONT. Registers and mask go back at the
 * first stop inside get_signal(): the PTRACE_EVENT_STOP of our interrupt or
 * of a group-stop (the thread stays stopped after detaching), or a
 * signal-delivery-stop, whose signal is passed back with PTRACE_DETACH so it
 * is delivered with the thread's own registers and mask. The kernel's
 * syscall-restart logic then runs on the interrupted call's own ax/orig_ax.
 * Returns 0 when restored and detached, else -errno (not restored). */
INJECTOR static int put_back(struct job *j, const struct user_regs_struct *saved, uint64_t mask)
{
    int st = j->last_st, detach_sig = 0;
    long e = pt(PTRACE_INTERRUPT, j->tid, 0, 0);
    if (e < 0)
        return (int)e;
    for (int round = 0;; round++) {
        if (!j->stopped) {
            int r = job_wait_stop(j, &st);
            if (r < 0)
                return r;
        }
        int sig = WSTOPSIG(st), event = (unsigned)st >> 16;
        if (event == PTRACE_EVENT_STOP)
            break;
        if (event == 0 && !(sig & 0x80)) {
            detach_sig = sig; /* signal-delivery-stop: hand it back on detach */
            break;
        }
        /* a syscall stop: after PTRACE_CONT no further syscall stops come,
         * so the next stop is in get_signal() */
        if (round >= 8)
            return -EPROTO;
        if ((e = pt(PTRACE_INTERRUPT, j->tid, 0, 0)) < 0 || (e = pt(PTRACE_CONT, j->tid, 0, 0)) < 0)
            return (int)e;
        j->stopped = 0;
    }
    int rr = (int)pt(PTRACE_SETREGS, j->tid, 0, saved);
    e = pt(PTRACE_SETSIGMASK, j->tid, 8, &mask);
    if (rr == 0)
        rr = (int)e;
    if (rr < 0)
        return rr;
    e = pt(PTRACE_DETACH, j->tid, 0, (void *)(long)detach_sig);
    if (e < 0)
        return (int)e;
    j->stopped = 0;
    return 0;
}

INJECTOR static void inject(struct job *j)
{
    struct ss_inject_info *info = j->info;
    struct user_regs_struct saved;
    uint64_t saved_mask = 0, all = ~0ull;
    int rc, st;
    long e;

    info->stage = ST_SEIZE;
    if ((e = pt(PTRACE_SEIZE, j->tid, 0, (void *)(long)PTRACE_O_TRACESYSGOOD)) < 0) {
        j->rc = (int)e;
        return;
    }
    /* From here on, the injector's exit detaches (the kernel's exit_ptrace),
     * whatever state the target is in. */
    info->stage = ST_STOP;
    if ((e = pt(PTRACE_INTERRUPT, j->tid, 0, 0)) < 0) {
        j->rc = (int)e;
        return;
    }
    for (;;) {
        rc = job_wait_stop(j, &st);
        if (rc < 0) {
            j->rc = rc;
            return; /* our exit detaches; nothing was changed */
        }
        int sig = WSTOPSIG(st), event = (unsigned)st >> 16;
        if (event == PTRACE_EVENT_STOP) {
            if (is_stop_signal(sig)) {
                pt(PTRACE_DETACH, j->tid, 0, 0);
                j->rc = -EAGAIN;
                return;
            }
            break; /* our interrupt */
        }
        /* A signal arrived first: deliver it as if we were not here; the
         * interrupt stays pending and traps right after. */
        info->forwarded_signals++;
        if ((e = pt(PTRACE_CONT, j->tid, 0, (void *)(long)(event ? 0 : sig))) < 0) {
            j->rc = (int)e;
            return;
        }
        j->stopped = 0;
    }

    maybe_pause(j, SS_INJECT_PAUSE_STOPPED);
    info->stage = ST_REGS;
    if ((e = pt(PTRACE_GETREGS, j->tid, 0, &saved)) < 0) {
        j->rc = (int)e;
        pt(PTRACE_DETACH, j->tid, 0, 0);
        return;
    }
    info->orig_syscall = (int64_t)saved.orig_rax;
    info->orig_ret = (int64_t)saved.rax;
    info->was_in_syscall = (int64_t)saved.orig_rax >= 0;
    if (saved.cs != SS_USER_CS64) {
        pt(PTRACE_DETACH, j->tid, 0, 0);
        j->rc = -ENOEXEC;
        return;
    }
    if ((e = pt(PTRACE_GETSIGMASK, j->tid, 8, &saved_mask)) < 0 ||
        (e = pt(PTRACE_SETSIGMASK, j->tid, 8, &all)) < 0) {
        j->rc = (int)e;
        pt(PTRACE_SETSIGMASK, j->tid, 8, &saved_mask); /* (when only the set failed) */
        pt(PTRACE_DETACH, j->tid, 0, 0);
        return;
    }

    int64_t t_masked = now_ns();
    maybe_pause(j, SS_INJECT_PAUSE_MASKED);
    int64_t ret = 0;
    info->stage = ST_CALL;
    if (j->mode == CALL_UFFD) {
        uint64_t a[6] = {j->args[0], 0, 0, 0, 0, 0};
        rc = run_call(j, &saved, __NR_userfaultfd, a, &ret);
        if (rc == 0 && ret >= 0) {
            info->stage = ST_GETFD;
            maybe_pause(j, SS_INJECT_PAUSE_AFTER_CALL);
            /* lands in the fd table the injector shares with the tracker */
            j->out_fd = (int)rsys(__NR_pidfd_getfd, j->pidfd, (int)ret, 0, 0, 0, 0);
            info->stage = ST_CLOSE;
            uint64_t c[6] = {(uint64_t)ret, 0, 0, 0, 0, 0};
            int64_t cret = 0;
            rc = run_call(j, &saved, __NR_close, c, &cret);
            if (rc == 0 && cret != 0)
                rc = (int)cret;
        }
        if (rc == 0 && ret < 0)
            rc = (int)ret;
        if (rc == 0 && j->out_fd < 0)
            rc = j->out_fd;
    } else {
        rc = run_call(j, &saved, j->nr, j->args, &ret);
    }
    int call_stage = info->stage;

    /* Whatever happened above (done, a timeout with the thread still inside
     * the call, an error at a stop), the thread gets its own registers and
     * mask back before we let go. */
    info->stage = ST_RESTORE;
    maybe_pause(j, SS_INJECT_PAUSE_PUT_BACK);
    int rr = put_back(j, &saved, saved_mask);
    info->restored = rr == 0;
    info->window_ns = now_ns() - t_masked;
    if (info->held_stop)
        rsys(SYS_tgkill, j->tgid, j->tid, info->held_stop, 0, 0, 0);
    j->rc = rc ? rc : rr;
    /* on failure, stage says where: the call that failed, or ST_RESTORE */
    info->stage = rc ? call_stage : rr ? ST_RESTORE : ST_DONE;
}

/* The injector task's entry (on its own stack, all signals blocked since
 * clone: see run_job). */
INJECTOR static int injector_main(void *arg)
{
    struct job *j = arg;
    /* Its own session and process group: a kill of the tracker's group (or a
     * terminal's hang-up) does not reach it. */
    rsys(SYS_setsid, 0, 0, 0, 0, 0, 0);
    /* SIGCHLD at its default action (the tracker may ignore it, and an ignored
     * SIGCHLD is never sent for a ptrace stop); blocked, it queues for
     * wait_stop's sigtimedwait. The signal handlers are the injector's own
     * copy (no CLONE_SIGHAND): the tracker's are untouched. */
    struct {
        long handler;
        unsigned long flags;
        long restorer;
        uint64_t mask;
    } dfl = {0, 0, 0, 0}; /* SIG_DFL */
    rsys(SYS_rt_sigaction, SIGCHLD, (long)&dfl, 0, 8, 0, 0);
    inject(j);
    return 0;
}

/* Where the injector lives: one mapping, its stack below, the job at the top. */
#define INJECTOR_MAP (128 * 1024)
struct injector_area {
    struct job job;
    struct ss_inject_info info;
};

/* Run the job in an injector task that outlives the tracker process:
 * clone(CLONE_VM | CLONE_FILES) without CLONE_THREAD makes it its own thread
 * group, so a SIGKILL of the tracker's process (kill -9 PID, timeout -s KILL,
 * a fatal signal of any of its threads, exit_group) does not kill it. It shares
 * the tracker's memory (the job is written in place; the mm lives on while it
 * runs, even when the tracker is gone: mm_users counts it) and the fd table (the
 * pidfd_getfd result lands in the tracker's table directly). It always finishes
 * or rolls back the injection and detaches; the tracker waits for it. Its exit
 * signal is 0: only a wait with __WALL/__WCLONE sees it, so a waitpid(-1) of
 * the host program cannot reap it and a SIGCHLD handler never hears of it.
 * Cost: one clone of a task sharing the mm (no page tables copied), ~0.1 ms. */
static int run_job(struct job *j)
{
    uint8_t *map = mmap(NULL, INJECTOR_MAP, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (map == MAP_FAILED)
        return -errno;
    mprotect(map, 4096, PROT_NONE); /* a guard page below the stack */
    struct injector_area *a =
        (struct injector_area *)(map + INJECTOR_MAP - ((sizeof *a + 63) & ~(size_t)63));
    struct ss_inject_info *caller_info = j->info;
    a->job = *j;
    a->info = *caller_info;
    a->job.info = &a->info;
    uint8_t *stack_top = (uint8_t *)((uintptr_t)a & ~(uintptr_t)15);

    /* It starts with every signal blocked (SIGKILL and SIGSTOP aside): the
     * mask is inherited from this thread, blocked only around the clone. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int pid = clone(injector_main, stack_top, CLONE_VM | CLONE_FILES | CLONE_UNTRACED, &a->job);
    int err = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (pid < 0) {
        munmap(map, INJECTOR_MAP);
        return -err;
    }
    for (;;) {
        int st;
        pid_t r = waitpid(pid, &st, __WALL);
        if (r == pid || (r < 0 && errno != EINTR))
            break; /* ECHILD: someone reaped it, so it has exited too */
    }
    int out_fd = a->job.out_fd;
    *j = a->job;
    j->info = caller_info;
    *caller_info = a->info;
    j->out_fd = out_fd;
    munmap(map, INJECTOR_MAP);
    return j->rc;
}

/* Common set-up of a job; info is where the caller wants the diagnostics. */
static void job_init(struct job *j, struct ss_inject_info *info, int tid, int tgid,
                     uint64_t syscall_addr, int timeout_ms, int mode)
{
    memset(j, 0, sizeof *j);
    memset(info, 0, sizeof *info);
    info->orig_syscall = -1;
    j->tid = tid;
    j->tgid = tgid;
    j->pidfd = -1;
    j->timeout_ms = timeout_ms > 0 ? timeout_ms : 2000;
    j->syscall_addr = syscall_addr;
    j->mode = mode;
    j->out_fd = -1;
    j->info = info;
    j->pause_point = g_pause_point;
    j->pause_ms = g_pause_ms;
    j->pause_fd = g_pause_fd;
}

int ss_inject_userfaultfd(int pid, int tid, int pidfd, uint64_t syscall_addr, int uffd_flags,
                          int timeout_ms, int *out_fd, struct ss_inject_info *info)
{
    struct ss_inject_info local;
    struct job j;
    job_init(&j, info ? info : &local, tid, pid, syscall_addr, timeout_ms, CALL_UFFD);
    j.pidfd = pidfd;
    j.args[0] = (uint64_t)(unsigned)uffd_flags;
    int rc = run_job(&j);
    if (rc < 0) {
        if (j.out_fd >= 0)
            close(j.out_fd);
        return rc;
    }
    *out_fd = j.out_fd;
    return 0;
}

/* Thread-group id of thread tid (from /proc/TID/status), or tid itself. */
static int tgid_of(int tid)
{
    int tgid = tid;
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/status", tid);
    FILE *f = fopen(path, "re");
    if (f) {
        char line[256];
        while (fgets(line, sizeof line, f))
            if (sscanf(line, "Tgid: %d", &tgid) == 1)
                break;
        fclose(f);
    }
    return tgid;
}

int ss_inject_syscall(int tid, uint64_t syscall_addr, long nr, const uint64_t args[6],
                      int timeout_ms, int64_t *ret, struct ss_inject_info *info)
{
    struct ss_inject_info local;
    struct job j;
    if (!info)
        info = &local;
    /* tgid for re-sending a held stop signal */
    job_init(&j, info, tid, tgid_of(tid), syscall_addr, timeout_ms, CALL_PLAIN);
    j.nr = nr;
    memcpy(j.args, args, sizeof j.args);
    int rc = run_job(&j);
    if (rc < 0)
        return rc;
    *ret = info->ret[0];
    return 0;
}

#else /* not x86_64 */

int ss_inject_userfaultfd(int pid, int tid, int pidfd, uint64_t syscall_addr, int uffd_flags,
                          int timeout_ms, int *out_fd, struct ss_inject_info *info)
{
    return -ENOSYS;
}

int ss_inject_syscall(int tid, uint64_t syscall_addr, long nr, const uint64_t args[6],
                      int timeout_ms, int64_t *ret, struct ss_inject_info *info)
{
    return -ENOSYS;
}

#endif
