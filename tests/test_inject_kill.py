"""A tracker SIGKILLed inside the ptrace injection of userfaultfd() must not harm the
target (issue 10, item 8): the target stays alive, not stopped, not traced, with its
signal mask, its pending signals delivered, and its computation going on exactly.

The kill lands deterministically inside the injection through the injector's test
hook (STATESYNC_TEST_INJECT_PAUSE=POINT:MS:FD, see tracking/uffd.py): it writes one
byte to FD at POINT and pauses there, and the test kills the tracker then. Trackers
are forked from one python that imported statesync already (a fresh interpreter per
kill would cost most of the test's time)."""
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from conftest import require
from statesync import _core, proc
from statesync.tracking import tracking_methods

# Three threads computing an LCG chain each, with their own signal masks, a SIGUSR1
# handler, and a thread reading stdin that, per line, checks every chain against an
# independent recomputation from the last checked point. The main thread (the one
# injected into) is blocked in that read(2), or with "busy" computes chain 0.
TARGET = r"""
import json, signal, sys, threading, time
M = (1 << 61) - 1
lock = threading.Lock()
state = [[0, 1 + i] for i in range(3)]
usr1 = [0]
signal.signal(signal.SIGUSR1, lambda s, f: usr1.__setitem__(0, usr1[0] + 1))
busy = sys.argv[1:] == ["busy"]
started = threading.Barrier(3 if busy else 4)   # every thread's mask set before "ready"
def step(x):
    return (x * 48271 + 11) % M
def setmask(i):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2, signal.SIGWINCH + i})
def work(i):
    n, x = 0, 1 + i
    while True:
        for _ in range(500):
            x = step(x)
            n += 1
        with lock:
            state[i] = [n, x]
        time.sleep(0.001)
def worker(i):
    setmask(i)
    started.wait()
    work(i)
checked = [[0, 1 + i] for i in range(3)]
def serve():
    for line in sys.stdin:
        with lock:
            snap = [list(s) for s in state]
        ok = True
        for i, (n, x) in enumerate(snap):
            n0, x0 = checked[i]
            for _ in range(n - n0):
                x0 = step(x0)
            ok = ok and x0 == x
            checked[i] = [n, x]
        print(json.dumps({"n": [s[0] for s in snap], "ok": ok, "usr1": usr1[0]}), flush=True)
for i in range(1 if busy else 0, 3):
    threading.Thread(target=worker, args=(i,), daemon=True).start()
if busy:
    setmask(0)
started.wait()
if busy:            # the main thread (the one injected into) computes
    threading.Thread(target=serve, daemon=True).start()
    print("ready", flush=True)
    work(0)
else:               # the main thread is blocked in read(2)
    print("ready", flush=True)
    serve()
"""

# Forks one tracker per request "PID POINT MS FD"; answers with the tracker's pid.
# Each tracker is its own process group (so a kill of the group is tested too).
FACTORY = r"""
import os, sys, time
from statesync.tracking import Tracker
import statesync.tracking.uffd
print("ready", flush=True)
for line in sys.stdin:
    pid, point, ms, fd = line.split()
    child = os.fork()
    if child == 0:
        os.setpgid(0, 0)
        os.environ["STATESYNC_TEST_INJECT_PAUSE"] = f"{point}:{ms}:{fd}"
        try:
            t = Tracker(int(pid), method="uffd")
            os.write(int(fd), b"A")   # attached: the kill came too late
            time.sleep(60)
        finally:
            os._exit(0)
    print(child, flush=True)
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
"""

POINTS = ["stopped", "masked", "in_call", "after_call", "in_close", "put_back"]
PAUSE_MS = 150


def _env(injector=None):
    env = dict(os.environ)
    env.pop("STATESYNC_INJECTOR", None)
    if injector:
        env["STATESYNC_INJECTOR"] = injector
    src = os.path.dirname(os.path.dirname(os.path.abspath(_core.__file__)))
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("STATESYNC_TEST_INJECT_PAUSE", None)
    return env


def _start(code, *args):
    p = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def _ask(target):
    """The target's progress report, or None when it died."""
    try:
        target.stdin.write("?\n")
        target.stdin.flush()
    except BrokenPipeError:
        return None
    r, _, _ = select.select([target.stdout], [], [], 10)
    assert r, "the target does not answer"
    line = target.stdout.readline()
    return json.loads(line) if line else None


def _death(target):
    target.wait(5)
    rc = target.returncode
    return f"died of {signal.Signals(-rc).name}" if rc < 0 else f"exited {rc}"


def _threads(pid):
    """{tid: (state letter, TracerPid, SigBlk)} of every thread."""
    out = {}
    for tid in proc.threads(pid):
        try:
            st = proc.status(tid, procfs=f"{proc.PROCFS}/{pid}/task")
        except Exception:
            continue
        out[tid] = (st.get("State", "?")[:1], st.get("TracerPid"), st.get("SigBlk"))
    return out


def _uffds(pid):
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += "userfaultfd" in os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return n


def _settle(target, timeout=10.0):
    """Wait until no thread of the target is traced or in a ptrace stop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if target.poll() is not None:
            return None
        th = _threads(target.pid)
        if all(tr == "0" and s not in "tT" for s, tr, _ in th.values()):
            return th
        time.sleep(0.01)
    return _threads(target.pid)


def _comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _one_kill(factory, target, point, group, r_fd, w_fd, injector_mode):
    """One tracker killed at point. Returns None when the target came out whole,
    else what was wrong with it."""
    before = _threads(target.pid)
    first = _ask(target)
    assert first and first["ok"]
    factory.stdin.write(f"{target.pid} {point} {PAUSE_MS} {w_fd}\n")
    factory.stdin.flush()
    tracker = int(factory.stdout.readline())
    r, _, _ = select.select([r_fd], [], [], 30)
    assert r, f"the tracker never reached pause point {point}"
    got = os.read(r_fd, 1)
    assert got == bytes([_core.INJECT_PAUSE_POINTS[point]]), got
    injector = int(proc.status(target.pid)["TracerPid"])
    helper = int(proc.status(injector).get("PPid", 0) or 0)
    if injector_mode == "helper":   # the tracer is the helper's injector task
        assert _comm(helper).startswith("statesync-inje"), (injector, helper, _comm(helper))
    else:                           # ... or the tracker's own
        assert helper == tracker, (injector, helper, tracker)
    os.kill(target.pid, signal.SIGUSR1)      # must be held, then delivered
    if group:
        os.killpg(tracker, signal.SIGKILL)   # the tracker's whole process group
        if injector_mode == "helper":
            os.kill(helper, signal.SIGKILL)  # and the helper: its injector task lives on
    else:
        os.kill(tracker, signal.SIGKILL)
    after = _settle(target)
    time.sleep(0.1)    # a thread detached with borrowed registers dies soon after
    if after is None or target.poll() is not None:
        return _death(target)
    bad = [f"tid {t}: state {s} TracerPid {tr}" for t, (s, tr, _) in after.items()
           if tr != "0" or s in "tT"]
    if bad:
        return "left traced/stopped: " + ", ".join(bad)
    masks = {t: b for t, (_, _, b) in after.items()}
    changed = [f"tid {t}: SigBlk {before[t][2]} -> {masks[t]}" for t in before
               if t in masks and masks[t] != before[t][2]]
    if changed:
        return "signal mask changed: " + ", ".join(changed)
    time.sleep(0.05)
    now = _ask(target)
    if now is None:
        return _death(target)
    if not now["ok"]:
        return "its computation went wrong"
    if not all(b > a for a, b in zip(first["n"], now["n"])):
        return f"stopped computing: {first['n']} -> {now['n']}"
    if now["usr1"] <= first["usr1"]:
        return "the SIGUSR1 sent during the injection was lost"
    if _uffds(target.pid):
        return "a userfaultfd descriptor was left in it"
    # the injector is gone (or a zombie nobody reaps), never left running
    if injector and proc.exists(injector) and proc.state(injector) not in ("Z", "X", None):
        deadline = time.monotonic() + 5
        while proc.exists(injector) and proc.state(injector) not in ("Z", "X", None):
            if time.monotonic() > deadline:
                return f"injector {injector} still running"
            time.sleep(0.01)
    return None


@pytest.mark.parametrize("injector_mode", ["helper", "inprocess"])
def test_tracker_killed_inside_the_injection_leaves_the_target_whole(injector_mode):
    require(tracking_methods()["uffd"][0], "uffd tracking unavailable")
    require(hasattr(_core, "inject_test_pause"), "the injector has no test hook")
    if injector_mode == "helper":
        from statesync.tracking import uffd
        require(os.access(uffd._HELPER, os.X_OK), "the statesync-injector helper is not built")
    rounds = int(os.environ.get("STATESYNC_INJECT_KILL_ROUNDS", "3"))
    r_fd, w_fd = os.pipe()
    factory = subprocess.Popen([sys.executable, "-c", FACTORY], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=_env(injector_mode),
                               pass_fds=(w_fd,), start_new_session=True)
    target = None
    results = []
    try:
        assert factory.stdout.readline().strip() == "ready"
        k = 0
        for rnd in range(rounds):
            # odd rounds: the injected main thread is computing, not blocked in read
            mode = ("busy",) if rnd % 2 else ()
            if target is not None:
                target.kill()
                target.wait()
            target = _start(TARGET, *mode)
            for point in POINTS:
                if target.poll() is not None:      # (measuring a broken injector)
                    target = _start(TARGET, *mode)
                group = (k + k // len(POINTS)) % 2 == 1   # each point both ways
                why = _one_kill(factory, target, point, group, r_fd, w_fd, injector_mode)
                results.append((point + (" busy" if mode else ""),
                                "pgrp" if group else "pid", why))
                k += 1
    finally:
        for p in (factory, target):
            if p is not None:
                p.kill()
                p.wait()
        os.close(r_fd)
        os.close(w_fd)
    bad = [r for r in results if r[2]]
    print(f"{len(bad)} of {len(results)} kills harmed the target")
    assert not bad, f"{len(bad)} of {len(results)} kills harmed the target: " + "; ".join(
        f"{p} ({how}): {why}" for p, how, why in bad)


def test_injector_that_cannot_start_is_a_one_line_error():
    """clone() refused (EAGAIN at the process limit, ENOMEM): stage 0, nothing was done
    to the target; the error says so, not "stopped by job control"."""
    from statesync import errors
    from statesync.tracking.uffd import _UffdBackend
    exc = OSError(11, os.strerror(11))
    exc.inject_info = {"stage": 0, "restored": False}
    me = os.getpid()     # (exists: the error is not ProcessGone)
    with pytest.raises(errors.TrackerUnavailable) as ei:
        _UffdBackend._raise_inject_error(me, exc)
    msg = str(ei.value)
    assert "injector task" in msg and "ulimit -u" in msg and "\n" not in msg
    assert "job control" not in msg


def _new_memcg(limit):
    """A fresh memory cgroup (v1 or v2) below our own, limited to `limit` bytes with no
    swap, or None when there is none we may create."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = [ln.rstrip("\n").split(":", 2) for ln in f]
    except OSError:
        return None
    name = f"statesync-inject-oom-{os.getpid()}"
    for _, ctrls, path in lines:
        if "memory" in ctrls.split(","):   # v1
            d = os.path.join("/sys/fs/cgroup/memory" + path, name)
            files = {"memory.limit_in_bytes": limit, "memory.memsw.limit_in_bytes": limit}
            break
    else:
        v2 = [p for _, c, p in lines if c == ""]
        if not v2:
            return None
        base = next((m for m in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")
                     if os.path.exists(os.path.join(m, "cgroup.controllers"))), None)
        if base is None:
            return None
        d = os.path.join(base + v2[0], name)
        files = {"memory.max": limit, "memory.swap.max": 0}
    try:
        os.mkdir(d)
        for k, v in files.items():
            p = os.path.join(d, k)
            if os.path.exists(p):
                with open(p, "w") as f:
                    f.write(str(v))
        with open(os.path.join(d, next(iter(files)))) as f:
            if int(f.read().split()[0]) > limit:
                raise OSError("limit not taken")
    except OSError:
        try:
            os.rmdir(d)
        except OSError:
            pass
        return None
    return d


TRACKER_IN_CGROUP = r"""
import os, sys, time
cg, pid, spec, fd = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
with open(os.path.join(cg, "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
with open("/proc/self/oom_score_adj", "w") as f:
    f.write("1000")                      # the OOM killer's first choice
from statesync.tracking import Tracker
import statesync.tracking.uffd
os.environ["STATESYNC_TEST_INJECT_PAUSE"] = spec
t = Tracker(pid, method="uffd")
os.write(fd, b"A")
time.sleep(60)
"""

HOG = r"""
import os, sys
with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
keep = [bytearray(16 << 20) for _ in range(64)]   # 1 GiB: past any limit below
"""


def test_oom_kill_of_the_tracker_inside_the_injection_leaves_the_target_whole():
    """The tracker, paused inside userfaultfd() in the target, is OOM-killed (its own
    memory cgroup, oom_score_adj 1000, a hog allocating past the limit): with the
    helper, the injection completes and the target runs on whole. (The in-process
    injector task shares the tracker's memory and dies with it: SIGSEGV.)"""
    from conftest import have_root
    from statesync.tracking import uffd
    require(tracking_methods()["uffd"][0], "uffd tracking unavailable")
    require(os.access(uffd._HELPER, os.X_OK), "the statesync-injector helper is not built")
    require(have_root(), "needs root for a memory cgroup")
    cg = _new_memcg(256 << 20)
    require(cg is not None, "needs a memory cgroup (v1 or v2) it may create below its own")
    r_fd, w_fd = os.pipe()
    target = tracker = hog = None
    try:
        target = _start(TARGET)
        before = _threads(target.pid)
        first = _ask(target)
        tracker = subprocess.Popen(
            [sys.executable, "-c", TRACKER_IN_CGROUP, cg, str(target.pid),
             f"in_call:3000:{w_fd}", str(w_fd)],
            env=_env("helper"), pass_fds=(w_fd,), start_new_session=True)
        r, _, _ = select.select([r_fd], [], [], 30)
        assert r and os.read(r_fd, 1) == bytes([_core.INJECT_PAUSE_POINTS["in_call"]])
        hog = subprocess.Popen([sys.executable, "-c", HOG, cg], start_new_session=True)
        tracker.wait(60)
        assert tracker.returncode == -signal.SIGKILL, tracker.returncode
        hog.wait(60)
        after = _settle(target)
        time.sleep(0.1)
        assert after is not None and target.poll() is None, _death(target)
        assert all(tr == "0" and s not in "tT" for s, tr, _ in after.values()), after
        assert {t: b for t, (_, _, b) in after.items() if t in before} == \
            {t: b for t, (_, _, b) in before.items() if t in after}
        time.sleep(0.05)
        now = _ask(target)
        assert now and now["ok"] and all(b > a for a, b in zip(first["n"], now["n"]))
        assert not _uffds(target.pid)
    finally:
        for p in (tracker, hog, target):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        os.close(r_fd)
        os.close(w_fd)
        deadline = time.monotonic() + 10
        while True:
            try:
                os.rmdir(cg)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def test_helper_killed_inside_the_injection_is_one_error_and_harms_nothing(monkeypatch):
    """SIGKILL of the helper itself (the tracker lives): its injector task finishes the
    injection on its own; the tracker gets one InjectionFailed saying so."""
    from statesync import errors
    from statesync.tracking import Tracker, uffd
    require(tracking_methods()["uffd"][0], "uffd tracking unavailable")
    require(os.access(uffd._HELPER, os.X_OK), "the statesync-injector helper is not built")
    target = _start(TARGET)
    r_fd, w_fd = os.pipe()
    monkeypatch.delenv("STATESYNC_INJECTOR", raising=False)
    monkeypatch.setenv("STATESYNC_TEST_INJECT_PAUSE", f"in_call:300:{w_fd}")
    os.set_inheritable(w_fd, True)
    try:
        before = _threads(target.pid)
        first = _ask(target)
        import threading

        def kill_helper():
            if select.select([r_fd], [], [], 30)[0]:
                os.read(r_fd, 1)
                inj = int(proc.status(target.pid)["TracerPid"])
                os.kill(int(proc.status(inj)["PPid"]), signal.SIGKILL)
        k = threading.Thread(target=kill_helper)
        k.start()
        with pytest.raises(errors.InjectionFailed) as ei:
            Tracker(target.pid, method="uffd")
        k.join()
        msg = str(ei.value)
        assert "without an answer" in msg and "\n" not in msg
        after = _settle(target)
        assert after is not None and target.poll() is None
        assert {t: b for t, (_, _, b) in after.items() if t in before} == \
            {t: b for t, (_, _, b) in before.items() if t in after}
        now = _ask(target)
        assert now and now["ok"] and all(b > a for a, b in zip(first["n"], now["n"]))
        assert not _uffds(target.pid)
    finally:
        target.kill()
        target.wait()
        os.close(r_fd)
        os.close(w_fd)
