"""The live migration engine behind :func:`statesync.migrate`: a source agent and a
destination agent over one authenticated TCP connection.

The function is ``statesync.migrate`` (also ``statesync.engine.migrate``); this module
is ``statesync.engine`` rather than ``statesync.migrate`` because a package attribute
cannot be both a submodule and a function: importing a submodule rebinds the
package attribute of its name to the module object.

::

    report = statesync.migrate(pid, dest="HOST:PORT", strategy="auto", secret=...)
    statesync.serve_destination(listen="HOST:PORT", images_dir=..., secret=...)

Flow (strategy ``iterative``; ``precopy`` stops after round 0; ``cold`` has no rounds):

1. Authenticate (:mod:`statesync.wire`); nothing of the process is sent before the
   destination proved it holds the shared secret.
2. Attach a dirty-page tracker; round 0 sends every page CRIU would dump while the
   process runs; rounds 1..N send what the tracker reports written. The source keeps
   a 128-bit hash of every page the destination holds. A stop rule (the scheduler)
   decides after each round whether another round still lowers the downtime.
3. Switch-over: detach the tracker, ``criu dump --leave-stopped`` into a local
   directory (the process is frozen from here on), hash the dumped pages and send
   only those whose content differs from what the destination holds, plus every
   non-memory image. The content diff makes the final state exact whatever the
   tracker said.
4. The destination writes a complete image set (pages gathered from what it
   received), atomically (temporary directory, fsync, rename), runs
   ``criu restore`` and confirms that the restored process runs.
5. Only then does the source kill its stopped copy. On any failure before that, the
   source sends SIGCONT (the process resumes with its state intact), the destination
   kills anything it restored and deletes its partial image set.

Both agents run CRIU in the target's network namespace (``nsenter --net``) when it is
not their own, so CRIU never tries to dump a network namespace.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import shutil
import signal
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from . import _criu_images, criu, proc, wire  # noqa: F401  (pre-import: the switch-over must not pay for it)
from ._consts import PAGE_SIZE
from ._fsutil import atomic_replace, discard, fsync_dir, temp_beside
from .errors import CriuError, MigrationError, StateSyncError
from .memsource import MemorySource
from .pagetable import PageTable
from .report import Report, RoundReport

STRATEGIES = ("auto", "cold", "precopy", "iterative")
DEFAULT_PORT = 7411
BATCH_PAGES = 1024             # pages per read/encode batch (4 MiB)
MAX_BATCH_PAGES = 8192         # largest batch a destination accepts in one frame
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")


# --------------------------------------------------------------------------- codec


class PageCodec:
    """How pages travel: one :mod:`statesync.stream` stream per batch of at most
    ``BATCH_PAGES`` pages, carried in one authenticated PAGES frame.

    ``compression``: ``None`` or ``"lz4"``; ``xor``: XBZRLE deltas against the
    destination's current copy (the source then keeps a mirror of every page it sent,
    one page of memory per page of state); ``dedup``: DUP records (default: with
    compression). All-zero pages always travel as ZERO records.
    """

    def __init__(self, compression: Optional[str] = None, xor: bool = False,
                 dedup: Optional[bool] = None, page_size: int = PAGE_SIZE):
        from . import stream
        if compression not in (None, "none", "lz4"):
            raise ValueError(f"unknown compression {compression!r} (none or lz4)")
        self.compression = None if compression in (None, "none") else "lz4"
        self.xor = bool(xor)
        self.dedup = (self.compression is not None) if dedup is None else bool(dedup)
        self.page_size = page_size
        self.encoder = stream.Encoder(page_size, compression=self.compression, xor=self.xor,
                                      dedup=self.dedup)

    @property
    def name(self) -> str:
        parts = [self.compression or "none"] + (["xor"] if self.xor else [])
        return "+".join(parts)

    def encode(self, addrs: np.ndarray, pages: np.ndarray, previous=None,
               previous_mask=None) -> bytes:
        return b"".join(self.encoder.encode(addrs, pages, previous=previous,
                                            previous_mask=previous_mask))


class _TableTarget:
    """statesync.stream target over a :class:`PageTable` (amortised growth: a round
    of many streams costs no whole-store copies). Pages of a stream are staged and
    land in the table only at commit."""

    def __init__(self, table: PageTable):
        self.table = table

    def begin(self, page_size: int):
        if page_size != self.table.width:
            from .errors import StreamError
            raise StreamError(f"stream page size {page_size} differs from ours "
                              f"({self.table.width})", offset=8)
        return _TableTxn(self.table)


class _TableTxn:
    def __init__(self, table: PageTable):
        self.table = table
        self.addrs: List[np.ndarray] = []
        self.pages: List[np.ndarray] = []

    def read(self, addrs):
        addrs = np.asarray(addrs, dtype=np.uint64)
        slots, ok = self.table.lookup(addrs)
        out = np.zeros((addrs.size, self.table.width), dtype=np.uint8)
        if ok.any():
            out[ok] = self.table.rows[slots[ok]]
        for a, p in zip(self.addrs, self.pages):   # earlier pages of this stream
            if a.size == 0:
                continue
            pos = np.minimum(np.searchsorted(a, addrs), a.size - 1)
            hit = a[pos] == addrs
            if hit.any():
                out[hit] = p[pos[hit]]
                ok = ok | hit
        return out, ok

    def write(self, addrs, pages):
        self.addrs.append(np.asarray(addrs, dtype=np.uint64))
        self.pages.append(np.asarray(pages, dtype=np.uint8).reshape(-1, self.table.width))

    def commit(self):
        for a, p in zip(self.addrs, self.pages):
            self.table.put(a, p)
        self.abort()

    def abort(self):
        self.addrs, self.pages = [], []


def decode_pages(payload: bytes, table: PageTable) -> int:
    """Apply one page stream (a PAGES frame's payload) into ``table``; returns the
    number of pages. Raises StreamError; the table is unchanged then."""
    from . import stream
    st = stream.apply([payload], _TableTarget(table), max_block_pages=MAX_BATCH_PAGES,
                      max_pages=MAX_BATCH_PAGES)
    return int(st.total_pages)


# --------------------------------------------------------------------------- CRIU


# A client connecting to a UNIX socket of the frozen tree from outside makes the dump
# fail (CRIU cannot dump half of a stream connection, nor an in-flight connection whose
# peer it cannot see); the next attempt usually finds no such connection.
_TRANSIENT_DUMP_ERRORS = ("Can't dump half of stream unix connection", "unix: Unix socket")


def _read_stats(path: str) -> Dict[str, int]:
    """CRIU's stats-dump / stats-restore (times in microseconds); {} if unreadable:
    the stats are informative, never a reason to fail a migration."""
    try:
        return {k: int(v) for k, v in _criu_images.read_stats(path).items()}
    except (StateSyncError, OSError, ValueError):
        return {}


def _present_pages_of(pagemap_path: str) -> Tuple[int, np.ndarray]:
    """(pages_id, addresses of the PE_PRESENT pages in pages-file order) of a
    pagemap image, decoded and validated by statesync.criu's reader (C)."""
    pm = _criu_images.Pagemap(pagemap_path, PAGE_SIZE)
    sel = (pm.flags & _criu_images.PE_PRESENT) != 0
    v, n = pm.vaddr[sel], pm.nr_pages[sel].astype(np.int64)
    total = int(n.sum())
    first = np.repeat(v, n)
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
    return int(pm.pages_id), first + within.astype(np.uint64) * np.uint64(PAGE_SIZE)


def _signal_all(pids, sig: int) -> None:
    """Send ``sig`` to each pid in order; pids already gone are skipped."""
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def _ns_pid(pid: int) -> int:
    """pid as the innermost pid namespace sees it (CRIU names image files by it)."""
    nspid = proc.status(pid).get("NSpid")
    return int(nspid.split()[-1]) if nspid else pid


# --------------------------------------------------------------------------- costs


@dataclass
class CriuCosts:
    """Switch-over cost priors handed to the scheduler's model (it recalibrates the
    link and the dirty rate from the rounds).

    ``dump``: CRIU's frozen dump plus the engine's read and content diff of it. The
    engine always dumps the whole state (no soft-dirty here, so no incremental CRIU
    dump), so this cost scales with the state, not with the final pages: the engine
    hands the model ``dump_fixed_s + dump_s_per_mib * state`` as its fixed dump cost.
    ``restore``: writing the image set at the destination plus ``criu restore``
    until the process runs. Defaults: a line through the means of 8 migrations of a
    25 MB and a 290 MB process (benchmarks/bench_migrate.py) with CRIU 4.2 on this
    project's machines (2 shared cores, images on tmpfs). With a calibration file
    (``migrate(..., calibration=PATH)``) every migration refines them for this host."""

    dump_fixed_s: float = 0.036
    dump_s_per_mib: float = 0.0014
    restore_fixed_s: float = 0.106
    restore_s_per_mib: float = 0.00175
    samples: List[List[float]] = field(default_factory=list)  # [state MiB, dump s, restore s]

    MAX_SAMPLES = 32

    def observe(self, report: Report) -> "CriuCosts":
        """Fold in a finished migration's measured switch-over (dump + diff,
        assemble + restore) and refit: a least-squares line over the samples when
        they span at least two state sizes (x1.5 apart), else the fixed costs shifted
        to the mean residual. Returns self."""
        ph = report.phases
        if not report.ok or "dump" not in ph or "restore" not in ph or not report.state_pages:
            return self
        mib = report.state_pages * PAGE_SIZE / (1 << 20)
        self.samples.append([mib, ph["dump"] + ph.get("final_diff", 0.0),
                             ph["restore"] + ph.get("assemble", 0.0)])
        self.samples = self.samples[-self.MAX_SAMPLES:]
        x = np.array([s[0] for s in self.samples])
        for col, fixed, slope in ((1, "dump_fixed_s", "dump_s_per_mib"),
                                  (2, "restore_fixed_s", "restore_s_per_mib")):
            y = np.array([s[col] for s in self.samples])
            if x.max() >= 1.5 * x.min() and len(x) >= 2:
                k, c = np.polyfit(x, y, 1)
                if k > 0 and c > 0:
                    setattr(self, slope, float(k))
                    setattr(self, fixed, float(c))
                    continue
            setattr(self, fixed, max(0.0, float(np.mean(y - getattr(self, slope) * x))))
        return self

    @classmethod
    def load(cls, path: str) -> "CriuCosts":
        """Costs saved by :meth:`save`; the priors if the file does not exist."""
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise ValueError(f"calibration file {path}: unreadable ({exc}); delete it to "
                             f"start from the priors") from None
        known = {k: d[k] for k in ("dump_fixed_s", "dump_s_per_mib", "restore_fixed_s",
                                   "restore_s_per_mib", "samples") if k in d}
        return cls(**known)

    def save(self, path: str) -> None:
        """Write atomically (temporary file, fsync, rename; see :mod:`statesync._fsutil`)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd, tmp = temp_beside(path)
        try:
            with os.fdopen(fd, "w", closefd=False) as f:
                json.dump({"dump_fixed_s": self.dump_fixed_s, "dump_s_per_mib": self.dump_s_per_mib,
                           "restore_fixed_s": self.restore_fixed_s,
                           "restore_s_per_mib": self.restore_s_per_mib,
                           "samples": self.samples}, f)
        except BaseException:
            discard(tmp, fd)
            raise
        atomic_replace(tmp, path, fd)


# --------------------------------------------------------------------------- source


def _parse_hostport(text: str, default_host: str = "127.0.0.1") -> Tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep:
        host, port = text, str(DEFAULT_PORT)
    host = host.strip("[]") or default_host
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"not HOST:PORT: {text!r}") from None
    if not 0 <= p < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return host, p


class _SourceAgent:
    def __init__(self, pid: int, dest: str, secret: bytes, strategy: str,
                 tracker: str, compression: str, max_rounds: int, targets,
                 scheduler_name: str, work_dir: Optional[str], io_timeout: float,
                 progress: Optional[Callable[[dict], None]], criu_args: List[str],
                 link_rate_Bps: Optional[float], costs: "CriuCosts",
                 netns: Optional[str] = None, xor: bool = False):
        self.pid = pid
        self.netns = netns
        self.dest = dest
        self.secret = secret
        self.strategy = strategy            # as asked
        self.mode = strategy                # what runs: cold / precopy / iterative
        self.tracker_method = tracker
        self.compression = compression      # "auto" (scheduler picks), "none", "lz4"
        self.xor = xor
        self.codec = self._make_codec("none" if compression in ("auto", "none") else compression)
        self.max_rounds = max_rounds
        self.targets = targets
        self.scheduler_name = scheduler_name
        self.sched = None
        self.work_dir = work_dir
        self.io_timeout = io_timeout
        self.progress = progress or (lambda ev: None)
        self.criu_args = list(criu_args)
        self.link_rate_Bps = link_rate_Bps
        self.costs = costs
        self.dump_retries = 4
        self.mem = MemorySource(pid)
        self.shadow = PageTable(2, np.uint64)     # hash of each page the destination holds
        self.mirror = PageTable(PAGE_SIZE)        # contents the destination holds (xor only)
        self.report = Report(pid=pid, dest=dest, strategy=strategy, codec=self.codec.name,
                             memory_backend=self.mem.backend)
        self.chan: Optional[wire.Channel] = None
        self.stopped_pids: List[int] = []
        self.committed = False
        self.state_addrs = np.zeros(0, dtype=np.uint64)
        self.t_start = 0.0

    def _emit(self, kind: str, **kw) -> None:
        try:
            self.progress({"event": kind, **kw})
        except Exception:
            pass

    async def _send_pages(self, addrs: np.ndarray, reader) -> Tuple[int, int]:
        """Read (``reader(addrs) -> (pages, ok)``), hash, encode and send; returns
        (pages sent, wire bytes). A worker thread prepares the next batches while the
        event loop sends the previous ones (at most two batches ahead)."""
        from . import _core
        sent = 0
        b0 = self.chan.bytes_sent
        codec = self.codec

        def work(a):
            pages, ok = reader(a)
            if not ok.all():
                a, pages = a[ok], pages[ok]
            if a.size == 0:
                return a, None, b""
            p2 = np.ascontiguousarray(pages)
            h = _core.hash_pages(p2)
            prev = mask = None
            if codec.xor:
                slots, mask = self.mirror.lookup(a)
                prev = np.zeros_like(p2)
                if mask.any():
                    prev[mask] = self.mirror.rows[slots[mask]]
            payload = codec.encode(a, p2, prev, mask)
            if codec.xor:
                self.mirror.put(a, p2)
            return a, h, payload

        queue: asyncio.Queue = asyncio.Queue(maxsize=2)

        async def produce():
            for i in range(0, addrs.size, BATCH_PAGES):
                await queue.put(await asyncio.to_thread(work, addrs[i:i + BATCH_PAGES]))
            await queue.put(None)

        producer = asyncio.ensure_future(produce())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                a2, h, payload = item
                if a2.size == 0:
                    continue
                await self.chan.send(wire.PAGES, payload)
                self.shadow.put(a2, h)
                sent += int(a2.size)
            await producer      # re-raises a reader/encoder error
        finally:
            if not producer.done():
                producer.cancel()
                try:
                    await producer
                except BaseException:
                    pass
        return sent, self.chan.bytes_sent - b0

    async def _connect(self, host: str, port: int):
        if not self.netns:
            return await asyncio.open_connection(host, port, limit=wire.MAX_FRAME + 1024)
        from .testbed import socket_in_netns
        sock = socket_in_netns(self.netns)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, limit=wire.MAX_FRAME + 1024)

    async def _round(self, index: int, addrs: np.ndarray) -> RoundReport:
        t0 = time.monotonic()
        n, nbytes = await self._send_pages(addrs, self.mem.read)
        await self.chan.send_json(wire.ROUND_END, {"round": index, "pages": n})
        _, payload = await self.chan.expect(wire.ROUND_ACK)
        ack, _ = wire.unpack_json(payload)
        if ack.get("held_pages", -1) != len(self.shadow):
            raise MigrationError(f"destination holds {ack.get('held_pages')} pages after round "
                                 f"{index}, source sent {len(self.shadow)}", "precopy")
        dt = time.monotonic() - t0
        return RoundReport(index=index, pages=n, bytes_raw=n * PAGE_SIZE, bytes_wire=nbytes,
                           duration_s=dt)

    def _make_codec(self, kpi_name: str) -> PageCodec:
        """The engine codec for a kpi codec name (``none``/``lz4``)."""
        if kpi_name == "lz4":
            return PageCodec("lz4", xor=self.xor)
        return PageCodec(None, xor=False)

    def _sample_codec(self):
        """Measure lz4 on up to 256 of the process's pages: a kpi.Codec."""
        from . import kpi
        n = self.state_addrs.size
        if n == 0:
            return None
        take = np.unique(self.state_addrs[np.linspace(0, n - 1, min(n, 256)).astype(np.int64)])
        pages, ok = self.mem.read(take)
        p = np.ascontiguousarray(pages[ok])
        if p.size == 0:
            return None
        codec = PageCodec("lz4", xor=False)
        t0 = time.perf_counter()
        payload = codec.encode(take[ok], p)
        t1 = time.perf_counter()
        decode_pages(payload, PageTable(PAGE_SIZE))
        t2 = time.perf_counter()
        return kpi.Codec("lz4", p.nbytes / max(len(payload), 1), p.nbytes / max(t1 - t0, 1e-6),
                         p.nbytes / max(t2 - t1, 1e-6))

    async def _plan(self) -> None:
        """Observe (state size, dirty rate, codec), ask the scheduler for a plan."""
        from . import kpi, scheduler
        from .errors import Infeasible
        rep = self.report
        self.state_addrs = await asyncio.to_thread(self.mem.present_pages)
        rate, window = 0.0, 1.0
        if self.strategy != "cold":
            rep.tracker = await asyncio.to_thread(self.mem.attach_tracker, self.tracker_method)
            t0 = time.monotonic()
            await asyncio.sleep(0.1)
            probe = await asyncio.to_thread(self.mem.collect)
            window = max(time.monotonic() - t0, 1e-3)
            rate = probe.size / window
        codecs = ()
        if self.compression in ("auto", "lz4"):
            c = await asyncio.to_thread(self._sample_codec)
            codecs = (c,) if c is not None else ()
        obs = kpi.Observations(
            state_bytes=max(1, int(self.state_addrs.size)) * PAGE_SIZE,
            dirty_rate_pages_per_s=rate, dirty_rate_window_s=window,
            bandwidth_bytes_per_s=self.link_rate_Bps or 12.5e6,
            # A full dump every time: its cost is fixed for this process (see CriuCosts).
            dump_fixed_s=self.costs.dump_fixed_s
            + self.costs.dump_s_per_mib * self.state_addrs.size * PAGE_SIZE / (1 << 20),
            dump_s_per_mib=0.0,
            restore_fixed_s=self.costs.restore_fixed_s,
            restore_s_per_mib=self.costs.restore_s_per_mib,
            rtt_s=0.001, codecs=codecs)
        targets = self.targets or kpi.Targets(max_downtime_s=1.0)
        self.sched = scheduler.get(self.scheduler_name)
        rep.scheduler = getattr(self.sched, "name", self.scheduler_name)
        try:
            plan = self.sched.plan(obs, targets)
        except Infeasible as exc:
            plan = exc.best
            rep.notes.append(f"targets not achievable ({exc}); running the best plan")
        if self.strategy == "auto":
            self.mode = "iterative" if plan.strategy == "precopy" else "cold"
        if self.compression == "auto":
            self.codec = self._make_codec(plan.codec)
        rep.codec = self.codec.name
        rep.strategy = self.mode if self.strategy == self.mode else f"{self.strategy}->{self.mode}"
        if self.mode == "cold":
            if self.mem.tracker is not None:
                self.mem.detach()
                rep.tracker = ""
            model = kpi.CostModel(obs)
            rep.predicted_downtime_s = model.downtime(
                self.state_addrs.size, "lz4" if self.codec.compression and codecs else "none",
                obs.bandwidth_bytes_per_s)
        self._emit("plan", strategy=self.mode, codec=self.codec.name, state_pages=int(self.state_addrs.size),
                   dirty_rate_pages_per_s=rate, dirty_rate_window_s=window, predicted_downtime_s=plan.predicted_downtime_s,
                   reason=plan.reason)

    async def _precopy(self) -> None:
        from . import kpi
        rep = self.report
        addrs = self.state_addrs
        index = 0
        while True:
            rnd = await self._round(index, addrs)
            rep.rounds.append(rnd)
            dirty = await asyncio.to_thread(self.mem.collect)
            rnd.dirty_pages_after = int(dirty.size)
            kcodec = "lz4" if self.codec.compression else "none"
            d = self.sched.on_round(kpi.RoundStats(
                index=index, duration_s=max(rnd.duration_s, 1e-6), pages_sent=rnd.pages,
                bytes_sent=rnd.bytes_wire, dirty_pages=rnd.dirty_pages_after,
                transfer_s=max(rnd.duration_s, 1e-6), elapsed_s=time.monotonic() - self.t_start,
                codec=kcodec))
            m = self.sched.model
            rnd.predicted_downtime_s = m.downtime(dirty.size, kcodec, m.bandwidth)
            if d.action is kpi.ABORT:
                raise MigrationError(f"scheduler {rep.scheduler} aborted: {d.reason}", "precopy")
            if self.mode == "precopy":
                reason = "precopy: one round"
            elif d.action is not kpi.CONTINUE:
                reason = d.reason or "scheduler: stop and copy"
            elif index + 1 >= self.max_rounds:
                reason = f"max rounds ({self.max_rounds})"
            else:
                reason = ""
            rnd.decision = reason or f"continue: {d.reason}"
            self._emit("round", round=index, pages=rnd.pages, bytes_wire=rnd.bytes_wire,
                       duration_s=rnd.duration_s, mbps=rnd.mbps, dirty_pages=rnd.dirty_pages_after,
                       predicted_downtime_s=rnd.predicted_downtime_s, decision=rnd.decision)
            if reason:
                break
            if self.compression == "auto" and d.codec in ("none", "lz4"):
                self.codec = self._make_codec(d.codec)
                rep.codec = self.codec.name
            index += 1
            addrs = dirty
        rep.predicted_downtime_s = rep.rounds[-1].predicted_downtime_s
        self.mem.detach()

    async def run(self) -> Report:
        host, port = _parse_hostport(self.dest)
        t_start = self.t_start = time.monotonic()
        phase = "connect"
        try:
            try:
                reader, writer = await asyncio.wait_for(self._connect(host, port),
                                                        self.io_timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                raise MigrationError(f"cannot connect to destination {host}:{port}: {exc}",
                                     phase) from None
            phase = "authenticate"
            self.chan = await wire.Channel.client(reader, writer, self.secret, self.io_timeout)
            await self.chan.send_json(wire.BEGIN, {"pid": self.pid, "page_size": PAGE_SIZE,
                                                   "strategy": self.strategy,
                                                   "codec": self.codec.name})
            await self.chan.expect(wire.READY)
            phase = "plan"
            await self._plan()
            if self.mode != "cold":
                phase = "precopy"
                await self._precopy()
            phase = "switchover"
            await self._switchover(t_start)
            self.report.ok = True
        except BaseException as exc:
            self.report.ok = False
            self.report.failed_phase = getattr(exc, "phase", None) or phase
            self.report.error = str(exc)
            await self._abort(exc)
            if isinstance(exc, (StateSyncError, OSError, asyncio.TimeoutError)):
                raise MigrationError(f"migration of pid {self.pid} aborted: {exc}",
                                     self.report.failed_phase, self.report) from exc
            raise
        finally:
            self.report.total_s = time.monotonic() - t_start
            if self.chan is not None:
                self.report.bytes_wire_total = self.chan.bytes_sent
                self.chan.close()
        return self.report

    async def _abort(self, exc: BaseException) -> None:
        try:
            self.mem.detach()
        except Exception:
            pass
        if self.chan is not None:
            try:
                await asyncio.wait_for(self.chan.send_json(wire.ABORT, {"reason": str(exc)[:500]}),
                                       2.0)
            except BaseException:
                pass
        if not self.committed:
            if self.stopped_pids:
                _signal_all(self.stopped_pids, signal.SIGCONT)
                time.sleep(0.01)
            st = proc.state(self.pid)
            self.report.source_resumed = st is not None and st not in ("T", "t", "Z", "X")

    async def _switchover(self, t_start: float) -> None:
        base = self.work_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
        tmp = tempfile.mkdtemp(prefix=f"statesync-dump-{self.pid}-", dir=base)
        try:
            await self._switchover_in(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    async def _switchover_in(self, tmp: str) -> None:
        from . import _core
        rep = self.report
        pids = [self.pid] + proc.descendants(self.pid)
        vpid = _ns_pid(self.pid)
        netns = criu.netns_of(self.pid)
        self._emit("phase", phase="dump")
        for attempt in range(self.dump_retries + 1):
            t0 = time.monotonic()
            try:
                await asyncio.to_thread(
                    criu.dump, self.pid, tmp, extra_args=["--leave-stopped"] + self.criu_args,
                    timeout=300.0, netns=netns)
                break
            except StateSyncError as exc:
                # CRIU resumes the tree itself when a dump fails; anything else failing
                # after a --leave-stopped dump leaves it stopped: the abort resumes
                # stopped_pids either way. A client connection in flight at the instant
                # CRIU collects sockets fails a dump ("half of stream unix connection"):
                # a later attempt usually finds none.
                self.stopped_pids = pids
                transient = isinstance(exc, CriuError) and any(
                    m in (exc.log_tail or "") for m in _TRANSIENT_DUMP_ERRORS)
                if (attempt == self.dump_retries or not transient
                        or not os.path.exists(f"/proc/{self.pid}")):
                    raise MigrationError(str(exc), "dump") from exc
                # as after any failed dump: make sure nothing stays stopped
                _signal_all(pids, signal.SIGCONT)
                self.stopped_pids = []
                rep.notes.append(f"dump attempt {attempt + 1} failed, retried: "
                                 f"{str(exc).splitlines()[-1].strip()}")
                for name in os.listdir(tmp):
                    os.unlink(os.path.join(tmp, name))
                await asyncio.sleep(random.uniform(0.02, 0.06) * (attempt + 1))
        t_dumped = time.monotonic()
        self.stopped_pids = pids
        rep.criu_dump_stats = _read_stats(os.path.join(tmp, "stats-dump"))
        # Freeze starts inside the dump; CRIU's own stats say how long after its start.
        frozen_us = rep.criu_dump_stats.get("frozen_time")
        dump_wall = t_dumped - t0
        t_freeze = t_dumped - frozen_us / 1e6 if frozen_us else t0
        rep.phases["freeze"] = rep.criu_dump_stats.get("freezing_time", 0) / 1e6
        rep.phases["dump"] = t_dumped - t_freeze
        self._emit("phase", phase="final transfer", dump_s=dump_wall)

        t1 = time.monotonic()
        main_pm = f"pagemap-{vpid}.img"
        if not os.path.exists(os.path.join(tmp, main_pm)):
            raise MigrationError(f"dump of pid {self.pid} has no {main_pm}", "dump")
        pages_id, addrs = _present_pages_of(os.path.join(tmp, main_pm))
        pages_file = f"pages-{pages_id}.img"
        pages_path = os.path.join(tmp, pages_file)
        if os.path.getsize(pages_path) != addrs.size * PAGE_SIZE:
            raise MigrationError(f"{pages_path} holds {os.path.getsize(pages_path)} bytes, "
                                 f"pagemap says {addrs.size} pages", "dump")
        rep.state_pages = int(addrs.size)
        # Zero-copy view of the dumped pages (the dump directory is on tmpfs by default).
        dumped = (np.memmap(pages_path, dtype=np.uint8, mode="r", shape=(addrs.size, PAGE_SIZE))
                  if addrs.size else np.zeros((0, PAGE_SIZE), np.uint8))

        def diff():
            h = _core.hash_pages(dumped) if addrs.size else np.zeros((0, 2), np.uint64)
            slots, found = self.shadow.lookup(addrs)
            need = ~found
            if found.any():
                need[found] = (self.shadow.rows[slots[found]] != h[found]).any(axis=1)
            return np.flatnonzero(need)

        need_idx = await asyncio.to_thread(diff)
        rep.phases["final_diff"] = time.monotonic() - t1
        t2 = time.monotonic()
        # Non-memory images first (pagemap included), then the pages the destination lacks.
        images_bytes = 0
        for name in sorted(os.listdir(tmp)):
            if name == pages_file or name in ("dump.log", "stats-dump"):
                continue
            path = os.path.join(tmp, name)
            if not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                data = f.read()
            for off in range(0, max(len(data), 1), 8 << 20):
                piece = data[off:off + (8 << 20)]
                await self.chan.send(wire.IMAGE, struct.pack("!H", len(name)) + name.encode()
                                     + struct.pack("!Q", off) + piece)
            images_bytes += len(data)
        rep.images_bytes = images_bytes
        b0 = self.chan.bytes_sent
        sel_addrs = addrs[need_idx]
        n_final, _ = await self._send_pages(
            sel_addrs, lambda a, idx=need_idx: (dumped[idx[np.searchsorted(sel_addrs, a)]],
                                                np.ones(a.size, dtype=bool)))
        rep.final_pages = n_final
        rep.final_bytes_wire = self.chan.bytes_sent - b0
        await self.chan.send_json(wire.FINAL, {"pages_file": pages_file, "count": int(addrs.size),
                                               "images_bytes": images_bytes},
                                  np.ascontiguousarray(addrs, dtype="<u8").tobytes())
        self._emit("phase", phase="restore", final_pages=n_final)
        mtype, payload = await self.chan.expect(wire.RESTORED, wire.FAILED,
                                                timeout=max(self.io_timeout, 120.0))
        info, _ = wire.unpack_json(payload)
        t4 = time.monotonic()
        if mtype == wire.FAILED:
            raise MigrationError(f"destination could not restore: {info.get('error')}",
                                 "restore")
        # The destination times its own steps; what remains of t2..t4 is the transfer
        # (until the last byte was applied there) and the round trip of RESTORED.
        assemble = float(info.get("assemble_s") or 0.0)
        restore = float(info.get("restore_s") or 0.0)
        rep.phases["final_transfer"] = max(0.0, (t4 - t2) - assemble - restore)
        rep.phases["assemble"] = assemble
        rep.phases["restore"] = restore
        rep.restored_pid = info.get("pid")
        rep.criu_restore_stats = info.get("stats", {})
        rep.downtime_s = t4 - t_freeze
        # The destination runs the service: now the stopped source copy goes, and is
        # gone when migrate() returns (SIGKILL of a pid-namespace init is asynchronous;
        # kill_tree waits). Off the event loop: the wait is a few milliseconds of polling.
        await asyncio.get_running_loop().run_in_executor(
            None, proc.kill_tree, list(reversed(self.stopped_pids)))
        self.committed = True
        # From here the service runs at the destination only: a lost COMMIT is worth a
        # note (the destination keeps what it restored), not a failed migration.
        try:
            await self.chan.send_json(wire.COMMIT, {})
            await self.chan.expect(wire.DONE, timeout=10.0)
        except StateSyncError as exc:
            rep.notes.append(f"destination did not acknowledge the commit: {exc}")
        self._emit("done")


# --------------------------------------------------------------------------- destination


class _DestinationSession:
    def __init__(self, chan: wire.Channel, images_dir: str, restore: bool, keep_images: bool,
                 log: Callable[[str], None]):
        self.chan = chan
        self.images_dir = images_dir
        self.restore = restore
        self.keep_images = keep_images
        self.log = log
        self.store = PageTable(PAGE_SIZE, np.uint8)
        self.tmp: Optional[str] = None
        self.final_dir: Optional[str] = None
        self.restored_pid: Optional[int] = None
        self.image_names: Dict[str, int] = {}
        self.result: dict = {"ok": False}

    async def run(self) -> dict:
        try:
            await self._run()
        except BaseException as exc:
            self.result["error"] = str(exc)
            self._cleanup_failed()
            if not isinstance(exc, (StateSyncError, OSError, asyncio.TimeoutError)):
                raise
        return self.result

    def _cleanup_failed(self) -> None:
        if self.restored_pid:
            proc.kill_tree([self.restored_pid])
            self.log(f"killed restored pid {self.restored_pid}")
            self.restored_pid = None
        for d in (self.tmp, self.final_dir):
            if d and os.path.exists(d):
                shutil.rmtree(d, ignore_errors=True)

    async def _run(self) -> None:
        _, payload = await self.chan.expect(wire.BEGIN)
        begin, _ = wire.unpack_json(payload)
        if int(begin.get("page_size", 0)) != PAGE_SIZE:
            await self.chan.send_json(wire.ERROR, {"error": f"page size {begin.get('page_size')} "
                                                             f"!= {PAGE_SIZE} here"})
            raise MigrationError("page size mismatch", "begin")
        os.makedirs(self.images_dir, exist_ok=True)
        # The agent's own pid is in the name so a later agent can sweep what a killed
        # one left (see DestinationServer.start); ".incoming-" is never a usable set.
        self.tmp = tempfile.mkdtemp(prefix=f".incoming-{os.getpid()}-{int(begin.get('pid', 0))}-",
                                    dir=self.images_dir)
        self.result["source_pid"] = begin.get("pid")
        await self.chan.send_json(wire.READY, {})
        while True:
            mtype, payload = await self.chan.recv()
            if mtype == wire.PAGES:
                await asyncio.to_thread(decode_pages, payload, self.store)
            elif mtype == wire.ROUND_END:
                await self.chan.send_json(wire.ROUND_ACK, {"held_pages": len(self.store)})
            elif mtype == wire.IMAGE:
                self._write_image_piece(payload)
            elif mtype == wire.FINAL:
                info, tail = wire.unpack_json(payload)
                await self._finish(info, tail)
                return
            elif mtype == wire.ABORT:
                info, _ = wire.unpack_json(payload)
                raise MigrationError(f"source aborted: {info.get('reason')}", "abort")
            else:
                raise wire.ProtocolError(f"unexpected {wire.NAMES.get(mtype, mtype)}")

    def _check_name(self, name: str) -> str:
        if not _NAME_RE.fullmatch(name) or name in (".", ".."):
            raise wire.ProtocolError(f"refusing image file name {name!r}")
        return name

    def _write_image_piece(self, payload: bytes) -> None:
        if len(payload) < 2:
            raise wire.ProtocolError("short image frame")
        (ln,) = struct.unpack_from("!H", payload)
        if 2 + ln + 8 > len(payload):
            raise wire.ProtocolError("image frame name past its end")
        name = self._check_name(payload[2:2 + ln].decode("ascii", "replace"))
        (off,) = struct.unpack_from("!Q", payload, 2 + ln)
        data = payload[2 + ln + 8:]
        if off != self.image_names.get(name, 0):
            raise wire.ProtocolError(f"image {name}: piece at offset {off}, expected "
                                     f"{self.image_names.get(name, 0)}")
        with open(os.path.join(self.tmp, name), "ab" if off else "wb") as f:
            f.write(data)
        self.image_names[name] = off + len(data)

    async def _finish(self, info: dict, tail: bytes) -> None:
        t0 = time.monotonic()
        pages_file = self._check_name(str(info.get("pages_file", "")))
        count = int(info.get("count", -1))
        if count < 0 or count * 8 != len(tail):
            raise wire.ProtocolError(f"FINAL lists {len(tail)} address bytes for {count} pages")
        addrs = np.frombuffer(tail, dtype="<u8").astype(np.uint64)

        def assemble():
            slots, found = self.store.lookup(addrs)
            if not found.all():
                miss = addrs[~found]
                raise MigrationError(f"cannot assemble {pages_file}: {miss.size} pages never "
                                     f"arrived, first at {int(miss[0]):#x}", "assemble")
            fd = os.open(os.path.join(self.tmp, pages_file),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _write_rows(fd, self.store.rows, slots)
                os.fsync(fd)
            finally:
                os.close(fd)
            for name in self.image_names:
                fd = os.open(os.path.join(self.tmp, name), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            # The files' entries in tmp, then the rename in images_dir: after a crash
            # the set is either complete under its final name or still ".incoming-".
            fsync_dir(self.tmp)
            final = os.path.join(self.images_dir,
                                 os.path.basename(self.tmp).replace(".incoming-", "migrated-", 1))
            os.rename(self.tmp, final)
            fsync_dir(self.images_dir)
            return final

        self.final_dir = await asyncio.to_thread(assemble)
        self.tmp = None
        t1 = time.monotonic()
        self.result["assemble_s"] = t1 - t0
        if not self.restore:
            await self.chan.send_json(wire.RESTORED, {"pid": None, "images": self.final_dir})
            self.result.update(ok=True, images=self.final_dir)
            await self._wait_commit()
            return
        try:
            res = await asyncio.to_thread(criu.restore, self.final_dir, True, (), 300.0)
            if res.pid <= 0:
                raise MigrationError(f"criu restore from {self.final_dir} left no pid file",
                                     "restore")
            self.restored_pid = res.pid
            st = proc.state(self.restored_pid)
            if st is None or st in ("Z", "X", "T", "t"):
                raise MigrationError(f"restored pid {self.restored_pid} is not running "
                                     f"(state {st})", "restore")
        except (CriuError, OSError, ValueError, MigrationError) as exc:
            await self.chan.send_json(wire.FAILED, {"error": str(exc)[-3000:]})
            raise MigrationError(f"restore failed: {exc}", "restore") from exc
        t2 = time.monotonic()
        stats = _read_stats(os.path.join(self.final_dir, "stats-restore"))
        self.result.update(restore_s=t2 - t1, pid=self.restored_pid)
        await self.chan.send_json(wire.RESTORED, {"pid": self.restored_pid, "stats": stats,
                                                  "assemble_s": t1 - t0, "restore_s": t2 - t1})
        await self._wait_commit()

    async def _wait_commit(self) -> None:
        try:
            mtype, payload = await self.chan.expect(wire.COMMIT, wire.ABORT)
        except StateSyncError as exc:
            # The source may already have killed its copy: keeping ours is the only way
            # not to lose the service. Say so loudly.
            self.log(f"no commit from the source ({exc}); keeping restored pid "
                     f"{self.restored_pid}: check that the source copy is gone")
            self.result.update(ok=True, uncommitted=True)
            self.restored_pid = None
            return
        if mtype == wire.ABORT:
            raise MigrationError("source aborted after restore", "commit")
        self.result.update(ok=True)
        self.restored_pid = None       # committed: no longer ours to kill
        try:
            await self.chan.send_json(wire.DONE, {})
        except StateSyncError:
            pass
        if not self.keep_images and self.final_dir:
            shutil.rmtree(self.final_dir, ignore_errors=True)


def _write_rows(fd: int, rows: np.ndarray, slots: np.ndarray) -> None:
    """Write ``rows[slots]`` to fd in order, without gathering them first: runs of
    consecutive slots go out as one iovec each (the store keeps rows in arrival
    order, which is mostly address order)."""
    if slots.size == 0:
        return
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    starts = np.concatenate([[0], breaks]).tolist()
    ends = np.concatenate([breaks, [slots.size]]).tolist()
    iov = [memoryview(rows[slots[a]:slots[a] + (b - a)]).cast("B") for a, b in zip(starts, ends)]
    for i in range(0, len(iov), 512):
        chunk = iov[i:i + 512]
        want = sum(len(v) for v in chunk)
        done = os.writev(fd, chunk)
        while done < want:  # short write: finish the rest piece by piece
            flat = b"".join(bytes(v) for v in chunk)
            done += os.write(fd, flat[done:])


class DestinationServer:
    """A running destination agent (see :func:`serve_destination`)."""

    def __init__(self, listen: str, images_dir: str, secret, *, once: bool = True,
                 restore: bool = True, keep_images: bool = False, io_timeout: float = 30.0,
                 log: Optional[Callable[[str], None]] = None):
        self.host, self.port = _parse_hostport(listen)
        self.images_dir = images_dir
        self.secret = wire.load_secret(secret)
        self.once = once
        self.restore = restore
        self.keep_images = keep_images
        self.io_timeout = io_timeout
        self.log = log or (lambda msg: print(f"statesync receive: {msg}", file=sys.stderr,
                                             flush=True))
        self.results: List[dict] = []
        self._done: Optional[asyncio.Event] = None
        self._busy = False
        self.server = None

    def sweep_stale(self) -> List[str]:
        """Remove partial image sets left by destination agents that were killed."""
        removed = []
        try:
            names = os.listdir(self.images_dir)
        except FileNotFoundError:
            return removed
        for name in names:
            m = re.fullmatch(r"\.incoming-(\d+)-\d+-\w+", name)
            if m and int(m.group(1)) != os.getpid() and proc.state(int(m.group(1))) is None:
                shutil.rmtree(os.path.join(self.images_dir, name), ignore_errors=True)
                removed.append(name)
        if removed:
            self.log(f"removed partial image sets of dead agents: {', '.join(removed)}")
        return removed

    async def start(self):
        self.sweep_stale()
        self._done = asyncio.Event()
        self.server = await asyncio.start_server(self._handle, self.host, self.port,
                                                 limit=wire.MAX_FRAME + 1024)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader, writer) -> None:
        peer = writer.get_extra_info("peername")
        try:
            chan = await wire.Channel.server(reader, writer, self.secret, self.io_timeout)
        except wire.ProtocolError as exc:
            self.log(f"refused {peer}: {exc}")
            writer.close()
            return
        if self._busy:
            await chan.send_json(wire.ERROR, {"error": "destination busy with another migration"})
            chan.close()
            return
        self._busy = True
        try:
            self.log(f"authenticated source {peer}")
            result = await _DestinationSession(chan, self.images_dir, self.restore,
                                               self.keep_images, self.log).run()
            self.results.append(result)
            self.log(("migration done: " if result.get("ok") else "migration failed: ")
                     + json.dumps(result))
        finally:
            self._busy = False
            chan.close()
        if self.once:
            self._done.set()

    async def serve(self, timeout: Optional[float] = None) -> List[dict]:
        try:
            if timeout is None:
                await self._done.wait()
            else:
                await asyncio.wait_for(self._done.wait(), timeout)
        finally:
            self.server.close()
            await self.server.wait_closed()
        return self.results


def serve_destination(listen: str = f"127.0.0.1:{DEFAULT_PORT}", images_dir: str = ".",
                      secret=None, *, once: bool = True, restore: bool = True,
                      keep_images: bool = False, io_timeout: float = 30.0,
                      timeout: Optional[float] = None,
                      ready: Optional[Callable[[int], None]] = None) -> List[dict]:
    """Run a destination agent until one migration finished (``once``) or forever.

    Listens on ``listen`` (``HOST:PORT``; loopback unless told otherwise), accepts
    only peers that prove they hold ``secret`` (bytes, str, or ``"@PATH"``), writes
    the received image set under ``images_dir`` and restores it with CRIU in this
    process's network namespace. Returns one result dict per migration attempt
    (``ok``, ``pid`` of the restored process, ``error``...). ``ready(port)`` is called
    once listening.
    """
    async def main():
        srv = await DestinationServer(listen, images_dir, secret, once=once, restore=restore,
                                      keep_images=keep_images, io_timeout=io_timeout).start()
        if ready:
            ready(srv.port)
        return await srv.serve(timeout)

    return asyncio.run(main())


# --------------------------------------------------------------------------- public API


def migrate(pid: int, dest: str, strategy: str = "auto", targets=None, secret=None, *,
            tracker: str = "auto", compression: Optional[str] = "auto", xor: bool = False,
            max_rounds: int = 10,
            scheduler: str = "adaptive", work_dir: Optional[str] = None,
            io_timeout: float = 30.0, progress: Optional[Callable[[dict], None]] = None,
            criu_args=(), link_rate: Optional[float] = None,
            costs: Optional[CriuCosts] = None, netns: Optional[str] = None,
            dump_retries: int = 4, calibration: Optional[str] = None) -> Report:
    """Live-migrate process ``pid`` (and its children) to the destination agent at
    ``dest`` (``HOST:PORT``; :func:`serve_destination` or ``statesync receive`` must be
    listening there). Returns a :class:`~statesync.report.Report` (times in seconds,
    sizes in bytes or pages as the field names say).

    ``secret`` (required): the shared secret both agents hold, as ``bytes``, as a
    ``str`` (its UTF-8 bytes), or ``"@PATH"`` / ``"file:PATH"`` to read it from a file
    (surrounding whitespace stripped); at least 16 bytes. A missing, unreadable or
    short secret raises :class:`~statesync.errors.SecretError` (a ``ValueError``)
    before anything is sent. Nothing of the process leaves this host before the
    destination proved it holds the same secret.

    ``strategy``: ``cold`` (dump, send everything, restore), ``precopy`` (one live
    round, then switch over), ``iterative`` (live rounds until the scheduler says stop,
    at most ``max_rounds``), ``auto`` (the scheduler's plan decides cold or iterative).
    ``targets``: a :class:`statesync.kpi.Targets` (default: max downtime 1 s).
    ``scheduler``: a name for :func:`statesync.scheduler.get` (default ``adaptive``).
    ``compression``: ``"auto"`` (the scheduler picks from the link rate and a
    measured lz4 sample), ``None``/``"none"``, or ``"lz4"``; pages travel as
    :mod:`statesync.stream` streams (zero pages always elided). ``xor``: with lz4,
    send XBZRLE deltas of re-sent pages against the destination's copy (costs a
    mirror of the state in the source's memory: one page per page of state).
    ``tracker``: a :class:`statesync.Tracker` method (``auto``, ``uffd``, ``hash``).
    ``link_rate`` (bits/s): the link's rate if known (else 100 Mbit/s until round 0
    measured it). ``io_timeout`` (seconds) bounds every wait on the peer. ``netns``:
    make the connection from this named network namespace (/run/netns/NAME) instead
    of the caller's, as the two-host testbed does; CRIU always runs in the target's
    network namespace (:func:`statesync.criu.netns_of`).

    ``work_dir``: the directory of the local CRIU dump at switch-over (a temporary
    directory is made in it and removed afterwards; default ``/dev/shm``, so the dump
    stays in memory: a disk there adds its write time to the downtime).
    ``criu_args``: extra arguments for ``criu dump`` (after ``--leave-stopped``), e.g.
    ``["--tcp-established"]`` for a process with open TCP connections.
    ``costs``: a :class:`CriuCosts` (dump and restore cost priors in seconds and
    seconds per MiB of state) for the scheduler's downtime model; ``calibration``: a
    JSON file of :class:`CriuCosts` for this host, read before and refined after every
    successful migration (``costs`` then is ignored). ``dump_retries``: further dump
    attempts when ``criu dump`` fails because a client's UNIX stream connection was
    open or in flight when CRIU collected sockets (other dump failures abort at once).

    ``progress``: called with one ``dict`` per event, from the calling thread (keep it
    quick; its exceptions are ignored). Every dict has ``"event"``:

    - ``"plan"``: ``strategy``, ``codec``, ``state_pages``, ``dirty_rate_pages_per_s``,
      ``dirty_rate_window_s``, ``predicted_downtime_s``, ``reason``;
    - ``"round"`` (after each live round): ``round`` (0-based), ``pages``,
      ``bytes_wire``, ``duration_s``, ``mbps`` (MB/s), ``dirty_pages`` (written
      during the round, to send next), ``predicted_downtime_s``, ``decision``;
    - ``"phase"`` (switch-over steps): ``phase`` = ``"dump"``, ``"final transfer"``
      (with ``dump_s``) or ``"restore"`` (with ``final_pages``);
    - ``"done"`` once the destination runs the process.

    On failure raises :class:`MigrationError` (``.phase``, ``.report``); the process
    then runs on at the source with its state intact (``report.source_resumed``).
    Must be run as root (ptrace, CRIU). Blocking; runs its own event loop, so call it
    from a thread without a running loop. Not thread-safe for the same ``pid``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if compression not in (None, "none", "auto", "lz4"):
        raise ValueError(f"unknown compression {compression!r} (auto, none, lz4)")
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    if not os.path.exists(f"/proc/{int(pid)}"):
        from .errors import NoSuchProcess
        raise NoSuchProcess(int(pid), "no such process: nothing to migrate")
    key = wire.load_secret(secret)
    if calibration:
        costs = CriuCosts.load(calibration)
    agent = _SourceAgent(int(pid), dest, key, strategy, tracker, compression or "none",
                         max_rounds, targets, scheduler, work_dir, io_timeout, progress,
                         list(criu_args), link_rate / 8 if link_rate else None,
                         costs or CriuCosts(), netns, xor)
    agent.dump_retries = max(0, int(dump_retries))
    report = asyncio.run(agent.run())
    if calibration:
        try:
            agent.costs.observe(report).save(calibration)
        except OSError as exc:
            report.notes.append(f"could not save the calibration to {calibration}: {exc}")
    return report


# --------------------------------------------------------------------------- CLI


def _print_progress(ev: dict) -> None:
    if ev["event"] == "plan":
        print(f"plan: {ev['strategy']}, codec {ev['codec']}, {ev['state_pages']} pages of state, "
              f"dirty rate {ev['dirty_rate_pages_per_s']:.0f} pages/s, predicted downtime "
              f"{ev['predicted_downtime_s'] * 1e3:.0f} ms ({ev['reason']})", flush=True)
    elif ev["event"] == "round":
        pd = ev["predicted_downtime_s"]
        print(f"round {ev['round']:3d}: {ev['pages']:8d} pages {ev['bytes_wire'] / 1e6:9.2f} MB "
              f"in {ev['duration_s']:6.2f} s ({ev['mbps']:7.1f} MB/s); "
              f"{ev['dirty_pages']} dirty; predicted downtime "
              f"{pd * 1e3:.0f} ms -> {ev['decision']}", flush=True)
    elif ev["event"] == "phase":
        print(f"switch-over: {ev['phase']}", flush=True)


def _default_calibration() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "statesync", "criu-costs.json")


def _secret_arg(a) -> bytes:
    if a.secret_file:
        return wire.load_secret("@" + a.secret_file)
    env = os.environ.get("STATESYNC_SECRET")
    if env:
        return wire.load_secret(env)
    raise SystemExit("statesync: a shared secret is required: --secret-file PATH or "
                     "STATESYNC_SECRET")


def _cmd_migrate(a) -> int:
    report = None
    try:
        targets = None
        if a.max_downtime or a.max_time:
            from .kpi import Targets
            targets = Targets(max_downtime_s=a.max_downtime or 1.0,
                              max_total_time_s=a.max_time or math.inf)
        report = migrate(a.pid, a.to, strategy=a.strategy, secret=_secret_arg(a),
                         tracker=a.tracker, compression=a.compression, targets=targets,
                         xor=a.xor,
                         max_rounds=a.max_rounds, io_timeout=a.io_timeout,
                         scheduler=a.scheduler,
                         progress=None if a.quiet else _print_progress,
                         link_rate=a.link_rate, work_dir=a.work_dir,
                         calibration=a.calibration or None)
        rc = 0
    except MigrationError as exc:
        report = exc.report
        print(f"statesync: error: {exc}", file=sys.stderr)
        rc = 1
    if report is not None:
        if a.json:
            with open(a.json, "w") as f:
                f.write(report.to_json())
        if a.metrics_file:
            report.write_prometheus(a.metrics_file)
        print(report.table())
    return rc


def _cmd_receive(a) -> int:
    def ready(port):
        print(f"listening on {a.listen.rpartition(':')[0] or '127.0.0.1'}:{port}", flush=True)
    results = serve_destination(a.listen, a.images_dir, _secret_arg(a), once=not a.forever,
                                restore=not a.no_restore, keep_images=a.keep_images,
                                io_timeout=a.io_timeout, ready=ready)
    for r in results:
        print(json.dumps(r))
    return 0 if results and results[-1].get("ok") else 1


def cli_register(sub) -> None:
    p = sub.add_parser("migrate", help="live-migrate a process to a destination agent")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--to", required=True, metavar="HOST:PORT")
    p.add_argument("--strategy", choices=STRATEGIES, default="auto")
    p.add_argument("--tracker", default="auto", help="auto, uffd, hash (dirty-page tracker)")
    p.add_argument("--compression", choices=["auto", "none", "lz4"], default="auto")
    p.add_argument("--xor", action="store_true", help="with lz4: XOR deltas of re-sent pages")
    p.add_argument("--max-rounds", type=int, default=10)
    p.add_argument("--scheduler", default="adaptive", help="scheduler name (statesync.scheduler)")
    p.add_argument("--max-downtime", type=float, default=None,
                   help="target: longest acceptable downtime, seconds")
    p.add_argument("--max-time", type=float, default=None,
                   help="target: longest acceptable total migration time, seconds")
    p.add_argument("--link-rate", type=float, default=None,
                   help="link rate in bits/s for predictions (default: measured)")
    p.add_argument("--secret-file", help="file holding the shared secret "
                   "(or STATESYNC_SECRET in the environment)")
    p.add_argument("--io-timeout", type=float, default=30.0)
    p.add_argument("--work-dir", help="where the local CRIU dump goes (default /dev/shm)")
    p.add_argument("--calibration", default=_default_calibration(),
                   help="JSON file of this host's measured CRIU costs, refined by every "
                   "migration (default %(default)s; '' to use the built-in priors)")
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.add_argument("--metrics-file", help="write Prometheus metrics (text format) here")
    p.add_argument("--quiet", action="store_true", help="no per-round progress")
    p.set_defaults(func=_cmd_migrate)

    r = sub.add_parser("receive", help="run a destination agent that restores migrated processes")
    r.add_argument("--listen", default=f"127.0.0.1:{DEFAULT_PORT}", metavar="HOST:PORT")
    r.add_argument("--images-dir", default=".", help="where received image sets are written")
    r.add_argument("--secret-file")
    r.add_argument("--forever", action="store_true", help="serve migrations until killed")
    r.add_argument("--no-restore", action="store_true",
                   help="only write the image set (no criu restore)")
    r.add_argument("--keep-images", action="store_true")
    r.add_argument("--io-timeout", type=float, default=30.0)
    r.set_defaults(func=_cmd_receive)
