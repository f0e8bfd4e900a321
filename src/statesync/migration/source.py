"""The source agent: plan, pre-copy rounds, then the switch-over (see switchover.py)."""
from __future__ import annotations

import asyncio
import os
import secrets
import time
from typing import Any, Callable, List, Optional, Tuple, cast

import numpy as np

from statesync import proc
from statesync._consts import PAGE_SIZE
from statesync.errors import MigrationError, StateSyncError
from statesync.migration import protocol as wire
from statesync.migration.codec import PageCodec, decode_pages
from statesync.migration import records
from statesync.migration.common import BATCH_PAGES, _parse_hostport, fault, sweep_dump_dirs
from statesync.migration.memsource import MemorySource
from statesync.migration.pagetable import PageTable
from statesync.migration.report import Report, RoundReport
from statesync.migration.records import SourceState as S
from statesync.migration.supervisor import Supervisor, resume_tree, settle_orphans
from statesync.migration.switchover import (
    SwitchOver,
    lazy_capacity_problem,
    lazy_unavailable,
)
from statesync.planning.costs import CriuCosts


class _SourceAgent(SwitchOver):
    def __init__(self, pid: int, dest: str, secret: bytes, strategy: str,
                 tracker: str, compression: str, max_rounds: int, targets,
                 scheduler_name: str, work_dir: Optional[str], io_timeout: float,
                 progress: Optional[Callable[[dict], None]], criu_args: List[str],
                 link_rate_Bps: Optional[float], costs: "CriuCosts",
                 netns: Optional[str] = None, xor: bool = False,
                 state_dir: Optional[str] = None, encryption=None, target=None):
        from statesync.migration.target import PidTarget
        # What is migrated and how it is dumped/restored/rolled back (target.py).
        self.target = target or PidTarget(pid)
        self.pid = pid
        # The wire protocol's encryption setting (protocol.encryption_options: None/True/
        # "on", False/"off"/"none", or a cipher name); ValueError here, before any work.
        self.encryption = encryption
        self.wire_options = wire.encryption_options(encryption)
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
        self.sched: Any = None
        self.work_dir = work_dir
        self.io_timeout = io_timeout
        self.progress = progress or (lambda ev: None)
        self.criu_args = list(criu_args) + self.target.dump_args()
        self.link_rate_Bps = link_rate_Bps
        self.costs = costs
        self.dump_retries = 4
        # The whole tree and its shared memory are pre-copied (every pagemap of the
        # final dump is diffed and assembled; see SwitchOver._to_prepared).
        self.mem = MemorySource(pid, tree=True, shmem=True)
        self.shadow = PageTable(2, np.uint64)     # hash of each page the destination holds
        self.mirror = PageTable(PAGE_SIZE)        # contents the destination holds (xor only)
        self.report = Report(pid=pid, dest=dest, strategy=strategy, codec=self.codec.name,
                             memory_backend=self.mem.backend)
        # Set once connected (run()); every user runs after that.
        self.chan: wire.Channel = cast("wire.Channel", None)
        # The handoff (docs/migrate.md): one session id per attempt, a durable record
        # of our state in it, a supervisor process that settles it if we die.
        self.session = secrets.token_hex(8)
        self.state_base = records.state_dir(state_dir)
        self.record_path = ""
        self.supervisor: Optional[Supervisor] = None
        self.pid_start = records.start_time(pid)
        self.frozen = False          # the tree may be stopped by our dump
        self.final_sent = False      # the destination may hold a restored copy
        self.decided = False         # COMMIT decided: never resume on our own any more
        self.committed = False       # destination confirmed; our copy killed
        self.dump_dir: Optional[str] = None
        self._criu = None
        self.deadline = 0.0
        max_down = getattr(targets, "max_downtime_s", None) or 1.0
        # Longest freeze before the agent aborts and resumes: the downtime target with a
        # wide margin (restore of a large state, a slow link), plus one io_timeout for
        # a peer that stops answering. Never a constant.
        self.budget_s = float(io_timeout) + 4.0 * float(max_down)
        self.resolve_window = 3.0 * float(io_timeout)
        self.state_addrs = np.zeros(0, dtype=np.uint64)
        self.t_start = 0.0
        # Migration.cancel() (api.py) sets cancel_requested; the switch-over checks it
        # before committing and sets committing, after which a cancel is refused.
        self.cancel_requested = False
        self.committing = False
        # The switch-over asked for ("auto", "lazy", "full") and the one that runs:
        # lazy = only the final dirty set travels in the freeze and the destination
        # restores lazily from the pages it holds (docs/migrate.md, docs/lazy.md).
        self.switchover = "auto"
        self.lazy = False
        self.pending_dirty = np.zeros(0, dtype=np.uint64)   # collected, not yet sent
        self.final_dirty = np.zeros(0, dtype=np.uint64)     # collected with the tree stopped
        self.dest_restores = True                           # READY says (--no-restore: no)
        self.t_stopped = 0.0

    def _emit(self, kind: str, **kw) -> None:
        try:
            self.progress({"event": kind, **kw})
        except MigrationError:
            raise           # a progress hook may abort the migration (api: abort_if)
        except Exception:
            pass

    async def _in_thread(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` in a worker thread, run to its end even if the migration is
        cancelled meanwhile: a tracker attach, a collect or a criu dump cut in half
        cannot be undone by the abort. The cancellation takes effect afterwards."""
        fut = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
        cancelled: Optional[BaseException] = None
        while not fut.done():
            try:
                await asyncio.wait([fut])
            except asyncio.CancelledError as exc:
                cancelled = exc
        if cancelled is not None:
            if not fut.cancelled():
                fut.exception()     # retrieved: the cancellation is what the caller sees
            raise cancelled
        return fut.result()

    async def _send_pages(self, addrs: np.ndarray, reader) -> Tuple[int, int]:
        """Read (``reader(addrs) -> (pages, ok)``), hash, encode and send; returns
        (pages sent, wire bytes). A worker thread prepares the next batches while the
        event loop sends the previous ones (at most two batches ahead)."""
        from statesync import _core
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
                self._emit("transfer", pages_sent=sent, pages_total=int(addrs.size),
                           bytes_wire=self.chan.bytes_sent - b0)
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
        from statesync.testing.testbed import socket_in_netns
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
        from statesync.planning import kpi
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
        from statesync.errors import Infeasible
        from statesync.planning import kpi, scheduler
        rep = self.report
        self.state_addrs = await asyncio.to_thread(self.mem.present_pages)
        rate, window = 0.0, 1.0
        if self.strategy != "cold":
            rep.tracker = await self._in_thread(self.mem.attach_tracker, self.tracker_method)
            t0 = time.monotonic()
            await asyncio.sleep(0.1)
            probe = await self._in_thread(self.mem.collect)
            window = max(time.monotonic() - t0, 1e-3)
            rate = probe.size / window
        codecs: tuple = ()
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
            self.mode = {"precopy": "iterative", "hybrid": "hybrid"}.get(plan.strategy, "cold")
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
        self._emit("plan", strategy=self.mode, codec=self.codec.name,
                   state_pages=int(self.state_addrs.size), dirty_rate_pages_per_s=rate,
                   dirty_rate_window_s=window,
                   # a cold run's own prediction (the plan may be a pre-copy one)
                   predicted_downtime_s=(rep.predicted_downtime_s if self.mode == "cold"
                                         else plan.predicted_downtime_s),
                   reason=plan.reason)

    async def _precopy(self) -> None:
        from statesync.planning import kpi
        rep = self.report
        if self.mode == "postcopy":     # no pre-copy round at all (migration/postcopy.py)
            from statesync.migration import postcopy
            return postcopy.skip_precopy(self)
        addrs = self.state_addrs
        index = 0
        while True:
            fault(f"source:round{min(index, 1)}")
            rnd = await self._round(index, addrs)
            rep.rounds.append(rnd)
            dirty = await self._in_thread(self.mem.collect)
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
            elif self.mode == "hybrid":     # switch over before convergence
                from statesync.migration.postcopy import hybrid_stop
                reason = hybrid_stop(rep.rounds)
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
        # What the last collect found was not sent: the lazy final transfer adds it
        # (the full switch-over's content diff finds it anyway).
        self.pending_dirty = np.asarray(dirty, dtype=np.uint64)
        self.lazy = self._choose_lazy()
        rep.switchover = "lazy" if self.lazy else "full"
        if not self.lazy:
            self.mem.detach()

    def _choose_lazy(self) -> bool:
        """Lazy switch-over when asked or (auto) when this host can: the tracker stays
        attached through the freeze, CRIU and the kernel do lazy pages, and the tree is
        one process (the destination's page store is one address space)."""
        if self.mode in ("postcopy", "hybrid") and self.strategy == self.mode:
            self.switchover = "lazy"    # post-copy runs on the lazy switch-over only
        if self.switchover == "full":
            return False
        why = self.target.lazy_problem() or lazy_unavailable()
        if why is None and self.mem.tracker is None:
            why = "no dirty-page tracker is attached"
        if why is None and not self.dest_restores:
            why = "the destination only writes image sets (--no-restore)"
        if why is None and self.report.tracker != "uffd":
            # With the hash tracker the final collect re-hashes the whole state in the
            # freeze anyway, and a lazy switch-over of redis under writes lost its
            # socket in 1 of 3 runs here (not understood yet): uffd only.
            why = f"the {self.report.tracker or 'selected'} tracker (lazy needs uffd)"
        if why is None and proc.descendants(self.pid):
            why = f"pid {self.pid} has child processes"
        if why is None:
            why = lazy_capacity_problem(int(self.state_addrs.size))
        if why is None:
            return True
        if self.switchover == "lazy":
            raise MigrationError(f"lazy switch-over impossible: {why}; use "
                                 f"switchover='full' or 'auto'", "precopy")
        self.report.notes.append(f"full switch-over: {why}")
        return False

    def _record(self, state, **fields) -> None:
        if self.record_path:
            records.transition(self.record_path, self.state_base, "source", state, **fields)

    async def _start_handoff(self) -> None:
        """Sweep what dead agents left, start our supervisor, write our record. The
        sweep blocks (it may wait for a dead agent's criu dump, ask a destination with
        RESOLVE): it runs in a worker thread, off the event loop."""
        def sweep():
            base = self.work_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
            swept = sweep_dump_dirs(base)
            return swept, settle_orphans(self.state_base, "source", None, self.secret, 0.0)

        swept, lines = await self._in_thread(sweep)
        if swept:
            self.report.notes.append(f"removed dump directories of dead agents: {', '.join(swept)}")
        self.report.notes += lines
        self.supervisor = Supervisor.spawn("source", self.state_base, self.secret)
        self.record_path = records.record_path(self.state_base, "source", self.session)
        records.write(self.record_path, {
            "role": "source", "session": self.session, "state": S.PRECOPY.value,
            "pid": self.pid, "pid_start": self.pid_start, "dest": self.dest,
            "netns": self.netns, "encryption": self.encryption, "agent_pid": os.getpid(),
            "target": self.target.record_info(),    # how to resume it (target.resume_source)
            "agent_start": records.start_time(os.getpid()),
            "supervisor_pid": self.supervisor.pid, "supervisor_start": self.supervisor.start,
            "io_timeout": self.io_timeout, "resolve_window": self.resolve_window,
            "budget_s": self.budget_s, "history": []})

    def _end_handoff(self) -> None:
        """Final record: remove it and let the supervisor go; else leave both to it."""
        if self.supervisor is None:
            return
        r = records.read(self.record_path) or {}
        final = r.get("state") == S.COMMITTED.value or (
            r.get("state") == S.ABORTED.value and r.get("peer_told", True)) \
            or r.get("state") == S.PRECOPY.value
        if final:
            records.remove(self.record_path)
            self.supervisor.bye()
        else:
            self.supervisor.detach()

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
            self.chan = await wire.Channel.client(reader, writer, self.secret, self.io_timeout,
                                                  **self.wire_options)
            self.report.encryption = self.chan.cipher
            await self._start_handoff()
            await self.chan.send_json(wire.BEGIN, {"pid": self.pid, "page_size": PAGE_SIZE,
                                                   "strategy": self.strategy,
                                                   "codec": self.codec.name,
                                                   "session": self.session,
                                                   "io_timeout": self.io_timeout,
                                                   "resolve_window": self.resolve_window,
                                                   **self.target.begin_fields()})
            mtype, payload = await self.chan.expect(wire.READY, wire.BUSY)
            if mtype == wire.BUSY:
                from statesync.errors import DestinationBusy
                info, _ = wire.unpack_json(payload)
                raise DestinationBusy(f"destination {host}:{port} is busy with another "
                                      f"migration ({info.get('error', '')}); try again later",
                                      "begin")
            if mtype == wire.READY:
                ready, _ = wire.unpack_json(payload)
                self.dest_restores = bool(ready.get("restore", True))
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
            from statesync.errors import DestinationBusy, InDoubt
            if isinstance(exc, (InDoubt, DestinationBusy)):
                exc.report = self.report
                raise
            if isinstance(exc, (StateSyncError, OSError, asyncio.TimeoutError)):
                raise MigrationError(f"migration of pid {self.pid} aborted: {exc}",
                                     self.report.failed_phase, self.report) from exc
            raise
        finally:
            self.report.total_s = time.monotonic() - t_start
            if self.chan is not None:
                self.report.bytes_wire_total = self.chan.bytes_sent
                self.chan.close()
            self._end_handoff()
        return self.report

    async def _abort(self, exc: BaseException) -> None:
        """Undo everything not yet decided. Synchronous first (a second cancellation
        cannot stop the resume), then a best-effort ABORT to the destination."""
        try:
            self.mem.detach()
        except Exception:
            pass
        if not self.decided and not self.committed:
            if self.frozen or getattr(self, "_criu", None) is not None:
                self._wait_criu()
                # A container dumped with its TCP connections is restored from its dump
                # instead (target.py); else the whole tree as CRIU froze it (walked now).
                if not self.target.rollback(self):
                    resume_tree(self.pid, self.pid_start)
            self._record(S.ABORTED, peer_told=not self.final_sent)
        if self.chan is not None and not self.decided:
            # Best effort: a destination holding a stopped copy drops it at once. Not
            # proof of delivery: after FINAL the supervisor still sends a RESOLVE.
            try:
                await asyncio.wait_for(self.chan.send_json(
                    wire.ABORT, {"reason": str(exc)[:500], "session": self.session}), 2.0)
            except BaseException:
                pass
            # Close by reading until the destination closes (bounded): closing with its
            # frames unread resets the connection, and the reset can discard the ABORT
            # before the destination read it. A destination in its restore reads it only
            # afterwards: wait up to io_timeout there.
            wait = (self.io_timeout if self.report.failed_phase in ("switchover", "restore")
                    else 2.0)
            try:
                await self.chan.aclose(wait)
            except BaseException:
                pass
        if not self.committed:
            st = proc.state(self.pid)
            self.report.source_resumed = st is not None and st not in ("T", "t", "Z", "X")
