"""The destination agent: receive pages and images, assemble, restore, confirm."""
from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

import numpy as np

from statesync import proc
from statesync._consts import PAGE_SIZE
from statesync.errors import CriuError, MigrationError, StateSyncError
from statesync.migration import protocol as wire
from statesync.migration.codec import decode_pages
from statesync.migration import records
from statesync.migration.common import (
    _NAME_RE,
    _parse_hostport,
    _read_stats,
    check_private_dir,
    criu_result,
    criu_spawn,
    fault,
    load_secret_checked,
)
from statesync.migration.records import DestState as D
from statesync.migration.supervisor import (
    Supervisor,
    drop_images,
    kill_tree,
    resume_tree,
    settle_orphans,
)
from statesync.migration.pagetable import PageTable

# --------------------------------------------------------------------------- destination

RECORD_TTL_S = 7 * 86400.0     # final destination records older than this are removed


if TYPE_CHECKING:
    from statesync.migration.lazy import LazyPagesDaemon


class _FillFailed(Exception):
    """A lazy restore's fill failed after the resume (not a StateSyncError: it must
    not be taken for a lost link by the RESUMED/DONE handling)."""


class _DestinationSession:
    """One migration at the destination. States (records.DestState, docs/migrate.md):
    RECEIVING -> RESTORING (criu restore --leave-stopped) -> PREPARED (RESTORED sent;
    the copy is stopped) -> COMMITTED (COMMIT received) -> RESUMED (SIGCONT, RESUMED
    sent). The restored copy never runs before COMMIT; without COMMIT it is killed
    (ABORT, peer lost past the hold, our own death: the supervisor)."""

    def __init__(self, server: "DestinationServer", chan: wire.Channel, begin: dict):
        self.server = server
        self.chan = chan
        self.images_dir = server.images_dir
        self.restore = server.restore
        self.keep_images = server.keep_images
        self.log = server.log
        self.session = str(begin.get("session") or secrets.token_hex(8))
        if not _NAME_RE.fullmatch(self.session):
            raise wire.ProtocolError(f"refusing session id {self.session!r}")
        self.begin = begin
        self.store = PageTable(PAGE_SIZE, np.uint8)
        self.tmp: Optional[str] = None
        self.tmp_fd: Optional[int] = None
        self.final_dir: Optional[str] = None
        self.restored_pid: Optional[int] = None
        self.restored_start: Optional[int] = None
        self.image_names: Dict[str, int] = {}
        self.restored_sent = False     # RESTORED may have reached the source
        self.source_aborted = False    # the source told us ABORT itself
        self.result: dict = {"ok": False, "session": self.session, "encryption": chan.cipher}
        self.daemon: Optional["LazyPagesDaemon"] = None   # of a lazy switch-over
        self.pc: Any = None     # post-copy / hybrid: migration.postcopy.DestPostCopy
        self.target: Any = None     # what is restored and how (target.py), set in _run
        self.record_path = records.record_path(server.state_base, "dest", self.session)

    def _record(self, state, **fields) -> None:
        records.transition(self.record_path, self.server.state_base, "dest", state, **fields)

    async def run(self) -> dict:
        try:
            try:
                await self._run()
            except _FillFailed as exc:
                raise MigrationError(f"lazy fill failed after the resume: {exc}",
                                     "post_switch") from exc
        except BaseException as exc:
            self.result["error"] = str(exc)
            self._cleanup_failed()
            if not isinstance(exc, (StateSyncError, OSError, asyncio.TimeoutError)):
                raise
        finally:
            if self.tmp_fd is not None:
                os.close(self.tmp_fd)
                self.tmp_fd = None
        return self.result

    def _cleanup_failed(self) -> None:
        r = records.read(self.record_path) or {}
        if r.get("state") in (D.COMMITTED.value, D.RESUMED.value):
            return      # committed: the copy is the service now, never ours to kill
        d = getattr(self, "daemon", None)
        if d is not None:
            d.close()
            self.daemon = None
        if self.restored_pid:
            kill_tree(self.restored_pid, self.restored_start)
            self.log(f"killed unconfirmed restored pid {self.restored_pid}")
            self.restored_pid = None
        if self.target is not None:
            self.target.drop(self)      # a container's runtime state, bundle, network
        for d in (self.tmp, self.final_dir):
            if d and os.path.exists(d):
                shutil.rmtree(d, ignore_errors=True)
        if r:
            if self.restored_sent and not self.source_aborted:
                # The source may have decided COMMIT and be waiting to ask: keep the
                # outcome for its RESOLVE.
                self._record(D.ABORTED)
            else:
                records.remove(self.record_path)

    async def _run(self) -> None:
        begin = self.begin
        if int(begin.get("page_size", 0)) != PAGE_SIZE:
            await self.chan.send_json(wire.ERROR, {"error": f"page size {begin.get('page_size')} "
                                                             f"!= {PAGE_SIZE} here"})
            raise MigrationError("page size mismatch", "begin")
        # The agent's own pid is in the name so a later agent can sweep what a killed
        # one left (see DestinationServer.sweep_stale); ".incoming-" is never a usable set.
        self.tmp = tempfile.mkdtemp(prefix=f".incoming-{os.getpid()}-{int(begin.get('pid', 0))}-",
                                    dir=self.images_dir)
        self.tmp_fd = os.open(self.tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                              | os.O_CLOEXEC)
        # Where the set will be and where CRIU will write the restored pid, known now:
        # the one record write before RESTORED (each fsync in the freeze is downtime).
        final = os.path.join(self.images_dir, os.path.basename(self.tmp).replace(
            ".incoming-", "migrated-", 1))
        from statesync.migration.target_dest import dest_record_info
        records.write(self.record_path, {
            "role": "dest", "session": self.session, "state": D.RECEIVING.value,
            "source_pid": begin.get("pid"), "images_dir": self.images_dir, "tmp_dir": self.tmp,
            "final_dir": final, "pidfile": os.path.join(final, ".restored.pid"),
            "agent_pid": os.getpid(), "agent_start": records.start_time(os.getpid()),
            "supervisor_pid": self.server.supervisor_pid,
            "supervisor_start": self.server.supervisor_start,
            "keep_images": self.keep_images, "history": [],
            "target": dest_record_info(begin, self.server.target_options, self.images_dir,
                                       self.session)})     # target_dest.settle_dest_target
        self.result["source_pid"] = begin.get("pid")
        from statesync.migration.target_dest import dest_target
        try:
            self.target = await asyncio.to_thread(dest_target, begin, self.server.target_options,
                                                  self.images_dir, self.session)
        except (StateSyncError, OSError) as exc:
            await self.chan.send_json(wire.ERROR, {"error": str(exc)})
            raise
        await self.chan.send_json(wire.READY, {"restore": self.restore})
        while True:
            mtype, payload = await self.chan.recv()
            if mtype == wire.PAGES:
                await asyncio.to_thread(decode_pages, payload, self.store)
            elif mtype == wire.ROUND_END:
                await self.chan.send_json(wire.ROUND_ACK, {"held_pages": len(self.store)})
            elif mtype == wire.IMAGE:
                self._write_image_piece(payload)
            elif mtype == wire.PC_REMOTE:       # post-copy: pages left at the source
                from statesync.migration.postcopy import DestPostCopy
                self.pc = DestPostCopy.from_frame(payload, self.chan.timeout)
            elif mtype == wire.FINAL:
                info, tail = wire.unpack_json(payload)
                await self._finish(info, tail)
                return
            elif mtype == wire.ABORT:
                info, _ = wire.unpack_json(payload)
                self.source_aborted = True
                raise MigrationError(f"source aborted: {info.get('reason')}", "abort")
            else:
                raise wire.ProtocolError(f"unexpected {wire.NAMES.get(mtype, mtype)}")

    def _check_name(self, name: str) -> str:
        if not _NAME_RE.fullmatch(name) or name in (".", ".."):
            raise wire.ProtocolError(f"refusing image file name {name!r}")
        return name

    def _open_image(self, name: str, flags: int) -> int:
        """Open ``name`` inside the incoming directory through its fd, never following
        a symlink (nobody else can write there; this is the second lock)."""
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.tmp_fd)

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
        flags = os.O_WRONLY | (os.O_APPEND if off else os.O_CREAT | os.O_EXCL)
        fd = self._open_image(name, flags)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        self.image_names[name] = off + len(data)

    def _final_files(self, info: dict, tail: bytes, lazy: bool):
        """FINAL's page lists: ``(names, every, bounds)``. The tail holds the keys of one
        part after the other: for a full FINAL one part per pages file (the root's
        ``pages_file`` first, then ``more``: its children's and the shmem objects'),
        each in file order; for a lazy one the lazy pages first (no file: the daemon
        serves them), then the ``more`` pages files. Part i is every[bounds[i]:bounds[i+1]]."""
        more = info.get("more") or []
        if not isinstance(more, list) or not all(isinstance(m, dict) for m in more):
            raise wire.ProtocolError("FINAL's 'more' is not a list of pages files")
        first = [] if lazy else [info.get("pages_file", "")]
        names = [self._check_name(str(f)) for f in first + [m.get("pages_file", "") for m in more]]
        counts = [int(info.get("count", -1))] + [int(m.get("count", -1)) for m in more]
        if len(set(names)) != len(names) or min(counts) < 0 or sum(counts) * 8 != len(tail):
            raise wire.ProtocolError(f"FINAL lists {len(tail)} address bytes for {sum(counts)} "
                                     f"pages in {len(counts)} parts")
        every = np.frombuffer(tail, dtype="<u8").astype(np.uint64)
        return names, every, np.cumsum([0] + counts)

    async def _finish(self, info: dict, tail: bytes) -> None:
        """Assemble the image set, restore it stopped, RESTORED, wait for COMMIT. Lazy
        (docs/migrate.md): the set came as it is (its pagemap marks the lazy pages
        PE_LAZY, its pages file holds only the others), the lazy pages stay in our
        store, and ``criu restore --lazy-pages`` hands the tree's userfaultfd to our
        lazy-pages daemon, which serves faults and fills them from the store in place."""
        lazy = bool(info.get("lazy"))
        t0 = time.monotonic()
        names, every, bounds = self._final_files(info, tail, lazy)
        files = list(zip(names, bounds[1:-1], bounds[2:]) if lazy
                     else zip(names, bounds[:-1], bounds[1:]))
        if lazy:
            lazy_keys = every[:bounds[1]]
            _, found = self.store.lookup(lazy_keys)
            if self.pc is not None:     # post-copy: those come after the resume
                found |= np.isin(lazy_keys, self.pc.remote)
            if not found.all():
                miss = lazy_keys[~found]
                raise MigrationError(f"lazy restore impossible: {miss.size} lazy pages never "
                                     f"arrived, first at {int(miss[0]):#x}", "assemble")
            if not self.restore:
                raise MigrationError("a lazy switch-over needs a restoring destination "
                                     "(this one runs with --no-restore)", "assemble")

        def assemble() -> str:
            for pages_file, lo, hi in files:
                self._assemble_pages_file(pages_file, every[lo:hi])
            return self._seal_set()

        final_dir: str = await asyncio.to_thread(assemble)
        self.final_dir = final_dir
        self.tmp = None
        t1 = time.monotonic()
        self.result["assemble_s"] = t1 - t0
        pidfile = os.path.join(final_dir, ".restored.pid")
        if not self.restore:
            self.restored_sent = True
            await self.chan.send_json(wire.RESTORED, {"pid": None, "images": self.final_dir})
            self.result.update(images=self.final_dir)
            await self._wait_commit()
            return
        try:
            if lazy:
                from statesync.migration.lazy import LazyPagesDaemon
                # Built (every lazy page checked against the store) and listening before
                # CRIU starts: CRIU connects to lazy-pages.socket in its work dir at once.
                self.daemon = LazyPagesDaemon(final_dir, self.store, accept_timeout=60.0,
                                              **(self.pc.daemon_kw() if self.pc else {}))
                self.daemon.start()
                if self.pc is not None:
                    self.chan = self.pc.attach(self.chan)   # PC_PAGES, requests from now
            await self._restore_stopped(final_dir, pidfile, lazy)
        except (CriuError, OSError, ValueError, MigrationError) as exc:
            await self.chan.send_json(wire.FAILED, {"error": str(exc)[-3000:]})
            raise MigrationError(f"restore failed: {exc}", "restore") from exc
        t2 = time.monotonic()
        stats = _read_stats(os.path.join(final_dir, "stats-restore"))
        self.result.update(restore_s=t2 - t1, pid=self.restored_pid,
                           switchover="lazy" if lazy else "full")
        self.restored_sent = True
        await self.chan.send_json(wire.RESTORED, {"pid": self.restored_pid, "stats": stats,
                                                  "assemble_s": t1 - t0, "restore_s": t2 - t1,
                                                  "lazy": lazy})
        fault("dest:after_restored")
        await self._wait_commit()

    async def _restore_stopped(self, final_dir: str, pidfile: str, lazy: bool) -> None:
        """``criu restore -d --leave-stopped`` (``--lazy-pages`` for a lazy set):
        sets restored_pid/start; the copy exists, stopped."""
        if await self.target.restore(self, final_dir):   # a container: through its runtime
            return
        args = ["restore", "-D", final_dir, "-o", "restore.log", "--pidfile", pidfile, "-d",
                "--leave-stopped"] + (["--lazy-pages"] if lazy else []) \
            + self.target.restore_args()
        # Not killed with this agent: CRIU killed while it holds the restored tasks
        # (between their sigreturn and its SIGSTOP + detach) lets them run, before it
        # wrote the pid file. The supervisor waits for it and kills what it restored.
        p = criu_spawn(args, None, pdeathsig=False)
        fault("dest:restore")
        try:
            await asyncio.to_thread(p.wait, 300.0)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise CriuError("criu restore did not finish within 300 s") from None
        criu_result(p, os.path.join(final_dir, "restore.log"), "restore")
        try:
            with open(pidfile) as f:  # noqa: ASYNC230 (a few bytes on tmpfs)
                self.restored_pid = int(f.read().strip())
        except (OSError, ValueError):
            raise MigrationError(f"criu restore from {final_dir} left no pid file",
                                 "restore") from None
        if self.daemon is not None:
            self.daemon.set_restored(self.restored_pid)   # a failing fill kills it
        self.restored_start = records.start_time(self.restored_pid)
        st = proc.state(self.restored_pid)
        if st is None or st in ("Z", "X"):
            raise MigrationError(f"restored pid {self.restored_pid} is not alive "
                                 f"(state {st})", "restore")

    def _assemble_pages_file(self, pages_file: str, addrs: np.ndarray) -> None:
        """Write pages_file (in the incoming set) from the store: the pages at addrs
        (keys), in that order. Every page must have arrived."""
        slots, found = self.store.lookup(addrs)
        if not found.all():
            miss = addrs[~found]
            raise MigrationError(f"cannot assemble {pages_file}: {miss.size} pages never "
                                 f"arrived, first at {int(miss[0]):#x}", "assemble")
        fd = self._open_image(pages_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            _write_rows(fd, self.store.rows, slots,
                        [s for s, _ in self.store.pieces()])
            os.fsync(fd)
        finally:
            os.close(fd)

    def _seal_set(self) -> str:
        """fsync every received image, then rename the set into place: after a crash
        it is either complete under its final name or still ".incoming-"."""
        assert self.tmp is not None and self.tmp_fd is not None
        for name in self.image_names:
            fd = self._open_image(name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.fsync(self.tmp_fd)
        base = os.path.basename(self.tmp)
        final_name = base.replace(".incoming-", "migrated-", 1)
        os.rename(base, final_name, src_dir_fd=self.server.dir_fd,
                  dst_dir_fd=self.server.dir_fd)
        os.fsync(self.server.dir_fd)
        return os.path.join(self.images_dir, final_name)

    async def _fill_then_confirm(self, copy: Optional[int], copy_start) -> None:
        """A lazy restore runs: wait for its daemon to place every page, record it,
        send FILLED (the source kills its frozen copy only then). A failed fill
        leaves pages unplaced: kill our copy (it ran only since the resume), record
        ABORTED, and end the session; the source resumes its own."""
        try:
            post = await self._wait_filled()
        except MigrationError as exc:
            self._record(D.ABORTED)
            kill_tree(copy, copy_start)
            self.result.update(ok=False)
            self.log(f"session {self.session}: {exc}; killed the incomplete copy (pid {copy})")
            raise _FillFailed(str(exc)) from exc
        self._record(D.RESUMED, filled=True)
        await self.chan.send_json(wire.FILLED, {"session": self.session, "post_switch": post})

    async def _wait_filled(self) -> dict:
        """After the resume: wait for the lazy-pages daemon to place every page. Until
        then the source keeps its frozen copy (RESUMED is sent after this). A daemon
        that fails leaves pages unfilled: the copy is killed (the source resumes)."""
        d = getattr(self, "daemon", None)
        if d is None:
            return {}
        t0 = time.monotonic()
        try:
            st = await (self.pc.wait(d) if self.pc is not None
                        else asyncio.to_thread(d.wait, 120.0))
        except Exception as exc:
            raise MigrationError(f"lazy-pages daemon failed after the resume: {exc}",
                                 "post_switch") from exc
        finally:
            self.daemon = None
        out = {"fill_s": time.monotonic() - t0 if not st.fill_s else float(st.fill_s),
               "pages_filled": float(st.pages_filled), "faults": float(st.faults),
               "fault_p50_ns": float(st.fault_p50_ns), "fault_p99_ns": float(st.fault_p99_ns)}
        if self.pc is not None:
            out.update(self.pc.post_switch(st))
        self.result["post_switch"] = out
        return out

    async def _wait_commit(self) -> None:
        try:
            mtype, payload = await self.chan.expect(wire.COMMIT, wire.ABORT)
        except StateSyncError as exc:
            await self._hold_after_loss(exc)
            return
        if mtype == wire.ABORT:
            self.source_aborted = True
            raise MigrationError("source aborted after restore", "commit")
        self._record(D.COMMITTED, restored_pid=self.restored_pid,
                     restored_start=self.restored_start, lazy=self.daemon is not None,
                     filled=False, postcopy=self.pc is not None)
        fault("dest:commit_received")
        await asyncio.to_thread(self.target.before_resume, self)
        resume_tree(self.restored_pid, self.restored_start)
        self.result.update(ok=True)
        copy, copy_start = self.restored_pid, self.restored_start
        self.restored_pid = None       # committed: no longer ours to kill
        try:
            # RESUMED first: the service runs, the source may end its downtime; the
            # RESUMED record (informative: COMMITTED already means "resume") after.
            await self.chan.send_json(wire.RESUMED, {"pid": self.result.get("pid"),
                                                     "session": self.session,
                                                     "lazy": self.daemon is not None})
            # (its fsync off the event loop: post-copy requests are served meanwhile)
            await asyncio.to_thread(self._record, D.RESUMED)
            if self.daemon is not None:
                await self._fill_then_confirm(copy, copy_start)
            fault("dest:after_resumed")
            await self.chan.expect(wire.DONE)
            records.remove(self.record_path)
        except StateSyncError as exc:
            # We run it; the source (still holding its stopped copy) will ask with a
            # RESOLVE if it missed our RESUMED: stay for it a while, the record stays.
            hold = self.server.hold_for(self.begin)
            self.log(f"session {self.session}: no DONE after RESUMED ({exc}); waiting "
                     f"{hold:.0f} s for the source to ask")
            await self.server.wait_resolution(self.session, hold)
        if not self.keep_images and self.final_dir:
            shutil.rmtree(self.final_dir, ignore_errors=True)

    async def _hold_after_loss(self, exc: Exception) -> None:
        """The source decides; until it says so (on a new connection: RESOLVE) the
        copy stays stopped. Past the hold, abort: the source still holds its own copy
        (frozen or resumed), since it kills it only after our RESUMED."""
        hold = self.server.hold_for(self.begin)
        self._record(D.PREPARED, restored_pid=self.restored_pid,
                     restored_start=self.restored_start, postcopy=self.pc is not None)
        self.log(f"session {self.session}: lost the source before COMMIT ({exc}); "
                 f"holding the stopped copy (pid {self.restored_pid}) {hold:.0f} s for it")
        outcome = await self.server.wait_resolution(self.session, hold)
        if outcome == "resumed":
            self.result.update(ok=True, resolved_after_reconnect=True)
            self.restored_pid = None
            await asyncio.to_thread(self.target.after_resolved_commit, self)   # a lock copy
            return
        if outcome is None:
            raise MigrationError(f"no word from the source within {hold:.0f} s after "
                                 f"the link failed: dropped the stopped copy", "commit")
        raise MigrationError("source aborted (told on reconnect)", "commit")



def conn_peer(conn: socket.socket):
    try:
        return conn.getpeername()
    except OSError:
        return "?"


def _write_rows(fd: int, rows: Any, slots: np.ndarray, chunk_starts=()) -> None:
    """Write ``rows[slots]`` to fd in order, without gathering them first: runs of
    consecutive slots go out as one iovec each (the store keeps rows in arrival
    order, which is mostly address order). ``chunk_starts``: the first slot of each
    of the store's chunks (PageStore.pieces()); runs are also cut there, so that every
    ``rows[a:b]`` is a view of one chunk, not a copy (a run across two chunks made
    the 290 MB pages file of a full switch-over cost 0.7-0.9 s instead of 0.1 s)."""
    if slots.size == 0:
        return
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    if len(chunk_starts) > 1:
        in_chunk = np.searchsorted(np.asarray(chunk_starts[1:], dtype=np.int64), slots,
                                   side="right")
        breaks = np.union1d(breaks, np.flatnonzero(np.diff(in_chunk) != 0) + 1)
    starts = np.concatenate([[0], breaks]).tolist()
    ends = np.concatenate([breaks, [slots.size]]).tolist()
    iov = [memoryview(rows[slots[a]:slots[a] + (b - a)]).cast("B")
           for a, b in zip(starts, ends)]
    for i in range(0, len(iov), 512):
        chunk = iov[i:i + 512]
        want = sum(len(v) for v in chunk)
        done = os.writev(fd, chunk)
        while done < want:  # short write: finish the rest piece by piece
            flat = b"".join(bytes(v) for v in chunk)
            done += os.write(fd, flat[done:])


class DestinationServer:
    """A running destination agent (see :func:`serve_destination`).

    ``state_dir``: where the durable handoff records go (records.state_dir).
    ``hold``: seconds a stopped restored copy waits for the source to come back after
    the connection broke before COMMIT (default: the source's resolve window + one
    io_timeout, so a source that reconnects in time always finds it).
    ``handshake_timeout`` bounds an unauthenticated connection; at most
    ``max_pending`` of them are held (the oldest is dropped for a new one).
    ``encryption``: ``None``/``True``/``"on"`` (default) accepts only sources that
    encrypt (either cipher); ``False``/``"off"`` only authenticated-only ones (links
    already protected: pages then travel in clear). A mismatch is refused."""

    def __init__(self, listen: str, images_dir: str, secret, *, once: bool = True,
                 restore: bool = True, keep_images: bool = False, io_timeout: float = 30.0,
                 log: Optional[Callable[[str], None]] = None, state_dir: Optional[str] = None,
                 hold: Optional[float] = None, handshake_timeout: float = 5.0,
                 max_pending: int = 64, encryption=None, target_options=None):
        # How containers are restored here (target_dest.DestOptions: rootfs, runc root...).
        self.target_options = target_options
        self.encrypt = bool(wire.encryption_options(encryption)["encrypt"])   # ValueError
        self.host, self.port = _parse_hostport(listen)
        self.images_dir = os.path.abspath(images_dir)
        self.secret = load_secret_checked(secret)
        self.once = once
        self.restore = restore
        self.keep_images = keep_images
        self.io_timeout = io_timeout
        self.state_base = records.state_dir(state_dir)
        self.hold = hold
        self.handshake_timeout = min(float(handshake_timeout), float(io_timeout))
        self.max_pending = max(1, int(max_pending))
        self.log = log or (lambda msg: print(f"statesync receive: {msg}", file=sys.stderr,
                                             flush=True))
        self.results: List[dict] = []
        self._done: Optional[asyncio.Event] = None
        self._busy = False
        self._pending: "collections.OrderedDict[int, tuple]" = collections.OrderedDict()
        self._lsock: Optional[socket.socket] = None
        self._waiters: Dict[str, asyncio.Future] = {}
        self._refused = 0
        self.server: Optional[asyncio.Future] = None
        self.dir_fd = -1
        self.supervisor: Optional[Supervisor] = None
        self.supervisor_pid: Optional[int] = None
        self.supervisor_start: Optional[int] = None

    def hold_for(self, begin: dict) -> float:
        if self.hold is not None:
            return float(self.hold)
        return float(begin.get("resolve_window") or 3 * self.io_timeout) + \
            float(begin.get("io_timeout") or self.io_timeout)

    def sweep_stale(self) -> List[str]:
        """Settle records of dead agents (kill unconfirmed restored copies, resume
        committed ones), then remove image sets (``.incoming-*``, ``migrated-*``) of
        dead agents that no live record needs."""
        for line in settle_orphans(self.state_base, "dest", None, log=self.log):
            self.log(line)
        # Outcomes kept to answer a source's RESOLVE: a week is far past any window.
        for r in records.all_records(self.state_base, "dest"):
            if r.get("state") in (D.RESUMED.value, D.ABORTED.value) and \
                    time.time() - float(r.get("updated") or 0) > RECORD_TTL_S:
                records.remove(r["_path"])
        needed = set()
        for r in records.all_records(self.state_base, "dest"):
            if r.get("state") not in (D.ABORTED.value,) and not (
                    r.get("state") == D.RESUMED.value and not r.get("keep_images")):
                for k in ("tmp_dir", "final_dir"):
                    if r.get(k):
                        needed.add(os.path.basename(r[k]))
        removed: List[str] = []
        try:
            names = os.listdir(self.images_dir)
        except FileNotFoundError:
            return removed
        for name in names:
            m = re.fullmatch(r"(?:\.incoming|migrated)-(\d+)-\d+-\w+", name)
            if not m or name in needed:
                continue
            owner = int(m.group(1))
            if owner != os.getpid() and proc.state(owner) in (None, "Z", "X"):
                if name.startswith("migrated-") and self.keep_images:
                    continue
                shutil.rmtree(os.path.join(self.images_dir, name), ignore_errors=True)
                removed.append(name)
        if removed:
            self.log(f"removed image sets of dead agents: {', '.join(removed)}")
        return removed

    async def start(self):
        self.dir_fd = check_private_dir(self.images_dir)
        # blocking (waits for a dead agent's criu restore): off the event loop
        await asyncio.to_thread(self.sweep_stale)
        self.supervisor = Supervisor.spawn("dest", self.state_base, None)
        self.supervisor_pid, self.supervisor_start = self.supervisor.pid, self.supervisor.start
        if not self.encrypt:
            self.log("encryption OFF (--no-encryption): migration frames are NOT encrypted, "
                     "process memory travels in clear; only for links already protected")
        self._done = asyncio.Event()
        fam = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0][0]
        lsock = socket.create_server((self.host, self.port), family=fam, backlog=128)
        lsock.setblocking(False)
        self._lsock = lsock
        self.port = lsock.getsockname()[1]
        self.server = asyncio.ensure_future(self._accept_loop())
        return self

    async def _accept_loop(self) -> None:
        """Accept connections ourselves: an unauthenticated one beyond ``max_pending``
        evicts the oldest unauthenticated one before anything else is allocated, so
        idle peers can never exhaust our file descriptors (asyncio's own accept loop
        takes a whole backlog at once)."""
        loop = asyncio.get_running_loop()
        lsock = self._lsock
        assert lsock is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(lsock)
            except OSError as exc:     # EMFILE/ENFILE: make room, then retry
                self._evict_oldest()
                self._note_refused("(accept)", f"{exc.strerror or exc}")
                await asyncio.sleep(0.05)
                continue
            while len(self._pending) >= self.max_pending:
                self._evict_oldest()
            conn.setblocking(False)
            task = asyncio.ensure_future(self._accept(conn))
            self._pending[id(task)] = (task, conn)

    def _evict_oldest(self) -> None:
        if not self._pending:
            return
        _, (task, conn) = self._pending.popitem(last=False)
        task.cancel()
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    async def _accept(self, conn: socket.socket) -> None:
        key = id(asyncio.current_task())
        writer = None
        try:
            reader, writer = await asyncio.open_connection(sock=conn,
                                                           limit=wire.MAX_FRAME + 1024)
            await self._handle(reader, writer, key)
        except asyncio.CancelledError:
            self._note_refused(conn_peer(conn), "dropped: too many unauthenticated connections")
        except OSError as exc:
            self._note_refused(conn_peer(conn), str(exc))
        finally:
            self._pending.pop(key, None)
            if writer is not None:
                writer.close()
            else:
                conn.close()

    async def _handle(self, reader, writer, key) -> None:
        peer = writer.get_extra_info("peername")
        try:
            # asyncio.timeout, not wait_for: no inner task whose exception an eviction
            # (cancellation) would leave unretrieved.
            handshake = wire.Channel.server(reader, writer, self.secret, self.handshake_timeout,
                                            encrypt=self.encrypt)
            if hasattr(asyncio, "timeout"):
                async with asyncio.timeout(self.handshake_timeout):
                    chan = await handshake
            else:       # Python < 3.11
                chan = await asyncio.wait_for(handshake, self.handshake_timeout)
            chan.timeout = self.io_timeout
            self._pending.pop(key, None)     # authenticated: no longer evictable
            mtype, payload = await chan.recv()
        except (StateSyncError, OSError, asyncio.TimeoutError, EOFError) as exc:
            self._note_refused(peer, str(exc) or type(exc).__name__)
            writer.close()
            return
        try:
            info, _ = wire.unpack_json(payload)
            if mtype == wire.RESOLVE:
                await self._serve_resolve(chan, info)
                return
            if mtype != wire.BEGIN:
                raise wire.ProtocolError(f"expected BEGIN or RESOLVE, got "
                                         f"{wire.NAMES.get(mtype, mtype)}")
            if self._busy:
                self.log(f"refused {peer}: busy with another migration")
                await chan.send_json(wire.BUSY, {"error": "destination busy with another "
                                                          "migration"})
                return
        except (StateSyncError, OSError) as exc:
            self.log(f"{peer}: {exc}")
            chan.close()
            return
        self._busy = True
        ok = False
        try:
            if chan.encrypted:
                self.log(f"authenticated source {peer} ({chan.cipher})")
            else:
                self.log(f"authenticated source {peer} ({chan.cipher}): frames NOT encrypted, "
                         f"process memory travels in clear (encryption off on both agents)")
            result = await _DestinationSession(self, chan, info).run()
            ok = bool(result.get("ok"))
            self.results.append(result)
            self.log(("migration done: " if ok else "migration failed: ") + json.dumps(result))
        finally:
            self._busy = False
            try:
                if not ok:
                    # A FAILED or ERROR may be our last frame: read until the source
                    # closes (bounded), so a reset over unread input cannot discard it.
                    await chan.aclose(2.0)
            finally:
                chan.close()
        if self.once and self._done is not None:
            self._done.set()

    def _note_refused(self, peer, why: str) -> None:
        """One line per refused peer (no traceback), at most 20 lines, then a count."""
        self._refused += 1
        if self._refused <= 20:
            self.log(f"refused {peer}: {why}")
        elif self._refused % 100 == 0:
            self.log(f"refused {self._refused} unauthenticated connections so far")

    async def wait_resolution(self, session: str, hold: float) -> Optional[str]:
        """Wait (at most ``hold`` s) for a RESOLVE of ``session``; its outcome, or None."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters[session] = fut
        try:
            return await asyncio.wait_for(fut, hold)
        except asyncio.TimeoutError:
            return None
        finally:
            self._waiters.pop(session, None)

    def _apply(self, session: str, decision: str) -> dict:
        """The source's decision for ``session`` against our record; our state after."""
        if not _NAME_RE.fullmatch(session):
            return {"state": "unknown"}
        path = records.record_path(self.state_base, "dest", session)
        r = records.read(path)
        if r is None:
            return {"state": "unknown"}
        st = r.get("state")
        pid, start = r.get("restored_pid"), r.get("restored_start")
        if st == D.PREPARED.value:
            # (a post-copy copy cannot complete without the link it lost: dropped)
            if decision == "commit" and (pid is None or records.alive(pid, start)) \
                    and not r.get("postcopy"):
                records.transition(path, self.state_base, "dest", D.COMMITTED)
                resume_tree(pid, start)
                records.transition(path, self.state_base, "dest", D.RESUMED)
                st = D.RESUMED.value
                if not r.get("keep_images"):
                    drop_images(r)
            else:
                kill_tree(pid, start)
                drop_images(r)
                records.transition(path, self.state_base, "dest", D.ABORTED)
                st = D.ABORTED.value
        elif st in (D.COMMITTED.value, D.RESUMED.value) and r.get("postcopy") \
                and not r.get("filled"):
            return {"state": "pending"}     # post-copy still running: not decided yet
        elif st == D.COMMITTED.value:
            resume_tree(pid, start)
            records.transition(path, self.state_base, "dest", D.RESUMED)
            st = D.RESUMED.value
        elif st in (D.RECEIVING.value, D.RESTORING.value):
            return {"state": "pending"}
        return {"state": st if st in (D.RESUMED.value, D.ABORTED.value) else "unknown",
                "pid": pid}

    async def _serve_resolve(self, chan: wire.Channel, info: dict) -> None:
        session, decision = str(info.get("session", "")), str(info.get("decision", "abort"))
        out = self._apply(session, decision)
        self.log(f"session {session}: source says {decision}; here: {out['state']}")
        fut = self._waiters.get(session)
        if fut is not None and not fut.done() and out["state"] in ("resumed", "aborted"):
            fut.set_result(out["state"])
        try:
            await chan.send_json(wire.STATUS, dict(out, session=session))
            await chan.expect(wire.DONE)
            if out["state"] in ("resumed", "aborted", "unknown"):
                records.remove(records.record_path(self.state_base, "dest", session))
        except StateSyncError:
            pass
        finally:
            chan.close()

    async def serve(self, timeout: Optional[float] = None) -> List[dict]:
        assert self._done is not None and self.server is not None, "start() first"
        try:
            if timeout is None:
                await self._done.wait()
            else:
                await asyncio.wait_for(self._done.wait(), timeout)
        finally:
            self.server.cancel()
            for t, _ in list(self._pending.values()):
                t.cancel()
            try:
                await self.server
            except BaseException:
                pass
            if self._lsock is not None:
                self._lsock.close()
            self.close()
        return self.results

    def close(self) -> None:
        """Stop the supervisor: with ``bye`` when no record of ours needs it."""
        if self.supervisor is not None:
            mine = [r for r in records.all_records(self.state_base, "dest")
                    if r.get("supervisor_pid") == self.supervisor_pid
                    and r.get("state") not in (D.RESUMED.value, D.ABORTED.value)]
            if mine:
                self.supervisor.detach()
            else:
                self.supervisor.bye()
            self.supervisor = None
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1
