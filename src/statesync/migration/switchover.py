"""The source's switch-over: freeze (criu dump), final diff and transfer, commit."""
from __future__ import annotations

import asyncio
import functools
import os
import random
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from typing import List, Optional

from typing import TYPE_CHECKING, Any, Callable, Tuple

import numpy as np

from statesync import criu, proc
from statesync.criu import driver
from statesync.criu import images as _img
from statesync.criu.images import PE_PRESENT
from statesync._consts import PAGE_SIZE
from statesync.errors import CriuError, MigrationError, StateSyncError
from statesync.migration import protocol as wire
from statesync.migration import records
from statesync.migration.common import (
    _TRANSIENT_DUMP_ERRORS,
    _ns_pid,
    _read_stats,
    criu_result,
    criu_spawn,
    fault,
)
from statesync.migration.records import SourceState as S
from statesync.migration.lazy import _LazyPagemap
from statesync.migration.report import Report
from statesync.migration.supervisor import resolve_with_peer, resume_tree


@functools.lru_cache(maxsize=None)
def lazy_unavailable() -> Optional[str]:
    """None when this host can run a lazy switch-over (CRIU's lazy pages and a
    userfaultfd with the non-cooperative events the lazy-pages daemon needs), else
    why not. Probed once per process."""
    from statesync import _core
    info = criu.check()
    if not info.ok:
        why = "; ".join(f"{k}: {v}" for k, v in info.reasons.items())
        return f"CRIU unusable ({why or 'criu check failed'})"
    if not info.features.get("lazy_pages", False):
        return "CRIU reports no lazy-pages support (criu check --feature uffd-noncoop)"
    try:
        _core.lazy_uffd_probe()
    except OSError as exc:
        return f"userfaultfd lacks the events the lazy-pages daemon needs ({exc})"
    return None


_CRIU_PIPE_MAX_PAGES = 819


def _has_cap_resource() -> bool:
    """CAP_SYS_RESOURCE (bit 24) in our effective set: the pipe limits do not apply."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 24 & 1)
    except (OSError, ValueError):
        pass
    return False


def lazy_capacity_problem(pages: int) -> Optional[str]:
    """None when ``criu dump --lazy-pages`` can hold ``pages`` lazy pages in pipes here,
    else why not and what to run. CRIU keeps every lazy page in a pipe until its page
    server ends; without CAP_SYS_RESOURCE the per-user limit fs.pipe-user-pages-soft
    (pages; 0 = none) counts all of this user's pipes, and the dump fails past it."""
    try:
        with open("/proc/sys/fs/pipe-user-pages-soft") as f:
            soft = int(f.read().strip())
        with open("/proc/sys/fs/pipe-max-size") as f:
            pipe_max = int(f.read().strip())
    except (OSError, ValueError):
        return None
    # CRIU grows its page pipes to PIPE_MAX_SIZE pages (criu/include/page-pipe.h:
    # 8 pages' worth of struct pipe_buffer, 819 pages); a smaller fs.pipe-max-size
    # makes the parasite's splice fail ("Can't splice all pages to pipe").
    if pipe_max < _CRIU_PIPE_MAX_PAGES * PAGE_SIZE and not _has_cap_resource():
        return (f"fs.pipe-max-size is {pipe_max} bytes, CRIU's lazy dump needs "
                f">= {_CRIU_PIPE_MAX_PAGES * PAGE_SIZE} (run `sysctl -w fs.pipe-max-size=4194304`,"
                f" as scripts/setup-system.sh does)")
    need = int(pages * 1.25) + 4096
    if soft == 0 or need <= soft or _has_cap_resource():
        return None
    return (f"fs.pipe-user-pages-soft is {soft} pages, a lazy dump of this process needs "
            f"~{need} (run `sysctl -w fs.pipe-user-pages-soft=0`, as scripts/setup-system.sh "
            f"does)")


def stop_tree(root: int, timeout: float = 2.0) -> List[int]:
    """SIGSTOP every process of root's tree and wait (bounded) until every thread is
    stopped; returns the pids stopped. resume_tree (supervisor) undoes it."""
    from statesync import proc
    pids = [root] + proc.descendants(root)
    for p in pids:
        try:
            os.kill(p, signal.SIGSTOP)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for p in pids:
        for tid in proc.threads(p) if proc.exists(p) else []:
            while time.monotonic() < deadline:
                st = proc.state(tid)
                if st is None or st in ("T", "t", "Z", "X"):
                    break
                time.sleep(0.0005)
    return pids


def _read_image(path: str) -> Optional[bytes]:
    """A dump file's bytes; None for what is not a regular file."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return f.read()


class SwitchOver:
    """The switch-over half of the source agent (mixed into :class:`_SourceAgent`).

    Source states (records.SourceState; docs/migrate.md): FREEZING (criu dump) ->
    FROZEN (final transfer, FINAL, wait for RESTORED = the destination's copy is
    restored and stopped) -> COMMITTING (decision recorded, COMMIT sent) -> COMMITTED
    once RESUMED arrives (then, and only then, the frozen copy is killed). Any failure
    before COMMITTING aborts: the whole frozen tree resumes. A failure after COMMIT
    was sent is IN_DOUBT: both copies stay stopped until the destination answers a
    RESOLVE (here, in the supervisor or in ``statesync recover``)."""

    # What the source agent (source._SourceAgent) provides.
    pid: int
    pid_start: Optional[int]
    dest: str
    netns: Optional[str]
    secret: bytes
    session: str
    state_base: str
    record_path: str
    report: Report
    chan: Any
    shadow: Any
    mem: Any
    criu_args: List[str]
    target: Any
    work_dir: Optional[str]
    dump_dir: Optional[str]
    dump_retries: int
    io_timeout: float
    budget_s: float
    resolve_window: float
    deadline: float
    frozen: bool
    final_sent: bool
    decided: bool
    committed: bool
    committing: bool
    cancel_requested: bool
    _criu: Optional[subprocess.Popen]
    mode: str
    link_rate_Bps: Optional[float]
    pc: Any = None      # post-copy / hybrid: migration.postcopy.SourcePostCopy

    if TYPE_CHECKING:
        def _emit(self, kind: str, **kw: Any) -> None: ...

        def _record(self, state: Any, **fields: Any) -> None: ...

        async def _in_thread(self, fn: Callable[..., Any], *args: Any,
                             **kwargs: Any) -> Any: ...

        async def _send_pages(self, addrs: np.ndarray, reader: Any) -> Tuple[int, int]: ...

    async def _switchover(self, t_start: float) -> None:
        base = self.work_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)  # noqa: ASYNC240
        # The agent's pid in the name: a later agent removes what a killed one left.
        tmp = tempfile.mkdtemp(prefix=f"statesync-dump-a{os.getpid()}-{self.pid}-", dir=base)
        self.dump_dir = tmp
        try:
            await self._switchover_in(tmp)
        finally:
            if self.pc is not None:
                self.pc.close()
            self._wait_criu()
            if not self.target.keeps_dump(self):    # a rollback restores from it
                shutil.rmtree(tmp, ignore_errors=True)

    def _wait_criu(self) -> None:
        """A dump still running (cancelled while waiting for it) must finish before the
        tree can be resumed: CRIU stops the tree at its end (--leave-stopped)."""
        p = getattr(self, "_criu", None)
        if p is not None and p.poll() is None:
            try:
                p.wait(300)
            except Exception:
                pass
        self._criu = None

    def _budget_left(self) -> float:
        return self.deadline - time.monotonic()

    async def _within_budget(self, coro, what: str):
        left = self._budget_left()
        try:
            if left <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(coro, left)
        except asyncio.TimeoutError:
            raise MigrationError(f"switch-over budget of {self.budget_s:.1f} s exceeded during "
                                 f"{what}; the source resumes", "switchover") from None

    async def _dump(self, tmp: str, netns) -> None:
        if await self.target.dump(self, tmp):   # a container: through its runtime
            return
        args = ["dump", "-t", str(self.pid), "-D", tmp, "-o", "dump.log",
                "--leave-stopped"] + self.criu_args
        session = None
        if self.lazy:
            # Only the non-memory images and the pages CRIU will not make lazy are
            # written; the lazy pages stay in the frozen tree (criu.driver.lazy_session).
            session = driver.lazy_session()
            args += ["--lazy-pages", "--ps-socket", str(session[1].fileno())]
        self.frozen = True      # from here the tree may be stopped: an abort resumes it
        try:
            p = criu_spawn(args, netns, pdeathsig=False,
                           pass_fds=(session[1].fileno(),) if session else ())
        finally:
            if session:
                session[1].close()
        self._criu = p
        fault("source:dump")
        try:
            # to its end even if cancelled meanwhile (a dump cut in half cannot be undone)
            await self._in_thread(p.wait, 300.0)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise CriuError(f"criu dump of pid {self.pid} did not finish within 300 s") from None
        self._criu = None
        try:
            criu_result(p, os.path.join(tmp, "dump.log"), f"dump of pid {self.pid}")
        except CriuError as exc:
            if not self.lazy:
                raise
            why = (exc.log_tail or str(exc)).strip().splitlines()[-2:]
            if not getattr(self, "_lazy_retried", False) and self._tree_stopped():
                # CRIU put the tree back as it found it: stopped by us, the final
                # collect still exact (nothing ran since). One more lazy dump costs a
                # dump; the full one instead writes every page in the freeze (seconds
                # for GBs).
                self._lazy_retried = True
                self.report.notes.append(f"the lazy dump failed once, retried with the tree "
                                         f"still stopped: {why}")
                for name in os.listdir(tmp):  # noqa: ASYNC240 (tmpfs)
                    os.unlink(os.path.join(tmp, name))
                return await self._dump(tmp, netns)
            # A lazy dump can fail where a full one works (its parasite splices every
            # lazy page into pipes): dump again, fully.
            self._fall_back_to_full(f"the lazy dump failed ({why})")
            exc.retry = True  # type: ignore[attr-defined]
            raise
        if session and not driver.lazy_session_ended(session[0]):
            raise CriuError(f"criu lazy dump of pid {self.pid}: the page server did not "
                            f"confirm the end of its session")
        if self.lazy and len(_img.read_pstree(os.path.join(tmp, "pstree.img"))) != 1:
            # A child appeared between the check and the freeze: its lazy pages are
            # not in the destination's store. Resume and dump again, fully.
            self._fall_back_to_full("a child process appeared at the freeze")
            err = CriuError("the lazy dump holds more than one task; dumping again fully")
            err.retry = True  # type: ignore[attr-defined]
            raise err
        self.target.dump_done(self, tmp, netns)     # a rollback may restore from this dump

    def _tree_stopped(self) -> bool:
        """Every process of the tree (walked now) is in a stop (SIGSTOP / group stop)."""
        from statesync.migration.supervisor import tree
        pids = tree(self.pid)
        return bool(pids) and all(proc.state(p) in ("T", "t") for p in pids)

    async def _stop_and_collect(self) -> None:
        """The lazy switch-over's freeze: stop the tree ourselves (SIGSTOP), take the
        tracker's final dirty set (exact: nothing runs), detach it. CRIU then dumps a
        stopped tree (it restores it stopped: resumed at COMMIT like any restore)
        whose page tables hold no uffd-wp state: its lazy dump cannot splice pages a
        registered tracker protects ("Can't splice all pages to pipe"), and
        never-touched pages are holes again, not write-protect markers."""
        self.frozen = True
        self.t_stopped = time.monotonic()
        await self._in_thread(stop_tree, self.pid)
        self.final_dirty = await self._in_thread(self.mem.collect)
        self.mem.detach()

    def _fall_back_to_full(self, why: str) -> None:
        self.lazy = False
        self.report.switchover = "full"
        self.report.notes.append(f"full switch-over instead of lazy: {why}")
        self.mem.detach()

    async def _switchover_in(self, tmp: str) -> None:
        rep = self.report
        vpid = _ns_pid(self.pid)
        netns = criu.netns_of(self.pid)
        self.deadline = time.monotonic() + self.budget_s
        self._record(S.FREEZING, dump_dir=tmp, deadline=time.time() + self.budget_s)
        self._emit("phase", phase="dump")
        for attempt in range(self.dump_retries + 1):
            t0 = time.monotonic()
            try:
                if self.lazy:
                    await self._stop_and_collect()
                await self._dump(tmp, netns)
                break
            except StateSyncError as exc:
                # CRIU resumes the tree itself when a dump fails; the abort resumes the
                # whole tree (walked after the dump) either way. A client connection in
                # flight at the instant CRIU collects sockets fails a dump ("half of
                # stream unix connection"): a later attempt usually finds none.
                self.frozen = True
                transient = isinstance(exc, CriuError) and (getattr(exc, "retry", False) or any(
                    m in (exc.log_tail or "") for m in _TRANSIENT_DUMP_ERRORS))
                if (attempt == self.dump_retries or not transient
                        or not os.path.exists(f"/proc/{self.pid}")):  # noqa: ASYNC240
                    raise MigrationError(str(exc), "dump") from exc
                # as after any failed dump: make sure nothing stays stopped
                resume_tree(self.pid, self.pid_start)
                self.frozen = False
                rep.notes.append(f"dump attempt {attempt + 1} failed, retried: "
                                 f"{str(exc).splitlines()[-1].strip()}")
                for name in os.listdir(tmp):
                    os.unlink(os.path.join(tmp, name))
                await asyncio.sleep(random.uniform(0.02, 0.06) * (attempt + 1))
        t_dumped = time.monotonic()
        self.frozen = True
        # The record stays FREEZING: the supervisor treats both alike (wait for any
        # dump, then resume), and every fsync here would be downtime.
        fault("source:frozen")
        rep.criu_dump_stats = _read_stats(os.path.join(tmp, "stats-dump"))
        # Freeze starts inside the dump; CRIU's own stats say how long after its start.
        frozen_us = rep.criu_dump_stats.get("frozen_time")
        dump_wall = t_dumped - t0
        # (never before CRIU started: a lazy dump's stats-dump carries no usable times)
        t_freeze = max(t0, t_dumped - frozen_us / 1e6) if frozen_us else t0
        if self.lazy:
            t_freeze = self.t_stopped       # our SIGSTOP froze it, before CRIU ran
        t_freeze = min(t_freeze, self.target.frozen_at or t_freeze)   # froze it before runc
        rep.phases["freeze"] = rep.criu_dump_stats.get("freezing_time", 0) / 1e6
        rep.phases["dump"] = t_dumped - t_freeze
        self._emit("phase", phase="final transfer", dump_s=dump_wall)
        prepare = self._to_prepared_lazy(tmp, vpid) if self.lazy else self._to_prepared(tmp, vpid)
        info, t2, t4 = await self._within_budget(prepare, "the final transfer and the restore")
        fault("source:after_restored")
        # The destination times its own steps; what remains of t2..t4 is the transfer
        # (until the last byte was applied there) and the round trip of RESTORED.
        assemble = float(info.get("assemble_s") or 0.0)
        restore = float(info.get("restore_s") or 0.0)
        rep.phases["final_transfer"] = max(0.0, (t4 - t2) - assemble - restore)
        rep.phases["assemble"] = assemble
        rep.phases["restore"] = restore
        rep.restored_pid = info.get("pid")
        rep.criu_restore_stats = info.get("stats", {})
        t5 = await self._commit()
        rep.phases["commit"] = t5 - t4
        rep.downtime_s = t5 - t_freeze
        self._emit("done")

    async def _to_prepared(self, tmp: str, vpid: int):
        """Final diff and transfer, FINAL, and the destination's RESTORED (its copy
        restored and stopped). Returns (RESTORED info, t sent, t RESTORED)."""
        from statesync import _core
        rep = self.report
        t1 = time.monotonic()
        main_pm = f"pagemap-{vpid}.img"
        if not os.path.exists(os.path.join(tmp, main_pm)):  # noqa: ASYNC240 (tmpfs)
            raise MigrationError(f"dump of pid {self.pid} has no {main_pm}", "dump")
        # Every pagemap of the dump (the root's, its children's, the shmem objects'),
        # its pages named by the memory source's keys, the root's first: the diff and
        # the final transfer cover them all, and the destination assembles each
        # pages file from its store (FINAL's "more").
        imgs = self.mem.image_keys(tmp)
        imgs.sort(key=lambda x: x[0] != main_pm)
        parts, views, pages_files = [], [], []
        for name, pages_id, keys in imgs:
            pf = f"pages-{pages_id}.img"
            path = os.path.join(tmp, pf)
            size = os.path.getsize(path) if os.path.exists(path) else 0  # noqa: ASYNC240
            if size != keys.size * PAGE_SIZE:
                raise MigrationError(f"{path} holds {size} bytes, {name} says {keys.size} "
                                     "pages", "dump")
            parts.append(keys)
            pages_files.append(pf)
            # Zero-copy views of the dumped pages (the dump directory is on tmpfs).
            views.append(np.memmap(path, dtype=np.uint8, mode="r", shape=(keys.size, PAGE_SIZE))
                         if keys.size else np.zeros((0, PAGE_SIZE), np.uint8))
        addrs = np.concatenate(parts)
        rep.state_pages = int(addrs.size)
        bounds = np.cumsum([0] + [k.size for k in parts])
        order = np.argsort(addrs, kind="stable")
        skeys = addrs[order]

        def rows(idx):
            """Dumped contents of the pages at positions idx of addrs."""
            out = np.empty((idx.size, PAGE_SIZE), dtype=np.uint8)
            img = np.searchsorted(bounds, idx, side="right") - 1
            for i in np.unique(img).tolist():
                sel = img == i
                out[sel] = views[i][idx[sel] - bounds[i]]
            return out

        def diff():
            h = (np.concatenate([_core.hash_pages(np.ascontiguousarray(v))
                                 for v in views if v.size])
                 if addrs.size else np.zeros((0, 2), np.uint64))
            return np.flatnonzero(self._lacking(addrs, h)[order])  # positions in skeys

        need_s = await asyncio.to_thread(diff)
        rep.phases["final_diff"] = time.monotonic() - t1
        t2 = time.monotonic()
        # Non-memory images first (pagemaps included), then the pages the destination lacks.
        images_bytes = await self._send_images(tmp, skip=set(pages_files))
        rep.images_bytes = images_bytes
        fault("source:final_transfer")
        b0 = self.chan.bytes_sent
        sel_keys = skeys[need_s]
        n_final, _ = await self._send_pages(
            sel_keys, lambda a: (rows(order[need_s[np.searchsorted(sel_keys, a)]]),
                                 np.ones(a.size, dtype=bool)))
        rep.final_pages = n_final
        rep.final_bytes_wire = self.chan.bytes_sent - b0
        # From FINAL on the destination may hold a restored (stopped) copy: an abort
        # must be told to it, now or later (a supervisor always tells it).
        self.final_sent = True
        await self.chan.send_json(
            wire.FINAL, {"pages_file": pages_files[0], "count": int(parts[0].size),
                         "images_bytes": images_bytes,
                         "more": [{"pages_file": pf, "count": int(k.size)}
                                  for pf, k in zip(pages_files[1:], parts[1:])]},
            np.ascontiguousarray(addrs, dtype="<u8").tobytes())
        fault("source:after_final")
        self._emit("phase", phase="restore", final_pages=n_final)
        info, t4 = await self._await_restored()
        return info, t2, t4

    def _lacking(self, keys: np.ndarray, hashes: np.ndarray) -> np.ndarray:
        """Mask of the dumped pages (keys, their 128-bit hashes) the destination does
        not hold as they are: never sent, or sent with other content."""
        slots, found = self.shadow.lookup(keys)
        need = ~found
        if found.any():
            need[found] = (self.shadow.rows[slots[found]] != hashes[found]).any(axis=1)
        return need

    async def _await_restored(self):
        """RESTORED (the destination's copy is restored and stopped) within the budget:
        (its info, arrival time); FAILED raises."""
        mtype, payload = await self.chan.expect(wire.RESTORED, wire.FAILED,
                                                timeout=max(0.1, self._budget_left()))
        info, _ = wire.unpack_json(payload)
        if mtype == wire.FAILED:
            raise MigrationError(f"destination could not restore: {info.get('error')}",
                                 "restore")
        return info, time.monotonic()

    async def _send_images(self, tmp: str, skip=()) -> int:
        """Every image file of the dump but ``skip``, as IMAGE frames; returns bytes."""
        total = 0
        for name in sorted(os.listdir(tmp)):
            if name in skip or name in ("dump.log", "stats-dump"):
                continue
            data = await asyncio.to_thread(_read_image, os.path.join(tmp, name))
            if data is None:
                continue
            for off in range(0, max(len(data), 1), 8 << 20):
                piece = data[off:off + (8 << 20)]
                await self.chan.send(wire.IMAGE, struct.pack("!H", len(name)) + name.encode()
                                     + struct.pack("!Q", off) + piece)
            total += len(data)
        return total

    async def _to_prepared_lazy(self, tmp: str, vpid: int):
        """The lazy switch-over's final transfer (docs/migrate.md): the dump wrote the
        non-memory images and only the pages CRIU does not make lazy; the lazy pages
        the destination lacks are the tracker's final dirty set (collected now, with
        the tree frozen: exact) plus any lazy page it never received, read from the
        frozen process. Work and bytes follow the dirty set, not the state."""
        from statesync.migration.lazy import lazy_pages
        rep = self.report
        t1 = time.monotonic()
        main_pm = f"pagemap-{vpid}.img"
        if not os.path.exists(os.path.join(tmp, main_pm)):  # noqa: ASYNC240 (tmpfs)
            raise MigrationError(f"dump of pid {self.pid} has no {main_pm}", "dump")
        dirty = self.final_dirty

        def select():
            lz = lazy_pages(tmp, vpid, PAGE_SIZE)
            _, held = self.shadow.lookup(lz)
            written = np.union1d(dirty, self.pending_dirty)
            need = ~held
            if written.size:
                pos = np.minimum(np.searchsorted(written, lz), written.size - 1)
                need |= written[pos] == lz
            return lz, lz[need]

        lz, need = await asyncio.to_thread(select)
        pc = None
        if self.mode in ("postcopy", "hybrid"):    # what is not sent now stays here
            from statesync.migration import postcopy
            need, remote = postcopy.split_final(self, need)
            pc = self.pc = postcopy.SourcePostCopy(remote, self.mem.read, self.io_timeout,
                                                   self._postcopy_acked, self.link_rate_Bps)
        pm = _LazyPagemap(os.path.join(tmp, main_pm), PAGE_SIZE)
        # The other pagemaps (shared-memory objects; a child appearing makes the dump
        # full instead) hold their pages in pages files, pre-copied like the rest:
        # diffed by hash against what the destination holds and assembled there from
        # its store, as in the full switch-over.
        others = self.mem.image_keys(tmp, skip=(main_pm,))
        # The root's own pages file holds the pages CRIU does not make lazy (stack,
        # private COW pages of file mappings): pre-copied too, so diffed and assembled
        # the same way (its keys: the PE_PRESENT runs, space 0 = the root's addresses).
        pres = (pm.flags & PE_PRESENT) != 0
        v, n = pm.vaddr[pres], pm.nr_pages[pres].astype(np.int64)
        within = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
        root_keys = np.repeat(v, n) + within.astype(np.uint64) * np.uint64(PAGE_SIZE)
        others.insert(0, (main_pm, int(pm.pages_id), root_keys))

        def other_diff():
            from statesync import _core
            out = []
            for name, pages_id, keys in others:
                path = os.path.join(tmp, f"pages-{pages_id}.img")
                size = os.path.getsize(path) if os.path.exists(path) else 0
                if size != keys.size * PAGE_SIZE:
                    raise MigrationError(f"{path} holds {size} bytes, {name} says "
                                         f"{keys.size} pages", "dump")
                view = (np.memmap(path, dtype=np.uint8, mode="r", shape=(keys.size, PAGE_SIZE))
                        if keys.size else np.zeros((0, PAGE_SIZE), np.uint8))
                h = (_core.hash_pages(np.ascontiguousarray(view)) if keys.size
                     else np.zeros((0, 2), np.uint64))
                out.append((f"pages-{pages_id}.img", keys, view,
                            np.flatnonzero(self._lacking(keys, h))))
            return out

        other_parts = await asyncio.to_thread(other_diff)
        rep.state_pages = int(lz.size) + sum(int(k.size) for _, k, _, _ in other_parts)
        rep.phases["final_diff"] = time.monotonic() - t1
        t2 = time.monotonic()
        rep.images_bytes = await self._send_images(tmp, skip={pf for pf, _, _, _ in other_parts})
        fault("source:final_transfer")
        b0 = self.chan.bytes_sent

        def read_frozen(a):
            pages, ok = self.mem.read(a)
            if not ok.all():
                raise MigrationError(f"{int((~ok).sum())} lazy pages of the frozen pid "
                                     f"{self.pid} could not be read, first at "
                                     f"{int(a[~ok][0]):#x}", "final_transfer")
            return pages, ok

        n_final, _ = await self._send_pages(need, read_frozen)
        for _, keys, view, idx in other_parts:
            sel = keys[idx]
            order = np.argsort(sel, kind="stable")
            sel_sorted, idx_sorted = sel[order], idx[order]
            n_o, _ = await self._send_pages(
                sel_sorted, lambda a, v=view, s=sel_sorted, i=idx_sorted:
                (np.asarray(v[i[np.searchsorted(s, a)]]), np.ones(a.size, dtype=bool)))
            n_final += n_o
        rep.final_pages = n_final
        rep.final_bytes_wire = self.chan.bytes_sent - b0
        self._record(S.FROZEN, final_sent=True,
                     **({"postcopy": True, "remote_pages": pc.n} if pc else {}))
        if pc:
            await self.chan.send(wire.PC_REMOTE, pc.payload_remote())
        await self.chan.send_json(
            wire.FINAL, {"lazy": True, "postcopy": pc is not None, "pid": vpid,
                         "count": int(lz.size),
                         "images_bytes": rep.images_bytes,
                         "more": [{"pages_file": pf, "count": int(k.size)}
                                  for pf, k, _, _ in other_parts]},
            np.ascontiguousarray(np.concatenate([lz] + [k for _, k, _, _ in other_parts]),
                                 dtype="<u8").tobytes())
        if pc:
            self.chan = pc.attach(self.chan)    # requests are served from now on
        fault("source:after_final")
        self._emit("phase", phase="restore", final_pages=n_final)
        info, t4 = await self._await_restored()
        return info, t2, t4

    async def _commit(self) -> float:
        """Decide (durably, under the records lock: the supervisor may have aborted at
        the deadline), send COMMIT, wait for RESUMED, then kill the frozen copy.
        Returns when the service ran again at the destination (RESUMED arrived)."""
        if self._budget_left() <= 0:
            raise MigrationError(f"switch-over budget of {self.budget_s:.1f} s exceeded before "
                                 f"the commit; the source resumes", "commit")
        if self.cancel_requested:       # Migration.cancel() (api.py)
            raise MigrationError("cancelled before the commit", "restore")
        if records.transition(self.record_path, self.state_base, "source", S.COMMITTING,
                              expect=(S.FREEZING, S.FROZEN)) is None:
            raise MigrationError("the supervisor aborted this switch-over (budget exceeded)",
                                 "commit")
        # No await since the cancel check: from here a cancel is refused (api.py).
        self.decided = self.committing = True
        self._emit("phase", phase="commit")
        try:
            await self.chan.send_json(wire.COMMIT, {"session": self.session})
            fault("source:after_commit")
            _, payload = await self.chan.expect(wire.RESUMED, timeout=self.io_timeout)
            t_resumed = time.monotonic()
            resumed, _ = wire.unpack_json(payload)
        except StateSyncError as exc:
            self.report.notes.append(f"no RESUMED after COMMIT ({exc}); asking the destination")
            await self._resolve_in_doubt(str(exc))
            return time.monotonic()
        if resumed.get("lazy"):
            # The copy runs; its lazy-pages daemon is still placing pages. Ours stays
            # frozen until FILLED: a fill that fails drops theirs, and ours resumes.
            try:
                if self.pc is not None:         # post-copy: push until FILLED
                    self.pc.start_push()
                    _, payload = await self.pc.wait_filled()
                else:
                    _, payload = await self.chan.expect(wire.FILLED,
                                                        timeout=self.io_timeout + 60)
                filled, _ = wire.unpack_json(payload)
            except StateSyncError as exc:
                self.report.notes.append(f"no FILLED after RESUMED ({exc}); asking the "
                                         "destination")
                await self._resolve_in_doubt(str(exc))
                return t_resumed
            post = filled.get("post_switch") or {}
            # the lazy fill after the resume: not downtime, the post-switch phase
            self.report.post_switch = {k: float(v) for k, v in post.items()
                                       if isinstance(v, (int, float))}
            if self.pc is not None:
                self.report.post_switch.update(self.pc.stats())
        await self._finish_commit(resumed.get("pid"))
        try:
            await self.chan.send_json(wire.DONE, {"session": self.session})
        except StateSyncError:
            pass
        return t_resumed

    def _postcopy_acked(self) -> None:
        """Post-copy: the destination has every page; the record says so (the frozen
        copy is still kept until FILLED: the pages must also be placed). Written in a
        thread (no fsync on the event loop while requests may still come), and only
        while the record is still COMMITTING."""
        if self.record_path:
            asyncio.get_running_loop().run_in_executor(
                None, functools.partial(records.transition, self.record_path, self.state_base,
                                        "source", S.COMMITTING, expect=(S.COMMITTING,),
                                        postcopy_acked=True))

    async def _finish_commit(self, dest_pid) -> None:
        # The destination runs the service: now the stopped source copy goes, and is
        # gone when migrate() returns (SIGKILL of a pid-namespace init is asynchronous;
        # kill_tree waits). Off the event loop: the wait is a few milliseconds of polling.
        await asyncio.get_running_loop().run_in_executor(None, self.target.drop_source, self)
        self.committed = True
        self._record(S.COMMITTED, peer_told=True)
        if dest_pid:
            self.report.restored_pid = dest_pid

    async def _resolve_in_doubt(self, why: str) -> None:
        """COMMIT went out, RESUMED did not come back: ask the destination (new
        connections) for the resolve window. Resumed there -> kill ours; aborted or
        unknown there -> resume ours (MigrationError); no answer -> InDoubt."""
        from statesync.errors import InDoubt
        self._record(S.IN_DOUBT)
        info = await asyncio.to_thread(resolve_with_peer, self.dest, self.netns, self.secret,
                                       self.session, "commit", self.resolve_window,
                                       self.io_timeout, lambda m: self.report.notes.append(m),
                                       getattr(self, "encryption", None))
        if info is None:
            raise InDoubt(f"switch-over of pid {self.pid} IN DOUBT ({why}): COMMIT was sent "
                          f"and {self.dest} never confirmed; both copies stay stopped. Run "
                          f"`statesync recover` on this host once the destination is reachable "
                          f"(session {self.session})", "commit")
        if info.get("state") == "resumed":
            self.report.notes.append("destination confirmed after reconnecting")
            await self._finish_commit(info.get("pid"))
            return
        self.decided = False       # the destination does not run it: ours must resume
        self._record(S.FROZEN, peer_told=True)
        raise MigrationError(f"destination dropped its copy ({info.get('state')}) after the "
                             f"link failed ({why})", "commit")
