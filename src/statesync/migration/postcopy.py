"""Post-copy and hybrid switch-over (issue 11 item 3; docs/postcopy.md): both sides'
post-copy loop.

For a service whose dirty rate makes pre-copy diverge, the switch-over happens before
convergence (``postcopy``: no pre-copy at all; ``hybrid``: after a few rounds, or as
soon as a round does not shrink the dirty set). At the freeze only the cheap part of
what the destination lacks travels; the rest stays in the source's frozen (complete)
copy and is listed in PC_REMOTE. After the resume the destination's lazy-pages daemon
(csrc/ss_lazy.c, remote rows) blocks a fault on such a page and asks for it
(PC_REQUEST, served first), while the source pushes every remote page in the
background (PC_PAGES) within a window of unacknowledged pages (PC_ACK), so a request
never waits behind more than a window of bulk data. FILLED (every page placed) ends it;
only then does the source kill its frozen copy.

Messages (appended to protocol.py; payloads after the channel's own framing):
  PC_REMOTE   source -> dest, before FINAL: JSON {"count": n} + n little-endian u64
              addresses (sorted): the lazy pages whose content is only at the source.
  PC_REQUEST  dest -> source: n little-endian u64 indices into that list (a fault
              waits for each).
  PC_PAGES    source -> dest: u32 n (big-endian), n little-endian u64 indices, then
              n x 4096 bytes of page content.
  PC_ACK      dest -> source: JSON {"received": pages received so far}.

Threads: everything here runs on the agents' event loops; the daemon's C loop runs in
its own thread and meets this code only through two pipes (requests, supplies) and the
remote buffer, whose row k is written here before k is written to the supply pipe and
never again. Arrays are numpy (uint64 addresses / indices, (n, 4096) uint8 pages); no
per-page Python objects on the paths that move pages.
"""
from __future__ import annotations

import asyncio
import collections
import fcntl
import os
import struct
import time
from typing import Any, Callable, Dict, Optional

import numpy as np

from statesync._consts import PAGE_SIZE
from statesync.errors import MigrationError, PostCopyLinkLost, ProtocolError
from statesync.migration import protocol as wire
from statesync.migration.common import fault
from statesync.planning.scheduler import HYBRID_MAX_ROUNDS  # noqa: F401 (re-exported)

BATCH = 32              # most pages per PC_PAGES frame (128 KiB)
# Pages pushed and not yet acknowledged: what the link carries in WINDOW_S, within
# [WINDOW_MIN, WINDOW_MAX]. A request waits behind at most this much bulk data
# (1 Gbit/s: 122 pages, ~4 ms). Measured on the hot case (bench_switchover): 1 ms
# (32 pages) halved the push rate (the acknowledgement loop, not the link, set the
# pace on two busy cores), 8 ms doubled a request's wait for no gain in push time.
WINDOW_S = 0.004
WINDOW_MIN, WINDOW_MAX = 16, 1024
ACK_EVERY = 16          # the destination acknowledges every this many pages
# a round that leaves more than this share of what it sent dirty again does not
# converge (r = dirty rate / bandwidth >= ~0.65: the next round is as long)
NO_CONVERGENCE = 0.65
# hybrid: seconds of link the freeze may spend on the dirty set (the rest is post-copy).
# 5 and 30 ms gave the same outside downtime on the hot case at 1 Gbit/s within the
# noise of a loaded machine; more of it in the freeze costs 100 Mbit/s links directly.
FREEZE_BUDGET_S = 0.005
_F_SETPIPE_SZ = 1031
_HDR = struct.Struct("!I")


# --------------------------------------------------------------------------- source


def hybrid_stop(rounds) -> str:
    """Why a hybrid pre-copy stops after these rounds (report.RoundReport list), or ""."""
    if not rounds:
        return ""
    last = rounds[-1]
    if len(rounds) >= HYBRID_MAX_ROUNDS:
        return f"hybrid: {len(rounds)} rounds, switching over with post-copy"
    if last.pages and last.dirty_pages_after >= NO_CONVERGENCE * last.pages:
        return (f"hybrid: round {last.index} left {last.dirty_pages_after} of "
                f"{last.pages} pages dirty (no convergence), switching over with post-copy")
    return ""


def skip_precopy(agent) -> None:
    """``postcopy``: no pre-copy round; the switch-over sends nothing it can leave at
    the source. Sets what the end of SourceAgent._precopy would."""
    agent.pending_dirty = np.zeros(0, dtype=np.uint64)
    agent.report.predicted_downtime_s = float("nan")
    agent.lazy = agent._choose_lazy()
    agent.report.switchover = "lazy"


def freeze_budget(agent) -> int:
    """Pages of the dirty set still sent in the freeze: none for ``postcopy``; for
    ``hybrid`` what the link carries in 5 ms (the cheap part: the pages written last,
    the likeliest to be touched right after the resume)."""
    if agent.mode != "hybrid":
        return 0
    bw = float(agent.link_rate_Bps or 12.5e6)
    return int(bw * FREEZE_BUDGET_S / PAGE_SIZE)


def split_final(agent, need: np.ndarray) -> tuple:
    """(sent in the freeze, left at the source) of the lazy pages the destination lacks
    (``need``, sorted uint64). The cheap part is taken from the final dirty set."""
    budget = freeze_budget(agent)
    if budget <= 0 or need.size == 0:
        return np.zeros(0, dtype=np.uint64), need
    if budget >= need.size:
        return need, np.zeros(0, dtype=np.uint64)
    hot = np.intersect1d(need, np.asarray(agent.final_dirty, dtype=np.uint64))[:budget]
    if hot.size < budget:       # then the pages written during the last round
        rest = np.setdiff1d(need, hot, assume_unique=True)
        hot = np.union1d(hot, rest[:budget - hot.size])
    return hot, np.setdiff1d(need, hot, assume_unique=True)


class _Demux:
    """A Channel whose incoming frames are read by one task: post-copy frames go to
    ``handlers`` (coroutines taking the payload), all others to a queue that
    ``recv``/``expect`` read as before. Sending and everything else is the wrapped
    channel's (frames are written whole, so several tasks may send). Used on both
    sides from the moment post-copy frames may arrive until the session ends."""

    def __init__(self, chan, handlers: Dict[int, Callable[[bytes], Any]],
                 on_rx: Optional[Callable[[], None]] = None):
        self._chan = chan
        self._handlers = handlers
        self._on_rx = on_rx or (lambda: None)
        self._q: asyncio.Queue = asyncio.Queue()
        self.error: Optional[BaseException] = None
        self.lost = asyncio.Event()
        self._task = asyncio.ensure_future(self._read())

    def __getattr__(self, name):
        return getattr(self._chan, name)

    async def _read(self) -> None:
        try:
            while True:
                mtype, payload = await self._chan.recv(timeout=1e9)
                self._on_rx()
                h = self._handlers.get(mtype)
                if h is not None:
                    await h(payload)
                else:
                    self._q.put_nowait((mtype, payload))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:   # the link, the peer, or a handler: all fatal here
            self.error = exc
            self.lost.set()
            self._q.put_nowait(exc)

    async def recv(self, timeout: Optional[float] = None):
        t = self._chan.timeout if timeout is None else timeout
        try:
            item = await asyncio.wait_for(self._q.get(), t)
        except asyncio.TimeoutError:
            raise ProtocolError(f"no frame from the {self._chan.peer} within {t:.1f}s "
                                f"(link down, peer dead or hung)") from None
        if isinstance(item, BaseException):
            self._q.put_nowait(item)       # every later read fails the same way
            if isinstance(item, ProtocolError):
                raise item
            raise ProtocolError(f"post-copy channel failed: {item}") from item
        return item

    async def expect(self, *types: int, timeout: Optional[float] = None):
        mtype, payload = await self.recv(timeout)
        if mtype not in types:
            want = "/".join(wire.NAMES.get(t, str(t)) for t in types)
            raise ProtocolError(f"expected {want}, got {wire.NAMES.get(mtype, mtype)}")
        return mtype, payload

    def _stop(self) -> None:
        if not self._task.done():
            self._task.cancel()

    def close(self) -> None:
        self._stop()
        self._chan.close()

    async def aclose(self, timeout: float = 2.0) -> None:
        self._stop()
        try:
            await self._task
        except BaseException:
            pass
        await self._chan.aclose(timeout)


class SourcePostCopy:
    """The source's post-copy loop. ``remote``: sorted uint64 addresses of the pages
    only the frozen copy holds; ``read(addrs) -> (pages, ok)`` reads them from it
    (the frozen process: MemorySource.read). Requests are answered from the moment
    FINAL is sent (a restore may fault); the background push starts at
    :meth:`start_push` (RESUMED). Owned by the switch-over's event loop."""

    def __init__(self, remote: np.ndarray, read, io_timeout: float,
                 on_acked: Optional[Callable[[], None]] = None,
                 link_rate_Bps: Optional[float] = None):
        self.remote = np.ascontiguousarray(remote, dtype=np.uint64)
        self.n = int(self.remote.size)
        self.read = read
        self.io_timeout = float(io_timeout)
        self.on_acked = on_acked
        bw = float(link_rate_Bps or 125e6)
        self.window = int(min(WINDOW_MAX, max(WINDOW_MIN, bw * WINDOW_S / PAGE_SIZE)))
        # at least two frames in flight, so the link never waits for an acknowledgement
        self.batch = max(8, min(BATCH, self.window // 2))
        self.sent = np.zeros(self.n, dtype=bool)
        self.nsent = 0
        self.cursor = 0
        self.acked = 0
        self.requested = 0          # pages the destination asked for
        self.requests: collections.deque = collections.deque()
        self.pushing = False
        self.wake = asyncio.Event()
        self.last_rx = time.monotonic()
        self.t_push = 0.0
        self.t_acked = 0.0
        self.chan: Any = None
        self._task: Optional[asyncio.Task] = None
        self._held = False

    def payload_remote(self) -> bytes:
        return wire.pack_json({"count": self.n}, self.remote.astype("<u8").tobytes())

    def attach(self, chan) -> _Demux:
        """Wrap the channel (after PC_REMOTE and FINAL went out) and start serving."""
        self.chan = _Demux(chan, {wire.PC_REQUEST: self._on_request, wire.PC_ACK: self._on_ack},
                           self._rx)
        self._task = asyncio.ensure_future(self._serve())
        return self.chan

    def _rx(self) -> None:
        self.last_rx = time.monotonic()

    async def _on_request(self, payload: bytes) -> None:
        ks = np.frombuffer(payload, dtype="<u8").astype(np.int64)
        if ks.size and (ks.min() < 0 or ks.max() >= self.n):
            raise ProtocolError(f"PC_REQUEST for page {int(ks.max())} of {self.n}")
        self.requested += int(ks.size)
        self.requests.append(ks)
        self.wake.set()

    async def _on_ack(self, payload: bytes) -> None:
        info, _ = wire.unpack_json(payload)
        self.acked = max(self.acked, int(info.get("received", 0)))
        if self.acked >= self.n and not self.t_acked:
            self.t_acked = time.monotonic()
            if self.on_acked:
                self.on_acked()
        self.wake.set()

    def start_push(self) -> None:
        self.pushing = True
        self.t_push = time.monotonic()
        self.wake.set()

    async def _send(self, ks: np.ndarray) -> None:
        ks = ks[~self.sent[ks]]
        if ks.size == 0:
            return
        pages, ok = self.read(self.remote[ks])
        if not ok.all():
            bad = int(self.remote[ks][~ok][0])
            raise MigrationError(f"post-copy: {int((~ok).sum())} pages of the frozen source "
                                 f"copy could not be read, first at {bad:#x}", "post_switch")
        self.sent[ks] = True
        self.nsent += int(ks.size)
        await self.chan.send(wire.PC_PAGES, b"".join(
            (_HDR.pack(ks.size), ks.astype("<u8").tobytes(),
             np.ascontiguousarray(pages).tobytes())))

    async def _serve(self) -> None:
        while self.nsent < self.n:
            if self.requests:
                ks = np.unique(np.concatenate(list(self.requests)))
                self.requests.clear()
                for i in range(0, ks.size, BATCH):
                    await self._send(ks[i:i + BATCH])
                continue
            if self.pushing and self.nsent - self.acked < self.window:
                while self.cursor < self.n and self.sent[self.cursor]:
                    self.cursor += 1
                end = self.cursor
                ks_list: list = []
                while end < self.n and len(ks_list) < self.batch:
                    if not self.sent[end]:
                        ks_list.append(end)
                    end += 1
                if ks_list:
                    await self._send(np.asarray(ks_list, dtype=np.int64))
                    if not self._held:
                        self._held = True
                        fault("source:postcopy")   # tests: first batch pushed
                    # let the reader run (a request may be waiting) between batches
                    await asyncio.sleep(0)
                    continue
            self.wake.clear()
            await self.wake.wait()

    async def wait_filled(self) -> tuple:
        """Until the destination's FILLED (every page placed): (type, payload). Raises
        ProtocolError when the destination stays silent for io_timeout (no ack, no
        request, no frame) while pages are unacknowledged, or the push fails: the link
        is lost during post-copy. Once every page is acknowledged the destination only
        places its local pages (no link needed): FILLED gets io_timeout + 60 s then,
        as after a lazy restore."""
        q = asyncio.ensure_future(self.chan.expect(wire.FILLED, timeout=1e9))
        try:
            while True:
                done, _ = await asyncio.wait({q} | ({self._task} if self._task and
                                                    not self._task.done() else set()),
                                             timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
                if q in done:
                    return q.result()
                if self._task is not None and self._task.done() and self._task.exception():
                    exc = self._task.exception()
                    raise ProtocolError(f"post-copy push failed after {self.nsent} of "
                                        f"{self.n} pages: {exc}")
                silent = time.monotonic() - self.last_rx
                if silent > self.io_timeout + (60.0 if self.acked >= self.n else 0.0):
                    raise ProtocolError(f"post-copy: no word from the destination for "
                                        f"{self.io_timeout:.1f} s ({self.acked} of {self.n} "
                                        f"pages acknowledged)")
        finally:
            if not q.done():
                q.cancel()

    def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def stats(self) -> dict:
        return {"remote_pages": float(self.n), "remote_requested": float(self.requested),
                "push_s": (self.t_acked - self.t_push) if self.t_acked and self.t_push
                else 0.0}


# --------------------------------------------------------------------------- destination


class DestPostCopy:
    """The destination's post-copy loop: the remote buffer and pipes the lazy-pages
    daemon is built with (:meth:`daemon_kw`), the channel demux that files PC_PAGES
    into the buffer and announces them to the daemon, the request forwarder, and the
    watchdog (:meth:`wait`) that cancels the daemon when the source stops sending:
    the daemon then kills the restored tree before releasing its userfaultfds, so a
    copy that cannot complete never runs on with missing pages."""

    def __init__(self, remote: np.ndarray, io_timeout: float):
        self.remote = np.ascontiguousarray(remote, dtype=np.uint64)
        self.n = int(self.remote.size)
        self.io_timeout = float(io_timeout)
        self.buf = np.zeros((max(self.n, 1), PAGE_SIZE), dtype=np.uint8)[:self.n]
        self.got = np.zeros(self.n, dtype=bool)
        self.received = 0
        self.acked = 0
        self.req_r, self.req_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.sup_r, self.sup_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.sup_r, False)
        try:
            fcntl.fcntl(self.sup_w, _F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass
        self.chan: Any = None
        self.last_rx = time.monotonic()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.requests_sent = 0

    @classmethod
    def from_frame(cls, payload: bytes, io_timeout: float) -> "DestPostCopy":
        info, tail = wire.unpack_json(payload)
        n = int(info.get("count", -1))
        if n < 0 or n * 8 != len(tail):
            raise ProtocolError(f"PC_REMOTE lists {len(tail)} address bytes for {n} pages")
        addrs = np.frombuffer(tail, dtype="<u8").astype(np.uint64)
        if addrs.size > 1 and np.any(addrs[1:] <= addrs[:-1]):
            raise ProtocolError("PC_REMOTE addresses are not sorted and unique")
        return cls(addrs, io_timeout)

    def daemon_kw(self) -> dict:
        """LazyPagesDaemon arguments: the remote rows, and closing our pipes when the
        daemon is closed (a session that fails before wait())."""
        return {"remote": (self.remote, self.buf, self.req_w, self.sup_r),
                "on_close": self.close_fds}

    def attach(self, chan) -> _Demux:
        """Start filing PC_PAGES and forwarding requests (before criu restore runs)."""
        self._loop = asyncio.get_running_loop()
        self.chan = _Demux(chan, {wire.PC_PAGES: self._on_pages}, self._rx)
        self._loop.add_reader(self.req_r, self._on_requests)
        if self.n == 0:
            self._close_supply()
        return self.chan

    def _rx(self) -> None:
        self.last_rx = time.monotonic()

    async def _on_pages(self, payload: bytes) -> None:
        (n,) = _HDR.unpack_from(payload)
        if len(payload) != _HDR.size + n * (8 + PAGE_SIZE):
            raise ProtocolError(f"PC_PAGES of {len(payload)} bytes for {n} pages")
        ks = np.frombuffer(payload, dtype="<u8", count=n, offset=_HDR.size).astype(np.int64)
        if n and (ks.min() < 0 or ks.max() >= self.n):
            raise ProtocolError(f"PC_PAGES carries page {int(ks.max())} of {self.n}")
        pages = np.frombuffer(payload, dtype=np.uint8, offset=_HDR.size + 8 * n).reshape(
            n, PAGE_SIZE)
        new = ~self.got[ks]
        ks, pages = ks[new], pages[new]
        if ks.size == 0:
            return
        self.buf[ks] = pages            # rows first: the daemon reads them after the index
        self.got[ks] = True
        self.received += int(ks.size)
        if self.sup_w >= 0:
            data = ks.astype(np.uint64).tobytes()
            while data:                 # the pipe holds 128 Ki indices: rarely blocks
                data = data[os.write(self.sup_w, data):]
        if self.received >= self.n:
            self._close_supply()        # EOF: the daemon knows nothing more comes
        if self.received - self.acked >= ACK_EVERY or self.received >= self.n:
            self.acked = self.received
            await self.chan.send_json(wire.PC_ACK, {"received": self.received})

    def _on_requests(self) -> None:
        try:
            data = os.read(self.req_r, 1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            return
        n = len(data) // 8 * 8
        self.requests_sent += n // 8
        asyncio.ensure_future(self._send_request(data[:n]))

    async def _send_request(self, data: bytes) -> None:
        try:
            await self.chan.send(wire.PC_REQUEST, data)
        except Exception:
            pass            # the watchdog sees the lost link

    def _close_supply(self) -> None:
        if self.sup_w >= 0:
            os.close(self.sup_w)
            self.sup_w = -1

    async def wait(self, daemon, timeout: float = 3600.0):
        """After the resume: until the daemon placed every page (LazyStats). When the
        source stays silent for io_timeout with pages missing, or the channel fails,
        the daemon is cancelled (it kills the restored tree first) and this raises
        PostCopyLinkLost."""
        fault("dest:postcopy")          # tests: resumed, post-copy running
        self.last_rx = max(self.last_rx, time.monotonic())
        t_end = time.monotonic() + timeout
        fut = asyncio.ensure_future(asyncio.to_thread(daemon.wait, timeout))
        why = ""
        try:
            while True:
                done, _ = await asyncio.wait({fut}, timeout=0.1)
                if fut in done:
                    return fut.result()
                if self.received < self.n:
                    if self.chan is not None and self.chan.lost.is_set():
                        why = f"the link to the source failed ({self.chan.error})"
                    elif time.monotonic() - self.last_rx > self.io_timeout:
                        why = f"no page from the source for {self.io_timeout:.1f} s"
                if time.monotonic() > t_end:
                    why = f"post-copy not done after {timeout:.0f} s"
                if why:
                    daemon.cancel()
                    try:
                        return await fut    # it finished meanwhile: complete after all
                    except Exception:
                        pass
                    raise PostCopyLinkLost(
                        f"post-copy lost: {why}; {self.n - self.received} of {self.n} pages "
                        f"still at the source: the restored copy (pid {daemon.restored_pid}) "
                        f"was killed, the source resumes its frozen copy")
        finally:
            if fut.done():
                self.close_fds()

    def close_fds(self) -> None:
        if self._loop is not None:
            try:
                self._loop.remove_reader(self.req_r)
            except Exception:
                pass
            self._loop = None
        self._close_supply()
        for fd in (self.req_r, self.req_w, self.sup_r):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.req_r = self.req_w = self.sup_r = -1

    def post_switch(self, st) -> dict:
        """The post-copy part of the post-switch report (LazyStats st)."""
        return {"postcopy": 1.0, "remote_pages": float(self.n),
                "remote_faults": float(st.remote_faults),
                "remote_requested": float(st.remote_requested),
                "remote_exist": float(st.remote_exist),
                "remote_fault_p50_ns": float(st.remote_p50_ns),
                "remote_fault_p99_ns": float(st.remote_p99_ns),
                "remote_fault_max_ns": float(st.remote_max_ns)}
