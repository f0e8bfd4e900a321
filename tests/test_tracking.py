"""Trackers on real processes: the workload generator says exactly which pages it
wrote (take_written), and each method must never miss one of them."""
import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import have_root, require
from statesync import _core, errors, proc, tracking
import statesync.tracking.uffd  # noqa: F401
from statesync.tracking import DirtySet, Tracker, tracking_methods

PS = proc.PAGE_SIZE


def _available():
    return [m for m, (ok, _) in tracking_methods().items() if ok]


def _need(method):
    """uffd must work here (a CI failure otherwise); hash always works."""
    ok, why = tracking_methods()[method]
    require(ok, f"{method} tracking unavailable: {why}")


def _check_softdirty_unavailable(pid):
    """On a kernel without soft-dirty (CONFIG_MEM_SOFT_DIRTY off, as on this
    project's machines): tracking_methods says so and why, an explicit request
    is a TrackerUnavailable with that reason, and auto never picks it."""
    ok, why = tracking_methods()["softdirty"]
    assert not ok and "SOFT_DIRTY" in why
    with pytest.raises(errors.TrackerUnavailable) as ei:
        Tracker(pid, method="softdirty")
    assert ei.value.method == "softdirty" and ei.value.reason == why
    with Tracker(pid) as t:
        assert t.method != "softdirty"
        if t.method == "hash":
            assert t.fallbacks["softdirty"] == why


def _ranges(st):
    return [(a, a + n) for a, n in st["mappings"]]


def _within(pages, ranges):
    keep = np.zeros(pages.size, dtype=bool)
    for a, b in ranges:
        keep |= (pages >= a) & (pages < b)
    return pages[keep]


def test_tracking_methods_say_what_works_and_why():
    m = tracking_methods()
    assert list(m) == ["uffd", "softdirty", "hash"]
    for _name, (ok, why) in m.items():
        assert isinstance(ok, bool) and why
    assert m["hash"][0]
    require(m["uffd"][0], f"uffd tracking unavailable: {m['uffd'][1]}")
    with open("/proc/self/clear_refs", "w") as f:  # what the softdirty probe relies on
        f.write("4")
    if not m["softdirty"][0]:
        assert "soft" in m["softdirty"][1].lower()


def test_auto_picks_the_best_available(spawn_workload):
    wl = spawn_workload(size="2M", rate=100)
    with Tracker(wl.pid) as t:
        best = _available()[0]
        assert t.method == best
        if best != "uffd":
            assert "uffd" in t.fallbacks


@pytest.mark.parametrize("method", ["uffd", "hash", "softdirty"])
def test_no_written_page_is_ever_missed(spawn_workload, method):
    """Many rounds under a running write load, collect racing the writes, new
    mappings added between rounds; the union of collects covers the union of
    writes, and with writes paused the final round equals them exactly (uffd).
    softdirty where the kernel lacks it: its unavailability is checked instead."""
    wl = spawn_workload(size="16M", rate=4000, paused=True)
    if method == "softdirty" and not tracking_methods()["softdirty"][0]:
        _check_softdirty_unavailable(wl.pid)
        return
    _need(method)
    c = wl.client
    with Tracker(wl.pid, method=method) as t:
        assert t.method == method
        c.take_written()
        c.resume()
        got, want = [], []
        for rnd in range(12):
            time.sleep(0.05)
            if rnd in (3, 7):
                c.map(f"{(rnd + 1) * 64}K")
            got.append(t.collect().pages)
            want.append(c.take_written())
        c.pause()
        got.append(t.collect().pages)
        want.append(c.take_written())
        ranges = _ranges(c.status())
        assert len(ranges) == 3
        all_got = _within(np.unique(np.concatenate(got)), ranges)
        all_want = np.unique(np.concatenate(want))
        assert all_want.size > 1000
        missed = np.setdiff1d(all_want, all_got)
        assert missed.size == 0, f"{method} missed {missed.size} written pages"
        if method != "hash":
            # Only the generator's rate writes touch its first buffer after attach:
            # nothing else may show up there. (New mappings also report the pages
            # their initial fill wrote, which take_written does not list.)
            first = ranges[:1]
            assert np.array_equal(_within(all_got, first), _within(all_want, first))
        # Paused: one more write of known pages, then an exact round.
        npages = c.status()["npages"]
        idx = [0, 1, 2, npages // 2, npages - 1]
        c.take_written()
        c.write(idx)
        d = t.collect()
        w = c.take_written()
        assert w.size == 5
        assert np.array_equal(_within(d.pages, ranges), w)
        if method == "uffd":
            assert np.array_equal(_within(t.collect().pages, ranges), np.zeros(0, np.uint64))


def test_uffd_round_is_exact_for_anonymous_memory(spawn_workload):
    _need("uffd")
    wl = spawn_workload(size="8M", rate=0, fill="zero")   # untouched pages: unpopulated
    c = wl.client
    with Tracker(wl.pid, method="uffd") as t:
        info = t.info
        assert info["registered_vmas"] > 0 and info["inject"]["ncalls"] == 2
        rng = np.random.default_rng(3)
        npages = c.status()["npages"]
        ranges = _ranges(c.status())
        for _ in range(5):
            idx = np.unique(rng.integers(0, npages, 300))
            c.write(idx.tolist())
            d = t.collect()
            assert np.array_equal(_within(d.pages, ranges), c.take_written())


def test_checksum_after_detach_and_target_keeps_running(spawn_workload):
    require(tracking_methods()["uffd"][0], "uffd tracking unavailable")
    wl = spawn_workload(size="8M", rate=3000)
    c = wl.client
    for method in ("uffd", "hash"):
        c.pause()
        before = c.checksum()
        seq0 = c.status()["seq"]
        with Tracker(wl.pid, method=method) as t:
            t.collect()
        assert c.checksum() == before       # tracking changed nothing the target sees
        c.resume()
        time.sleep(0.2)
        assert c.status()["seq"] > seq0     # and it keeps writing
    assert wl.alive()


def _fds(pid):
    # The workload serves each control request on its own short connection:
    # let the last one close before looking.
    time.sleep(0.2)
    return sorted(os.listdir(f"/proc/{pid}/fd"))


def test_attach_detach_100_times_on_a_busy_target_leaks_nothing(spawn_workload):
    _need("uffd")
    wl = spawn_workload(size="16M", rate=20000)
    c = wl.client
    c.pause()
    target_fds, our_fds = _fds(wl.pid), _fds(os.getpid())
    nvmas = len(proc.read_maps(wl.pid))
    c.resume()
    for i in range(100):
        with Tracker(wl.pid, method="uffd") as t:
            if i % 10 == 0:
                t.collect()
        assert proc.status(wl.pid)["TracerPid"] == "0"
    c.pause()
    time.sleep(0.05)
    assert _fds(wl.pid) == target_fds
    assert _fds(os.getpid()) == our_fds
    # registering and unregistering whole VMAs must not leave them split
    assert abs(len(proc.read_maps(wl.pid)) - nvmas) <= 2
    # and no uffd-wp bit is left behind on the buffer
    st = c.status()
    pm = proc.pagemap(wl.pid, st["addr"], st["addr"] + st["size"])
    assert not pm.uffd_wp.any()
    c.resume()
    assert wl.alive() and c.status()["seq"] > 0


def _blocked(cmd, stdin=subprocess.PIPE):
    p = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:   # wait until it sleeps in its system call
        try:
            with open(f"/proc/{p.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "S":
                    with open(f"/proc/{p.pid}/syscall") as f2:
                        if f2.read().split()[0] not in ("running", "-1"):
                            break
        except OSError:
            pass
        time.sleep(0.01)
    time.sleep(0.05)
    return p


def test_target_blocked_in_read_gets_its_read_back():
    """ERESTARTSYS: `head` blocked in read(2) must see the bytes written after
    we attached and detached, as if nothing happened."""
    _need("uffd")
    p = _blocked(["head", "-c", "6"])
    try:
        with Tracker(p.pid, method="uffd") as t:
            info = t.info["inject"]
            assert info["was_in_syscall"] and info["orig_syscall"] == 0  # read
            assert info["orig_ret"] == -512                              # -ERESTARTSYS
            t.collect()
        out, err = p.communicate(b"hello\n", timeout=10)
        assert (p.returncode, out, err) == (0, b"hello\n", b"")
    finally:
        p.kill()
        p.wait()


def test_target_blocked_in_nanosleep_sleeps_its_full_time():
    """ERESTART_RESTARTBLOCK: `sleep` in clock_nanosleep restarts through
    restart_syscall and still exits 0 after its full time."""
    _need("uffd")
    t0 = time.monotonic()
    p = _blocked(["sleep", "1.5"], stdin=subprocess.DEVNULL)
    try:
        for _ in range(3):
            with Tracker(p.pid, method="uffd") as t:
                assert t.info["inject"]["was_in_syscall"]
                assert t.info["inject"]["orig_ret"] == -516   # -ERESTART_RESTARTBLOCK
        out, err = p.communicate(timeout=10)
        dt = time.monotonic() - t0
        assert (p.returncode, err) == (0, b"")
        assert 1.45 <= dt < 4.0
    finally:
        p.kill()
        p.wait()


def test_signals_arriving_during_attach_are_delivered():
    """A handled signal sent while we inject is held pending, then delivered."""
    _need("uffd")
    code = ("import signal, sys, time\n"
            "n = 0\n"
            "def h(*a):\n global n; n += 1\n"
            "signal.signal(signal.SIGUSR1, h)\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n"
            "print('got', n, flush=True)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        sent = 0
        for _ in range(40):
            with Tracker(p.pid, method="uffd"):
                os.kill(p.pid, signal.SIGUSR1)
                sent += 1
            time.sleep(0.01)
        out, _ = p.communicate("", timeout=20)
        assert p.returncode == 0, out
        n = int(out.split()[1])
        # Python runs its handler once for signals that arrive back to back, so
        # a few may merge; a lost signal would show as far fewer.
        assert sent // 2 <= n <= sent
    finally:
        p.kill()
        p.wait()


# --------------------------------------------------------------------------- faults


def test_no_such_process():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    for method in ("auto", "uffd", "hash"):
        with pytest.raises(errors.NoSuchProcess) as ei:
            Tracker(p.pid, method=method)
        assert ei.value.pid == p.pid


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown tracking method"):
        Tracker(os.getpid(), method="magic")


def test_softdirty_works_or_says_why(spawn_workload):
    wl = spawn_workload(size="1M", rate=0)
    if not tracking_methods()["softdirty"][0]:
        _check_softdirty_unavailable(wl.pid)
        return
    with Tracker(wl.pid, method="softdirty") as t:
        assert t.method == "softdirty"
        t.collect()
        wl.client.write([3])
        pages = t.collect().pages
        assert int(wl.client.take_written()[-1]) in set(pages.tolist())


@pytest.mark.parametrize("method", ["uffd", "hash"])
def test_target_exits_mid_tracking(spawn_workload, method):
    _need(method)
    wl = spawn_workload(size="2M", rate=500)
    t = Tracker(wl.pid, method=method)
    t.collect()
    wl.kill()
    with pytest.raises(errors.ProcessGone) as ei:
        t.collect()
    assert ei.value.pid == wl.pid
    t.detach()
    t.detach()


@pytest.mark.parametrize("method", ["uffd", "hash"])
def test_target_execs_mid_tracking(method):
    _need(method)
    r, w = os.pipe()
    code = ("import os, sys\n"
            "buf = bytearray(1 << 20)\n"
            "os.read(int(sys.argv[1]), 1)\n"
            "os.execvp('sleep', ['sleep', '30'])\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(r)], pass_fds=(r,))
    os.close(r)
    try:
        time.sleep(0.5)
        t = Tracker(p.pid, method=method)
        t.collect()
        os.write(w, b"x")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(f"/proc/{p.pid}/cmdline", "rb") as f:
                if f.read().startswith(b"sleep"):
                    break
            time.sleep(0.02)
        with pytest.raises(errors.ProcessGone, match="exec"):
            t.collect()
        t.detach()
        assert p.poll() is None
    finally:
        os.close(w)
        p.kill()
        p.wait()


def test_already_traced_target(spawn_workload):
    _need("uffd")
    import ctypes
    import threading
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    wl = spawn_workload(size="2M", rate=500)
    seized, release = threading.Event(), threading.Event()
    result = {}

    def tracer():  # the attachment ends when this thread exits
        result["tid"] = threading.get_native_id()
        result["rc"] = libc.ptrace(0x4206, wl.pid, None, None)  # PTRACE_SEIZE
        seized.set()
        release.wait(20)

    th = threading.Thread(target=tracer)
    th.start()
    try:
        seized.wait(10)
        assert result["rc"] == 0
        with pytest.raises(errors.AlreadyTraced) as ei:
            Tracker(wl.pid, method="uffd")
        assert ei.value.pid == wl.pid and ei.value.tracer == result["tid"]
        with Tracker(wl.pid) as t:          # auto falls back to hashing
            assert t.method == "hash" and "traced" in t.fallbacks["uffd"]
            t.collect()
    finally:
        release.set()
        th.join()
    time.sleep(0.05)
    assert proc.status(wl.pid)["TracerPid"] == "0"
    _assert_still_writing(wl)


def _assert_still_writing(wl, wait=0.3):
    """The workload writes at a known rate (>= 500 pages/s here): its sequence
    number must grow, so it really runs on."""
    seq0 = wl.client.status()["seq"]
    time.sleep(wait)
    seq1 = wl.client.status()["seq"]
    assert seq1 > seq0, f"pid {wl.pid} stopped writing (seq {seq0} -> {seq1})"


def test_stopped_target_is_left_stopped(spawn_workload):
    _need("uffd")
    wl = spawn_workload(size="2M", rate=500)
    os.kill(wl.pid, signal.SIGSTOP)
    try:
        time.sleep(0.1)
        with pytest.raises(errors.TrackerUnavailable, match="stopped"):
            Tracker(wl.pid, method="uffd")
        with Tracker(wl.pid) as t:
            assert t.method == "hash"
        assert proc.status(wl.pid)["State"].startswith("T")
    finally:
        os.kill(wl.pid, signal.SIGCONT)
    time.sleep(0.1)
    _assert_still_writing(wl)


def test_injected_call_past_the_timeout_leaves_the_target_whole(spawn_workload):
    """pause() injected with a 300 ms timeout never returns by itself: the thread
    is running inside it when the wait gives up. It must get its registers and
    signal mask back and run on (the workload keeps writing and answering), and
    the error maps to InjectionFailed saying it was restored, never retried."""
    _need("uffd")
    wl = spawn_workload(size="2M", rate=500)
    wl.client.status()
    vdso = [v for v in proc.read_maps(wl.pid) if v.path == "[vdso]"][0]
    addr = _core.find_syscall_insn(wl.pid, vdso.start, vdso.end)
    blocked = proc.status(wl.pid)["SigBlk"]
    with pytest.raises(OSError) as ei:
        _core.inject_syscall(wl.pid, addr, 34, (), timeout_ms=300)  # SYS_pause
    exc = ei.value
    assert exc.errno == errno.ETIMEDOUT
    assert exc.inject_info["stage"] == _core.INJECT_STAGE_CALL
    assert exc.inject_info["restored"] is True
    st = proc.status(wl.pid)
    assert st["TracerPid"] == "0" and st["SigBlk"] == blocked
    _assert_still_writing(wl)
    assert tracking.uffd._calls_began(exc)
    with pytest.raises(errors.InjectionFailed) as ei2:
        tracking.uffd._UffdBackend._raise_inject_error(wl.pid, exc)
    assert ei2.value.restored and ei2.value.pid == wl.pid and ei2.value.cause is exc
    assert "put back" in str(ei2.value) and "not retried" in str(ei2.value)
    assert isinstance(ei2.value, errors.TrackingError)
    with Tracker(wl.pid, method="uffd") as t:   # and it can be tracked afterwards
        t.collect()
        time.sleep(0.1)
        assert t.collect().pages.size > 0


def test_unprivileged_tracker_gets_access_denied(spawn_workload):
    require(have_root(), "needs root to drop to another user")
    wl = spawn_workload(size="1M", rate=0)
    from test_proc import _as_nobody

    def attempt():
        out = []
        for method in ("uffd", "hash"):
            try:
                Tracker(wl.pid, method=method)
                out.append("attached")
            except errors.AccessDenied as exc:
                out.append(f"denied {exc.pid}")
        return ",".join(out)

    assert _as_nobody(attempt) == f"denied {wl.pid},denied {wl.pid}"
    assert proc.status(wl.pid)["TracerPid"] == "0"


def test_collect_after_detach_is_an_error(spawn_workload):
    wl = spawn_workload(size="1M", rate=0)
    t = Tracker(wl.pid, method="hash")
    t.detach()
    with pytest.raises(errors.TrackingError, match="detached"):
        t.collect()


def test_dirtyset_from_collect_is_sorted_and_unique(spawn_workload):
    wl = spawn_workload(size="4M", rate=5000)
    with Tracker(wl.pid) as t:
        time.sleep(0.1)
        d = t.collect()
    assert isinstance(d, DirtySet) and len(d) > 0
    assert d.pages.dtype == np.uint64 and np.all(np.diff(d.pages.astype(np.int64)) > 0)
    assert np.all(d.pages % PS == 0) and d.nbytes == len(d) * PS


def test_tracking_our_own_process():
    """No injection for ourselves: the userfaultfd is created directly."""
    _need("uffd")
    import mmap
    m = mmap.mmap(-1, 64 * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf = np.frombuffer(m, dtype=np.uint8)
    base = buf.ctypes.data
    buf[::PS] = 1
    with Tracker(os.getpid()) as t:
        assert t.method == "uffd"
        buf[[3 * PS, 40 * PS + 9]] = 2
        d = t.collect()
        assert d.within(base, base + 64 * PS).pages.tolist() == [base + 3 * PS, base + 40 * PS]
    assert not proc.pagemap(os.getpid(), base, base + 64 * PS).uffd_wp.any()
    del buf
    m.close()


def test_cpu_bound_target_computes_the_right_answer():
    """Stopped in the middle of user code many times: registers restored exactly."""
    _need("uffd")
    code = "s = 0\nfor i in range(6_000_000):\n    s = (s * 31 + i * i) % 1000000007\nprint(s)\n"
    want = {}
    exec(code.replace("print(s)", "want['s'] = s"), {"want": want})
    p = subprocess.Popen([sys.executable, "-c", "print('go', flush=True)\n" + code],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "go\n"   # past exec and start-up: computing now
    attached = 0
    try:
        while p.poll() is None and attached < 200:
            try:
                with Tracker(p.pid, method="uffd") as t:
                    t.collect()
                    attached += 1
            except errors.StateSyncError:
                try:  # only acceptable because it is exiting right now
                    p.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    raise
                break
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0 and int(out) == want["s"]
        assert attached >= 10, attached
    finally:
        p.kill()
        p.wait()


def test_vma_replaced_in_place_is_registered_again():
    """munmap + mmap(MAP_FIXED) of the same range gives an identical maps line but a
    new, unregistered VMA: the scan's CHECK_WPASYNC notices, the tracker registers
    it again and reports its pages; a page dropped with MADV_DONTNEED is reported
    too (its content became zeros without a write)."""
    _need("uffd")
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    n = 32
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    # PROT_NONE guard pages on both sides: the VMA can never merge with a neighbour
    guard = libc.mmap(None, (n + 2) * PS, 0, flags, -1, 0)  # PROT_NONE
    assert guard not in (None, ctypes.c_void_p(-1).value)
    base = libc.mmap(guard + PS, n * PS, prot, flags | 0x10, -1, 0)  # MAP_FIXED
    assert base == guard + PS
    try:
        view = (ctypes.c_uint8 * (n * PS)).from_address(base)
        for i in range(n):
            view[i * PS] = 1
        with Tracker(os.getpid(), method="uffd") as t:
            t.collect()
            view[2 * PS] = 5
            assert t.collect().within(base, base + n * PS).pages.tolist() == [base + 2 * PS]
            assert libc.madvise(base + 7 * PS, PS, 4) == 0          # MADV_DONTNEED
            assert t.collect().within(base, base + n * PS).pages.tolist() == [base + 7 * PS]
            lines = open("/proc/self/maps").read()
            assert libc.munmap(base, n * PS) == 0
            again = libc.mmap(base, n * PS, prot, flags | 0x10, -1, 0)  # MAP_FIXED
            assert again == base
            for i in (0, 9, 31):
                view[i * PS] = 3
            assert open("/proc/self/maps").read().count(f"{base:x}-") == \
                lines.count(f"{base:x}-")
            got = t.collect().within(base, base + n * PS).pages.tolist()
            # every page changed: three written, the other 29 now read as zeros
            assert got == [base + i * PS for i in range(n)]
            assert t.info["rescans"] >= 1
            view[4 * PS] = 1
            assert t.collect().within(base, base + n * PS).pages.tolist() == [base + 4 * PS]
        assert not proc.pagemap(os.getpid(), base, base + n * PS).uffd_wp.any()
    finally:
        libc.munmap(guard, (n + 2) * PS)
