"""Third-party services as migration targets: Debian's ``redis-server``, started the
way a migration needs it, a minimal RESP client, a write load and a prober.

Redis listens only on a UNIX socket at a path (``--port 0``): the path lives in the
file system both network namespaces share, and CRIU re-binds it on restore, so
clients reach whichever copy runs. Every client here opens one short connection per
request (or per pipelined batch): CRIU cannot dump a process holding one half of a
stream connection whose other half lives outside the dumped tree, so a long-lived
outside connection would make every dump fail. A request in flight at the instant
CRIU collects sockets can still fail one dump; the engine retries the dump
(``migrate(..., dump_retries=...)``).

Used by the tests, the benchmark and the demo. Thread-safe: each call opens its own
connection.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from statesync import proc
from statesync.errors import RedisError  # defined in errors, re-exported here


def _resp(args: Sequence) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, (bytes, bytearray)) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class _Reader:
    def __init__(self, sock: socket.socket):
        self.f = sock.makefile("rb")

    def reply(self):
        line = self.f.readline()
        if not line.endswith(b"\r\n"):
            raise RedisError("connection closed mid-reply")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.f.read(n + 2)
            if len(data) != n + 2:
                raise RedisError("connection closed mid-reply")
            return data[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise RedisError(f"unexpected reply {line[:40]!r}")


class RedisClient:
    """One short UNIX-socket connection per call."""

    def __init__(self, path: str, timeout: float = 5.0):
        self.path = path
        self.timeout = timeout

    def _conn(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except OSError:
            s.close()
            raise
        return s

    def command(self, *args):
        return self.pipeline([args])[0]

    def pipeline(self, commands: Sequence[Sequence]) -> list:
        s = self._conn()
        try:
            s.sendall(b"".join(_resp(c) for c in commands))
            r = _Reader(s)
            return [r.reply() for _ in commands]
        finally:
            s.close()


@dataclass
class RedisServer:
    """A redis-server started by :func:`spawn_redis`. ``pid`` is the server's pid in
    our namespace (the init of its own pid namespace)."""

    pid: int
    path: str
    popen: subprocess.Popen
    args: List[str] = field(default_factory=list)

    @property
    def client(self) -> RedisClient:
        return RedisClient(self.path)

    def kill(self) -> None:
        """SIGKILL the server (init of its pid namespace) and reap its wrapper."""
        proc.kill_tree([self.pid], self.popen)


def redis_binary() -> Optional[str]:
    return shutil.which("redis-server", path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin")


def spawn_redis(path: str, *, netns: Optional[str] = None, maxmemory: str = "2gb",
                ready_timeout: float = 20.0) -> RedisServer:
    """Start ``redis-server`` as init of its own pid namespace and session, in
    network namespace ``netns`` (``nsenter --net``) if given, listening only on the
    UNIX socket ``path``, with persistence off (the state is its memory)."""
    exe = redis_binary()
    if not exe:
        raise RedisError("redis-server not installed (scripts/setup-system.sh installs it)")
    cmd = ["unshare", "-p", "-f", "setsid", exe, "--port", "0", "--unixsocket", path,
           "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
           "--daemonize", "no", "--logfile", "", "--maxmemory", maxmemory,
           "--io-threads", "1"]
    if netns:
        cmd = ["nsenter", f"--net=/run/netns/{netns}", "--"] + cmd
    popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + ready_timeout
    client = RedisClient(path)
    pid = None
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RedisError(f"redis-server exited with {popen.returncode}: {' '.join(cmd)}")
        if pid is None:
            pid = _find_process(popen.pid, os.path.basename(exe))
        try:
            if pid and client.command("PING") == "PONG":
                return RedisServer(pid, path, popen, cmd)
        except OSError:
            pass
        time.sleep(0.02)
    # redis-server is the init of its own pid namespace and session: killing the
    # unshare/nsenter wrapper alone would leave it running.
    proc.kill_tree([pid], popen)
    raise RedisError(f"redis-server did not answer on {path} within {ready_timeout}s")


def _find_process(root: int, name: str) -> Optional[int]:
    """root or its first descendant whose comm starts like ``name`` (the kernel
    keeps 15 characters of it)."""
    for p in [root] + proc.descendants(root):
        try:
            with open(f"/proc/{p}/comm") as f:
                if f.read().strip().startswith(name[:15]):
                    return p
        except OSError:
            pass
    return None


def load_keys(client: RedisClient, n: int, value_size: int = 1000, batch: int = 500,
              prefix: str = "key") -> None:
    """SET ``prefix:i`` for i < n to a value of ``value_size`` bytes derived from i."""
    for lo in range(0, n, batch):
        cmds = [
            ("SET", f"{prefix}:{i}", value_for(i, value_size))
            for i in range(lo, min(n, lo + batch))
        ]
        for r in client.pipeline(cmds):
            if r != "OK":
                raise RedisError(f"SET failed: {r!r}")


def value_for(i: int, size: int) -> bytes:
    base = f"{i:012d}".encode()
    return (base * (size // len(base) + 1))[:size]


class RedisWriter:
    """A bounded write load: ``rate`` pipelined batches of ``batch`` SETs per second
    over keys ``prefix:0..keys-1``; each key's value carries a version number so a
    lost write is visible. ``acked[k]`` is the last version redis acknowledged for k.
    Failed batches (service frozen or moving) are counted, not retried."""

    def __init__(self, client: RedisClient, keys: int, rate: float = 50.0, batch: int = 50,
                 prefix: str = "w", max_seconds: float = 300.0):
        self.client = client
        self.keys = keys
        self.rate = rate
        self.batch = batch
        self.prefix = prefix
        self.max_seconds = max_seconds
        self.acked: Dict[int, int] = {}
        self.writes = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-writer", daemon=True)

    def _run(self) -> None:
        n = 0
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            keys = [(n * self.batch + j) % self.keys for j in range(self.batch)]
            cmds = [("SET", f"{self.prefix}:{k}", f"v{n}") for k in keys]
            try:
                self.client.pipeline(cmds)
            except (OSError, RedisError):
                self.failures += 1
            else:
                for k in keys:
                    self.acked[k] = n
                self.writes += len(keys)
            n += 1
            self._stop.wait(1.0 / self.rate)

    def start(self) -> "RedisWriter":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def verify(self) -> int:
        """Keys whose stored version is older than the last acknowledged one."""
        ks = sorted(self.acked)
        got = self.client.pipeline([("GET", f"{self.prefix}:{k}") for k in ks]) if ks else []
        bad = 0
        for k, v in zip(ks, got):
            if v is None or int(v[1:]) < self.acked[k]:
                bad += 1
        return bad
