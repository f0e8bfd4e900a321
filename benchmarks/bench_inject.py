"""What does one ptrace injection cost, and one whole uffd attach (+ detach)?

- ``inject_getpid``  _core.inject_syscall(getpid) into the workload's main thread
                     (blocked in a read): seize, stop, one call, put back, detach
- ``inject_uffd``    _core.inject_userfaultfd: the two calls an attach injects, by an
                     injector task of this process
- ``inject_uffd_helper`` the same through the statesync-injector helper (spawned per
                     injection; what an attach uses when the helper is built)
- ``attach_uffd``    Tracker(pid, method="uffd") then detach() (STATESYNC_INJECTOR
                     selects helper or inprocess): the injection, the
                     VMA registration, the arming scan, the baseline hashing
- ``window``         of each inject_uffd, how long the target's signal mask and
                     registers were ours (info["window_ns"]): a tracer dying inside
                     it crashes the target (docs/tracking.md)

The tracker's own size matters to how the injector is started (a CLONE_VM task
costs the same whatever the tracker maps; a fork would copy its page tables), so
BENCH_TRACKER_MB MiB (default 0) are allocated and touched in the tracker first.

    .venv/bin/python -m pytest benchmarks/bench_inject.py --benchmark-only
    .venv/bin/python benchmarks/bench_inject.py      # min / median / p90 table
"""
import os
import statistics
import time

import pytest

from conftest import require
from statesync import _core, proc
from statesync.testing import workloads
from statesync.tracking import Tracker, tracking_methods, uffd

TRACKER_MB = int(os.environ.get("BENCH_TRACKER_MB", "0"))
_ballast = bytearray(TRACKER_MB << 20)
for _i in range(0, len(_ballast), 4096):
    _ballast[_i] = 1


class Bench:
    def __init__(self):
        self.wl = workloads.spawn(size="16M", rate=0, paused=True)
        self.pid = self.wl.pid
        vdso = [v for v in proc.read_maps(self.pid) if v.path == "[vdso]"][0]
        self.addr = _core.find_syscall_insn(self.pid, vdso.start, vdso.end)
        self.pidfd = os.pidfd_open(self.pid)
        self.flags = os.O_CLOEXEC | os.O_NONBLOCK | _core.UFFD_USER_MODE_ONLY
        self.windows = []   # ms the target's state was ours, per inject_uffd

    def inject_getpid(self):
        ret, _ = _core.inject_syscall(self.pid, self.addr, 39)
        assert ret == self.pid

    def inject_uffd(self):
        fd, info = _core.inject_userfaultfd(self.pid, self.pid, self.pidfd, self.addr, self.flags)
        os.close(fd)
        if "window_ns" in info:
            self.windows.append(info["window_ns"] / 1e6)

    def inject_uffd_helper(self):
        fd, info = uffd._inject_via_helper(uffd._HELPER, self.pid, self.pid, self.addr,
                                           self.flags, 2000, None)
        os.close(fd)

    def attach_uffd(self):
        Tracker(self.pid, method="uffd").detach()

    def close(self):
        os.close(self.pidfd)
        self.wl.kill()


@pytest.fixture(scope="module")
def bench():
    require(tracking_methods()["uffd"][0], "uffd tracking unavailable")
    b = Bench()
    yield b
    b.close()


@pytest.mark.parametrize("what", ["inject_getpid", "inject_uffd", "inject_uffd_helper",
                                  "attach_uffd"])
def test_inject_cost(benchmark, bench, what):
    benchmark(getattr(bench, what))


def main(n=200):
    b = Bench()
    try:
        print(f"tracker ballast {TRACKER_MB} MiB, {n} runs each, ms")
        print("| what | min | median | p90 |")
        print("|---|---|---|---|")
        whats = ["inject_getpid", "inject_uffd", "attach_uffd"]
        if os.access(uffd._HELPER, os.X_OK):
            whats.insert(2, "inject_uffd_helper")
        for what in whats:
            f = getattr(b, what)
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                f()
                ts.append((time.perf_counter() - t0) * 1e3)
            ts.sort()
            print(f"| {what} | {ts[0]:.3f} | {statistics.median(ts):.3f} | "
                  f"{ts[int(n * 0.9)]:.3f} |")
        if b.windows:
            w = sorted(b.windows)
            print(f"| window (signals ours .. detached) | {w[0]:.3f} | "
                  f"{statistics.median(w):.3f} | {w[int(len(w) * 0.9)]:.3f} |")
    finally:
        b.close()


if __name__ == "__main__":
    main()
