"""Two "hosts" on one machine: network namespaces joined by a rate-shaped veth pair.

A :class:`Testbed` creates two network namespaces (``A``, the source host, and ``B``,
the destination host), joins them with a veth pair, gives each end an address, and
shapes both directions with ``tc tbf`` at a given rate. Each side gets its own
directory, so the destination can only use what reached it over the link.

Used by the migration tests, the benchmark and ``make demo``::

    with Testbed(rate="100mbit") as tb:
        dest = tb.popen("b", [python, "-m", "statesync", "receive", "--listen",
                              f"{tb.addr_b}:{port}", ...])
        report = tb.run_source([...])          # or tb.popen("a", ...)

Processes in a side are started with ``nsenter --net=/run/netns/NAME``: only the
network namespace changes (``ip netns exec`` would also unshare the mount namespace,
which CRIU would then try to dump). Names are ``ssm<pid><n>a`` / ``...b``, unique per
process; :meth:`Testbed.close` (also on ``__exit__`` and on failure inside
``__enter__``) kills every process started through the testbed, deletes the
namespaces (which removes the veth pair) and the directories. Stale namespaces left
by a killed run (their creator pid is gone) are swept at the next creation.

Addresses come from 198.18.0.0/15, the range RFC 2544 sets aside for benchmarking
network devices; traffic between them never leaves the two namespaces.

Requires root, ``ip``, ``tc`` and ``nsenter``. Not thread-safe per instance.
"""
from __future__ import annotations

import ctypes
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Sequence

from statesync import proc
from statesync.errors import TestbedError  # defined in errors, re-exported here

NETNS_DIR = "/run/netns"
_PREFIX = "ssm"
_counter = itertools.count()
CLONE_NEWNET = 0x40000000


def parse_rate(rate) -> int:
    """``"100mbit"`` / ``"1gbit"`` / ``"10Mbit"`` / ``125e6`` -> bits per second."""
    if isinstance(rate, (int, float)):
        return int(rate)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmg]?)(bit|bps)?\s*", str(rate).lower())
    if not m:
        raise ValueError(f"not a link rate: {rate!r} (use e.g. 10mbit, 100mbit, 1gbit)")
    mult = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2)]
    bits = float(m.group(1)) * mult
    if m.group(3) == "bps":  # tc's unit: bytes per second
        bits *= 8
    if bits <= 0:
        raise ValueError(f"link rate must be > 0, got {rate!r}")
    return int(bits)


def _run(cmd: Sequence[str], check: bool = True, timeout: float = 20.0):
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise TestbedError(f"{cmd[0]} not found: install iproute2 / util-linux "
                           f"(scripts/setup-system.sh)") from exc
    if check and r.returncode != 0:
        raise TestbedError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def socket_in_netns(netns: str, family=socket.AF_INET, type=socket.SOCK_STREAM) -> socket.socket:
    """A socket created inside network namespace ``netns`` (a name under /run/netns).

    A socket belongs to the namespace it was created in, whatever thread uses it
    later; we create it in a short-lived thread that entered the namespace, so the
    caller's own threads never change namespace.
    """
    result: Dict[str, object] = {}

    def worker():
        try:
            fd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc().setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result["sock"] = socket.socket(family, type)
        except BaseException as exc:  # handed to the caller
            result["error"] = exc

    t = threading.Thread(target=worker, name=f"netns-{netns}")
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["sock"]  # type: ignore[return-value]


def sweep_stale() -> List[str]:
    """Delete testbed namespaces whose creating process no longer exists."""
    removed: List[str] = []
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return removed
    for name in names:
        m = re.fullmatch(_PREFIX + r"(\d+)x\d+[ab]", name)
        if m and proc.state(int(m.group(1))) is None:
            _run(["ip", "netns", "delete", name], check=False)
            removed.append(name)
    return removed


class Testbed:
    """Two network namespaces ``a`` (source) and ``b`` (destination) joined by a veth
    pair shaped with ``tc tbf`` at ``rate`` in both directions.

    Attributes: ``ns_a``/``ns_b`` (namespace names), ``addr_a``/``addr_b`` (IPv4
    addresses), ``dir_a``/``dir_b`` (private directories), ``rate_bps``.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, rate="100mbit", *, base_dir: Optional[str] = None,
                 burst_seconds: float = 0.004):
        self.rate_bps = parse_rate(rate)
        self.burst_seconds = burst_seconds
        tag = f"{_PREFIX}{os.getpid()}x{next(_counter)}"
        self.ns_a, self.ns_b = tag + "a", tag + "b"
        self.veth_a, self.veth_b = tag + "a", tag + "b"  # <= 15 chars for pids < 10^8
        self.addr_a, self.addr_b = "198.18.0.1", "198.18.0.2"
        # tmpfs by default: image sets are written and read in the downtime window.
        self._base_dir = base_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
        self.root: Optional[str] = None
        self.dir_a = self.dir_b = ""
        self._procs: List[subprocess.Popen] = []
        self._created: List[str] = []

    # -- life cycle

    def __enter__(self) -> "Testbed":
        try:
            self.setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def setup(self) -> None:
        if os.geteuid() != 0:
            raise TestbedError("the two-host testbed needs root (network namespaces, tc)")
        for prog in ("ip", "tc", "nsenter"):
            if not shutil.which(prog, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
                raise TestbedError(f"{prog} not found: run scripts/setup-system.sh as root")
        sweep_stale()
        self.root = tempfile.mkdtemp(prefix=f"{self.ns_a[:-1]}-", dir=self._base_dir)
        self.dir_a = os.path.join(self.root, "a")
        self.dir_b = os.path.join(self.root, "b")
        os.mkdir(self.dir_a, 0o700)
        os.mkdir(self.dir_b, 0o700)
        for ns in (self.ns_a, self.ns_b):
            _run(["ip", "netns", "add", ns])
            self._created.append(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "link", "add", self.veth_a, "netns", self.ns_a, "type", "veth",
              "peer", "name", self.veth_b, "netns", self.ns_b])
        for ns, dev, addr in ((self.ns_a, self.veth_a, self.addr_a),
                              (self.ns_b, self.veth_b, self.addr_b)):
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
        self.set_rate(self.rate_bps)

    def set_rate(self, rate) -> None:
        """(Re)shape both directions to ``rate`` (bits/s or ``"100mbit"``)."""
        self.rate_bps = parse_rate(rate)
        # The bucket must hold at least one timer tick of traffic and a full GSO
        # segment (64 KiB), or tbf drops packets instead of delaying them.
        burst = max(96 * 1024, int(self.rate_bps / 8 * self.burst_seconds))
        for ns, dev in ((self.ns_a, self.veth_a), (self.ns_b, self.veth_b)):
            _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
                  "rate", str(self.rate_bps), "burst", str(burst), "latency", "100ms"])

    def set_link(self, up: bool) -> None:
        """Bring the link down (both ends) or up again: a link drop."""
        state = "up" if up else "down"
        for ns, dev in ((self.ns_a, self.veth_a), (self.ns_b, self.veth_b)):
            _run(["ip", "-n", ns, "link", "set", dev, state], check=up)

    def close(self) -> None:
        """Kill what the testbed started, delete namespaces and directories. Idempotent."""
        for p in self._procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    try:
                        p.kill()
                    except ProcessLookupError:
                        pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        for ns in self._created:
            _run(["ip", "netns", "delete", ns], check=False)
        self._created.clear()
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    # -- running things on a side

    def ns(self, side: str) -> str:
        if side not in ("a", "b"):
            raise ValueError(f"side must be 'a' (source) or 'b' (destination), got {side!r}")
        return self.ns_a if side == "a" else self.ns_b

    def wrap(self, side: str, cmd: Sequence[str]) -> List[str]:
        """``cmd`` prefixed so that it runs in the side's network namespace."""
        return ["nsenter", f"--net={NETNS_DIR}/{self.ns(side)}", "--"] + list(cmd)

    def popen(self, side: str, cmd: Sequence[str], **kw) -> subprocess.Popen:
        """Start ``cmd`` in a side (own process group); killed by :meth:`close`."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        env = dict(kw.pop("env", None) or os.environ)
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"]
                                        if env.get("PYTHONPATH") else "")
        p = subprocess.Popen(self.wrap(side, cmd), env=env, **kw)
        self._procs.append(p)
        return p

    def python(self, side: str, args: Sequence[str], **kw) -> subprocess.Popen:
        """Run ``python -m statesync ARGS`` (this interpreter) in a side."""
        return self.popen(side, [sys.executable, "-m", "statesync"] + list(args), **kw)

    def socket(self, side: str, family=socket.AF_INET, type=socket.SOCK_STREAM) -> socket.socket:
        """A socket living in a side's network namespace."""
        return socket_in_netns(self.ns(side), family, type)

    def free_port(self, side: str) -> int:
        """A TCP port free on a side's address (bind-to-0 then release)."""
        s = self.socket(side)
        try:
            s.bind((self.addr_a if side == "a" else self.addr_b, 0))
            return s.getsockname()[1]
        finally:
            s.close()

    def wait_port(self, side: str, port: int, timeout: float = 30.0,
                  proc: Optional[subprocess.Popen] = None) -> None:
        """Wait until something listens on a side's address:port."""
        host = self.addr_a if side == "a" else self.addr_b
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise TestbedError(f"process {proc.args!r} exited ({proc.returncode}) "
                                   f"before listening on {host}:{port}")
            s = self.socket(side)
            s.settimeout(1.0)
            try:
                s.connect((host, port))
                return
            except OSError:
                time.sleep(0.05)
            finally:
                s.close()
        raise TestbedError(f"nothing listening on {host}:{port} in {self.ns(side)} "
                           f"after {timeout}s")
