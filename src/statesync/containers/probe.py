"""A TCP client that holds ONE connection to a redis server through a migration.

:class:`RedisSession` connects once (from a socket the caller made, e.g. in a client
namespace) and, in a thread, issues ``SET key:N N`` then ``GET key:N`` every
``interval`` seconds on that same connection, recording each acknowledged write and the
time between consecutive replies. After the migration, :meth:`stop` ends the loop;
``gap_s`` is the longest time between two replies (what the client saw of the
switch-over), ``error`` the first failure (a reset, a timeout, a wrong answer), ``acked``
the writes the server acknowledged, which :meth:`verify` checks on a fresh connection.
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Callable, List, Optional, Sequence


def resp(args: Sequence) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, (bytes, bytearray)) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class _Reader:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed by the server")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RuntimeError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("connection closed by the server")
                self.buf += chunk
            data, self.buf = self.buf[:n], self.buf[n + 2:]
            return data
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise ValueError(f"bad RESP line {line[:40]!r}")


def command(sock: socket.socket, *args, reader: Optional[_Reader] = None):
    sock.sendall(resp(args))
    return (reader or _Reader(sock)).reply()


class RedisSession:
    """One long-lived connection doing SET/GET every ``interval`` s (see module doc).
    ``make_socket`` returns a fresh unconnected TCP socket (for instance one created in
    the client namespace); ``timeout`` bounds one reply (a reply later than that is an
    error: the connection is considered lost)."""

    def __init__(self, make_socket: Callable[[], socket.socket], host: str, port: int, *,
                 interval: float = 0.005, timeout: float = 10.0, prefix: str = "sess"):
        self.make_socket, self.host, self.port = make_socket, host, port
        self.interval, self.timeout, self.prefix = interval, timeout, prefix
        self.acked: List[int] = []
        self.replies = 0
        self.gap_s = 0.0
        self.gap_at = 0.0
        self.error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.sock: Optional[socket.socket] = None

    def start(self) -> "RedisSession":
        self.sock = self.make_socket()
        self.sock.settimeout(self.timeout)
        self.sock.connect((self.host, self.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader = _Reader(self.sock)
        if command(self.sock, "PING", reader=self._reader) != b"PONG":
            raise RuntimeError("no PONG from redis")
        self._thread = threading.Thread(target=self._loop, name="redis-session", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        sock = self.sock
        assert sock is not None  # start() connected it before starting this thread
        n = 0
        last = time.monotonic()
        try:
            while not self._stop.is_set():
                key = f"{self.prefix}:{n}"
                sock.sendall(resp(["SET", key, n]) + resp(["GET", key]))
                r1 = self._reader.reply()
                r2 = self._reader.reply()
                now = time.monotonic()
                if r1 != b"OK" or r2 != str(n).encode():
                    raise RuntimeError(f"bad reply for {key}: {r1!r} {r2!r}")
                self.acked.append(n)
                self.replies += 2
                if now - last > self.gap_s:
                    self.gap_s, self.gap_at = now - last, now
                last = now
                n += 1
                self._stop.wait(self.interval)
        except BaseException as exc:  # recorded for the test to report
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=self.timeout + 5)
        if self.sock:
            self.sock.close()

    def verify(self, sock: socket.socket) -> List[int]:
        """The acknowledged writes missing on the server (read over ``sock``, a new,
        unconnected socket); [] when all are there."""
        sock.settimeout(self.timeout)
        sock.connect((self.host, self.port))
        r = _Reader(sock)
        missing = []
        try:
            step = 500
            for i in range(0, len(self.acked), step):
                chunk = self.acked[i:i + step]
                got = command(sock, "MGET", *[f"{self.prefix}:{n}" for n in chunk], reader=r)
                missing += [n for n, v in zip(chunk, got) if v != str(n).encode()]
        finally:
            sock.close()
        return missing
