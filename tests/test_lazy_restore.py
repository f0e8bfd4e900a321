"""statesync's own lazy-pages daemon against the real `criu restore --lazy-pages`
(root, CRIU 4.2.1; CI fails when missing).

A full `criu dump` is turned into a restore set whose private anonymous pages are
PE_LAZY and absent from pages-N.img (write_lazy_image_set); CRIU restores the
rest and hands each task's userfaultfd to LazyPagesDaemon, which serves faults
and fills the remaining pages from the ORIGINAL dump's pages. The restored
process must hold exactly the memory it had at the dump, also when it forks,
mremaps, munmaps and MADV_DONTNEEDs while pages are still missing.
"""
import errno
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import pid_gone, require
from statesync import criu, proc
from statesync.migration import lazy
from statesync.migration.lazy import LazyPagesDaemon, LazyPagesError, lazy_restore
from statesync.testing import workloads


def _uffd_ok():
    from statesync import _core
    try:
        _core.lazy_uffd_probe()
        return True, ""
    except OSError as exc:
        return False, str(exc)


@pytest.fixture(scope="module")
def lazy_ok(criu_ok):
    ok, why = _uffd_ok()
    require(ok, f"userfaultfd with fork/remap/remove/unmap events: {why}")
    return criu_ok


@pytest.fixture(scope="module")
def workload_dump(lazy_ok, tmp_path_factory):
    """One 32 MiB workload, dumped once (full), plus its lazy restore set."""
    base = tmp_path_factory.mktemp("lazywl")
    wl = workloads.spawn("32M", 0, own_pidns=True, paused=True, seed=11)
    try:
        c = wl.client
        c.write(list(range(0, 8192, 5)))
        st = c.status()
        checksum = c.checksum()
        criu.dump(wl.pid, base / "full")  # the process is gone after this
    finally:
        wl.kill()
    res = lazy.write_lazy_image_set(base / "full", base / "lazy")
    return {"wl": wl, "status": st, "checksum": checksum, "full": str(base / "full"),
            "lazy": str(base / "lazy"), "res": res}


def test_lazy_image_set_marks_private_anonymous_pages(workload_dump):
    full = criu.ImageSet(workload_dump["full"])
    pid = full.root_pid
    lz = lazy.lazy_pages(workload_dump["lazy"], pid)
    st = workload_dump["status"]
    buf = full.addresses()[(full.addresses() >= st["addr"]) &
                           (full.addresses() < st["addr"] + st["size"])]
    # every dumped page of the workload's buffer is lazy, and nothing outside the dump
    assert np.isin(buf, lz).all()
    assert np.isin(lz, full.addresses()).all()
    res = workload_dump["res"]
    assert res.lazy_pages[pid] == lz.size
    assert res.stored_pages[pid] + lz.size == full.npages
    size = os.path.getsize(os.path.join(workload_dump["lazy"],
                                        f"pages-{full.pagemap().pages_id}.img"))
    assert size == res.stored_pages[pid] * 4096


def test_lazy_restore_brings_back_the_exact_memory(workload_dump, reap):
    full = criu.ImageSet(workload_dump["full"])
    rr, d = lazy_restore(workload_dump["lazy"], full)
    reap.append(rr.pid)
    st = d.wait(60)
    assert st.tasks == 1 and st.total_pages == workload_dump["res"].lazy_pages[full.root_pid]
    # every lazy page placed exactly once, on demand or in the background
    assert st.fault_copied + st.prefetch_copied + st.exist == st.total_pages
    assert st.prefetch_copied > 0 and st.unreachable == 0 and st.lost_exited == 0
    assert st.fill_s > 0 and st.latencies_ns.size == st.faults
    if st.faults:  # the resumed workload's threads usually fault before the fill is done
        assert st.fault_p99_ns >= st.fault_p50_ns > 0
    c = workloads.WorkloadClient(workload_dump["wl"].control)
    c.wait_ready(20)
    assert c.checksum() == workload_dump["checksum"]
    seq = c.status()["seq"]
    c.write([1, 2, 3])
    assert c.status()["seq"] == seq + 3
    assert not os.path.exists(os.path.join(workload_dump["lazy"], lazy.LAZY_SOCKET))


def test_missing_store_page_is_refused_before_restore(workload_dump):
    full = criu.ImageSet(workload_dump["full"])
    addrs, pages = full.addresses(), full.pages()
    lz = lazy.lazy_pages(workload_dump["lazy"], full.root_pid)
    keep = addrs != lz[len(lz) // 2]
    with pytest.raises(LazyPagesError) as ei:
        LazyPagesDaemon(workload_dump["lazy"], (addrs[keep], pages[keep]))
    assert f"{int(lz[len(lz) // 2]):#x}" in str(ei.value) and ei.value.pid == full.root_pid
    # with missing="zero" it is accepted (served as a zero page)
    LazyPagesDaemon(workload_dump["lazy"], (addrs[keep], pages[keep]), missing="zero")


def test_no_criu_connection_times_out(workload_dump, tmp_path):
    full = criu.ImageSet(workload_dump["full"])
    d = LazyPagesDaemon(workload_dump["lazy"], full, work_dir=tmp_path, accept_timeout=0.2)
    d.start()
    assert os.path.exists(tmp_path / lazy.LAZY_SOCKET)
    with pytest.raises(LazyPagesError) as ei:
        d.wait(10)
    assert "never connected" in str(ei.value) and not ei.value.unfilled
    assert not os.path.exists(tmp_path / lazy.LAZY_SOCKET)


def test_failed_restore_stops_the_daemon(workload_dump, tmp_path):
    # A restore set whose pagemap points at a missing pages file: CRIU connects,
    # fails, closes the socket; lazy_restore raises CriuError and stops the daemon.
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(workload_dump["lazy"], bad)
    for n in os.listdir(bad):
        if n.startswith("pages-"):
            os.unlink(bad / n)
    full = criu.ImageSet(workload_dump["full"])
    from statesync.errors import CriuError
    with pytest.raises(CriuError):
        lazy_restore(bad, full, timeout=60)


# ---------------------------------------------------------------- events during the fill

# A target of its own (the workload generator has no fork/mremap/munmap mode): maps
# NPAGES pages of seeded random bytes, writes its outer pid, and waits for a trigger
# file. Restored with the trigger present, it at once forks (the child checks its
# copy), MADV_DONTNEEDs, munmaps and mremaps parts of the buffer while the daemon is
# still filling, then checks every byte and writes a JSON verdict.
TARGET = textwrap.dedent(r'''
    import ctypes, json, mmap, os, sys, time
    import numpy as np
    NP = int(sys.argv[2]); PS = 4096; d = sys.argv[1]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mremap.restype = ctypes.c_void_p
    libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                            ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    base = libc.mmap(None, NP * PS, 3, 0x22, -1, 0)   # PROT_RW, MAP_PRIVATE|MAP_ANONYMOUS
    def view(addr, npages):
        return np.ctypeslib.as_array((ctypes.c_uint8 * (npages * PS)).from_address(addr)
                                     ).reshape(npages, PS)
    def expected(i0, i1):
        # pages [i0, i1): blocks of 1024 pages, block k from a generator seeded k
        out = np.empty((i1 - i0, PS), dtype=np.uint8)
        for k in range(i0 // 1024, (i1 + 1023) // 1024):
            blk = np.random.default_rng(k).integers(0, 256, size=(1024, PS), dtype=np.uint8)
            lo, hi = max(i0, k * 1024), min(i1, (k + 1) * 1024)
            out[lo - i0:hi - i0] = blk[lo - k * 1024:hi - k * 1024]
        return out
    buf = view(base, NP)
    buf[:] = expected(0, NP)
    trig = os.path.join(d, "go")
    if len(sys.argv) > 3 and sys.argv[3] == "tree":
        # a second task in the dumped tree: it shares the buffer copy-on-write and
        # rewrites one page of it, so its pagemap differs from its parent's
        if os.fork() == 0:
            buf[7, :8] = 0x5A
            while not os.path.exists(trig):
                time.sleep(0.001)
            want = expected(0, NP)
            want[7, :8] = 0x5A
            ok = bool((view(base, NP) == want).all())
            with open(os.path.join(d, "tree.tmp"), "w") as f:
                json.dump({"ok": ok}, f)
            os.rename(os.path.join(d, "tree.tmp"), os.path.join(d, "tree.json"))
            while True:
                time.sleep(1)
    with open(os.path.join(d, "pid"), "w") as f:
        for line in open("/proc/self/status"):
            if line.startswith("NSpid:"):
                f.write(line.split()[1])
    while not os.path.exists(trig):
        time.sleep(0.001)
    t0 = time.monotonic()
    bad = {}
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        ok = bool((view(base, NP) == expected(0, NP)).all())
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    a, b = NP // 16, NP // 8                          # DONTNEED [a, b)
    libc.madvise(base + a * PS, (b - a) * PS, 4)      # MADV_DONTNEED
    c, e = NP // 4, NP // 4 + NP // 16                # munmap [c, e)
    libc.munmap(base + c * PS, (e - c) * PS)
    m0, m1 = NP // 2, NP // 2 + NP // 8               # mremap [m0, m1) elsewhere
    dest = libc.mmap(None, (m1 - m0) * PS, 0, 0x22, -1, 0)   # a PROT_NONE reservation
    moved = libc.mremap(base + m0 * PS, (m1 - m0) * PS, (m1 - m0) * PS, 3, dest)  # MAYMOVE|FIXED
    ops_s = time.monotonic() - t0
    bad["dontneed_zero"] = bool((view(base + a * PS, b - a) == 0).all())
    bad["moved"] = moved not in (None, ctypes.c_void_p(-1).value) and bool(
        (view(moved, m1 - m0) == expected(m0, m1)).all())
    wrong = []
    for i0, i1 in ((0, a), (b, c), (e, m0), (m1, NP)):
        rows = (view(base + i0 * PS, i1 - i0) != expected(i0, i1)).any(axis=1)
        wrong += [i0 + int(i) for i in np.flatnonzero(rows)]
    bad["rest"] = not wrong
    bad["wrong_pages"] = wrong[:10]
    bad["wrong_zero"] = [bool((view(base + i * PS, 1) == 0).all()) for i in wrong[:10]]
    os.waitpid(child, 0)
    bad["fork_child"] = os.read(r, 1) == b"1"
    bad["ops_s"] = ops_s
    with open(os.path.join(d, "result.tmp"), "w") as f:
        json.dump(bad, f)
    os.rename(os.path.join(d, "result.tmp"), os.path.join(d, "result.json"))
    while True:
        time.sleep(1)
''')


def _spawn_target(tmp_path, npages, mode="one"):
    script = tmp_path / "target.py"
    script.write_text(TARGET)
    work = tmp_path / "work"
    work.mkdir()
    p = subprocess.Popen(["unshare", "-p", "-f", "setsid", sys.executable, str(script),
                          str(work), str(npages), mode], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, cwd=str(work))
    deadline = time.monotonic() + 60
    while not (work / "pid").exists() or not (work / "pid").read_text():
        assert p.poll() is None, "target exited early"
        assert time.monotonic() < deadline, "target not ready"
        time.sleep(0.02)
    time.sleep(0.05)
    return p, int((work / "pid").read_text()), work


def _wait_result(work, timeout=60, name="result.json"):
    deadline = time.monotonic() + timeout
    while not (work / name).exists():
        assert time.monotonic() < deadline, f"restored target wrote no {name}"
        time.sleep(0.02)
    return json.loads((work / name).read_text())


@pytest.mark.parametrize("prefetch", [True, False], ids=["fill", "faults-only"])
def test_fork_mremap_munmap_dontneed_during_fill(lazy_ok, tmp_path, reap, prefetch):
    npages = 16384  # 64 MiB
    p, pid, work = _spawn_target(tmp_path, npages)
    try:
        criu.dump(pid, tmp_path / "full")
    finally:
        proc.kill_tree([pid], p)
    lazy.write_lazy_image_set(tmp_path / "full", tmp_path / "lazy")
    (work / "go").write_text("")
    full = criu.ImageSet(tmp_path / "full")
    # chunk=1: a slow fill (one page per ioctl), so the target's operations, which
    # start within milliseconds of the resume, meet pages still missing
    rr, d = lazy_restore(tmp_path / "lazy", full, chunk=1 if prefetch else 256,
                         prefetch=prefetch)
    reap.append(rr.pid)
    verdict = _wait_result(work)
    assert verdict == {**verdict, "dontneed_zero": True, "moved": True, "rest": True,
                       "fork_child": True}, verdict
    if prefetch:
        st = d.wait(60)
    else:
        # faults only (a measurement mode): pages nobody touches stay missing, so
        # the daemon only ends when cancelled, says that pages were left, and kills
        # the restored tree before it releases the userfaultfds (fail-stop: the
        # tree never runs on with zeros for its missing pages)
        d.cancel()
        with pytest.raises(LazyPagesError) as ei:
            d.wait(60)
        assert ei.value.unfilled and ei.value.errno == errno.ECANCELED
        assert ei.value.killed and ei.value.restored_pid == rr.pid
        assert pid_gone(rr.pid)
        st = ei.value.stats
    assert st.forks >= 1 and st.removes >= 1 and st.unmaps >= 1 and st.remaps >= 1, st
    assert st.unreachable == 0
    if not prefetch:
        assert st.prefetch_copied == 0
        # the DONTNEED'd and munmapped ranges were never touched: dropped, not copied
        assert st.dropped >= 2 * (npages // 16)
    else:
        assert st.prefetch_copied > 0 and st.lost_exited == 0


def test_two_task_tree(lazy_ok, tmp_path, reap):
    """A dumped tree of two processes: CRIU sends two descriptors, each task is
    filled from its own pagemap's pages (they differ in one page)."""
    npages = 4096
    p, pid, work = _spawn_target(tmp_path, npages, "tree")
    time.sleep(0.2)  # the child has forked and written its page
    try:
        criu.dump(pid, tmp_path / "full")
    finally:
        proc.kill_tree([pid], p)
    full = criu.ImageSet(tmp_path / "full")
    assert len(full.pids()) == 2
    res = lazy.write_lazy_image_set(tmp_path / "full", tmp_path / "lazy")
    assert all(n > 0 for n in res.lazy_pages.values()) and len(res.lazy_pages) == 2
    (work / "go").write_text("")
    rr, d = lazy_restore(tmp_path / "lazy", full)
    reap.append(rr.pid)
    st = d.wait(60)
    assert st.tasks == 2 and st.total_pages == sum(res.lazy_pages.values())
    assert st.left == 0 and st.unreachable == 0
    v = _wait_result(work)
    assert v["rest"] and v["moved"] and v["dontneed_zero"] and v["fork_child"], json.dumps(v)
    assert _wait_result(work, name="tree.json") == {"ok": True}


def test_lazy_set_with_data_kept_restores_too(workload_dump, tmp_path, reap):
    """keep_data=True writes PE_LAZY|PE_PRESENT (pages still in pages-N.img, as CRIU
    writes when it transfers lazy pages into the images): CRIU skips them all the
    same, and the daemon serves them from the page store."""
    out = lazy.write_lazy_image_set(workload_dump["full"], tmp_path / "kept", keep_data=True)
    full = criu.ImageSet(workload_dump["full"])
    pid = full.root_pid
    assert out.stored_pages[pid] == full.npages
    assert np.array_equal(lazy.lazy_pages(out.path, pid),
                          lazy.lazy_pages(workload_dump["lazy"], pid))
    rr, d = lazy_restore(out.path, full)
    reap.append(rr.pid)
    st = d.wait(60)
    assert st.left == 0 and st.fault_copied + st.prefetch_copied == st.total_pages
    c = workloads.WorkloadClient(workload_dump["wl"].control)
    c.wait_ready(20)
    assert c.checksum() == workload_dump["checksum"]


def test_served_from_the_destinations_page_table(workload_dump, reap):
    """The destination's PageTable (rows in arrival order, not address order) is
    served in place: two rounds put into it in a shuffled order."""
    from statesync.migration.pagetable import PageTable
    full = criu.ImageSet(workload_dump["full"])
    addrs, pages = full.addresses(), full.pages()
    order = np.random.default_rng(5).permutation(addrs.size)
    t = PageTable(4096, capacity=16)
    half = addrs.size // 2
    for part in (order[:half], order[half:]):
        t.put(addrs[part], pages[part])
    assert len(t.pieces()) > 1  # grown in chunks: served as pieces, never gathered
    rr, d = lazy_restore(workload_dump["lazy"], t)
    reap.append(rr.pid)
    st = d.wait(60)
    assert st.left == 0 and st.fault_copied + st.prefetch_copied == st.total_pages
    # shuffled rows: runs are short, but every page is right
    c = workloads.WorkloadClient(workload_dump["wl"].control)
    c.wait_ready(20)
    assert c.checksum() == workload_dump["checksum"]
