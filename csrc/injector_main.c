/* statesync-injector: one ss_inject_userfaultfd() on behalf of a tracker, in a
 * process of its own (its own mm, session and signal mask), so that nothing that
 * kills the tracker, an OOM kill included (the OOM killer also kills every process
 * sharing the victim's memory, hence an in-process injector task), can leave the
 * target running on borrowed registers. Built by setup.py next to the module and
 * run by statesync/tracking/uffd.py.
 *
 *   statesync-injector PID TID SYSCALL_ADDR FLAGS TIMEOUT_MS [PAUSE_POINT PAUSE_MS PAUSE_FD]
 *
 * fd 3 is a connected SOCK_SEQPACKET socket: one message comes back, a text line
 * "rc=... stage=... ..." with our userfaultfd attached (SCM_RIGHTS) on success.
 * If the tracker is gone by then the send fails and the descriptor just closes.
 * The exit status is 0 when the message was sent, 2 for bad arguments, 3 when the
 * send failed. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "ss_ptrace.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

static int num(const char *s, long long *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 0);
    if (errno || end == s || *end)
        return -1;
    *out = v;
    return 0;
}

/* A tracker that made itself the OOM killer's favourite (oom_score_adj > 0) must not
 * make us one: we hold the target's borrowed state for a millisecond and free almost
 * nothing when killed. Lowering back to 0 needs no privilege (the floor is the
 * inherited oom_score_adj_min, normally 0); a failure changes nothing. */
static void not_the_oom_victim(void)
{
    char buf[16] = {0};
    int fd = open("/proc/self/oom_score_adj", O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return;
    if (read(fd, buf, sizeof buf - 1) > 0 && atoi(buf) > 0 && lseek(fd, 0, SEEK_SET) == 0 &&
        write(fd, "0", 1) != 1) {
        /* left as it was */
    }
    close(fd);
}

int main(int argc, char **argv)
{
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL); /* (also set by the spawner) */
    setsid();                             /* (fails harmlessly if the spawner did it) */
    not_the_oom_victim();
    long long v[8] = {0, 0, 0, 0, 0, 0, 0, -1};
    if (argc != 6 && argc != 9) {
        fprintf(stderr, "usage: %s PID TID SYSCALL_ADDR FLAGS TIMEOUT_MS "
                        "[PAUSE_POINT PAUSE_MS PAUSE_FD]\n", argv[0]);
        return 2;
    }
    for (int i = 1; i < argc; i++)
        if (num(argv[i], &v[i - 1]) < 0) {
            fprintf(stderr, "%s: bad argument %d: %s\n", argv[0], i, argv[i]);
            return 2;
        }
    if (argc == 9)
        ss_inject_test_pause((int)v[5], (int)v[6], (int)v[7]);

    struct ss_inject_info info;
    memset(&info, 0, sizeof info);
    int fd = -1, rc;
    int pidfd = (int)syscall(SYS_pidfd_open, (int)v[0], 0);
    if (pidfd < 0) {
        rc = -errno;
        info.stage = 1; /* as a failed seize: nothing was done */
    } else {
        rc = ss_inject_userfaultfd((int)v[0], (int)v[1], pidfd, (uint64_t)v[2], (int)v[3],
                                   (int)v[4], &fd, &info);
        close(pidfd);
    }

    char line[512];
    int n = snprintf(line, sizeof line,
                     "rc=%d stage=%d restored=%d ncalls=%d ret=%lld,%lld,%lld,%lld "
                     "was_in_syscall=%d orig_syscall=%lld orig_ret=%lld forwarded_signals=%d "
                     "held_stop=%d window_ns=%lld\n",
                     rc, info.stage, info.restored, info.ncalls, (long long)info.ret[0],
                     (long long)info.ret[1], (long long)info.ret[2], (long long)info.ret[3],
                     info.was_in_syscall, (long long)info.orig_syscall,
                     (long long)info.orig_ret, info.forwarded_signals, info.held_stop,
                     (long long)info.window_ns);
    struct iovec iov = {.iov_base = line, .iov_len = (size_t)n};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (rc == 0 && fd >= 0) {
        memset(&u, 0, sizeof u);
        msg.msg_control = u.buf;
        msg.msg_controllen = sizeof u.buf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof fd);
    }
    ssize_t sent = sendmsg(3, &msg, MSG_NOSIGNAL);
    if (fd >= 0)
        close(fd);
    return sent == n ? 0 : 3;
}
