"""A second real third-party service through CRIU: Debian's memcached, with data,
survives dump -> writes -> dump -> write_incremental -> criu restore with every key
intact, and the incremental set stores only part of the pages."""
import socket
import subprocess
import time

import numpy as np

from conftest import find_program, free_port, require
from statesync import criu, proc


class _Memcached:
    """The memcached text protocol over one short-lived TCP connection."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("memcached closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("memcached closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def set_many(self, items):
        self.sock.sendall(b"".join(b"set %s 0 0 %d\r\n%s\r\n" % (k, len(v), v)
                                   for k, v in items))
        return [self._line() for _ in items]

    def delete_many(self, keys):
        self.sock.sendall(b"".join(b"delete %s\r\n" % k for k in keys))
        return [self._line() for _ in keys]

    def get_many(self, keys):
        self.sock.sendall(b"get " + b" ".join(keys) + b"\r\n")
        out = {}
        while True:
            line = self._line()
            if line == b"END":
                return out
            _, key, _, n = line.split()
            out[key] = self._exact(int(n) + 2)[:-2]

    def close(self):
        self.sock.close()


def _settled_fds(pid, quiet=0.3, timeout=10.0):
    """The server's fd count once it has stayed the same for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = proc.fd_count(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        n = proc.fd_count(pid)
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return n
    raise AssertionError(f"fd count of pid {pid} never settled")


def _wait_fds(pid, count, timeout=10.0):
    """Wait until the server has closed its side of our client connections: CRIU
    will not dump a connection whose peer is outside the dumped tree."""
    deadline = time.monotonic() + timeout
    while proc.fd_count(pid) > count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.fd_count(pid) <= count


def test_memcached_survives_dump_incremental_restore(criu_ok, tmp_path):
    exe = find_program("memcached")
    require(exe, "needs memcached (scripts/setup-system.sh installs it)")
    port = free_port()
    p = subprocess.Popen(["unshare", "-p", "-f", "setsid", exe, "-u", "root", "-l", "127.0.0.1",
                          "-p", str(port), "-U", "0", "-m", "64", "-t", "1"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    outer = restored = None
    try:
        deadline = time.monotonic() + 20
        mc = None
        while mc is None and time.monotonic() < deadline:
            try:
                mc = _Memcached(port)
            except OSError:
                time.sleep(0.02)
        assert mc is not None, "memcached did not start"
        outer = proc.descendants(p.pid)[0]
        mc.close()
        base_fds = _settled_fds(outer)              # no client connection open
        mc = _Memcached(port)
        rng = np.random.default_rng(5)
        data = {b"k%d" % i: rng.bytes(int(rng.integers(16, 400))) for i in range(15000)}
        items = list(data.items())
        for i in range(0, len(items), 1000):
            assert set(mc.set_many(items[i:i + 1000])) == {b"STORED"}
        mc.close()
        _wait_fds(outer, base_fds)

        criu.dump(outer, tmp_path / "d1", leave_running=True)
        mc = _Memcached(port)
        changed = [(b"k%d" % i, b"v2-%d" % i) for i in rng.choice(15000, 1500, replace=False)]
        changed += [(b"n%d" % i, b"new-%d" % i) for i in range(500)]
        assert set(mc.set_many(changed)) == {b"STORED"}
        data.update(changed)
        gone = [b"k%d" % i for i in range(50)]
        assert set(mc.delete_many(gone)) <= {b"DELETED", b"NOT_FOUND"}
        for k in gone:
            data.pop(k, None)
        mc.close()
        _wait_fds(outer, base_fds)
        criu.dump(outer, tmp_path / "d2")           # ends the original
        p.wait(timeout=20)

        inc = criu.write_incremental(tmp_path / "d2", tmp_path / "d1", tmp_path / "inc")
        assert 0 < inc.pages_written < criu.ImageSet(tmp_path / "d2").npages
        restored = criu.restore(tmp_path / "inc").pid
        mc = _Memcached(port)
        keys = list(data)
        for i in range(0, len(keys), 500):
            got = mc.get_many(keys[i:i + 500])
            assert got == {k: data[k] for k in keys[i:i + 500]}
        assert mc.get_many(gone) == {}
        mc.close()
    finally:
        proc.kill_tree([outer, restored], p, timeout=20)
