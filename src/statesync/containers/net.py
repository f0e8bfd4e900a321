"""TCP continuity across a migration: a service IP that moves, CRIU's network lock, announcements.

A TCP client outside the migrated service keeps its connection when (FIELD-NOTES, checked here):

1. the source is dumped with ``tcp_established`` (CRIU puts the sockets in repair mode and
   installs its *network lock*: DROP rules for each dumped connection, so neither side's
   kernel answers the peer while the service is frozen);
2. the lock is replicated into the destination's network namespace **before** the service
   IP appears there (:func:`replicate_network_lock`): otherwise the destination kernel answers
   the client's retransmission with a RST, the connection dies;
3. the service IP moves (:func:`move_ip`): removed at the source, added at the destination
   (it must exist there before ``restore``: CRIU re-connects the socket to it), announced with
   a gratuitous ARP (:func:`announce`) so the switch learns the new port;
4. the restore (``tcp_established``) re-creates the connections and lifts the lock (CRIU's
   unlock removes the replicated rules); :func:`remove_network_lock` clears the source's
   leftovers once the source copy is gone.

The service IP lives on its own macvlan interface with a fixed MAC address (``svc_mac``),
the way a migrated VM keeps its MAC: the client's ARP entry stays valid, only the switch has
to learn the new port, which the gratuitous ARP from the destination teaches it. Host
interfaces get ``arp_ignore=1`` so only the service interface answers for the service IP.

:class:`ServiceLan` extends a two-host :class:`statesync.testing.testbed.Testbed` (or any two
namespaces) with a switch namespace holding a bridge, a client namespace, and a service IP.

Every function here runs ``ip`` / ``iptables-save`` / ``nft`` in the namespace it names (a
name under /run/netns or a path) and raises :class:`~statesync.errors.NetworkMoveError`.
"""
from __future__ import annotations

import ctypes
import itertools
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import NetworkMoveError

__all__ = [
    "NetworkLock",
    "network_lock_of",
    "lock_from_dump_log",
    "replicate_network_lock",
    "rule_key",
    "remove_network_lock",
    "add_service_ip",
    "remove_service_ip",
    "move_ip",
    "announce",
    "ServiceLan",
    "in_netns",
    "netns_path",
    "TcpHandoff",
]

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
#: CRIU marks the packets of its own restore with this (SOCCR_MARK); its lock rules let them pass.
CRIU_MARK = 0xC114
_PREFIX = "ssl"
_counter = itertools.count()
_SEARCH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def netns_path(netns: str) -> str:
    return netns if "/" in netns else os.path.join(NETNS_DIR, netns)


def in_netns(netns: Optional[str], cmd: Sequence[str]) -> List[str]:
    """``cmd`` run in network namespace ``netns`` (nothing changes for None)."""
    if not netns:
        return list(cmd)
    return ["nsenter", f"--net={netns_path(netns)}", "--"] + list(cmd)


def _run(netns: Optional[str], cmd: Sequence[str], what: str, check: bool = True,
         input: Optional[str] = None, timeout: float = 20.0) -> subprocess.CompletedProcess:
    full = in_netns(netns, cmd)
    try:
        r = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input,
                           stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError:
        raise NetworkMoveError(
            netns or "", f"{what}: {cmd[0]} not found (run scripts/setup-system.sh as root)"
        ) from None
    except subprocess.TimeoutExpired:
        raise NetworkMoveError(
            netns or "", f"{what}: {cmd[0]} timed out after {timeout:g} s"
        ) from None
    if check and r.returncode != 0:
        err = (r.stderr or r.stdout).strip().splitlines()
        raise NetworkMoveError(netns or "", f"{what} failed: {err[-1] if err else r.returncode}")
    return r


# --------------------------------------------------------------------------- CRIU's network lock


@dataclass
class NetworkLock:
    """CRIU's network lock as found in a namespace: ``iptables`` / ``ip6tables``
    (iptables-restore input lines, ``-A CHAIN ...``, filter table) and ``nft_tables``
    (``(family, name, ruleset text)`` of CRIU's own nftables tables)."""

    iptables: List[str] = field(default_factory=list)
    ip6tables: List[str] = field(default_factory=list)
    nft_tables: List[Tuple[str, str, str]] = field(default_factory=list)
    chains: Dict[str, List[str]] = field(default_factory=dict)  # v4/v6 -> CRIU chains to create

    def __bool__(self) -> bool:
        return bool(self.iptables or self.ip6tables or self.nft_tables)

    @property
    def rules(self) -> int:
        return len(self.iptables) + len(self.ip6tables) + len(self.nft_tables)


_MARK_RE = re.compile(r"--mark\s+0x0*c114\b", re.I)


def _criu_iptables_lines(save_text: str) -> Tuple[List[str], List[str]]:
    """From ``iptables-save`` output: CRIU's rules in table filter (rules that let
    CRIU's marked packets through, or DROPs in a chain named CRIU) and CRIU chains."""
    table = None
    rules: List[str] = []
    chains: List[str] = []
    for ln in save_text.splitlines():
        if ln.startswith("*"):
            table = ln[1:].strip()
            continue
        if table != "filter":
            continue
        if ln.startswith(":CRIU"):
            chains.append(ln.split()[0][1:])
        elif ln.startswith("-A ") and (_MARK_RE.search(ln) or ln.split()[1].startswith("CRIU")
                                       or re.search(r"-j CRIU\b", ln)):
            rules.append(ln)
    return rules, chains


def network_lock_of(netns: Optional[str]) -> NetworkLock:
    """What of CRIU's network lock is installed in ``netns`` now (after a
    ``tcp_established`` dump with CRIU left stopped)."""
    lock = NetworkLock()
    for fam, tool in (("v4", "iptables-save"), ("v6", "ip6tables-save")):
        if not shutil.which(tool, path=_SEARCH):
            continue
        r = _run(netns, [tool, "-t", "filter"], f"{tool}", check=False)
        if r.returncode != 0:
            continue
        rules, chains = _criu_iptables_lines(r.stdout)
        (lock.iptables if fam == "v4" else lock.ip6tables).extend(rules)
        if chains:
            lock.chains[fam] = chains
    if shutil.which("nft", path=_SEARCH):
        r = _run(netns, ["nft", "list", "tables"], "nft list tables", check=False)
        for ln in r.stdout.splitlines():
            parts = ln.split()
            if len(parts) == 3 and parts[0] == "table" and parts[2].startswith("CRIU"):
                fam, name = parts[1], parts[2]
                t = _run(netns, ["nft", "list", "table", fam, name], f"nft list table {fam} {name}")
                lock.nft_tables.append((fam, name, t.stdout))
    return lock


_LOG_RULE = re.compile(r"Running (ip6?tables) \[(ip6?tables) (.*)\]\s*$")
_LOG_NFT = re.compile(r"Running nftables \[add element (\S+) (\S+) ")


def lock_from_dump_log(dump_log: str, src_netns: Optional[str] = None) -> NetworkLock:
    """CRIU's network lock as its dump.log records it: the per-connection iptables
    rules it inserted (no process run: the switch-over path stays short), or, for
    ``network-lock nftables``, the name of its table, listed once in ``src_netns``.
    Falls back to :func:`network_lock_of` when the log shows a lock it cannot parse."""
    lock = NetworkLock()
    nft: List[Tuple[str, str]] = []
    try:
        with open(dump_log, errors="replace") as f:
            lines = f.readlines()
    except OSError as exc:
        raise NetworkMoveError(
            src_netns or "", f"cannot read CRIU's log {dump_log}: {exc}"
        ) from None
    locked = False
    for ln in lines:
        if "Lock network" in ln or "Locked " in ln:
            locked = True
        m = _LOG_RULE.search(ln)
        if m:
            args = m.group(3).split()
            # iptables -w -t filter -I CHAIN rule... -> "-A CHAIN rule..." for filter
            try:
                t = args.index("-t")
                table = args[t + 1]
            except (ValueError, IndexError):
                table = "filter"
            if "-I" not in args or table != "filter":
                continue
            i = args.index("-I")
            rule = "-A " + " ".join(args[i + 1:])
            (lock.iptables if m.group(1) == "iptables" else lock.ip6tables).append(rule)
            continue
        m = _LOG_NFT.search(ln)
        if m and (m.group(1), m.group(2)) not in nft:
            nft.append((m.group(1), m.group(2)))
    for fam, name in nft:
        t = _run(src_netns, ["nft", "list", "table", fam, name], f"nft list table {fam} {name}")
        lock.nft_tables.append((fam, name, t.stdout))
    if locked and not lock:
        return network_lock_of(src_netns)
    return lock


_OPT_ALIASES = {"-s": "src", "--source": "src", "-d": "dst", "--destination": "dst",
                "--sport": "sport", "--source-port": "sport", "--dport": "dport",
                "--destination-port": "dport", "-p": "proto", "--protocol": "proto", "-j": "jump"}


def rule_key(rule: str) -> Tuple:
    """What identifies one of CRIU's lock rules, whatever its spelling (dump.log's
    ``--source A`` and iptables-save's ``-s A/32`` are the same rule): chain,
    protocol, addresses, ports, target."""
    toks = rule.split()
    chain = toks[1] if len(toks) > 1 and toks[0] in ("-A", "-I", "-D") else ""
    key = {"chain": chain}
    for i, t in enumerate(toks[:-1]):
        k = _OPT_ALIASES.get(t)
        if k:
            v = toks[i + 1]
            if k in ("src", "dst") and v.endswith("/32"):
                v = v[:-3]
            key[k] = v.lower()
    return tuple(sorted(key.items()))


def _iptables_restore_input(
    chains: Sequence[str], rules: Sequence[str], delete: bool = False
) -> str:
    out = ["*filter"]
    if not delete:
        out += [f":{c} - [0:0]" for c in chains]
        # CRIU inserts its rules at the head of INPUT/OUTPUT: so do we, ahead of any ACCEPT
        # the destination already has.
        out += ["-I " + r[3:] if r.startswith("-A ") else r for r in rules]
    else:
        out += ["-D " + r[3:] for r in rules if r.startswith("-A ")]
        out += [f"-X {c}" for c in chains]
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def replicate_network_lock(src_netns: Optional[str], dst_netns: Optional[str],
                           lock: Optional[NetworkLock] = None, *, dump_log: Optional[str] = None,
                           skip_present: bool = False) -> NetworkLock:
    """Install CRIU's network lock into ``dst_netns``: ``lock`` when given, else the
    one ``dump_log`` (CRIU's dump.log) records (:func:`lock_from_dump_log`, cheapest),
    else what :func:`network_lock_of` finds in ``src_netns``. Call it after the dump and
    BEFORE the service IP appears at the destination; CRIU's unlock at a
    ``tcp_established`` restore removes it again. ``skip_present``: first read the
    destination's rules and add only missing ones (an idempotent retry). Returns the
    lock (empty when the source had none: nothing to do). One ``iptables-restore``
    (or ``nft -f``) per family in the destination."""
    if lock is None:
        lock = lock_from_dump_log(dump_log, src_netns) if dump_log else network_lock_of(src_netns)
    have = network_lock_of(dst_netns) if skip_present else NetworkLock()
    if lock.iptables or lock.chains.get("v4"):
        present = {rule_key(r) for r in have.iptables}
        rules = [r for r in lock.iptables if rule_key(r) not in present]
        chains = [c for c in lock.chains.get("v4", []) if c not in have.chains.get("v4", [])]
        if rules or chains:
            _run(dst_netns, ["iptables-restore", "-w", "--noflush"], "iptables-restore (lock)",
                 input=_iptables_restore_input(chains, rules))
    if lock.ip6tables or lock.chains.get("v6"):
        present6 = {rule_key(r) for r in have.ip6tables}
        rules = [r for r in lock.ip6tables if rule_key(r) not in present6]
        chains = [c for c in lock.chains.get("v6", []) if c not in have.chains.get("v6", [])]
        if rules or chains:
            _run(dst_netns, ["ip6tables-restore", "-w", "--noflush"], "ip6tables-restore (lock)",
                 input=_iptables_restore_input(chains, rules))
    present = {(f, n) for f, n, _ in have.nft_tables}
    for fam, name, text in lock.nft_tables:
        if (fam, name) not in present:
            _run(dst_netns, ["nft", "-f", "-"], f"nft -f (table {fam} {name})", input=text)
    return lock


def remove_network_lock(netns: Optional[str], lock: Optional[NetworkLock] = None) -> int:
    """Remove CRIU's network lock from ``netns`` (the source's leftovers after a
    commit: a dump left stopped keeps it). ``lock`` None = whatever is there now.
    Returns how many rules/tables were removed."""
    if lock is None:
        lock = network_lock_of(netns)
    have = network_lock_of(netns)
    n = 0
    # delete the rules as the namespace spells them now, matched by what they lock
    want = {rule_key(r) for r in lock.iptables}
    rules = [r for r in have.iptables if rule_key(r) in want]
    chains = [c for c in lock.chains.get("v4", []) if c in have.chains.get("v4", [])]
    if rules or chains:
        _run(netns, ["iptables-restore", "-w", "--noflush"], "iptables-restore (unlock)",
             input=_iptables_restore_input(chains, rules, delete=True))
        n += len(rules)
    want6 = {rule_key(r) for r in lock.ip6tables}
    rules6 = [r for r in have.ip6tables if rule_key(r) in want6]
    chains6 = [c for c in lock.chains.get("v6", []) if c in have.chains.get("v6", [])]
    if rules6 or chains6:
        _run(netns, ["ip6tables-restore", "-w", "--noflush"], "ip6tables-restore (unlock)",
             input=_iptables_restore_input(chains6, rules6, delete=True))
        n += len(rules6)
    present = {(f, nm) for f, nm, _ in have.nft_tables}
    for fam, name, _ in lock.nft_tables:
        if (fam, name) in present:
            _run(netns, ["nft", "delete", "table", fam, name], f"nft delete table {fam} {name}")
            n += 1
    return n


# --------------------------------------------------------------------------- service IP


def _split_ip(ip: str) -> Tuple[str, int]:
    if "/" in ip:
        a, p = ip.split("/", 1)
        return a, int(p)
    return ip, 32


def add_service_ip(netns: Optional[str], ip: str, lower: str, dev: str = "svc0",
                   mac: Optional[str] = None, announce_it: bool = True) -> None:
    """Create the service interface ``dev`` (macvlan on ``lower``, MAC ``mac``) in
    ``netns`` holding ``ip`` (``A.B.C.D`` or ``A.B.C.D/len``; /32 when no length: the
    host's own interface keeps the subnet route) and announce it. One ``ip -batch``."""
    addr, plen = _split_ip(ip)
    link = (
        f"link add {dev}"
        + (f" address {mac}" if mac else "")
        + f" link {lower} type macvlan mode bridge"
    )
    batch = f"{link}\naddr add {addr}/{plen} dev {dev} nodad\nlink set {dev} up\n"
    _run(netns, ["ip", "-batch", "-"], f"service interface {dev} with {addr}", input=batch)
    if announce_it:
        announce(netns, dev, addr, mac=mac)


def remove_service_ip(netns: Optional[str], dev: str = "svc0") -> bool:
    """Delete the service interface (and so the IP) in ``netns``; False when absent."""
    r = _run(netns, ["ip", "link", "del", dev], f"ip link del {dev}", check=False)
    return r.returncode == 0


def _mac_of(netns: Optional[str], dev: str) -> str:
    # not /sys/class/net: sysfs shows the namespace it was mounted in, not ours
    r = _run(netns, ["ip", "-o", "link", "show", dev], f"ip link show {dev}")
    m = re.search(r"link/ether ([0-9a-f:]{17})", r.stdout)
    if not m:
        raise NetworkMoveError(netns or "", f"no MAC address on {dev}")
    return m.group(1)


def _in_netns_thread(netns: Optional[str], fn):
    """Run ``fn()`` in a short-lived thread that entered ``netns``; return its result."""
    out: Dict[str, object] = {}

    def worker():
        try:
            if netns:
                fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, os.strerror(err))
                finally:
                    os.close(fd)
            out["r"] = fn()
        except BaseException as exc:  # handed to the caller
            out["e"] = exc

    t = threading.Thread(target=worker, name="statesync-netns")
    t.start()
    t.join()
    if "e" in out:
        raise out["e"]  # type: ignore[misc]
    return out.get("r")


def announce(netns: Optional[str], dev: str, ip: str, count: int = 2,
             mac: Optional[str] = None) -> None:
    """Gratuitous ARP for ``ip`` from ``dev`` in ``netns``: a broadcast ARP request with
    sender = target = ip and the device's MAC, sent with a raw packet socket (no arping
    process on the switch-over path). Teaches switches (bridge FDBs) the port and
    neighbours the MAC."""
    addr, _ = _split_ip(ip)
    macb = bytes.fromhex((mac or _mac_of(netns, dev)).replace(":", ""))
    ipb = socket.inet_aton(addr)
    bcast = b"\xff" * 6
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, macb, ipb, b"\x00" * 6, ipb)
    frame = bcast + macb + struct.pack("!H", 0x0806) + arp
    frame += b"\x00" * max(0, 60 - len(frame))

    def send():
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        try:
            s.bind((dev, 0))
            for _ in range(count):
                s.send(frame)
        finally:
            s.close()

    try:
        _in_netns_thread(netns, send)
    except OSError as exc:
        raise NetworkMoveError(netns or "", f"gratuitous ARP for {addr} on {dev}: {exc}") from None


def move_ip(ip: str, src: Tuple[Optional[str], str], dst: Tuple[Optional[str], str],
            dev: str = "svc0", mac: Optional[str] = None) -> float:
    """Move the service IP: delete the service interface ``dev`` in ``src = (netns,
    lower)`` (absent is fine), create it in ``dst = (netns, lower)`` with the same MAC
    (``mac``, default: the source interface's MAC), add ``ip``, announce it. Returns
    the seconds it took. Replicate CRIU's network lock into the destination FIRST."""
    t0 = time.monotonic()
    src_ns, _ = src
    dst_ns, dst_lower = dst
    if mac is None:
        try:
            mac = _mac_of(src_ns, dev)
        except NetworkMoveError:
            mac = None
    remove_service_ip(src_ns, dev)
    add_service_ip(dst_ns, ip, dst_lower, dev=dev, mac=mac, announce_it=True)
    return time.monotonic() - t0


# --------------------------------------------------------------------------- the testbed LAN


def _sweep_stale() -> None:
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return
    for name in names:
        m = re.fullmatch(_PREFIX + r"(\d+)x\d+[sc]", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)


class ServiceLan:
    """A LAN shared by two host namespaces and a client namespace.

    A switch namespace holds bridge ``br0``; host namespaces ``ns_a`` and ``ns_b`` (for
    instance a :class:`~statesync.testing.testbed.Testbed`'s) each get an interface ``lan0``
    on it (``host_a``/``host_b`` addresses, ``arp_ignore=1``), and a new client
    namespace ``ns_client`` gets ``lan0`` with ``client_ip``. :meth:`place_service`
    puts ``service_ip`` on a macvlan ``svc0`` (MAC ``svc_mac``) of one host.
    Addresses from 198.19.0.0/24 (RFC 2544 benchmarking range). Context manager;
    :meth:`close` deletes what it created (the host namespaces stay)."""

    __test__ = False

    def __init__(self, ns_a: str, ns_b: str, *, subnet: str = "198.19.0", dev: str = "lan0"):
        self.ns_a, self.ns_b = ns_a, ns_b
        tag = f"{_PREFIX}{os.getpid()}x{next(_counter)}"
        self.ns_switch, self.ns_client = tag + "s", tag + "c"
        self.dev = dev
        self.host_a, self.host_b = f"{subnet}.1", f"{subnet}.2"
        self.client_ip = f"{subnet}.10"
        self.service_ip = f"{subnet}.100"
        self.prefix = 24
        self.svc_dev = "svc0"
        n = next(_counter) & 0xFF
        self.svc_mac = f"02:53:53:{(os.getpid() >> 8) & 0xFF:02x}:{os.getpid() & 0xFF:02x}:{n:02x}"
        self._tag = tag
        self._created: List[str] = []
        self._links: List[Tuple[str, str]] = []

    def __enter__(self) -> "ServiceLan":
        try:
            self.setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ns(self, side: str) -> str:
        return {"a": self.ns_a, "b": self.ns_b, "client": self.ns_client,
                "switch": self.ns_switch}[side]

    def setup(self) -> None:
        _sweep_stale()
        for ns in (self.ns_switch, self.ns_client):
            _run(None, ["ip", "netns", "add", ns], f"ip netns add {ns}")
            self._created.append(ns)
            _run(ns, ["ip", "link", "set", "lo", "up"], "lo up")
        sw = self.ns_switch
        _run(sw, ["ip", "link", "add", "br0", "type", "bridge", "forward_delay", "0"], "bridge")
        _run(sw, ["ip", "link", "set", "br0", "up"], "bridge up")
        for i, (ns, addr) in enumerate(((self.ns_a, self.host_a), (self.ns_b, self.host_b),
                                        (self.ns_client, self.client_ip))):
            port = f"p{i}{self._tag[-6:]}"[:15]
            _run(None, ["ip", "link", "add", port, "netns", sw, "type", "veth", "peer", "name",
                        self.dev, "netns", ns], f"veth {port}")
            self._links.append((ns, self.dev))
            _run(sw, ["ip", "link", "set", port, "master", "br0"], f"{port} into br0")
            _run(sw, ["ip", "link", "set", port, "up"], f"{port} up")
            _run(
                ns, ["ip", "addr", "add", f"{addr}/{self.prefix}", "dev", self.dev], f"addr {addr}"
            )
            _run(ns, ["ip", "link", "set", self.dev, "up"], f"{self.dev} up")
            if ns in (self.ns_a, self.ns_b):
                for key in ("all", self.dev):
                    _run(ns, ["sysctl", "-q", "-w", f"net.ipv4.conf.{key}.arp_ignore=1"],
                         "arp_ignore")

    def place_service(self, side: str) -> None:
        """Put the service IP on host ``side`` ("a" or "b")."""
        add_service_ip(self.ns(side), f"{self.service_ip}/32", self.dev, dev=self.svc_dev,
                       mac=self.svc_mac)

    def move_service(self, src: str, dst: str) -> float:
        """:func:`move_ip` of the service IP from host ``src`` to host ``dst``."""
        return move_ip(f"{self.service_ip}/32", (self.ns(src), self.dev), (self.ns(dst), self.dev),
                       dev=self.svc_dev, mac=self.svc_mac)

    def socket(self, side: str = "client", family=socket.AF_INET, type=socket.SOCK_STREAM):
        """A socket created in a namespace of the LAN (the client's by default)."""
        return _in_netns_thread(self.ns(side), lambda: socket.socket(family, type))

    def close(self) -> None:
        for ns, dev in self._links:
            if ns in (self.ns_a, self.ns_b):
                _run(ns, ["ip", "link", "del", self.svc_dev], "svc del", check=False)
                _run(ns, ["ip", "link", "del", dev], "lan del", check=False)
        self._links.clear()
        for ns in self._created:
            _run(None, ["ip", "netns", "delete", ns], f"ip netns delete {ns}", check=False)
        self._created.clear()


# --------------------------------------------------------------------------- the hand-off


class TcpHandoff:
    """The network half of a ``tcp_established`` switch-over, in the order that keeps
    the clients' connections (see the module doc), and its undo.

    ``ip`` (``A.B.C.D[/len]``) lives on service interface ``dev`` with MAC ``mac``;
    ``src``/``dst`` are ``(netns, lower interface)`` of the two hosts::

        h = TcpHandoff(ip, (ns_a, "lan0"), (ns_b, "lan0"), mac=svc_mac)
        r = runc.checkpoint(c, img, leave_stopped=True, tcp_established=True)
        h.prepare_destination(dump_log=r.log)   # lock at B, THEN the IP moves to B
        runc.restore(img_b, bundle_b, name, tcp_established=True)   # CRIU unlocks B
        h.commit()                              # the source's lock leftovers go
        # or, if anything after the dump failed:
        h.abort()        # B's copy of the lock and the IP go back; then kill the frozen
                         # source and runc.restore locally with tcp_established=True

    ``timings`` records seconds per step."""

    def __init__(self, ip: str, src: Tuple[Optional[str], str], dst: Tuple[Optional[str], str], *,
                 dev: str = "svc0", mac: Optional[str] = None):
        self.ip, self.src, self.dst, self.dev, self.mac = ip, src, dst, dev, mac
        self.lock: Optional[NetworkLock] = None
        self.ip_moved = False
        self.timings: Dict[str, float] = {}

    def prepare_destination(self, dump_log: Optional[str] = None,
                            lock: Optional[NetworkLock] = None) -> NetworkLock:
        t0 = time.monotonic()
        self.lock = replicate_network_lock(self.src[0], self.dst[0], lock, dump_log=dump_log)
        t1 = time.monotonic()
        self.timings["lock"] = t1 - t0
        if self.mac is None:
            self.mac = _mac_of(self.src[0], self.dev)
        self.timings["move_ip"] = move_ip(self.ip, self.src, self.dst, dev=self.dev, mac=self.mac)
        self.ip_moved = True
        return self.lock

    def commit(self) -> int:
        """After the destination runs: remove the lock the dump left at the source.
        Returns the rules/tables removed."""
        return remove_network_lock(self.src[0], self.lock) if self.lock else 0

    def abort(self) -> None:
        """Undo :meth:`prepare_destination` as far as it got: the destination's copy
        of the lock is removed, the IP goes back to the source and is announced there.
        The source's own lock stays: the local restore's unlock lifts it."""
        if self.lock:
            remove_network_lock(self.dst[0], self.lock)
        if self.ip_moved:
            move_ip(self.ip, self.dst, self.src, dev=self.dev, mac=self.mac)
            self.ip_moved = False
