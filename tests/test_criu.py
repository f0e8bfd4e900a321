"""statesync.criu against the real CRIU on real processes (root; CI fails when missing).

Round trips: dump -> the workload writes -> dump again -> diff finds exactly the pages
whose content changed -> write_incremental -> criu restore brings back a process whose
own checksum and counters continue. crit (CRIU's own decoder) agrees with what we
write. A real redis-server survives dump -> incremental -> restore with every key.
"""
import json
import os
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from conftest import find_program, free_port, require
from statesync import criu, proc
from statesync.testing import scripted, workloads
from statesync.errors import CriuError, NoSuchProcess


def test_check_reports_version_and_features(criu_ok):
    assert criu_ok.version_tuple >= (4, 0)
    assert os.access(criu_ok.path, os.X_OK)
    assert set(criu.FEATURES) <= set(criu_ok.features)
    # Without CONFIG_MEM_SOFT_DIRTY (off on our test kernels) CRIU reports memory
    # dirty tracking as unavailable, and we pass its reason on.
    if not criu_ok.features["mem_dirty_track"]:
        assert criu_ok.reasons["mem_dirty_track"]


def test_statesync_criu_env_selects_binary(monkeypatch, criu_ok, tmp_path):
    monkeypatch.setenv("STATESYNC_CRIU", "/nonexistent/criu")
    info = criu.check(refresh=True)
    assert not info.ok and info.path == "/nonexistent/criu"
    with pytest.raises(CriuError):
        criu.dump(os.getpid(), tmp_path / "never-used")
    assert not (tmp_path / "never-used").exists() or not os.listdir(tmp_path / "never-used")
    monkeypatch.delenv("STATESYNC_CRIU")
    assert criu.check(refresh=True).ok


def test_dump_of_missing_pid_is_a_clear_error(criu_ok, tmp_path):
    with pytest.raises(NoSuchProcess):
        criu.dump(2 ** 22 + 12345, tmp_path / "x")


def test_failing_dump_raises_criu_error_with_log_tail(criu_ok, tmp_path):
    # Our own process is not in its own session/pidns and has a tty-less parent
    # chain CRIU refuses to take from inside: a real CRIU failure.
    with pytest.raises(CriuError) as ei:
        criu.dump(os.getpid(), tmp_path / "self", leave_running=True)
    e = ei.value
    assert e.returncode not in (None, 0)
    assert e.cmd[1] == "dump"
    assert "Error" in e.log_tail


def _content_changed(s1, s2, addrs):
    """Per address: not in s1, or content differs (read independently of diff)."""
    a1 = s1.addresses()
    out = np.ones(addrs.size, dtype=bool)
    both = np.isin(addrs, a1)
    if both.any():
        out[both] = np.any(s1.read(addrs[both]) != s2.read(addrs[both]), axis=1)
    return out


def test_dump_diff_incremental_restore_continues(criu_ok, spawn_workload, tmp_path, reap):
    wl = spawn_workload("16M", 0, own_pidns=True, paused=True, seed=7)
    c = wl.client
    st = c.status()
    c.take_written()
    r1 = criu.dump(wl.pid, tmp_path / "d1", leave_running=True)
    assert r1.stats["pages_written"] > 16 * 256 // 2 and r1.stats["frozen_time"] > 0
    # Writes: explicit pages, a new VMA, and rate-driven writes for a moment.
    c.write(list(range(0, 4096, 37)))
    new_map = c.map("256K")
    c.resume()
    c.set_rate(3000)
    time.sleep(0.3)
    c.pause()
    written = np.sort(c.take_written())
    checksum, seq = c.checksum(), c.status()["seq"]
    assert written.size > 200
    criu.dump(wl.pid, tmp_path / "d2", leave_running=True)

    s1, s2 = criu.ImageSet(tmp_path / "d1"), criu.ImageSet(tmp_path / "d2")
    d = criu.diff(s1, s2)
    buf = d.within(st["addr"], st["addr"] + st["size"])
    in_buf = written[(written >= st["addr"]) & (written < st["addr"] + st["size"])]
    # Content level: a written page whose bytes came out equal (the workload stored a
    # value the page already held) is rightly not dirty; every other one must be found,
    # and no unwritten buffer page may be reported.
    changed = _content_changed(s1, s2, in_buf)
    assert changed.mean() > 0.95
    assert np.array_equal(buf.pages, in_buf[changed])
    # The mapping made after the first dump is all new: every page of it in d2 is dirty.
    a2 = s2.addresses()
    nm_pages = a2[(a2 >= new_map) & (a2 < new_map + 256 * 1024)]
    assert nm_pages.size > 0
    assert np.array_equal(d.within(new_map, new_map + 256 * 1024).pages, nm_pages)
    # Pages outside the buffer (interpreter heap, stacks) may differ too, never absent ones.
    assert np.isin(d.pages, s2.addresses()).all()

    inc = criu.write_incremental(s2, tmp_path / "d1", tmp_path / "inc")
    assert inc.pages_written == len(d)
    assert inc.pages_in_parent == s2.npages - len(d)
    assert os.readlink(tmp_path / "inc" / "parent") == "../d1"
    si = criu.ImageSet(tmp_path / "inc")
    assert si.chain == [str(tmp_path / "inc"), str(tmp_path / "d1")]
    assert np.array_equal(si.addresses(), s2.addresses())
    assert np.array_equal(si.pages(), s2.pages())
    assert len(criu.diff(s2, si)) == 0

    wl.kill()
    rr = criu.restore(tmp_path / "inc")
    reap.append(rr.pid)
    assert rr.pid > 0 and rr.stats["pages_restored"] == s2.npages
    c2 = workloads.WorkloadClient(wl.control)
    c2.wait_ready(20)
    assert c2.checksum() == checksum
    assert c2.status()["seq"] == seq
    c2.write([1, 2, 3])
    assert c2.status()["seq"] == seq + 3


def test_flatten_chain_restores_and_matches(criu_ok, spawn_workload, tmp_path, reap):
    wl = spawn_workload("4M", 0, own_pidns=True, paused=True, seed=3)
    c = wl.client
    criu.dump(wl.pid, tmp_path / "d1", leave_running=True)
    c.write(range(0, 1024, 5))
    criu.dump(wl.pid, tmp_path / "d2", leave_running=True)
    c.write(range(1, 1024, 7))
    checksum = c.checksum()
    criu.dump(wl.pid, tmp_path / "d3", leave_running=True)
    criu.write_incremental(tmp_path / "d2", tmp_path / "d1", tmp_path / "i2")
    # A chain of two increments: i3 -> i2 -> d1.
    r = criu.write_incremental(tmp_path / "d3", tmp_path / "i2", tmp_path / "i3")
    assert criu.ImageSet(tmp_path / "i3").chain[-1] == str(tmp_path / "d1")
    assert r.pages_written < criu.ImageSet(tmp_path / "d3").npages // 2
    f = criu.flatten(tmp_path / "i3", tmp_path / "flat")
    assert not os.path.lexists(tmp_path / "flat" / "parent")
    full = criu.ImageSet(tmp_path / "d3")
    assert f.pages_written == full.npages
    # The same pages, byte for byte, as CRIU's own full dump of the same memory (run
    # boundaries follow the increments, so the pagemap bytes may differ).
    assert (tmp_path / "flat" / "pages-1.img").read_bytes() == (
        tmp_path / "d3" / "pages-1.img"
    ).read_bytes()
    flat = criu.ImageSet(tmp_path / "flat")
    assert np.array_equal(flat.addresses(), full.addresses())
    assert len(criu.diff(full, flat)) == 0
    wl.kill()
    rr = criu.restore(tmp_path / "i3")
    reap.append(rr.pid)
    c2 = workloads.WorkloadClient(wl.control)
    c2.wait_ready(20)
    assert c2.checksum() == checksum


def _crit():
    crit = find_program("crit")
    require(crit, "needs crit (scripts/install-criu.sh installs it)")
    return crit


def _crit_entries(path):
    out = subprocess.run([_crit(), "decode", "-i", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["entries"]


def _int(v):
    return int(v, 0) if isinstance(v, str) else int(v)


def _flags(e):
    names = {"PE_PARENT": criu.PE_PARENT, "PE_LAZY": criu.PE_LAZY, "PE_PRESENT": criu.PE_PRESENT}
    f = e.get("flags", "PE_PRESENT")
    return sum(names[x.strip()] for x in f.split("|")) if isinstance(f, str) else int(f)


def test_crit_decodes_our_images_like_criu_s(criu_ok, spawn_workload, tmp_path):
    wl = spawn_workload("4M", 0, own_pidns=True, paused=True, seed=5)
    criu.dump(wl.pid, tmp_path / "d1", leave_running=True)
    wl.client.write(range(0, 1024, 3))
    criu.dump(wl.pid, tmp_path / "d2", leave_running=True)
    wl.kill()
    criu.flatten(tmp_path / "d2", tmp_path / "flat")
    criu.write_incremental(tmp_path / "d2", tmp_path / "d1", tmp_path / "inc")
    theirs = _crit_entries(tmp_path / "d2" / "pagemap-1.img")
    assert _crit_entries(tmp_path / "flat" / "pagemap-1.img") == theirs
    ours = _crit_entries(tmp_path / "inc" / "pagemap-1.img")
    assert ours[0] == theirs[0]  # head: pages_id
    # The incremental set's runs cover the same pages; PE_PARENT pages exist in d1 with
    # equal content, PE_PRESENT ones are exactly the pages diff reports.
    def pages(entries, want=None):
        out = []
        for e in entries[1:]:
            if want is None or _flags(e) & want:
                v = _int(e["vaddr"])
                out += [v + i * 4096 for i in range(e["nr_pages"])]
        return np.array(sorted(out), dtype=np.uint64)
    assert np.array_equal(pages(ours), pages(theirs))
    d = criu.diff(tmp_path / "d1", tmp_path / "d2")
    assert np.array_equal(pages(ours, criu.PE_PRESENT), d.pages)
    assert all(_flags(e) & (criu.PE_PARENT | criu.PE_PRESENT) in (criu.PE_PARENT, criu.PE_PRESENT)
               for e in ours[1:])
    # crit agrees with our reader on the VMAs of CRIU's mm image.
    mm = _crit_entries(tmp_path / "d2" / "mm-1.img")[0]
    vm = criu.ImageSet(tmp_path / "d2").vmas()
    assert [_int(v["start"]) for v in mm["vmas"]] == vm["start"].tolist()
    assert [_int(v["end"]) for v in mm["vmas"]] == vm["end"].tolist()
    assert [v["fd"] for v in mm["vmas"]] == vm["fd"].tolist()


# --------------------------------------------------------------------------- redis


class _Redis:
    """Just enough RESP for the test: pipelined commands, simple replies."""

    def __init__(self, port, timeout=20.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.s = socket.socket()
                self.s.settimeout(timeout)
                self.s.connect(("127.0.0.1", port))
                break
            except OSError:
                self.s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.f = self.s.makefile("rb")

    def pipeline(self, cmds):
        out = bytearray()
        for c in cmds:
            out += b"*%d\r\n" % len(c)
            for a in c:
                a = a if isinstance(a, bytes) else str(a).encode()
                out += b"$%d\r\n%s\r\n" % (len(a), a)
        self.s.sendall(out)
        return [self._reply() for _ in cmds]

    def _reply(self):
        line = self.f.readline()
        t, rest = line[:1], line[1:-2]
        if t in (b"+", b":"):
            return int(rest) if t == b":" else rest
        if t == b"-":
            raise RuntimeError(rest.decode())
        if t == b"$":
            n = int(rest)
            return None if n < 0 else self.f.read(n + 2)[:-2]
        if t == b"*":
            return [self._reply() for _ in range(int(rest))]
        raise RuntimeError(f"bad reply {line!r}")

    def close(self):
        self.f.close()
        self.s.close()


def test_redis_survives_dump_incremental_restore(criu_ok, tmp_path, reap):
    redis = find_program("redis-server")
    require(redis, "needs redis-server (scripts/setup-system.sh installs it)")
    # A TCP listener on loopback (CRIU < 4.2 cannot dump one on Linux >= 6.16; the
    # installer makes sure ours can). No client connection is open during dumps.
    port = free_port()
    p = subprocess.Popen(["unshare", "-p", "-f", "setsid", redis, "--port", str(port),
                          "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--dir", str(tmp_path), "--daemonize", "no", "--protected-mode", "no"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    outer = None
    try:
        deadline = time.monotonic() + 20
        while outer is None and time.monotonic() < deadline:
            kids = proc.descendants(p.pid)
            outer = kids[0] if kids else None
            if outer is None:
                time.sleep(0.02)
        r = _Redis(port)
        rng = np.random.default_rng(11)
        data = {}
        for chunk in range(10):
            cmds = []
            for i in range(chunk * 2000, (chunk + 1) * 2000):
                v = rng.bytes(int(rng.integers(16, 300)))
                data[b"k%d" % i] = v
                cmds.append([b"SET", b"k%d" % i, v])
            assert all(x == b"OK" for x in r.pipeline(cmds))
        pid = int(r.pipeline([[b"INFO", b"server"]])[0].split(b"process_id:")[1].split(b"\r")[0])
        r.close()
        # pid as redis sees it is 1 (its own namespace); ours is unshare's child.
        assert pid == 1 and outer
        criu.dump(outer, tmp_path / "d1", leave_running=True)
        r = _Redis(port)
        cmds = []
        for i in rng.choice(20000, 2000, replace=False):
            v = rng.bytes(64)
            data[b"k%d" % i] = v
            cmds.append([b"SET", b"k%d" % i, v])
        for i in range(20000, 21000):
            data[b"k%d" % i] = b"new%d" % i
            cmds.append([b"SET", b"k%d" % i, data[b"k%d" % i]])
        for i in range(0, 100):
            data.pop(b"k%d" % i, None)
            cmds.append([b"DEL", b"k%d" % i])
        r.pipeline(cmds)
        r.close()
        criu.dump(outer, tmp_path / "d2")          # CRIU ends the original
        p.wait(timeout=20)
        inc = criu.write_incremental(tmp_path / "d2", tmp_path / "d1", tmp_path / "inc")
        full = criu.ImageSet(tmp_path / "d2").npages
        assert 0 < inc.pages_written < full
        rr = criu.restore(tmp_path / "inc")
        reap.append(rr.pid)
        r = _Redis(port)
        assert r.pipeline([[b"DBSIZE"]])[0] == len(data)
        keys = list(data)
        for i in range(0, len(keys), 1000):
            got = r.pipeline([[b"MGET", *keys[i:i + 1000]]])[0]
            assert got == [data[k] for k in keys[i:i + 1000]]
        assert r.pipeline([[b"GET", b"k5"]])[0] is None
        r.close()
    finally:
        # redis is the init of its own pid namespace and session: SIGKILL it by pid
        # (killing unshare alone would leave it running), then reap unshare.
        proc.kill_tree([outer], p, timeout=20)


def test_write_image_set_from_page_store_restores(criu_ok, spawn_workload, tmp_path, reap):
    """The migration engine's path: a final dump's non-memory images plus pages from a
    page store (here: the changed pages, read back into plain arrays), incremental
    against an earlier dump; criu restore must bring the process back intact."""
    wl = spawn_workload("4M", 0, own_pidns=True, paused=True, seed=9)
    c = wl.client
    criu.dump(wl.pid, tmp_path / "d1", leave_running=True)
    c.write(range(0, 1024, 3))
    checksum, seq = c.checksum(), c.status()["seq"]
    criu.dump(wl.pid, tmp_path / "final", leave_running=True)
    wl.kill()
    changed = criu.diff(tmp_path / "d1", tmp_path / "final").pages
    store = np.array(criu.ImageSet(tmp_path / "final").read(changed))  # a plain in-memory copy
    r = criu.write_image_set(tmp_path / "final", tmp_path / "out", changed, store,
                             parent_dir=tmp_path / "d1")
    assert r.pages_written == changed.size
    rr = criu.restore(tmp_path / "out")
    reap.append(rr.pid)
    c2 = workloads.WorkloadClient(wl.control)
    c2.wait_ready(20)
    assert c2.checksum() == checksum and c2.status()["seq"] == seq


_SHM_SERVER = r'''
import hashlib, mmap, socket, sys
m = mmap.mmap(-1, 64 * 4096, flags=mmap.MAP_SHARED)
for i in range(0, 64, 2):
    m[i * 4096:(i + 1) * 4096] = bytes([i + 1]) * 4096
''' + scripted.SERVE_LOOP + r'''
    if cmd[0] == "w":
        i = int(cmd[1]); m[i * 4096:i * 4096 + 8] = b"XXXXXXXX"
    c.sendall(hashlib.sha1(m).hexdigest().encode()); c.close()
'''


def test_shared_anonymous_memory_round_trip(criu_ok, tmp_path, reap):
    """MAP_SHARED anonymous memory lands in CRIU's pagemap-shmem-*.img; our writer keeps
    it whole and the restored process sees its last content."""
    name = f"statesync-criu-shm-{os.getpid()}"

    def req(x):
        return scripted.request(name, x, timeout=20)

    p = scripted.spawn_script(tmp_path / "shm.py", _SHM_SERVER, name,
                              wrap=["unshare", "-p", "-f", "setsid"])
    outer = None
    try:
        req("h")
        outer = proc.descendants(p.pid)[0]
        criu.dump(outer, tmp_path / "d1", leave_running=True)
        req("w 5")
        h = req("w 8")
        criu.dump(outer, tmp_path / "d2", leave_running=True)
        shm = [n for n in criu.ImageSet(tmp_path / "d2").pagemap_names if "shmem" in n]
        assert len(shm) == 1
        criu.write_incremental(tmp_path / "d2", tmp_path / "d1", tmp_path / "inc")
        assert criu.ImageSet(tmp_path / "inc").pagemap(shm[0]).flags.tolist() == [criu.PE_PRESENT]
        os.kill(outer, signal.SIGKILL)
        p.wait(timeout=20)
        rr = criu.restore(tmp_path / "inc")
        reap.append(rr.pid)
        assert req("h") == h
    finally:
        proc.kill_tree([outer], p, timeout=20)


def test_kernel_feature_cache_is_loaded_and_dropped_when_from_another_boot(
        criu_ok, spawn_workload, tmp_path):
    """statesync.criu.kdat: where /run is not a tmpfs, CRIU never keeps its
    kernel-feature cache and re-probes the kernel on every dump and restore. The primed
    cache is what CRIU loads (its own log says so); one stamped with another boot id is
    removed before the next CRIU run, then primed again."""
    from statesync.criu import kdat
    if kdat.run_is_tmpfs():
        assert kdat.prime().startswith("nothing to do")
        return
    kdat.prime()
    assert kdat.status()[0], kdat.status()[1]
    wl = spawn_workload("1M", 0, own_pidns=True, paused=True, seed=1)
    criu.dump(wl.pid, tmp_path / "d", leave_running=True, extra_args=["-v4"])
    log = (tmp_path / "d" / "dump.log").read_text()
    assert f"Loaded kdat cache from {kdat.KDAT}" in log, log[:2000]
    # A cache of another boot (a disk-backed /run survives reboots) is not used.
    with open(kdat.BOOT_STAMP, "w") as f:
        f.write("00000000-another-boot\n")
    kdat._checked = False
    try:
        assert not kdat.status()[0]
        kdat.drop_if_stale()
        assert not os.path.exists(kdat.KDAT)
    finally:
        kdat.prime()
    assert kdat.status()[0]
