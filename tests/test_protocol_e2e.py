"""Encryption end to end, on the two-namespace testbed with real CRIU migrations.

- A capture of the veth in the destination namespace (a raw AF_PACKET socket, TCP
  streams reassembled) during a real migration holds none of the random markers the
  workload keeps in memory, while the restored process's checksum equals the source's.
  The positive control: the same capture finds the markers when the same pages cross
  the same veth in authenticated-only frames (``encrypt=False``).
- A man in the middle in the destination namespace that tampers with, replays,
  reorders, reflects or truncates the migration's frames: the migration aborts, the
  source runs on unchanged, the destination keeps no process and no image set, and its
  log says what happened.
- A source with encryption off is refused by a destination with it on (the default):
  no silent downgrade.
"""
from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
from collections import defaultdict

import numpy as np
import pytest

from conftest import find_program, have_root, require
from migration_bed import MigrationBed
from statesync.errors import MigrationError
from statesync.migration import protocol as wire

SECRET = b"statesync-e2e-secret-0123456789abcdef"
ETH_P_ALL = 0x0003
PAGE = 4096


def _prereqs():
    require(have_root(), "needs root (namespaces, ptrace, CRIU, raw sockets)")
    for prog in ("ip", "tc", "nsenter", "unshare"):
        require(find_program(prog), f"{prog} not installed (scripts/setup-system.sh)")


# --------------------------------------------------------------------------- capture


def _packet_socket(netns_path: str) -> socket.socket:
    """A raw AF_PACKET socket for every protocol, created inside a network namespace
    (the protocol must be given at creation: binding it later hooks nothing)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    out = {}

    def worker():
        try:
            fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, 0x40000000) != 0:          # CLONE_NEWNET
                    raise OSError(ctypes.get_errno(), f"setns({netns_path})")
            finally:
                os.close(fd)
            out["sock"] = socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                        socket.htons(ETH_P_ALL))
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=worker)     # a thread of its own: ours keep their netns
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["sock"]


class Capture:
    """Every frame on ``dev`` in ``netns`` (raw AF_PACKET, both directions) while active;
    :meth:`streams` reassembles each TCP direction's payload by sequence number."""

    def __init__(self, tb, dev: str):
        self.sock = _packet_socket(os.path.join("/run/netns", tb.ns_b))
        with_force = getattr(socket, "SO_RCVBUFFORCE", 33)
        self.sock.setsockopt(socket.SOL_SOCKET, with_force, 256 << 20)
        self.sock.bind((dev, 0))
        self.sock.settimeout(0.2)
        self.packets = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.packets.append(self.sock.recv(1 << 17))
            except socket.timeout:
                continue
            except OSError:
                break

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        time.sleep(0.3)
        self._stop.set()
        self._t.join(5)
        self.sock.close()

    def streams(self):
        """{(src, sport, dst, dport): bytes} of TCP payload, reassembled."""
        segs = defaultdict(dict)
        for p in self.packets:
            if len(p) < 34 or p[12:14] != b"\x08\x00":
                continue
            ihl = (p[14] & 0x0F) * 4
            if p[23] != 6:                       # TCP
                continue
            tot = struct.unpack_from("!H", p, 16)[0]
            t = 14 + ihl
            sport, dport, seq = struct.unpack_from("!HHI", p, t)
            doff = (p[t + 12] >> 4) * 4
            payload = p[t + doff:14 + tot]
            if payload:
                key = (socket.inet_ntoa(p[26:30]), sport, socket.inet_ntoa(p[30:34]), dport)
                segs[key][seq] = payload
        out = {}
        for key, d in segs.items():
            buf, end = bytearray(), None
            for seq in sorted(d):                 # (no 2**32 wrap in a test-sized flow)
                data = d[seq]
                if end is not None and seq < end:
                    data = data[end - seq:]
                buf += data
                end = max(end or 0, seq + len(d[seq]))
            out[key] = bytes(buf)
        return out


def _markers(seed: int, size: int, count: int = 64):
    """``count`` 32-byte pieces of the workload's memory (its ``--fill random`` content
    regenerated from the seed; docs/workloads.md)."""
    npages = size // PAGE
    pages = np.random.default_rng(seed).integers(0, 2**63, size=(npages, PAGE // 8),
                                                 dtype=np.uint64)
    pick = np.random.default_rng(seed + 1)
    out = []
    for p in pick.choice(npages, size=count, replace=False):
        off = int(pick.integers(0, PAGE // 8 - 4))
        out.append(pages[p, off:off + 4].tobytes())
    return out, pages


# --------------------------------------------------------------------------- fixture


class Bed(MigrationBed):
    control_prefix = "ssm-e2e"

    def __init__(self, tb):
        super().__init__(tb, SECRET)


@pytest.fixture
def bed(criu_ok):
    _prereqs()
    from statesync.testing.testbed import Testbed
    with Testbed("1gbit") as tb:
        b = Bed(tb)
        try:
            yield b
        finally:
            b.close()


# --------------------------------------------------------------------------- confidentiality


def test_migration_traffic_holds_no_byte_of_the_memory(bed):
    seed = int.from_bytes(os.urandom(4), "little")
    size = 6 << 20
    markers, _ = _markers(seed, size)
    bed.start_dest()
    bed.spawn(size=str(size), fill="random", seed=seed, paused=True)
    before = bed.client("a").checksum()
    with Capture(bed.tb, bed.tb.veth_b) as cap:
        rep = bed.migrate(strategy="iterative")
    bed.restored.append(rep.restored_pid)
    assert rep.ok and rep.restored_pid
    dst = bed.client("b")
    assert dst.checksum() == before, "restored memory differs from the source"
    assert bed.dest.wait(10) == 0
    streams = cap.streams()
    c2s = [s for (src, _, dst_, dport), s in streams.items()
           if src == bed.tb.addr_a and dport == bed.port]
    # The capture saw the migration: the handshake, and more bytes than the state.
    mig = [s for s in c2s if s.startswith(wire.MAGIC)]
    assert len(mig) == 1 and len(mig[0]) > size, [len(s) for s in c2s]
    allbytes = b"".join(streams.values())
    found = [m.hex() for m in markers if m in allbytes]
    assert found == [], f"{len(found)} of {len(markers)} memory markers crossed the wire in clear"
    log = bed.dest.stderr.read().decode()
    assert "authenticated source" in log


@pytest.mark.parametrize("encrypt", [False, True], ids=["hmac-only", "encrypted"])
def test_capture_finds_memory_sent_in_clear(bed, encrypt):
    """The positive control of the test above: the same pages in authenticated-only
    frames over the same veth are found by the same capture; encrypted, they are not."""
    seed = 12345
    markers, pages = _markers(seed, 2 << 20)
    port = bed.tb.free_port("b")
    lsock = bed.tb.socket("b")
    lsock.bind((bed.tb.addr_b, port))
    lsock.listen(1)
    lsock.setblocking(False)

    async def go():
        loop = asyncio.get_running_loop()

        async def server():
            conn, _ = await loop.sock_accept(lsock)
            r, w = await asyncio.open_connection(sock=conn, limit=wire.MAX_FRAME + 1024)
            ch = await wire.Channel.server(r, w, SECRET, 5, encrypt=encrypt)
            _, p = await ch.recv()
            ch.close()
            return p

        task = asyncio.ensure_future(server())
        from statesync.testing.testbed import socket_in_netns
        s = socket_in_netns(bed.tb.ns_a)
        s.setblocking(False)
        await loop.sock_connect(s, (bed.tb.addr_b, port))
        r, w = await asyncio.open_connection(sock=s, limit=wire.MAX_FRAME + 1024)
        ch = await wire.Channel.client(r, w, SECRET, 5, encrypt=encrypt)
        await ch.send(wire.PAGES, pages.tobytes())
        got = await task
        ch.close()
        return got

    with Capture(bed.tb, bed.tb.veth_b) as cap:
        got = asyncio.run(asyncio.wait_for(go(), 30))
    lsock.close()
    assert got == pages.tobytes()
    allbytes = b"".join(cap.streams().values())
    assert len(allbytes) > pages.nbytes
    found = sum(m in allbytes for m in markers)
    assert found == (0 if encrypt else len(markers))


# --------------------------------------------------------------------------- attacks


class FrameProxy:
    """A TCP relay in the destination namespace that cuts the source's stream into
    frames (docs/wire-format.md) and lets ``hook(i, frame)`` pick what happens to
    source frame ``i``: a list of ("on" | "back", bytes), or "cut"."""

    def __init__(self, tb, target_port, hook):
        self.tb, self.target, self.hook = tb, target_port, hook
        self.port = tb.free_port("b")
        self.lsock = tb.socket("b")
        self.lsock.bind((tb.addr_b, self.port))
        self.lsock.listen(1)
        self.locks = {}
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        try:
            c, _ = self.lsock.accept()
        except OSError:
            return
        u = self.tb.socket("b")
        u.connect((self.tb.addr_b, self.target))
        self.locks = {id(c): threading.Lock(), id(u): threading.Lock()}
        threading.Thread(target=self._pump, args=(c, u, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(u, c, False), daemon=True).start()

    def _send(self, s, data):
        with self.locks[id(s)]:
            s.sendall(data)

    def _send_quiet(self, s, data):
        try:
            self._send(s, data)
        except OSError:
            pass

    @staticmethod
    def _read(s, n):
        buf = bytearray()
        while len(buf) < n:
            d = s.recv(n - len(buf))
            if not d:
                raise EOFError
            buf += d
        return bytes(buf)

    def _pump(self, a, b, from_source):
        try:
            for n in ((73,) if from_source else (40, 33)):
                self._send(b, self._read(a, n))
            i = 0
            while True:
                hdr = self._read(a, 13)
                frame = hdr + self._read(a, struct.unpack_from("!I", hdr)[0] + 16)
                out = self.hook(i, frame) if from_source else [("on", frame)]
                i += 1
                if out == "cut":
                    from_source = True      # both connections end right here
                    break
                for where, data in out:
                    if where == "on":
                        self._send(b, data)
                    else:   # the sender may not read for a while: never block our pump
                        threading.Thread(target=self._send_quiet, args=(a, data),
                                         daemon=True).start()
        except (OSError, EOFError):
            pass
        finally:
            # The source's direction ending ends both connections (the source learns at
            # once that the destination is gone). The destination's direction ending
            # only passes its EOF on: what the source still sends (its ABORT) must get
            # through.
            if from_source:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            else:
                try:
                    b.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def close(self):
        self.lsock.close()


def _flip(frame, pos):
    b = bytearray(frame)
    b[pos] ^= 0x10
    return bytes(b)


# Source frames: 0 BEGIN, 1.. PAGES of round 0 (a 16 MiB workload: several frames).
_held = []
ATTACKS = {
    "tampered": (lambda i, f: [("on", _flip(f, 13 + 100) if i == 2 else f)],
                 "failed authentication"),
    "replayed": (lambda i, f: [("on", f)] * (2 if i == 2 else 1), "replayed"),
    "reordered": (lambda i, f: (_held.append(f) or []) if i == 2 else
                  ([("on", f), ("on", _held.pop())] if i == 3 else [("on", f)]),
                  "reordered or dropped"),
    # Forwarded and also echoed back: the destination misses nothing, the source meets
    # its own frame when it next reads (the round's ack) and aborts. Whether its ABORT
    # reaches the destination is a race (the source closes with the ack unread, so its
    # kernel may reset the connection first); if not, the destination times out.
    "reflected": (lambda i, f: [("on", f), ("back", f)] if i == 2 else [("on", f)], None),
    "truncated": (lambda i, f: "cut" if i == 2 else [("on", f)], "truncated"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attacked_migration_aborts_cleanly(bed, attack):
    hook, dest_says = ATTACKS[attack]
    _held.clear()
    bed.start_dest()
    bed.spawn(size="16M", paused=True)
    before = bed.client("a").checksum()
    proxy = FrameProxy(bed.tb, bed.port, hook)
    try:
        with pytest.raises(MigrationError) as ei:
            bed.migrate(port=proxy.port, strategy="iterative")
    finally:
        proxy.close()
    rep = ei.value.report
    assert rep is not None and not rep.ok and rep.source_resumed
    if attack == "reflected":
        # The source itself meets its own frame coming back.
        assert "reflected" in str(ei.value), ei.value
    # The source runs on, unchanged; no copy runs at the destination.
    src = bed.client("a")
    assert src.checksum() == before
    src.resume()
    s0 = src.status()["seq"]
    time.sleep(0.1)
    assert src.status()["seq"] > s0
    assert bed.procs_with_control() == [bed.wl.pid]
    assert bed.dest.wait(15) == 1
    assert os.listdir(bed.tb.dir_b) == [], "destination kept something"
    log = bed.dest.stderr.read().decode()
    if dest_says:
        assert dest_says in log, log[-2000:]


def test_source_without_encryption_is_refused(bed, monkeypatch):
    """No silent downgrade: a source asking for authenticated-only frames is refused by
    a destination that runs with encryption on (the default), before any memory moves."""
    orig = wire.Channel.client.__func__

    async def no_encryption(cls, *a, **kw):
        kw["encrypt"] = False
        return await orig(cls, *a, **kw)

    monkeypatch.setattr(wire.Channel, "client", classmethod(no_encryption))
    bed.start_dest()
    bed.spawn(size="2M", paused=True)
    with pytest.raises(MigrationError) as ei:
        bed.migrate(strategy="cold")
    assert ei.value.phase == "authenticate"
    assert "configure both sides the same" in str(ei.value)
    assert bed.wl.alive() and bed.procs_with_control() == [bed.wl.pid]
    assert bed.dest.poll() is None          # still serving: a refused peer does not end it
    bed.dest.terminate()
    log = bed.dest.communicate(timeout=10)[1].decode()
    assert "refused" in log and "encryption off" in log, log[-2000:]
