"""The migration source's view of a live process's memory: which pages to send, their
contents, and which were written since the last round.

Page contents come from :func:`statesync.proc.read_pages` (process_vm_readv) with
``/proc/PID/mem`` for what it refuses (``PROT_NONE``), dirty pages from
:class:`statesync.Tracker`. Which pages to send in round 0 is decided here: what
CRIU would dump (see :func:`dumpable_pages`).

**Spaces.** CRIU dumps a process tree as one pagemap per task (``pagemap-PID.img``,
the task's private pages by address) plus one pagemap per shared-memory object
(``pagemap-shmem-SHMID.img``, the object's pages by offset; SHMID is the inode number
``/proc/PID/maps`` shows). A :class:`MemorySource` names every page it reports by a
64-bit *key*: ``space << 48 | address`` (``space_of`` / ``addr_of``), where each
space is a task or a shmem object (:attr:`MemorySource.spaces`). Space 0 is the
root task, so with ``tree=False, shmem=False`` (the default) keys are plain
addresses of the root process, as before. x86-64 user addresses and shmem offsets
stay below 2^47.

Shared memory (``shmem=True``): MAP_SHARED anonymous memory (``/dev/zero
(deleted)``), memfd and SysV segments, whatever mapping protection, are read
through ``/proc/PID/map_files`` (needs CAP_SYS_ADMIN, as CRIU's own dump) by offset,
and listed like CRIU does (SEEK_DATA/SEEK_HOLE: every page of data of the object,
mapped or not). A page shared by several processes of the tree is one key of the
object's space: it travels once. Writes through a mapping are seen by the uffd (or
hash) tracker of the process that wrote; writes through a file descriptor
(``write(2)``, ``fallocate``) change the object's mtime/ctime, checked every collect:
then every page of that object is reported.

Process trees (``tree=True``): the root and all its descendants, each a space.
A child forked during the migration becomes a new space at the next collect, and
all its pages are reported then; a child that exec'd is tracked again from scratch
(same space, all pages reported); a child that exited leaves its space (its keys
are simply not in the next dump). Pages a child shares copy-on-write with its parent
(the same physical page, seen through pagemap PFNs with CAP_SYS_ADMIN) are listed by
:meth:`MemorySource.aliases`, so a sender can send one copy.

Pages that vanish while being read (the process unmapped them) are reported as not
ok and skipped; the CRIU dump at switch-over is the authority on what exists.
"""
from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np

from statesync import _core, proc
from statesync._consts import PAGE_SIZE
from statesync.errors import ProcessError, ProcessGone
from statesync.proc import Vma
from statesync.tracking.common import PM_MARKER, _merge, _read_any

if TYPE_CHECKING:
    from statesync.tracking import Tracker

SPACE_SHIFT = 48
_ADDR_MASK = np.uint64((1 << SPACE_SHIFT) - 1)
_EMPTY = np.zeros(0, dtype=np.uint64)

# What CRIU dumps as shmem: anonymous shared memory, SysV segments, memfd.
_SHMEM_PATH = re.compile(r"^(/dev/zero|/SYSV[0-9a-f]{8}|/memfd:.*?)( \(deleted\))?$")


def space_of(keys: np.ndarray) -> np.ndarray:
    """The space index of each key."""
    return (np.asarray(keys, dtype=np.uint64) >> np.uint64(SPACE_SHIFT)).astype(np.int64)


def addr_of(keys: np.ndarray) -> np.ndarray:
    """The address (task) or offset (shmem) of each key."""
    return np.asarray(keys, dtype=np.uint64) & _ADDR_MASK


def make_keys(space: int, addrs: np.ndarray) -> np.ndarray:
    a = np.asarray(addrs, dtype=np.uint64)
    return a | np.uint64(space << SPACE_SHIFT) if space else a


def is_shmem(v: Vma) -> bool:
    """A VMA backed by a shared-memory object CRIU dumps as shmem (by content)."""
    return v.inode != 0 and bool(_SHMEM_PATH.match(v.path))


def _dumpable_vma(v: Vma) -> bool:
    """Private VMAs whose anonymous pages CRIU dumps into the task's pagemap, whatever
    their protection (CRIU adds PROT_READ while it dumps a PROT_NONE VMA)."""
    return v.private and not v.special


def dumpable_pages(pid: int, vmas: Optional[List[Vma]] = None) -> np.ndarray:
    """Sorted uint64 addresses of the pages CRIU would dump into pid's own pagemap:
    present or swapped pages of private mappings, any protection (``PROT_NONE``
    included), that are not page-cache pages of a file (bit 61 of pagemap clear) and
    not uffd-wp PTE markers. Kernel areas ([vdso], [vvar] ...) are left out.

    Reads /proc/PID/maps with :func:`statesync.proc.read_maps` (unless ``vmas`` is
    given) and pagemap with :func:`statesync.proc.present_pages` (bounded chunks,
    O_CLOEXEC): memory follows the number of pages found, not the size of the
    mappings, so a 1 TiB reservation costs nothing. Raises
    :class:`~statesync.errors.NoSuchProcess` / :class:`~statesync.errors.AccessDenied`
    (with the pid) like :mod:`statesync.proc`.
    """
    if vmas is None:
        vmas = proc.read_maps(pid)
    sel = [v for v in vmas if _dumpable_vma(v)]
    return proc.present_pages(pid, sel, swapped=True, exclude=proc.PM_FILE | PM_MARKER)


@dataclass
class Space:
    """One pagemap of the image set: a task (``kind == "task"``, ``pid``) or a
    shared-memory object (``kind == "shmem"``, ``shmid`` = its inode number, read
    through a mapping of ``pid``; ``size`` in bytes)."""

    index: int
    kind: str
    pid: int
    shmid: int = 0
    size: int = 0
    path: str = ""
    _fd: int = field(default=-1, repr=False)
    _stamp: Tuple[int, int, int] = field(default=(0, 0, 0), repr=False)
    _hashes: Optional[Tuple[np.ndarray, np.ndarray]] = field(default=None, repr=False)

    @property
    def image(self) -> str:
        """The CRIU pagemap image this space becomes (task pids as the target's pid
        namespace numbers them: see ``vpid``)."""
        return (f"pagemap-shmem-{self.shmid}.img" if self.kind == "shmem"
                else f"pagemap-{_ns_pid(self.pid)}.img")


def _ns_pid(pid: int) -> int:
    try:
        nspid = proc.status(pid).get("NSpid")
    except ProcessError:
        return pid
    return int(nspid.split()[-1]) if nspid else pid


def _data_offsets(fd: int, size: int) -> np.ndarray:
    """Page offsets of the data of a shmem file (SEEK_DATA/SEEK_HOLE, as CRIU)."""
    parts = []
    off = 0
    while off < size:
        try:
            d = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        h = min(os.lseek(fd, d, os.SEEK_HOLE), size)
        lo = d // PAGE_SIZE * PAGE_SIZE
        parts.append(np.arange(lo, h, PAGE_SIZE, dtype=np.uint64))
        off = max(h, lo + PAGE_SIZE)
    return np.concatenate(parts) if parts else _EMPTY


def _pread_pages(fd: int, offs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    out = np.zeros((offs.size, PAGE_SIZE), dtype=np.uint8)
    ok = np.zeros(offs.size, dtype=bool)
    if not offs.size:
        return out, ok
    brk = np.flatnonzero(np.diff(offs.astype(np.int64)) != PAGE_SIZE) + 1
    for lo, hi in zip(np.r_[0, brk].tolist(), np.r_[brk, offs.size].tolist()):
        while lo < hi:
            n = min(hi - lo, 1024)
            try:
                b = os.pread(fd, n * PAGE_SIZE, int(offs[lo]))
            except OSError:
                b = b""
            got = len(b) // PAGE_SIZE
            if len(b) % PAGE_SIZE and got < n:      # short last page of the file
                b = b + bytes(PAGE_SIZE - len(b) % PAGE_SIZE)
                got += 1
            if got:
                out[lo:lo + got] = np.frombuffer(b, np.uint8, got * PAGE_SIZE).reshape(
                    got, PAGE_SIZE)
                ok[lo:lo + got] = True
            lo += max(got, 1)
    return out, ok


class MemorySource:
    """Round-0 pages, page reads and dirty tracking for one live process, or (with
    ``tree``) its whole process tree, and (with ``shmem``) the shared-memory objects
    they map. See the module docstring for keys and spaces."""

    backend = "statesync.proc"

    def __init__(self, pid: int, *, tree: bool = False, shmem: bool = False):
        self.pid = pid
        self.tree = tree
        self.shmem = shmem
        self.tracker: Optional["Tracker"] = None  # the root's (compatibility)
        self.trackers: Dict[int, object] = {}     # pid -> Tracker
        self.method = "auto"
        self.spaces: Dict[int, Space] = {}
        self._task_space: Dict[int, int] = {}     # pid -> space index
        self._shm_space: Dict[int, int] = {}      # shmid -> space index
        self._maps: Dict[int, List[Vma]] = {}
        self._next = 1
        self._new: List[int] = []                 # spaces found since the last collect
        self._add_task(pid)

    # -- spaces

    def _add_task(self, pid: int) -> int:
        idx = 0 if not self.spaces else self._next
        if idx:
            self._next += 1
        self.spaces[idx] = Space(idx, "task", pid)
        self._task_space[pid] = idx
        return idx

    def _pids(self) -> List[int]:
        if not self.tree:
            return [self.pid]
        return [self.pid] + [p for p in proc.descendants(self.pid)
                             if proc.state(p) not in (None, "Z", "X")]

    def _maps_of(self, pid: int, fresh: bool = True) -> List[Vma]:
        """pid's VMAs: read now (``fresh``), or as its tracker read them in its last
        collect (maps are read once per collect)."""
        t = self.trackers.get(pid)
        if not fresh and t is not None and t._maps_raw is not None:  # type: ignore[attr-defined]
            maps = t._maps_cache  # type: ignore[attr-defined]
        elif t is not None:
            maps = t._maps()  # type: ignore[attr-defined]
        else:
            maps = proc.read_maps(pid)
        self._maps[pid] = maps
        return maps

    def _refresh(self, fresh: bool = True) -> None:
        """Find new tasks (forked since) and new shmem objects; forget exited tasks.
        ``fresh=False`` (collect): look for shmem objects in the maps the trackers
        read last; one mapped since is found at the next collect, all its pages then."""
        pids = self._pids()
        live = set(pids)
        for p in pids:
            if p not in self._task_space:
                self._new.append(self._add_task(p))
                if self.trackers:
                    self._attach(p)
        for p in [p for p in self._task_space if p not in live and p != self.pid]:
            idx = self._task_space.pop(p)
            self.spaces.pop(idx, None)
            t = self.trackers.pop(p, None)
            if t is not None:
                t.detach()  # type: ignore[attr-defined]
        if self.shmem:
            for p in pids:
                try:
                    maps = self._maps_of(p, fresh)
                except ProcessError:
                    continue
                for v in maps:
                    if is_shmem(v) and v.inode not in self._shm_space:
                        self._add_shmem(p, v)

    def _add_shmem(self, pid: int, v: Vma) -> None:
        try:
            fd = os.open(f"/proc/{pid}/map_files/{v.start:x}-{v.end:x}",
                         os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return      # no CAP_SYS_ADMIN, or unmapped meanwhile: the dump carries it
        st = os.fstat(fd)
        if st.st_ino != v.inode:
            os.close(fd)
            return
        idx = self._next
        self._next += 1
        sp = Space(idx, "shmem", pid, shmid=v.inode, size=int(st.st_size), path=v.path,
                   _fd=fd, _stamp=(st.st_mtime_ns, st.st_ctime_ns, st.st_size))
        self.spaces[idx] = sp
        self._shm_space[v.inode] = idx
        self._new.append(idx)
        if sp.path.startswith("/memfd:"):
            self._memfd_changes(sp)     # the baseline its descriptor writes compare with

    def _space_pages(self, sp: Space) -> np.ndarray:
        if sp.kind == "shmem":
            if sp._fd < 0:
                return _EMPTY
            st = os.fstat(sp._fd)
            sp.size = int(st.st_size)
            return make_keys(sp.index, _data_offsets(sp._fd, sp.size))
        try:
            maps = self._maps_of(sp.pid)
        except ProcessError:
            return _EMPTY
        return make_keys(sp.index, dumpable_pages(sp.pid, maps))

    # -- what round 0 sends

    def present_pages(self) -> np.ndarray:
        """Keys of every page CRIU would dump (the tasks' private pages and, with
        ``shmem``, the data pages of the shmem objects): what round 0 sends.
        Sorted; space 0's keys are the root's addresses."""
        self._refresh()
        self._new.clear()
        return _merge([self._space_pages(sp) for sp in list(self.spaces.values())])

    def read(self, keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(contents (n, page_size) uint8, ok (n,) bool) of the pages at keys."""
        if not proc.exists(self.pid):
            raise ProcessGone(self.pid, "exited during the migration")
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        if len(self.spaces) == 1 and not (keys >> np.uint64(SPACE_SHIFT)).any():
            return _read_any(self.pid, keys)
        out = np.zeros((keys.size, PAGE_SIZE), dtype=np.uint8)
        ok = np.zeros(keys.size, dtype=bool)
        sp_of = space_of(keys)
        for idx in np.unique(sp_of).tolist():
            sel = np.flatnonzero(sp_of == idx)
            sp = self.spaces.get(idx)
            if sp is None:
                continue
            a = addr_of(keys[sel])
            if sp.kind == "shmem":
                if sp._fd < 0:
                    continue
                p, k = _pread_pages(sp._fd, a)
            else:
                try:
                    p, k = _read_any(sp.pid, a)
                except OSError:
                    continue      # the task exited meanwhile
            out[sel], ok[sel] = p, k
        return out, ok

    def aliases(self, keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Copy-on-write sharing between tasks: (dst, src) key arrays, where the page
        at dst is physically the page at src (same PFN in pagemap, which needs
        CAP_SYS_ADMIN; empty without it), src in a lower space than dst. A sender may
        send src only and have the destination copy it to dst."""
        keys = np.asarray(keys, dtype=np.uint64)
        sp_of = space_of(keys)
        pfn_keys, pfns = [], []
        for idx in np.unique(sp_of).tolist():
            sp = self.spaces.get(idx)
            if sp is None or sp.kind != "task":
                continue
            k = keys[sp_of == idx]
            a = addr_of(k)
            try:
                fd = _core.pagemap_open(sp.pid)
            except OSError:
                continue
            try:
                raw = np.zeros(a.size, dtype=np.uint64)
                brk = np.flatnonzero(np.diff(a.astype(np.int64)) != PAGE_SIZE) + 1
                for lo, hi in zip(np.r_[0, brk].tolist(), np.r_[brk, a.size].tolist()):
                    r = _core.pagemap_read(fd, int(a[lo]), hi - lo, PAGE_SIZE)
                    raw[lo:lo + r.size] = r
            finally:
                os.close(fd)
            present = (raw >> np.uint64(63)) & np.uint64(1)
            pfn = raw & np.uint64(proc.PM_PFN_MASK)
            sel = (present == 1) & (pfn != 0)
            pfn_keys.append(k[sel])
            pfns.append(pfn[sel])
        if not pfn_keys:
            return _EMPTY, _EMPTY
        k = np.concatenate(pfn_keys)
        p = np.concatenate(pfns)
        order = np.lexsort((k, p))          # by pfn, then key (lowest space first)
        k, p = k[order], p[order]
        dup = np.r_[False, p[1:] == p[:-1]]
        first = np.maximum.accumulate(np.where(~dup, np.arange(k.size), 0))
        return k[dup], k[first[dup]]

    # -- switch-over

    def image_keys(self, dump_dir: str, skip=()) -> List[Tuple[str, int, np.ndarray]]:
        """For a CRIU dump of the tree: ``[(pagemap name, pages_id, keys)]``, one per
        pagemap-*.img (tasks and shmem objects), keys in the order of the pages in
        ``pages-<pages_id>.img`` (PE_PRESENT runs), in the spaces of this source, so
        the switch-over can diff each image against what the destination holds and the
        destination can assemble each pages file from its store. A pagemap whose task
        or object this source never saw gets a fresh space (all its pages needed)."""
        from statesync.criu import images as _img
        by_vpid = {_ns_pid(sp.pid): sp.index for sp in self.spaces.values()
                   if sp.kind == "task"}
        out = []
        for name in _img.pagemap_files(dump_dir):
            if name in skip:
                continue
            pm = _img.Pagemap(os.path.join(dump_dir, name), PAGE_SIZE)
            sel = (pm.flags & _img.PE_PRESENT) != 0
            v, n = pm.vaddr[sel], pm.nr_pages[sel].astype(np.int64)
            first = np.repeat(v, n)
            within = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
            addrs = first + within.astype(np.uint64) * np.uint64(PAGE_SIZE)
            if _img.is_task_pagemap(name):
                idx = by_vpid.get(int(name[len("pagemap-"):-len(".img")]))
            elif name.startswith("pagemap-shmem-"):
                idx = self._shm_space.get(int(name[len("pagemap-shmem-"):-len(".img")]))
            else:
                idx = None
            if idx is None:
                idx = self._next
                self._next += 1
            out.append((name, int(pm.pages_id), make_keys(idx, addrs)))
        return out

    # -- tracking

    def _attach(self, pid: int) -> None:
        from statesync.tracking import Tracker
        try:
            self.trackers[pid] = Tracker(pid, method=self.method)
        except ProcessError:
            pass        # exited meanwhile

    def attach_tracker(self, method: str = "auto") -> str:
        """Start dirty tracking of every task; returns the method the root's tracker
        uses."""
        self.method = method
        self._refresh()
        from statesync.tracking import Tracker
        tracker = self.tracker = Tracker(self.pid, method=method)
        self.trackers[self.pid] = tracker
        for p in list(self._task_space):
            if p != self.pid:
                self._attach(p)
        return str(tracker.method)

    def _task_keys(self, pid: int, idx: int, pages: np.ndarray,
                   shm_parts: List[np.ndarray]) -> np.ndarray:
        """Split a task's written addresses: private VMAs -> the task's keys, shmem
        VMAs -> the object's keys (offset), the rest (shared file mappings: file
        state, not memory) dropped."""
        if not pages.size or (not self.shmem and not self.tree):
            return pages
        maps = self._maps.get(pid) or self._maps_of(pid, fresh=False)
        starts = np.array([v.start for v in maps], dtype=np.uint64)
        ends = np.array([v.end for v in maps], dtype=np.uint64)
        k = np.searchsorted(starts, pages, side="right") - 1
        inside = (k >= 0) & (pages < ends[np.maximum(k, 0)])
        k = np.where(inside, k, -1)
        priv = np.zeros(pages.size, dtype=bool)
        for j in np.unique(k[k >= 0]).tolist():
            v = maps[j]
            sel = k == j
            if v.private:
                priv |= sel
            elif self.shmem and is_shmem(v) and v.inode in self._shm_space:
                off = pages[sel] - np.uint64(v.start) + np.uint64(v.offset)
                shm_parts.append(make_keys(self._shm_space[v.inode], off))
        return make_keys(idx, pages[priv])

    def collect(self) -> np.ndarray:
        """Keys of the pages written (or changed) since the previous collect, in every
        space; new spaces (a forked child, a new shmem object) report all their pages."""
        if not self.tree and not self.shmem:
            assert self.tracker is not None, "collect() before attach_tracker()"
            return np.asarray(self.tracker.collect().pages, dtype=np.uint64)
        self._refresh(fresh=False)
        parts: List[np.ndarray] = []
        shm_parts: List[np.ndarray] = []
        for pid, t in list(self.trackers.items()):
            idx = self._task_space.get(pid)
            if idx is None:
                continue
            try:
                pages = np.asarray(t.collect().pages, dtype=np.uint64)  # type: ignore[attr-defined]
                self._maps_of(pid, fresh=False)
            except ProcessGone as exc:
                if pid == self.pid:
                    raise
                t.detach()  # type: ignore[attr-defined]
                self.trackers.pop(pid, None)
                if "exec" in str(exc) and proc.exists(pid):
                    self._attach(pid)                    # a new program: all new
                    self._new.append(idx)
                continue
            parts.append(self._task_keys(pid, idx, pages, shm_parts))
        for sp in list(self.spaces.values()):
            if sp.kind == "shmem" and sp.path.startswith("/memfd:"):
                parts.append(self._memfd_changes(sp))
        for idx in dict.fromkeys(self._new):
            new_sp = self.spaces.get(idx)
            if new_sp is not None:
                parts.append(self._space_pages(new_sp))
        self._new.clear()
        return _merge(parts + shm_parts)

    def _memfd_changes(self, sp: Space) -> np.ndarray:
        """A memfd can also be written through a descriptor (write(2), fallocate),
        which no page table sees. Its mtime/ctime move then (and on mapped writes
        too): only then are its data pages hashed and the changed ones reported."""
        try:
            st = os.fstat(sp._fd)
        except OSError:
            return _EMPTY
        stamp = (st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        if stamp == sp._stamp and sp._hashes is not None:
            return _EMPTY
        sp._stamp = stamp
        sp.size = int(st.st_size)
        offs = _data_offsets(sp._fd, sp.size)
        pages, ok = _pread_pages(sp._fd, offs)
        h = _core.hash_pages(np.ascontiguousarray(pages))
        old = sp._hashes
        sp._hashes = (offs, h)
        if old is None:
            return _EMPTY
        o_offs, o_h = old
        i = np.minimum(np.searchsorted(o_offs, offs), max(o_offs.size - 1, 0))
        same = (o_offs[i] == offs) & (o_h[i] == h).all(axis=1) if o_offs.size else \
            np.zeros(offs.size, dtype=bool)
        return make_keys(sp.index, offs[~same])

    def detach(self) -> None:
        """Stop tracking and close the shmem objects' descriptors (their pages read
        as not ok from then on). The spaces stay: :meth:`image_keys` needs them."""
        ts, self.trackers, self.tracker = list(self.trackers.values()), {}, None
        for t in ts:
            try:
                t.detach()  # type: ignore[attr-defined]
            except Exception:
                pass
        for sp in self.spaces.values():
            if sp._fd >= 0:
                os.close(sp._fd)
                sp._fd = -1

    close = detach
