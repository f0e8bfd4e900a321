"""The tracker's contract under whatever the target does between collects.

    collect() reports every page written since the previous collect that holds
    data now (present or swapped, inside what is mapped now), whatever happened to
    its VMA in between; and every page holding data whose content changed without
    a write of this process (a new mapping in its place, mremap).

A small C target executes random sequences of memory operations (mmap private or
shared, writes, mprotect to any protection, munmap, MAP_FIXED replacement in
place, mremap, MADV_DONTNEED, fork, fork+exec of a child) and keeps its own
record of the pages it wrote (the ground truth). After each step the test
collects and checks two things:

1. every page the target wrote since the previous collect that is present now is
   in the collect (the contract);
2. the migration invariant: a model of the destination ("shadow": the content of
   every page as of the round that last reported it) agrees with the target's
   memory now for every present page it holds, read through /proc/PID/mem
   (which reads PROT_NONE pages too).
"""
import os
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import require
from statesync import proc
from statesync.tracking import Tracker, tracking_methods

PS = proc.PAGE_SIZE

TARGET_C = r"""
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

static sigjmp_buf jb;
static void on_segv(int s) { (void)s; siglongjmp(jb, 1); }
static uint64_t counter = 1;
static uint64_t written[1 << 16];
static size_t nwritten;
#define PS 4096UL

static void record(uint64_t a) {
    if (nwritten < sizeof written / sizeof written[0]) written[nwritten++] = a;
}

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_segv;
    sa.sa_flags = SA_NODEFER;
    sigaction(SIGSEGV, &sa, 0);
    sigaction(SIGBUS, &sa, 0);
    setvbuf(stdout, 0, _IOLBF, 0);
    char cmd[8];
    unsigned long a, n, x;
    printf("ready\n");
    while (scanf("%7s", cmd) == 1) {
        if (!strcmp(cmd, "m")) {          /* m NPAGES SHARED PROT -> addr */
            scanf("%lu %lu %lu", &n, &x, &a);
            void *p = mmap(0, n * PS, (int)a, (x ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS,
                           -1, 0);
            printf("%lu\n", p == MAP_FAILED ? 0UL : (unsigned long)p);
        } else if (!strcmp(cmd, "w")) {   /* w ADDR NPAGES: write a new value per page */
            scanf("%lx %lu", &a, &n);
            unsigned long ok = 0;
            for (unsigned long i = 0; i < n; i++) {
                volatile uint64_t *p = (uint64_t *)(a + i * PS + (counter % 500) * 8);
                if (sigsetjmp(jb, 1) == 0) {
                    *p = counter++;
                    record(a + i * PS);
                    ok++;
                }
            }
            printf("%lu\n", ok);
        } else if (!strcmp(cmd, "p")) {   /* p ADDR NPAGES PROT */
            scanf("%lx %lu %lu", &a, &n, &x);
            printf("%d\n", mprotect((void *)a, n * PS, (int)x));
        } else if (!strcmp(cmd, "u")) {   /* u ADDR NPAGES */
            scanf("%lx %lu", &a, &n);
            printf("%d\n", munmap((void *)a, n * PS));
        } else if (!strcmp(cmd, "f")) {   /* f ADDR NPAGES SHARED: new mapping in place */
            scanf("%lx %lu %lu", &a, &n, &x);
            void *p = mmap((void *)a, n * PS, PROT_READ | PROT_WRITE,
                           (x ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
            printf("%d\n", p == MAP_FAILED ? -1 : 0);
        } else if (!strcmp(cmd, "r")) {   /* r ADDR NPAGES NEWNPAGES -> new addr */
            scanf("%lx %lu %lu", &a, &n, &x);
            void *p = mremap((void *)a, n * PS, x * PS, MREMAP_MAYMOVE);
            printf("%lu\n", p == MAP_FAILED ? 0UL : (unsigned long)p);
        } else if (!strcmp(cmd, "d")) {   /* d ADDR NPAGES */
            scanf("%lx %lu", &a, &n);
            printf("%d\n", madvise((void *)a, n * PS, MADV_DONTNEED));
        } else if (!strcmp(cmd, "k")) {   /* fork; the child writes its copy and exits */
            pid_t c = fork();
            if (c == 0) {
                counter += 7;
                _exit(0);
            }
            waitpid(c, 0, 0);
            printf("%d\n", c > 0 ? 0 : -1);
        } else if (!strcmp(cmd, "x")) {   /* fork + exec of a child */
            pid_t c = fork();
            if (c == 0) {
                execl("/bin/true", "true", (char *)0);
                _exit(127);
            }
            int stt = 0;
            waitpid(c, &stt, 0);
            printf("%d\n", WIFEXITED(stt) ? WEXITSTATUS(stt) : -1);
        } else if (!strcmp(cmd, "t")) {   /* take the record of written pages */
            printf("%zu", nwritten);
            for (size_t i = 0; i < nwritten; i++) printf(" %lx", (unsigned long)written[i]);
            printf("\n");
            nwritten = 0;
        } else {
            printf("?\n");
        }
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def target_bin(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    require(cc is not None, "a C compiler (cc) is needed to build the tracker's test target")
    d = tmp_path_factory.mktemp("tracktarget")
    src = d / "target.c"
    src.write_text(TARGET_C)
    exe = d / "target"
    subprocess.run([cc, "-O1", "-o", str(exe), str(src)], check=True)
    return str(exe)


class Target:
    """The C target behind a pipe: one command line in, one answer line out."""

    def __init__(self, exe: str):
        self.p = subprocess.Popen([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, bufsize=1)
        assert self.p.stdout.readline().strip() == "ready"
        self.pid = self.p.pid
        self.arena = []    # (start, end) of every mapping the target made for the test

    def cmd(self, line: str) -> str:
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        out = self.p.stdout.readline()
        assert out, f"target died on {line!r} (rc {self.p.poll()})"
        return out.strip()

    def take(self) -> np.ndarray:
        parts = self.cmd("t").split()
        return np.unique(np.array([int(x, 16) for x in parts[1:]], dtype=np.uint64))

    def close(self):
        self.p.kill()
        self.p.wait()


def _mapped_now(pid, arena):
    """Pages of the arena mapped now, and the subset present (or swapped)."""
    maps = proc.read_maps(pid)
    mapped, present = [], []
    for v in maps:
        for s, e in arena:
            lo, hi = max(s, v.start), min(e, v.end)
            if lo < hi:
                mapped.append(np.arange(lo, hi, PS, dtype=np.uint64))
                ent = proc.pagemap(pid, lo, hi)
                # uffd-wp markers show as "swapped" with no swap entry: present only
                present.append(ent.addrs[ent.present])
    cat = lambda xs: np.unique(np.concatenate(xs)) if xs else np.zeros(0, np.uint64)  # noqa: E731
    return cat(mapped), cat(present)


def _explain(pid, pages):
    """The missed pages' VMAs and pagemap entries, for a failure message."""
    out = []
    maps = proc.read_maps(pid)
    for a in pages[:4].tolist():
        v = [f"{x.start:#x}-{x.end:#x} {x.perms} {x.path}" for x in maps if x.start <= a < x.end]
        raw = int(proc.pagemap(pid, a, a + PS).raw[0])
        out.append(f"{a:#x} in {v or 'nothing'} pagemap {raw:#x}")
    return "; ".join(out)


def _contents(pid, addrs):
    out = {}
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for a in addrs.tolist():
            out[a] = os.pread(fd, PS, a)
    finally:
        os.close(fd)
    return out


# One step: (operation, which mapping, page offset, page count, argument)
OPS = ["map", "write", "write", "write", "mprotect", "munmap", "replace", "mremap",
       "dontneed", "fork", "exec"]
step = st.tuples(st.sampled_from(OPS), st.integers(0, 7), st.integers(0, 15),
                 st.integers(1, 8), st.integers(0, 7))


def _apply(t: Target, regions, op, ri, off, n, arg):
    """Run one step on the target. regions: list of [start, npages] the test made."""
    if op == "map" or not regions:
        npages = 4 + 2 * n
        addr = int(t.cmd(f"m {npages} {arg & 1} {[0, 1, 3, 3][arg & 3]}"))
        assert addr
        regions.append([addr, npages])
        t.arena.append((addr, addr + npages * PS))
        return
    start, npages = regions[ri % len(regions)]
    off = off % npages
    n = min(n, npages - off)
    a = start + off * PS
    if op == "write":
        t.cmd(f"w {a:x} {n}")
    elif op == "mprotect":
        t.cmd(f"p {a:x} {n} {[0, 1, 3, 3, 1, 0, 3, 5][arg]}")
    elif op == "munmap":
        t.cmd(f"u {a:x} {n}")
    elif op == "replace":
        t.cmd(f"f {a:x} {n} {arg & 1}")
    elif op == "dontneed":
        t.cmd(f"d {a:x} {n}")
    elif op == "mremap":
        new = int(t.cmd(f"r {start:x} {npages} {npages + arg}"))
        if new:
            regions[ri % len(regions)] = [new, npages + arg]
            t.arena.append((new, new + (npages + arg) * PS))
    elif op == "fork":
        t.cmd("k")
    elif op == "exec":
        assert t.cmd("x") == "0"


def _check_sequence(exe, method, steps, collect_every):
    t = Target(exe)
    try:
        regions = []
        _apply(t, regions, "map", 0, 0, 4, 3)
        t.cmd(f"w {regions[0][0]:x} {regions[0][1]}")
        with Tracker(t.pid, method=method) as tr:
            assert tr.method == method
            t.take()
            _, present = _mapped_now(t.pid, t.arena)
            shadow = _contents(t.pid, present)     # what round 0 sent
            for i, s in enumerate(steps):
                _apply(t, regions, *s)
                if (i + 1) % collect_every and i + 1 != len(steps):
                    continue
                got = tr.collect().pages
                wrote = t.take()
                _, present = _mapped_now(t.pid, t.arena)
                # 1. the contract: written and holding data now => reported. (A page
                # written and then dropped, by MADV_DONTNEED or a new mapping in its
                # place, holds no data: no dump contains it, nothing is owed.)
                must = np.intersect1d(wrote, present)
                missed = np.setdiff1d(must, got)
                assert missed.size == 0, (
                    f"{method} missed {missed.size} written pages after {steps[:i + 1]} "
                    f"(collect every {collect_every}): {_explain(t.pid, missed)}")
                # 2. the migration invariant on the pages the destination holds
                now = _contents(t.pid, present)
                for a in got.tolist():      # what this round sends (or drops)
                    if a in now:
                        shadow[a] = now[a]
                    else:
                        shadow.pop(a, None)
                rep = set(got.tolist())
                for a, c in now.items():
                    if a not in rep and a in shadow:
                        assert shadow[a] == c, (
                            f"{method}: page {a:#x} changed without being reported after "
                            f"{steps[:i + 1]}")
    finally:
        t.close()


def _need(method):
    ok, why = tracking_methods()[method]
    require(ok, f"{method} tracking unavailable: {why}")


@pytest.mark.parametrize("method", ["uffd", "hash"])
def test_written_then_mprotected_read_only_is_reported(target_bin, method):
    """The W^X regression: 8 pages written, then made read-only (all, or half and
    PROT_NONE) before the next collect. All 8 used to be missed by both methods."""
    _need(method)
    t = Target(target_bin)
    try:
        a = int(t.cmd("m 8 0 3"))
        b = int(t.cmd("m 8 0 3"))
        t.cmd(f"w {a:x} 8")
        t.cmd(f"w {b:x} 8")
        with Tracker(t.pid, method=method) as tr:
            t.take()
            tr.collect()
            t.cmd(f"w {a:x} 8")
            t.cmd(f"p {a:x} 8 1")          # whole VMA read-only
            t.cmd(f"w {b:x} 8")
            t.cmd(f"p {b:x} 4 1")          # split: half read-only ...
            t.cmd(f"p {b + 4 * PS:x} 4 0")  # ... half PROT_NONE
            got = tr.collect().pages
            want = t.take()
            assert want.size == 16
            assert np.setdiff1d(want, got).size == 0, f"{method} missed written pages"
            # read-only + written again (made writable, written, read-only again)
            t.cmd(f"p {a:x} 8 3")
            t.cmd(f"w {a:x} 2")
            t.cmd(f"p {a:x} 8 1")
            got = tr.collect().pages
            assert np.setdiff1d(t.take(), got).size == 0
    finally:
        t.close()


@pytest.mark.parametrize("method", ["uffd", "hash"])
def test_random_operation_sequences_miss_nothing(target_bin, method):
    _need(method)

    @settings(max_examples=250 if method == "uffd" else 200, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(steps=st.lists(step, min_size=1, max_size=14), every=st.integers(1, 4))
    def run(steps, every):
        _check_sequence(target_bin, method, steps, every)

    run()


def test_uffd_registers_read_only_and_shared_vmas(target_bin):
    """Protection at the time of a collect says nothing about writes since the last
    one, so uffd registers every VMA the kernel accepts (with WP_ASYNC: anonymous,
    shared, file-backed, read-only, PROT_NONE); none of ours is hashed."""
    _need("uffd")
    t = Target(target_bin)
    try:
        addrs = [int(t.cmd(f"m 4 {sh} {prot}")) for sh in (0, 1) for prot in (0, 1, 3)]
        with Tracker(t.pid, method="uffd") as tr:
            b = tr._backend
            for a in addrs:
                assert b.registered.get(a) == a + 4 * PS or any(
                    s <= a < e for s, e in b.registered.items()), hex(a)
    finally:
        t.close()
