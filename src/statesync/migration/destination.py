"""The destination agent: receive pages and images, assemble, restore, confirm."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from statesync import criu, proc
from statesync._consts import PAGE_SIZE
from statesync._util.fsutil import fsync_dir
from statesync.errors import CriuError, MigrationError, StateSyncError
from statesync.migration import protocol as wire
from statesync.migration.codec import decode_pages
from statesync.migration.common import _NAME_RE, _parse_hostport, _read_stats
from statesync.migration.pagetable import PageTable

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
