"""A controllable dirty-page workload: the process statesync tracks, dumps and migrates
in its tests, benchmarks and demo.

Run as a process (``python -m statesync.testing.workloads --size 64M --rate 2000``) it maps a
private anonymous buffer, fills it, and rewrites pages at a set rate (pages/s) over a
working set chosen uniformly or hot/cold. Every write stores a fresh 64-bit sequence
number with its top bit set (a value no fill pattern contains) into the page, so a
written page always changes content. The process keeps a
bitmap of the pages it wrote since the last ``take_written`` request and answers
requests on a UNIX stream socket (one request line in, one JSON line out):

=====================  ===========================================================
``status``             pid (outer, as seen from the initial pid namespace), seq,
                       buffer address/size, rate, paused, mappings
``checksum``           BLAKE2b of every mapping's bytes plus seq, computed while
                       writes are held
``pause`` / ``resume`` stop / restart the rate-driven writes
``take_written``       JSON ``{"count": n}`` then n little-endian uint64 page
                       addresses (sorted); clears the bitmap
``write I J ...``      write the pages at global page indices I, J, ... now
``map BYTES``          add a new private anonymous mapping (a new VMA); returns addr
``rate R``             set the write rate (pages/s)
``quit``               exit(0)
=====================  ===========================================================

The control address is an abstract UNIX socket name by default (``@name``): abstract
names belong to the network namespace, so a source and a restored copy on the same
machine in different namespaces never collide, and CRIU restores them as they were.
Heartbeats (optional) are datagrams ``b"<seq> <time.time()>"`` sent to a path every
``--heartbeat-interval`` seconds; the sender socket is unbound, so nothing about it
stands in the way of a dump. Standard streams go to /dev/null by default for the same
reason.

:func:`spawn` starts one (optionally as init of its own pid namespace and session,
which CRIU restore needs) and returns a :class:`Workload` handle with a client.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np

from statesync._consts import PAGE_SIZE  # re-exported: statesync.workloads.PAGE_SIZE

_SIZE_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text) -> int:
    """``"64M"`` -> 67108864. Accepts K/M/G (binary) suffixes, optional ``B``/``iB``."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace("IB", "").rstrip("B")
    unit = s[-1:] if s[-1:] in _SIZE_SUFFIX and not s[-1:].isdigit() else ""
    num = s[: len(s) - len(unit)] if unit else s
    try:
        value = int(float(num) * _SIZE_SUFFIX[unit])
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 4096, 64M, 1G)") from None
    if value < 0:
        raise ValueError(f"size must be >= 0, got {text!r}")
    return value


# --------------------------------------------------------------------------- server


class _Mapping:
    __slots__ = ("mm", "addr", "npages", "words")

    def __init__(self, nbytes: int):
        npages = max(1, -(-nbytes // PAGE_SIZE))
        self.mm = mmap.mmap(-1, npages * PAGE_SIZE,
                            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.npages = npages
        self.words = np.frombuffer(self.mm, dtype=np.uint64)
        self.addr = int(self.words.ctypes.data)


def _fill(m: _Mapping, mode: str, rng: np.random.Generator) -> None:
    """Initial content. ``mixed`` approximates real heaps: about a third zero pages,
    a third low-entropy (repeated short records), a third random."""
    pages = m.words.reshape(m.npages, PAGE_SIZE // 8)
    if mode == "zero":
        return
    if mode == "random":
        pages[:] = rng.integers(0, 2**63, size=pages.shape, dtype=np.uint64)
        return
    kind = rng.integers(0, 3, size=m.npages)
    rnd = np.flatnonzero(kind == 2)
    if rnd.size:
        pages[rnd] = rng.integers(0, 2**63, size=(rnd.size, pages.shape[1]), dtype=np.uint64)
    low = np.flatnonzero(kind == 1)
    if low.size:
        # A 64-byte record repeated over the page, varied per page.
        rec = rng.integers(0, 256, size=(low.size, 8), dtype=np.uint64)
        pages[low] = np.tile(rec, (1, pages.shape[1] // 8))


class WorkloadServer:
    """The workload's state; runs inside the workload process."""

    def __init__(self, size: int, rate: float, pattern: str, hot_fraction: float,
                 hot_prob: float, fill: str, seed: int):
        self.rng = np.random.default_rng(seed)
        self.lock = threading.Lock()
        self.maps: List[_Mapping] = []
        self.page_base = np.zeros(0, dtype=np.int64)  # first global page index per mapping
        self.written = np.zeros(0, dtype=bool)
        self.seq = 0
        self.rate = float(rate)
        self.pattern = pattern
        self.hot_fraction = hot_fraction
        self.hot_prob = hot_prob
        self.paused = False
        self.fill = fill
        self.add_mapping(size)

    @property
    def npages(self) -> int:
        return int(self.written.size)

    def add_mapping(self, nbytes: int) -> int:
        m = _Mapping(nbytes)
        _fill(m, self.fill, self.rng)
        with self.lock:
            self.maps.append(m)
            self.page_base = np.append(self.page_base, self.npages)
            self.written = np.concatenate([self.written, np.zeros(m.npages, dtype=bool)])
        return m.addr

    def _write_indices(self, idx: np.ndarray) -> None:
        """Write one fresh sequence number into each global page index (lock held)."""
        if idx.size == 0:
            return
        which = np.searchsorted(self.page_base, idx, side="right") - 1
        seqs = self.seq + 1 + np.arange(idx.size, dtype=np.uint64)
        slots = (seqs % (PAGE_SIZE // 8)).astype(np.int64)
        # The top bit is set in no fill value (random words are < 2**63, low-entropy
        # ones < 256), and seq never repeats: every write really changes its page.
        values = seqs | np.uint64(1 << 63)
        for mi in np.unique(which):
            sel = which == mi
            m = self.maps[mi]
            local = idx[sel] - self.page_base[mi]
            m.words[local * (PAGE_SIZE // 8) + slots[sel]] = values[sel]
        self.seq += int(idx.size)
        self.written[idx] = True

    def _pick(self, k: int) -> np.ndarray:
        n = self.npages
        if self.pattern == "hotcold":
            hot_n = max(1, int(n * self.hot_fraction))
            hot = self.rng.random(k) < self.hot_prob
            idx = np.where(hot, self.rng.integers(0, hot_n, size=k),
                           self.rng.integers(0, n, size=k))
        else:
            idx = self.rng.integers(0, n, size=k)
        return idx.astype(np.int64)

    def run(self, tick: float = 0.005) -> None:
        carry = 0.0
        last = time.monotonic()
        while True:
            time.sleep(tick)
            now = time.monotonic()
            dt, last = now - last, now
            if self.paused or self.rate <= 0:
                carry = 0.0
                continue
            # A long stall (e.g. the process was frozen for a dump) must not turn
            # into a burst: cap the catch-up at one second of writes.
            carry += self.rate * min(dt, 1.0)
            k = int(carry)
            if k:
                carry -= k
                with self.lock:
                    if not self.paused:
                        self._write_indices(self._pick(k))

    # -- requests

    def handle(self, line: str):
        parts = line.split()
        if not parts:
            return {"error": "empty request"}
        cmd, args = parts[0], parts[1:]
        if cmd == "status":
            return {"pid": _outer_pid(), "nspid": os.getpid(), "seq": self.seq,
                    "addr": self.maps[0].addr, "size": self.maps[0].npages * PAGE_SIZE,
                    "page_size": PAGE_SIZE, "npages": self.npages, "rate": self.rate,
                    "paused": self.paused,
                    "mappings": [[m.addr, m.npages * PAGE_SIZE] for m in self.maps]}
        if cmd == "checksum":
            with self.lock:
                h = hashlib.blake2b(digest_size=16)
                for m in self.maps:
                    h.update(m.mm)
                h.update(str(self.seq).encode())
                return {"checksum": h.hexdigest(), "seq": self.seq}
        if cmd == "pause":
            with self.lock:
                self.paused = True
            return {"ok": True, "seq": self.seq}
        if cmd == "resume":
            self.paused = False
            return {"ok": True}
        if cmd == "rate":
            self.rate = float(args[0])
            return {"ok": True, "rate": self.rate}
        if cmd == "write":
            idx = np.array([int(a) for a in args], dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= self.npages):
                return {"error": f"page index out of range 0..{self.npages - 1}"}
            with self.lock:
                self._write_indices(idx)
            return {"ok": True, "seq": self.seq}
        if cmd == "map":
            addr = self.add_mapping(parse_size(args[0]))
            return {"ok": True, "addr": addr}
        if cmd == "take_written":
            with self.lock:
                addrs = self._written_addrs()
                self.written[:] = False
            return ({"count": int(addrs.size)}, addrs.astype("<u8").tobytes())
        if cmd == "quit":
            os._exit(0)
        return {"error": f"unknown request {cmd!r}"}

    def _written_addrs(self) -> np.ndarray:
        out = []
        for mi, m in enumerate(self.maps):
            b = int(self.page_base[mi])
            local = np.flatnonzero(self.written[b:b + m.npages]).astype(np.uint64)
            out.append(np.uint64(m.addr) + local * np.uint64(PAGE_SIZE))
        return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.uint64)


def _outer_pid() -> int:
    # /proc here is the mount of the initial pid namespace (we do not remount it),
    # so NSpid's first field is our pid as the rest of the machine sees it.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return os.getpid()


def _sock_addr(address: str):
    return "\0" + address[1:] if address.startswith("@") else address


def _serve(server: WorkloadServer, address: str) -> None:
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if not address.startswith("@") and os.path.exists(address):
        os.unlink(address)
    lsock.bind(_sock_addr(address))
    lsock.listen(8)

    def client(conn):
        with conn:
            f = conn.makefile("rb")
            for raw in f:
                try:
                    reply = server.handle(raw.decode().strip())
                except Exception as exc:  # a bad request must not kill the workload
                    reply = {"error": f"{type(exc).__name__}: {exc}"}
                payload = b""
                if isinstance(reply, tuple):
                    reply, payload = reply
                conn.sendall(json.dumps(reply).encode() + b"\n" + payload)

    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=client, args=(conn,), daemon=True).start()


def _heartbeat(server: WorkloadServer, path: str, interval: float) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    n = 0
    while True:
        n += 1
        try:
            s.sendto(f"{n} {time.time():.6f} {server.seq}".encode(), path)
        except OSError:
            pass  # no observer listening: heartbeats are best effort
        time.sleep(interval)


def run_workload(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m statesync.testing.workloads",
                                description="Dirty-page workload generator.")
    p.add_argument("--size", default="64M", help="buffer size (bytes; K/M/G suffixes)")
    p.add_argument("--rate", type=float, default=1000.0, help="page writes per second")
    p.add_argument("--pattern", choices=["uniform", "hotcold"], default="uniform")
    p.add_argument("--hot-fraction", type=float, default=0.1,
                   help="hotcold: share of pages in the hot set")
    p.add_argument("--hot-prob", type=float, default=0.9,
                   help="hotcold: probability that a write hits the hot set")
    p.add_argument("--fill", choices=["mixed", "zero", "random"], default="mixed")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--control", required=True,
                   help="control socket: a path, or @name for an abstract socket")
    p.add_argument("--heartbeat", help="send heartbeat datagrams to this UNIX socket path")
    p.add_argument("--heartbeat-interval", type=float, default=0.005)
    p.add_argument("--paused", action="store_true", help="start with writes paused")
    a = p.parse_args(argv)
    server = WorkloadServer(parse_size(a.size), a.rate, a.pattern, a.hot_fraction,
                            a.hot_prob, a.fill, a.seed)
    server.paused = a.paused
    # As init of a pid namespace we get no default signal actions; make SIGTERM work.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    threading.Thread(target=_serve, args=(server, a.control), daemon=True).start()
    if a.heartbeat:
        threading.Thread(target=_heartbeat, args=(server, a.heartbeat, a.heartbeat_interval),
                         daemon=True).start()
    server.run()
    return 0


# --------------------------------------------------------------------------- client


class WorkloadClient:
    """Talks to a workload's control socket. One short connection per request, so no
    connection is open while the workload is dumped. Not thread-safe per instance."""

    def __init__(self, address: str, timeout: float = 10.0, netns: Optional[str] = None):
        self.address = address
        self.timeout = timeout
        # Abstract socket names belong to a network namespace: a workload started in
        # one (spawn(netns=...)) is reached by a socket created in that namespace.
        self.netns = netns

    def _socket(self) -> socket.socket:
        if self.netns:
            from statesync.testing.testbed import socket_in_netns
            return socket_in_netns(self.netns, socket.AF_UNIX, socket.SOCK_STREAM)
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def _request(self, line: str):
        s = self._socket()
        s.settimeout(self.timeout)
        try:
            s.connect(_sock_addr(self.address))
            s.sendall(line.encode() + b"\n")
            f = s.makefile("rb")
            reply = json.loads(f.readline() or b"null")
            if reply is None:
                raise ConnectionError(f"workload at {self.address} closed the connection")
            if "error" in reply:
                raise RuntimeError(f"workload at {self.address}: {reply['error']}")
            if "count" in reply:
                need = 8 * int(reply["count"])
                data = f.read(need)
                if len(data) != need:
                    raise ConnectionError("short reply from workload")
                return np.frombuffer(data, dtype="<u8").astype(np.uint64)
            return reply
        finally:
            s.close()

    def status(self) -> dict:
        return self._request("status")

    def checksum(self) -> str:
        return self._request("checksum")["checksum"]

    def pause(self) -> dict:
        return self._request("pause")

    def resume(self) -> dict:
        return self._request("resume")

    def set_rate(self, rate: float) -> None:
        self._request(f"rate {rate}")

    def write(self, indices: Sequence[int]) -> None:
        self._request("write " + " ".join(str(int(i)) for i in indices))

    def map(self, nbytes) -> int:
        return int(self._request(f"map {parse_size(nbytes)}")["addr"])

    def take_written(self) -> np.ndarray:
        return self._request("take_written")

    def quit(self) -> None:
        try:
            self._request("quit")
        except (ConnectionError, OSError, json.JSONDecodeError):
            pass

    def wait_ready(self, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                return self.status()
            except (OSError, ConnectionError) as exc:
                last = exc
                time.sleep(0.02)
        raise TimeoutError(f"workload at {self.address} not ready after {timeout}s: {last}")


@dataclass
class Workload:
    """A running workload process started by :func:`spawn`."""

    pid: int                       # as seen from our pid namespace
    control: str
    popen: subprocess.Popen
    own_pidns: bool
    args: List[str] = field(default_factory=list)
    netns: Optional[str] = None

    @property
    def client(self) -> WorkloadClient:
        return WorkloadClient(self.control, netns=self.netns)

    def alive(self) -> bool:
        """True while the workload exists and is not a zombie."""
        from statesync import proc
        return proc.exists(self.pid)

    def kill(self) -> None:
        """SIGKILL the workload (and anything it started), then reap its wrapper."""
        from statesync import proc
        proc.kill_tree([self.pid], self.popen)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def spawn(size="64M", rate: float = 1000.0, *, pattern: str = "uniform", fill: str = "mixed",
          seed: int = 1, control: Optional[str] = None, heartbeat: Optional[str] = None,
          heartbeat_interval: float = 0.005, paused: bool = False, own_pidns: bool = False,
          netns: Optional[str] = None, python: Optional[str] = None,
          extra_args: Sequence[str] = (), ready_timeout: float = 60.0) -> Workload:
    """Start a workload process and wait until it answers.

    ``own_pidns=True`` starts it as init of a new pid namespace and session
    (``unshare -p -f setsid``; root only), which ``criu restore`` needs to get the same
    pids back. ``netns`` runs it inside a named network namespace
    (``nsenter --net=/run/netns/NAME``). See docs/workloads.md.
    The returned handle's ``pid`` is the workload's pid in our namespace.
    """
    control = control or f"@statesync-wl-{os.getpid()}-{time.monotonic_ns()}"
    cmd = [python or sys.executable, "-m", "statesync.testing.workloads", "--size", str(size),
           "--rate", str(rate), "--pattern", pattern, "--fill", fill, "--seed", str(seed),
           "--control", control]
    if heartbeat:
        cmd += ["--heartbeat", heartbeat, "--heartbeat-interval", str(heartbeat_interval)]
    if paused:
        cmd.append("--paused")
    cmd += list(extra_args)
    if own_pidns:
        cmd = ["unshare", "-p", "-f", "setsid"] + cmd
    if netns:
        # nsenter changes only the network namespace; `ip netns exec` would also
        # unshare the mount namespace, which CRIU would then have to dump.
        cmd = ["nsenter", f"--net=/run/netns/{netns}", "--"] + cmd
    env = dict(os.environ)
    # The child must import this same statesync, wherever it was imported from.
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    client = WorkloadClient(control)
    if netns:
        # The control socket is abstract, hence only reachable inside that netns.
        wl = Workload(pid=-1, control=control, popen=popen, own_pidns=own_pidns, args=cmd,
                      netns=netns)
        wl.pid = _wait_child_pid(popen, cmd, ready_timeout)
        try:
            WorkloadClient(control, netns=netns).wait_ready(ready_timeout)
        except TimeoutError:
            wl.kill()
            raise
        return wl
    try:
        st = client.wait_ready(ready_timeout)
    except TimeoutError:
        popen.kill()
        raise
    return Workload(pid=int(st["pid"]), control=control, popen=popen, own_pidns=own_pidns,
                    args=cmd)


def processes_with(*needles: bytes, exe: Optional[bytes] = None,
                   contains: Optional[bytes] = None) -> List[int]:
    """pids of the processes (this kernel, any namespace) whose command line holds
    every one of ``needles`` as a whole argument; with ``exe``, whose argv[0]'s base
    name contains ``exe``; with ``contains``, one of whose arguments contains it."""
    from statesync import proc
    want = [n.decode() for n in needles]
    ex = exe.decode() if exe is not None else None
    part = contains.decode() if contains is not None else None

    def match(args: List[str]) -> bool:
        return ((ex is None or ex in os.path.basename(args[0]))
                and (part is None or any(part in a for a in args))
                and all(n in args for n in want))
    return proc.find_by_cmdline(match)


def copies(control: str) -> List[int]:
    """pids of every running workload process (any host, any namespace of this kernel)
    whose command line names ``control``: the original and any restored copy. Tests
    use it to check that a migration leaves exactly one copy."""
    return processes_with(control.encode(), exe=b"python")


def _wait_child_pid(popen: subprocess.Popen, cmd, timeout: float) -> int:
    """Find the python process at the end of a wrapper chain (nsenter, unshare)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = popen.pid
        for _ in range(4):
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    kids = f.read().split()
            except OSError:
                break
            exe = ""
            try:
                exe = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0].decode()
            except OSError:
                pass
            if "python" in os.path.basename(exe):
                return pid
            if not kids:
                break
            pid = int(kids[0])
        time.sleep(0.02)
    raise TimeoutError(f"workload did not start: {' '.join(cmd)}")


if __name__ == "__main__":
    sys.exit(run_workload())
