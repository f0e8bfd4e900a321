"""The source's switch-over: freeze (criu dump), final diff and transfer, commit."""
from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import struct
import tempfile
import time

import numpy as np

from statesync import criu, proc
from statesync._consts import PAGE_SIZE
from statesync.errors import CriuError, MigrationError, StateSyncError
from statesync.migration import protocol as wire
from statesync.migration.common import (
    _TRANSIENT_DUMP_ERRORS,
    _ns_pid,
    _present_pages_of,
    _read_stats,
    _signal_all,
)


class SwitchOver:
    """The switch-over half of the source agent (mixed into :class:`_SourceAgent`)."""

    async def _switchover(self, t_start: float) -> None:
        base = self.work_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
        tmp = tempfile.mkdtemp(prefix=f"statesync-dump-{self.pid}-", dir=base)
        try:
            await self._switchover_in(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    async def _switchover_in(self, tmp: str) -> None:
        from statesync import _core
        rep = self.report
        pids = [self.pid] + proc.descendants(self.pid)
        vpid = _ns_pid(self.pid)
        netns = criu.netns_of(self.pid)
        self._emit("phase", phase="dump")
        for attempt in range(self.dump_retries + 1):
            t0 = time.monotonic()
            # Before the dump: an abort (or a cancel) from here on resumes them, whatever
            # state the dump left them in (SIGCONT to a running process does nothing).
            self.stopped_pids = pids
            try:
                await self._in_thread(
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
        if self.cancel_requested:
            raise MigrationError("cancelled before the commit", "restore")
        self.committing = True      # no await since the check: a cancel now is refused
        self._emit("phase", phase="commit")
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
