"""statesync.proc on real processes: our own, and the workload generator."""
import mmap
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import have_root, require
from statesync import errors, proc
from statesync.testing.workloads import PAGE_SIZE

PS = PAGE_SIZE


def _anon(npages):
    return mmap.mmap(-1, npages * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_read_maps_of_self_finds_a_fresh_mapping():
    m = _anon(8)
    addr = np.frombuffer(m, dtype=np.uint8).ctypes.data
    vmas = proc.read_maps(os.getpid())
    hit = [v for v in vmas if addr in v]
    assert len(hit) == 1
    v = hit[0]
    assert v.writable and v.readable and v.private and v.anonymous and not v.special
    assert v.start <= addr and addr + 8 * PS <= v.end
    assert all(a.end <= b.start for a, b in zip(vmas, vmas[1:]))
    assert any(v.path == "[vdso]" and v.special for v in vmas)


def test_pagemap_shows_exactly_the_touched_pages_present():
    m = _anon(16)
    buf = np.frombuffer(m, dtype=np.uint8)
    addr = buf.ctypes.data
    touched = [0, 3, 4, 15]
    for i in touched:
        buf[i * PS] = 1
    pm = proc.pagemap(os.getpid(), addr, addr + 16 * PS)
    assert len(pm) == 16
    assert np.flatnonzero(pm.present).tolist() == touched
    assert not pm.swapped.any()
    assert pm.exclusive[touched].all()
    assert (pm.pfn[touched] != 0).all() == (os.geteuid() == 0)
    assert (pm.addrs == addr + np.arange(16, dtype=np.uint64) * PS).all()
    sel = proc.present_pages(os.getpid(), [v for v in proc.read_maps(os.getpid()) if addr in v])
    want = addr + np.array(touched, dtype=np.uint64) * PS
    assert np.isin(want, sel).all()
    del buf
    m.close()


def test_read_pages_matches_proc_mem_of_the_workload(spawn_workload):
    wl = spawn_workload(size="4M", rate=0, fill="random")
    st_ = wl.client.status()
    addrs = st_["addr"] + np.arange(0, st_["size"] // PS, 7, dtype=np.uint64) * PS
    data, ok = proc.read_pages(wl.pid, addrs)
    assert ok.all() and data.shape == (addrs.size, PS)
    with open(f"/proc/{wl.pid}/mem", "rb") as f:   # an independent reader
        for i in (0, 1, addrs.size // 2, addrs.size - 1):
            f.seek(int(addrs[i]))
            assert f.read(PS) == data[i].tobytes()
    hashes, hok = proc.hash_pages(wl.pid, addrs)
    from statesync import _core
    assert hok.all() and np.array_equal(hashes, _core.hash_pages(data))


def test_read_pages_goes_on_past_pages_that_are_not_mapped():
    m = _anon(12)
    buf = np.frombuffer(m, dtype=np.uint8)
    base = buf.ctypes.data
    buf[:] = np.arange(12 * PS, dtype=np.uint64).astype(np.uint8)
    buf[::PS] = np.arange(12, dtype=np.uint8) + 100
    # punch holes in the middle of contiguous runs: pages 4, 5 and 9 vanish
    libc_munmap = __import__("ctypes").CDLL(None).munmap
    libc_munmap.argtypes = [__import__("ctypes").c_void_p, __import__("ctypes").c_size_t]
    assert libc_munmap(base + 4 * PS, 2 * PS) == 0
    assert libc_munmap(base + 9 * PS, PS) == 0
    addrs = base + np.arange(12, dtype=np.uint64) * PS
    data, ok = proc.read_pages(os.getpid(), addrs)
    assert np.flatnonzero(~ok).tolist() == [4, 5, 9]
    assert (data[~ok] == 0).all()
    assert data[ok][:, 0].tolist() == [100 + i for i in range(12) if i not in (4, 5, 9)]


def test_read_pages_handles_many_scattered_batches():
    n = 3000  # more than IOV_MAX non-contiguous pages
    m = _anon(2 * n)
    buf = np.frombuffer(m, dtype=np.uint8)
    base = buf.ctypes.data
    idx = np.arange(0, 2 * n, 2)
    buf.reshape(-1, PS)[idx, 0] = (idx % 251).astype(np.uint8)
    data, ok = proc.read_pages(os.getpid(), base + idx.astype(np.uint64) * PS)
    assert ok.all() and (data[:, 0] == idx % 251).all()


def test_errors_name_the_pid():
    pid = _dead_pid()
    with pytest.raises(errors.NoSuchProcess) as ei:
        proc.read_maps(pid)
    assert ei.value.pid == pid and str(pid) in str(ei.value)
    with pytest.raises(errors.NoSuchProcess):
        proc.pagemap(pid, 0, PS)
    with pytest.raises(errors.NoSuchProcess):
        proc.read_pages(pid, [PS])
    with pytest.raises(ValueError):
        proc.read_pages(os.getpid(), [123])
    with pytest.raises(ValueError):
        proc.pagemap(os.getpid(), 0, 1 << 47)


def _as_nobody(fn):
    """Run fn() in a forked child that dropped to uid/gid 65534; returns its string."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            out = fn()
        except BaseException as exc:  # report anything to the parent
            out = f"unexpected {type(exc).__name__}: {exc}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def test_access_denied_for_an_unprivileged_reader(spawn_workload):
    require(have_root(), "needs root to drop to another user")
    wl = spawn_workload(size="1M", rate=0)
    addr = wl.client.status()["addr"]

    def attempt():
        try:
            proc.read_pages(wl.pid, [addr])
        except errors.AccessDenied as exc:
            return f"denied {exc.pid}"
        return "read it"

    assert _as_nobody(attempt) == f"denied {wl.pid}"
    assert wl.alive()


MAPS_FIXTURE = b"""\
55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0                          [heap]
7f1e2c000000-7f1e2c021000 rw-p 00000000 00:00 0 
7f1e2c400000-7f1e2c5a0000 r-xp 00028000 fe:01 1311                       /usr/lib/x86_64-linux-gnu/libc.so.6
7f1e2c600000-7f1e2c601000 rw-s 00000000 00:01 4242                       /dev/zero (deleted)
7ffd5e9b0000-7ffd5e9d1000 rw-p 00000000 00:00 0                          [stack]
7ffd5e9f0000-7ffd5e9f2000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
"""  # noqa: E501  (verbatim /proc/PID/maps lines)


def test_parse_maps_fixture(tmp_path):
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "maps").write_bytes(MAPS_FIXTURE)
    v = proc.read_maps(42, procfs=str(tmp_path))
    assert [x.path for x in v] == ["[heap]", "", "/usr/lib/x86_64-linux-gnu/libc.so.6",
                                   "/dev/zero (deleted)", "[stack]", "[vdso]", "[vsyscall]"]
    assert [x.anonymous for x in v] == [True, True, False, False, True, False, False]
    assert v[2].offset == 0x28000 and v[2].inode == 1311 and v[2].executable
    assert v[3].shared and v[6].special and v[0].npages == 0x21


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parse_maps_fuzz_raises_only_valueerror(data):
    try:
        vmas = proc.parse_maps(data)
    except ValueError as exc:
        assert "maps line" in str(exc)
        return
    for v in vmas:
        assert v.end >= v.start and v.start % PS == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1 << 35), st.integers(0, 64),
                          st.sampled_from(["rw-p", "r--s", "---p"]),
                          st.text(alphabet="abc/[]: -", max_size=20)), max_size=8))
def test_parse_maps_roundtrip(rows):
    lines = []
    for pg, n, perms, path in rows:
        s, e = pg * PS, (pg + n) * PS
        lines.append(f"{s:x}-{e:x} {perms} 00000000 00:00 0 {path}")
    vmas = proc.parse_maps("\n".join(lines).encode())
    assert [(v.start, v.end, v.perms, v.path) for v in vmas] == \
        [(pg * PS, (pg + n) * PS, perms, path.strip()) for pg, n, perms, path in rows]
