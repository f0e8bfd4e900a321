"""`criu dump --lazy-pages` as the freeze-time capture of a lazy switch-over (root,
real CRIU; CI fails when missing): the dump writes the non-memory images and only
the pages CRIU will not make lazy, leaves the tree frozen, and the lazy pages read
from the frozen process restore it exactly through statesync's lazy-pages daemon."""
import os
import signal
import time

import pytest

from conftest import require
from statesync import criu, proc
from statesync.criu.images import PE_LAZY, PE_PRESENT
from statesync.errors import CriuError
from statesync.migration import lazy
from statesync.testing import workloads


@pytest.fixture
def lazy_ok(criu_ok):
    from statesync import _core
    try:
        _core.lazy_uffd_probe()
    except OSError as exc:
        require(False, f"userfaultfd with fork/remap/remove/unmap events: {exc}")
    return criu_ok


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_lazy_dump_leaves_the_tree_frozen_and_writes_no_lazy_page(lazy_ok, tmp_path):
    wl = workloads.spawn("32M", 0, own_pidns=True, paused=True, seed=5)
    restored = None
    try:
        c = wl.client
        c.write(list(range(0, 8192, 3)))
        checksum = c.checksum()
        st = c.status()
        d = tmp_path / "lazy"
        r = criu.dump(wl.pid, d, extra_args=["--leave-stopped"], lazy_pages=True)
        # CRIU stops the tree as it lets go of it (SIGSTOP): allow its delivery
        deadline = time.monotonic() + 5
        while proc.state(wl.pid) not in ("T", "t") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.state(wl.pid) in ("T", "t")
        pm = lazy._LazyPagemap(str(d / "pagemap-1.img"), 4096)
        lazy_runs = (pm.flags & PE_LAZY) != 0
        assert lazy_runs.any()
        # the workload's buffer is lazy: none of its pages are in pages-N.img
        lz = lazy.lazy_pages(str(d), 1)
        in_buf = (lz >= st["addr"]) & (lz < st["addr"] + st["size"])
        assert in_buf.sum() >= 8192 // 3
        stored = int(pm.nr_pages[((pm.flags & PE_PRESENT) != 0) & ~lazy_runs].sum())
        assert os.path.getsize(d / f"pages-{pm.pages_id}.img") == stored * 4096
        assert stored < lz.size // 4
        assert r.wall_time >= 0
        # the lazy pages, read from the frozen process, are its state at the freeze
        pages, ok = proc.read_pages(wl.pid, lz)
        assert ok.all()
        _kill(wl.pid)
        wl.kill()
        rr, dm = lazy.lazy_restore(str(d), {1: (lz, pages)})
        restored = rr.pid
        stats = dm.wait(60)
        assert stats.unreachable == 0 and stats.fault_copied + stats.prefetch_copied \
            + stats.exist == stats.total_pages == lz.size
        c2 = workloads.WorkloadClient(wl.control)
        c2.wait_ready(20)
        assert c2.checksum() == checksum
    finally:
        _kill(wl.pid)
        wl.kill()
        if restored:
            _kill(restored)


def test_lazy_dump_failing_after_the_freeze_resumes_the_target(lazy_ok, tmp_path):
    wl = workloads.spawn("4M", 200, own_pidns=True)
    try:
        d = tmp_path / "bad"
        (d / "mm-1.img").mkdir(parents=True)     # CRIU cannot write it once the tree is seized
        with pytest.raises(CriuError):
            criu.dump(wl.pid, d, extra_args=["--leave-stopped"], lazy_pages=True)
        assert "mm-1.img" in open(d / "dump.log").read()
        assert proc.state(wl.pid) not in ("T", "t")
        s1 = wl.client.status()["seq"]
        time.sleep(0.3)
        assert wl.client.status()["seq"] > s1       # running and writing again
    finally:
        wl.kill()
