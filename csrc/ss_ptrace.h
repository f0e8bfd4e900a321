/* Running system calls inside an unmodified, running process (x86_64).
 *
 * The idea is CRIU compel's: stop one thread with PTRACE_SEIZE +
 * PTRACE_INTERRUPT (no signal is sent, so the target's signal state is
 * untouched), save its registers and signal mask, point its instruction pointer
 * at an existing `syscall` instruction (found by the caller, e.g. in the vDSO:
 * nothing in the target's memory is written), run the call between the
 * syscall-enter and syscall-exit stops, and put everything back.
 *
 * Putting back is exact also for a thread that was blocked in a system call:
 * the interrupted call's state (ax = -ERESTART*, orig_ax = its number) is
 * restored at a PTRACE_EVENT_STOP inside get_signal(), the same place the first
 * stop happened, so the kernel's own restart logic runs on it after we detach,
 * just as if we had never been there. While our calls run, every signal is
 * blocked (PTRACE_SETSIGMASK) and stays pending; a SIGSTOP that arrives in
 * that window is held and sent again after detaching.
 *
 * All ptrace calls are made from an injector task that the calling thread
 * starts and waits for: clone(CLONE_VM | CLONE_FILES) without CLONE_THREAD, its
 * own process (and session), so that the death of the calling process (SIGKILL,
 * a crash of another of its threads, a kill of its process group) cannot leave
 * the target running on borrowed registers: the injector finishes or rolls back
 * the injection and detaches whatever happens to its caller. If the target never
 * stops (uninterruptible sleep) the injector gives up at the timeout and exits,
 * and the kernel detaches a tracer's tracees when it exits. No attachment leaks.
 * What still kills the injector with its caller: an OOM kill of the caller (the
 * OOM killer kills every process sharing the victim's memory), a kill of the
 * whole cgroup, a SIGKILL of the injector itself (docs/tracking.md). For the OOM
 * case, statesync-injector (csrc/injector_main.c) runs the injection in a process
 * of its own mm; the Python tracker uses it by default.
 */
#ifndef SS_PTRACE_H
#define SS_PTRACE_H

#include <stddef.h>
#include <stdint.h>

/* What happened during an injection (for diagnostics and tests). */
struct ss_inject_info {
    int64_t ret[4];        /* return value of each injected call (or -errno) */
    int ncalls;            /* calls actually run */
    int was_in_syscall;    /* the thread was stopped inside a system call */
    int64_t orig_syscall;  /* its number (orig_ax), -1 when not in a call */
    int64_t orig_ret;      /* its ax at the stop (e.g. -512 = -ERESTARTSYS) */
    int forwarded_signals; /* signals delivered through while waiting to stop */
    int held_stop;         /* a stop signal held during the calls and re-sent */
    int stage;             /* last stage reached (see ss_ptrace.c); on failure the
                              stage that failed: 0 = the injector task could not be
                              started (mmap/clone failed), nothing was done to the
                              target. >= SS_INJECT_STAGE_CALL: our calls had
                              begun, the thread's registers and mask were changed */
    int restored;          /* 1: the thread's registers and signal mask were put back
                              and it was detached at a stop (always so on success);
                              0 after a failure at or after SS_INJECT_STAGE_CALL: its
                              state may be damaged (e.g. it stayed in uninterruptible
                              sleep inside the injected call past a second timeout) */
    int64_t window_ns;     /* how long the thread's signal mask and registers were
                              ours: from blocking its signals to its detach (0 when
                              not reached); a tracer dying inside it harmed the target */
};

#define SS_INJECT_STAGE_CALL 4

/* Test hook: pause points of an injection (values are the stage reached there). */
#define SS_INJECT_PAUSE_STOPPED 2    /* thread in our interrupt stop, nothing changed yet */
#define SS_INJECT_PAUSE_MASKED 3     /* registers saved, all its signals blocked */
#define SS_INJECT_PAUSE_IN_CALL 4    /* at the syscall-enter stop of userfaultfd() (or the
                                        call of ss_inject_syscall): registers borrowed */
#define SS_INJECT_PAUSE_AFTER_CALL 5 /* at userfaultfd()'s exit stop, before pidfd_getfd */
#define SS_INJECT_PAUSE_IN_CLOSE 6   /* at the syscall-enter stop of the injected close() */
#define SS_INJECT_PAUSE_PUT_BACK 8   /* calls done, before the registers and mask go back */

/* For tests only: every later injection in this process pauses ms milliseconds at
 * `point` (one of SS_INJECT_PAUSE_*; 0 or ms <= 0: never), first writing one byte
 * to notify_fd when it is >= 0, so that a test can kill the tracker exactly there.
 * Not thread-safe against concurrent injections; the one global of the C core. */
void ss_inject_test_pause(int point, int ms, int notify_fd);

/* Find a `syscall` instruction (0f 05) in [start, end) of process pid's memory
 * (read with process_vm_readv). *addr receives its address. Returns 0,
 * -ENOENT when there is none, or -errno. */
int ss_find_syscall_insn(int pid, uint64_t start, uint64_t end, uint64_t *addr);

/* Create a userfaultfd inside thread tid of process pid and move it to us:
 * runs userfaultfd(uffd_flags) in the target, takes the new descriptor with
 * pidfd_getfd(pidfd, ...), then runs close() on the target's copy. syscall_addr
 * must point at a `syscall` instruction in an executable mapping of the target.
 * *out_fd receives our descriptor (O_CLOEXEC). timeout_ms bounds each wait for
 * the target to stop. Returns 0, or -errno:
 *   -EPERM   no right to trace it (or already traced by someone else)
 *   -ESRCH   it does not exist or exited meanwhile
 *   -EAGAIN  it is stopped by job control (SIGSTOP): left as it was; with
 *            info->stage 0: the injector task could not be started (process
 *            limit), nothing was done
 *   -ETIMEDOUT it did not stop in time (uninterruptible): left as it was when
 *            info->stage < SS_INJECT_STAGE_CALL; at or after it, an injected call
 *            outlived the timeout: the thread was interrupted, its registers and
 *            mask put back (info->restored says whether that worked) and the
 *            call's effects may remain (e.g. a descriptor left open in it)
 *   -ENOEXEC not a 64-bit x86 thread
 *   other    the error userfaultfd() itself returned inside the target
 */
int ss_inject_userfaultfd(int pid, int tid, int pidfd, uint64_t syscall_addr, int uffd_flags,
                          int timeout_ms, int *out_fd, struct ss_inject_info *info);

/* Run one system call nr(args[0..5]) in thread tid with the same machinery;
 * *ret receives its return value. For tests and diagnostics. */
int ss_inject_syscall(int tid, uint64_t syscall_addr, long nr, const uint64_t args[6],
                      int timeout_ms, int64_t *ret, struct ss_inject_info *info);

#endif
