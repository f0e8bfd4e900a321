"""memsource.dumpable_pages: which pages round 0 sends (what CRIU would dump)."""
import contextlib
import mmap
import os
import tracemalloc

import numpy as np
import pytest

from statesync import NoSuchProcess
from statesync._consts import PAGE_SIZE
from statesync.migration.memsource import dumpable_pages
from statesync.testing import scripted

PS = PAGE_SIZE
_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux value; Python < 3.12 lacks it


def _addr(m) -> int:
    import ctypes
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def test_huge_reservation_costs_memory_by_pages_found_not_by_size():
    # 16 GiB of reserved address space with 3 touched pages: the old code read the
    # whole VMA's pagemap at once (8 bytes a page = 32 MiB here, 2 GiB for 1 TiB).
    size = 16 << 30
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE)
    try:
        base = _addr(m)
        for i in (0, 12345, size // PS - 1):
            m[i * PS] = 1
        tracemalloc.start()
        try:
            got = dumpable_pages(os.getpid())
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        mine = got[(got >= base) & (got < base + size)]
        assert mine.tolist() == [base, base + 12345 * PS, base + size - PS]
        assert np.all(np.diff(got.astype(np.int64)) > 0)
        assert peak < 8 << 20, peak
    finally:
        m.close()


def test_file_pages_are_left_out_until_written(tmp_path):
    p = tmp_path / "data"
    p.write_bytes(os.urandom(8 * PS))
    with open(p, "rb+") as f:
        m = mmap.mmap(f.fileno(), 8 * PS, flags=mmap.MAP_PRIVATE)
    try:
        base = _addr(m)
        assert sum(m[i * PS] for i in range(8)) >= 0   # fault in page-cache pages
        m[5 * PS] = m[5 * PS] ^ 0xFF                    # copy-on-write: now anonymous
        got = dumpable_pages(os.getpid())
        mine = got[(got >= base) & (got < base + 8 * PS)]
        assert mine.tolist() == [base + 5 * PS]
    finally:
        m.close()


def test_no_fd_leak_and_missing_process_is_no_such_process():
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        dumpable_pages(os.getpid())
    assert len(os.listdir("/proc/self/fd")) == before
    with pytest.raises(NoSuchProcess) as ei:
        dumpable_pages(2 ** 22 + 1)
    assert ei.value.pid == 2 ** 22 + 1


# --------------------------------------------------------------------------- shmem

_SHM32 = r'''
import ctypes, hashlib, mmap, socket, sys
N = 8192                                   # 32 MiB MAP_SHARED anonymous (Python's default)
m = mmap.mmap(-1, N * 4096)
for i in range(N):
    m[i * 4096:i * 4096 + 64] = bytes([i % 251 + 1]) * 64
# 16 private pages written, then left PROT_NONE (a guard area, a W^X JIT's old code)
pn = mmap.mmap(-1, 16 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
pn[:] = b"N" * (16 * 4096)
pn_addr = ctypes.addressof(ctypes.c_char.from_buffer(pn))
libc = ctypes.CDLL(None)
libc.mprotect(ctypes.c_void_p(pn_addr), ctypes.c_size_t(16 * 4096), 0)
''' + scripted.SERVE_LOOP + r'''
    if cmd[0] == "w":
        i = int(cmd[1]); m[i * 4096 + 100:i * 4096 + 108] = b"XXXXXXXX"
    c.sendall(hashlib.sha1(m).hexdigest().encode()); c.close()
'''


def _shm_expected(i):
    page = bytearray(PS)
    page[:64] = bytes([i % 251 + 1]) * 64
    return bytes(page)


class _ShmServer:
    def __init__(self, tmp_path, pidns):
        self.name = f"statesync-memsource-shm-{os.getpid()}-{id(self)}"
        pre = ["unshare", "-p", "-f", "setsid"] if pidns else []
        self.p = scripted.spawn_script(tmp_path / "shm32.py", _SHM32, self.name, wrap=pre)
        self.req("h")
        from statesync import proc
        self.pid = proc.descendants(self.p.pid)[0] if pidns else self.p.pid

    def req(self, x):
        return scripted.request(self.name, x)

    def kill(self):
        from statesync import proc
        proc.kill_tree([self.pid], self.p, timeout=20)


def _shm_space(ms):
    sh = [sp for sp in ms.spaces.values() if sp.kind == "shmem" and sp.size == 8192 * PS]
    assert len(sh) == 1, ms.spaces
    return sh[0]


def test_shared_anonymous_32mb_buffer_is_state_and_tracked(tmp_path):
    """A Python process's 32 MB mmap.mmap(-1, ...) buffer (MAP_SHARED anonymous): with
    shmem=True the memory source lists its 8192 pages as state (one shmem space, by
    offset, as CRIU's pagemap-shmem-INO.img), reads them exactly, and the tracker
    reports the pages written through the mapping as that object's keys."""
    from conftest import have_root, require
    from statesync.migration.memsource import MemorySource, addr_of, make_keys, space_of
    require(have_root(), "reading shmem through /proc/PID/map_files needs CAP_SYS_ADMIN")
    srv = _ShmServer(tmp_path, pidns=False)
    ms = MemorySource(srv.pid, shmem=True)
    try:
        keys = ms.present_pages()
        sp = _shm_space(ms)
        assert sp.image == f"pagemap-shmem-{sp.shmid}.img"
        mine = keys[space_of(keys) == sp.index]
        assert np.array_equal(addr_of(mine), np.arange(8192, dtype=np.uint64) * PS)
        # the private pages of the root are still there, as plain addresses (space 0)
        assert (space_of(keys) == 0).sum() > 100
        pages, ok = ms.read(mine)
        assert ok.all()
        for i in (0, 1, 250, 251, 4096, 8191):
            assert pages[i].tobytes() == _shm_expected(i)
        # without shmem=True the buffer is not state (CRIU dumps it whole)
        plain = MemorySource(srv.pid).present_pages()
        assert (space_of(plain) == 0).all()
        ms.attach_tracker("auto")
        ms.collect()
        srv.req("w 5")
        srv.req("w 8000")
        got = ms.collect()
        shm_got = addr_of(got[space_of(got) == sp.index])
        assert {5 * PS, 8000 * PS} <= set(shm_got.tolist())
        assert shm_got.size < 64, "only what was written, not the whole object"
        p2, ok2 = ms.read(make_keys(sp.index, np.array([5 * PS], np.uint64)))
        assert ok2.all() and p2[0, 100:108].tobytes() == b"XXXXXXXX"
    finally:
        ms.close()
        srv.kill()


def test_image_set_from_precopied_shmem_pages_restores(tmp_path, criu_ok):
    """Pre-copied shmem pages (read by the memory source while the process runs)
    become the pagemap-shmem-INO.img of an image set statesync's writer assembles
    from a dump's non-memory images; the dump's own shmem pages are zeroed first, so
    only the pre-copied ones can give the restored process its content: plain
    `criu restore` brings back the exact buffer."""
    from statesync import criu, proc
    from statesync.migration.memsource import MemorySource, addr_of, space_of
    srv = _ShmServer(tmp_path, pidns=True)
    rpid = None
    ms = MemorySource(srv.pid, shmem=True)
    try:
        srv.req("w 77")
        h = srv.req("h")
        keys = ms.present_pages()
        sp = _shm_space(ms)
        mine = keys[space_of(keys) == sp.index]
        pages, ok = ms.read(mine)
        assert ok.all() and mine.size == 8192
        criu.dump(srv.pid, tmp_path / "final", leave_running=True)
        name = sp.image
        tpl = criu.ImageSet(tmp_path / "final")
        assert name in tpl.pagemap_names
        pid_of = tpl.pagemap(name).pages_id
        with open(tmp_path / "final" / f"pages-{pid_of}.img", "r+b") as f:   # forget them
            size = f.seek(0, 2)
            f.seek(0)
            f.write(bytes(size))
        tpl.close()
        # What the memory source called state is what CRIU dumped: the shmem object
        # page for page, the task's private pages (PROT_NONE ones included) too
        ik = {n: k for n, _, k in ms.image_keys(str(tmp_path / "final"))}
        assert np.array_equal(ik[name], mine)
        task = [n for n in ik if n != name]
        assert len(task) == 1
        dumped = ik[task[0]]
        assert (space_of(dumped) == 0).all()
        ours = keys[space_of(keys) == 0]
        # the interpreter ran a little between our listing and the dump: compare
        # the bulk, and the PROT_NONE VMA exactly
        assert np.setdiff1d(dumped, ours).size <= 0.05 * dumped.size
        pn = [v for v in proc.read_maps(srv.pid) if v.perms == "---p" and v.size == 16 * PS]
        assert pn, "the PROT_NONE VMA"
        lo, hi = pn[0].start, pn[0].end
        in_pn = lambda k: k[(k >= lo) & (k < hi)]  # noqa: E731
        assert in_pn(dumped).size == 16 and np.array_equal(in_pn(dumped), in_pn(ours))
        pg, okk = ms.read(in_pn(ours))
        assert okk.all() and (pg == ord("N")).all()   # read although PROT_NONE
        r = criu.write_image_set_pages(tmp_path / "final", tmp_path / "out",
                                       {name: (addr_of(mine), pages)})
        assert r.pages_written >= 8192
        os.kill(srv.pid, 9)
        srv.p.wait(timeout=20)
        rr = criu.restore(tmp_path / "out")
        rpid = rr.pid
        assert srv.req("h") == h
    finally:
        ms.close()
        if rpid:
            try:
                os.kill(rpid, 9)
            except ProcessLookupError:
                pass
        srv.kill()


# --------------------------------------------------------------------------- trees

_TREE = r'''
import mmap, os, socket, sys, time
buf = mmap.mmap(-1, 256 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(256):
    buf[i * 4096] = i % 200 + 1
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("\0" + sys.argv[1]); s.listen()
kids = []
while True:
    c, _ = s.accept()
    cmd = c.recv(100).decode().split()
    out = "ok"
    if cmd[0] == "fork":                   # a child that sleeps, then one that writes
        pid = os.fork()
        if pid == 0:
            s.close()
            r, w = int(cmd[1]), int(cmd[2])
            time.sleep(r / 10)
            for i in range(w):
                buf[i * 4096 + 1] = 0xEE
            time.sleep(3600)
        kids.append(pid); out = str(pid)
    elif cmd[0] == "forkexec":             # a child that later becomes another program
        pid = os.fork()
        if pid == 0:
            s.close()
            time.sleep(0.5)
            os.execv("/bin/sleep", ["sleep", "3600"])
        kids.append(pid); out = str(pid)
    elif cmd[0] == "w":
        buf[int(cmd[1]) * 4096 + 2] = 0xAB
    c.sendall(out.encode()); c.close()
'''


def _local_server(tmp_path, what, source):
    """One of this file's scripts started as a child of the test (output not hidden)
    and a function sending it one request."""
    name = f"statesync-memsource-{what}-{os.getpid()}"
    p = scripted.spawn_script(tmp_path / f"{what}.py", source, name, quiet=False)
    return p, lambda x: scripted.request(name, x)


def test_process_tree_children_forked_during_tracking_are_precopied(tmp_path):
    """tree=True: a child forked after the tracker attached becomes a space at the
    next collect (all its pages reported), its later writes are reported as its own
    keys, and the pages it still shares copy-on-write with its parent are listed as
    aliases (same PFN), so they need to travel once."""
    import time
    from conftest import have_root, require
    from statesync import proc
    from statesync.migration.memsource import MemorySource, addr_of, space_of
    require(have_root(), "PFNs in pagemap (COW aliases) need CAP_SYS_ADMIN")
    p, req = _local_server(tmp_path, "tree", _TREE)
    ms = None
    try:
        req("w 0")
        ms = MemorySource(p.pid, tree=True)
        k0 = ms.present_pages()
        assert set(space_of(k0).tolist()) == {0}
        ms.attach_tracker("auto")
        ms.collect()
        child = int(req("fork 5 16"))          # sleeps 0.5 s, then writes 16 pages
        got = ms.collect()
        kids = [sp for sp in ms.spaces.values() if sp.kind == "task" and sp.pid == child]
        assert len(kids) == 1, ms.spaces
        ci = kids[0].index
        child_keys = got[space_of(got) == ci]
        want = ms.present_pages()
        assert np.setdiff1d(want[space_of(want) == ci], child_keys).size == 0
        # COW: the child's untouched buffer pages are the parent's physical pages
        dst, src = ms.aliases(want)
        assert dst.size > 200 and (space_of(dst) == ci).all() and (space_of(src) == 0).all()
        assert np.array_equal(addr_of(dst[:5]), addr_of(src[:5]))
        time.sleep(1.0)                         # the child writes its 16 pages
        got = ms.collect()
        written = addr_of(got[space_of(got) == ci])
        maps = proc.read_maps(child)
        pages, _ = ms.read(got[space_of(got) == ci])
        hits = sum(1 for a, pg in zip(written.tolist(), pages) if pg[1] == 0xEE)
        assert hits >= 16, (hits, written.size, len(maps))
        dst2, _ = ms.aliases(ms.present_pages())
        assert dst2.size <= dst.size - 16      # written pages are no longer shared
        # a child that execs another program: tracked again, all its new pages reported
        ex = int(req("forkexec"))
        ms.collect()
        time.sleep(1.0)                         # it has exec'd /bin/sleep
        got = ms.collect()
        sp = [x for x in ms.spaces.values() if x.kind == "task" and x.pid == ex]
        assert len(sp) == 1
        mine = got[space_of(got) == sp[0].index]
        now = ms.present_pages()
        now_mine = now[space_of(now) == sp[0].index]
        assert now_mine.size > 0 and np.setdiff1d(now_mine, mine).size == 0
        assert ex in ms.trackers
    finally:
        if ms is not None:
            ms.close()
        proc.kill_tree([], p, timeout=20)


# --------------------------------------------------------------------------- migrations

_MIG_SHM = r'''
import hashlib, mmap, os, socket, sys, time
N = int(sys.argv[2])
shared = sys.argv[3] == "shared"
m = mmap.mmap(-1, N * 4096, flags=(mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE)
              | mmap.MAP_ANONYMOUS)
for i in range(N):
    m[i * 4096:i * 4096 + 64] = os.urandom(64)
kids = []
for k in range(int(sys.argv[4])):          # children: private copies + the shared buffer
    pid = os.fork()
    if pid == 0:
        priv = bytearray(os.urandom(256 * 4096))
        while True:
            time.sleep(0.05)
    kids.append(pid)
''' + scripted.SERVE_LOOP + r'''
    if cmd[0] == "w":
        for i in range(int(cmd[1]), int(cmd[2])):
            m[i * 4096 + 200:i * 4096 + 208] = os.urandom(8)
    c.sendall(hashlib.sha1(m).hexdigest().encode()); c.close()
'''


def _spawn_mig(bed, tmp_path, npages, kind, children):
    name = f"statesync-mig-shm-{os.getpid()}-{kind}"
    wrap = ["nsenter", f"--net=/run/netns/{bed.tb.ns_a}", "--", "unshare", "-p", "-f",
            "setsid"]
    p = scripted.spawn_script(tmp_path / "mig_shm.py", _MIG_SHM, name, str(npages), kind,
                              str(children), wrap=wrap)

    def req(x, side="a"):
        return scripted.request(name, x, netns=bed.tb.ns(side))

    req("h")
    from statesync import proc
    unshare_child = proc.descendants(p.pid)
    return p, unshare_child[0], req


@contextlib.contextmanager
def mig_shm_bed(tmp_path, npages, kind, children, **dest_kw):
    """A 1 Gbit testbed with a destination agent (``dest_kw`` for its start) and the
    _MIG_SHM process in the source namespace: yields (bed, its pid, its request
    function); kills the process tree and closes the bed on the way out. Also used by
    benchmarks/bench_shmem.py."""
    from test_migrate import Bed
    from statesync import proc
    from statesync.testing.testbed import Testbed
    with Testbed("1gbit") as tb:
        bed = Bed(tb, tmp_path)
        p = None
        try:
            bed.start_dest(**dest_kw)
            p, pid, req = _spawn_mig(bed, tmp_path, npages, kind, children)
            yield bed, pid, req
        finally:
            if p is not None:
                proc.kill_tree([], p, timeout=20)
            bed.close()


@pytest.mark.parametrize("children", [0, 3])
def test_migrate_shared_buffer_and_children_precopied(request, tmp_path, criu_ok, children):
    """The issue's case: a Python process with a 32 MB mmap.mmap(-1, ...) MAP_SHARED
    buffer (and, second case, 3 forked children with private memory). Migrated
    iteratively, the shared pages and the children's pages travel in the pre-copy
    rounds: the final transfer holds only what changed since (a few written pages),
    and the restored process has the exact buffer."""
    from test_migrate import _prereqs
    from statesync import proc
    _prereqs()
    with mig_shm_bed(tmp_path, 8192, "shared", children) as (bed, pid, req):
        box = {}

        def hook(ev):
            if ev.get("event") == "round" and ev.get("round") == 0:
                req("w 10 30")                 # 20 pages written after round 0
            if ev.get("event") == "phase" and ev.get("phase") == "dump":
                box["h"] = req("h")
        rep = bed.migrate(pid, strategy="iterative", max_rounds=3, tracker="uffd",
                          progress=hook)
        assert rep.ok, rep.error
        bed.restored.append(rep.restored_pid)
        total = rep.state_pages
        assert total >= 8192 + children * 256
        precopied = rep.rounds[0].pages
        assert precopied >= 8192 + children * 256, (precopied, total)
        # what the freeze carried: far less than the buffer (before: all 8192)
        assert rep.final_pages < 1500, rep.final_pages
        assert req("h", "b") == box["h"]
        if children:
            kids = proc.descendants(rep.restored_pid)
            assert len(kids) >= children


_MEMFD = r'''
import mmap, os, socket, sys
fd = os.memfd_create("statesync-test")
os.ftruncate(fd, 64 * 4096)
m = mmap.mmap(fd, 64 * 4096)                 # MAP_SHARED of the memfd
for i in range(64):
    m[i * 4096] = i + 1
''' + scripted.SERVE_LOOP + r'''
    if cmd[0] == "p":                          # through the descriptor: no page table
        os.pwrite(fd, b"Z" * 8, int(cmd[1]) * 4096 + 16)
    elif cmd[0] == "w":                        # through the mapping
        m[int(cmd[1]) * 4096 + 32] = 0x77
    c.sendall(b"ok"); c.close()
'''


def test_memfd_written_through_its_descriptor_is_reported(tmp_path):
    """A memfd's pages change through write(2) without any page table seeing it: the
    memory source notices its mtime moved, hashes it and reports exactly the changed
    page; mapped writes are reported as the object's offsets too."""
    import time
    from conftest import have_root, require
    from statesync.migration.memsource import MemorySource, addr_of, space_of
    require(have_root(), "reading shmem through /proc/PID/map_files needs CAP_SYS_ADMIN")
    p, req = _local_server(tmp_path, "memfd", _MEMFD)
    ms = MemorySource(p.pid, shmem=True)
    try:
        req("w 0")
        keys = ms.present_pages()
        sp = [x for x in ms.spaces.values() if x.kind == "shmem"]
        assert len(sp) == 1 and sp[0].path.startswith("/memfd:statesync-test")
        idx = sp[0].index
        assert addr_of(keys[space_of(keys) == idx]).size == 64
        ms.attach_tracker("auto")
        ms.collect()
        time.sleep(0.02)                       # mtime granularity
        req("p 9")
        got = ms.collect()
        assert addr_of(got[space_of(got) == idx]).tolist() == [9 * PS]
        req("w 33")
        got = ms.collect()
        assert 33 * PS in addr_of(got[space_of(got) == idx]).tolist()
        pages, ok = ms.read(np.array([(idx << 48) | 9 * PS], dtype=np.uint64))
        assert ok.all() and pages[0, 16:24].tobytes() == b"Z" * 8
    finally:
        ms.close()
        p.kill()
        p.wait()
