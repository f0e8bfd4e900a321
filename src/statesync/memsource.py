"""The migration source's view of a live process's memory: which pages to send, their
contents, and which were written since the last round.

Uses :mod:`statesync.proc` and :class:`statesync.Tracker` when they are available
and falls back to the plain kernel interfaces otherwise (``/proc/PID/maps``,
``/proc/PID/pagemap`` read into numpy, ``/proc/PID/mem`` with ``preadv``, and a
content-hash tracker over :func:`statesync._core.hash_pages`). Which path was taken
is visible in :attr:`MemorySource.backend` and in the migration report.

Pages that vanish while being read (the process unmapped them) are reported as not
ok and skipped; the CRIU dump at switch-over is the authority on what exists.
"""
from __future__ import annotations

import os
from typing import List, Tuple

import numpy as np

from .errors import NoSuchProcess, ProcessGone
from .workloads import PAGE_SIZE

_SKIP = ("[vsyscall]", "[vvar]", "[vdso]", "[vvar_vclock]", "[uprobes]")
_PRESENT, _SWAPPED, _FILE = 1 << 63, 1 << 62, 1 << 61


def _maps(pid: int) -> List[Tuple[int, int, str, str]]:
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise NoSuchProcess(pid, "no such process") from None
    out = []
    for line in lines:
        parts = line.split(None, 5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        out.append((lo, hi, parts[1], parts[5] if len(parts) > 5 else ""))
    return out


def present_pages_fallback(pid: int) -> np.ndarray:
    """Sorted addresses of the pages CRIU would dump: present or swapped pages of
    private mappings that are anonymous (not page-cache pages of a file)."""
    chunks = []
    try:
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    except FileNotFoundError:
        raise NoSuchProcess(pid, "no such process") from None
    try:
        for lo, hi, perms, name in _maps(pid):
            if perms[3] != "p" or name in _SKIP or perms[0] != "r":
                continue
            n = (hi - lo) // PAGE_SIZE
            raw = os.pread(fd, n * 8, (lo // PAGE_SIZE) * 8)
            ent = np.frombuffer(raw, dtype="<u8")
            sel = ((ent & np.uint64(_PRESENT | _SWAPPED)) != 0) & ((ent & np.uint64(_FILE)) == 0)
            idx = np.flatnonzero(sel).astype(np.uint64)
            if idx.size:
                chunks.append(np.uint64(lo) + idx[: ent.size] * np.uint64(PAGE_SIZE))
    finally:
        os.close(fd)
    return np.sort(np.concatenate(chunks)) if chunks else np.zeros(0, dtype=np.uint64)


def read_pages_fallback(pid: int, addrs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(contents (n, PAGE_SIZE) uint8, ok mask) via /proc/PID/mem, one preadv per run
    of contiguous pages; a run that fails is retried page by page."""
    addrs = np.asarray(addrs, dtype=np.uint64)
    out = np.zeros((addrs.size, PAGE_SIZE), dtype=np.uint8)
    ok = np.zeros(addrs.size, dtype=bool)
    if addrs.size == 0:
        return out, ok
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except FileNotFoundError:
        raise NoSuchProcess(pid, "no such process") from None
    try:
        breaks = np.flatnonzero(np.diff(addrs) != PAGE_SIZE) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [addrs.size]])
        for s, e in zip(starts.tolist(), ends.tolist()):
            view = memoryview(out[s:e]).cast("B")
            try:
                got = os.preadv(fd, [view], int(addrs[s]))
            except OSError:
                got = -1
            if got == (e - s) * PAGE_SIZE:
                ok[s:e] = True
                continue
            for i in range(s, e):
                try:
                    if os.preadv(fd, [memoryview(out[i]).cast("B")], int(addrs[i])) == PAGE_SIZE:
                        ok[i] = True
                except OSError:
                    pass
    finally:
        os.close(fd)
    return out, ok


class _HashTracker:
    """Fallback tracker: dirty = pages whose 128-bit content hash changed, or that
    appeared, since the last collect. Reads all of the process's memory per collect."""

    method = "hash(fallback)"

    def __init__(self, pid: int):
        from .pagetable import PageTable
        self.pid = pid
        self.table = PageTable(2, np.uint64)
        self._scan()

    def _scan(self) -> np.ndarray:
        from . import _core
        addrs = present_pages_fallback(self.pid)
        dirty = []
        for i in range(0, addrs.size, 4096):
            a = addrs[i:i + 4096]
            pages, ok = read_pages_fallback(self.pid, a)
            a, h = a[ok], _core.hash_pages(pages[ok])
            slots, found = self.table.lookup(a)
            changed = ~found
            if found.any():
                changed[found] = (self.table.rows[slots[found]] != h[found]).any(axis=1)
            dirty.append(a[changed])
            self.table.put(a, h)
        return np.concatenate(dirty) if dirty else np.zeros(0, dtype=np.uint64)

    def collect(self):
        from .tracking import DirtySet
        return DirtySet._trusted(np.sort(self._scan()))

    def detach(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()


class MemorySource:
    """Present pages, page reads and dirty tracking for one live process."""

    def __init__(self, pid: int):
        self.pid = pid
        try:
            from . import proc  # noqa: F401
            self._proc = proc
            self.backend = "statesync.proc"
        except ImportError:
            self._proc = None
            self.backend = "procfs(fallback)"
        self.tracker = None

    def present_pages(self) -> np.ndarray:
        """The pages CRIU would dump (present or swapped, anonymous, in private
        mappings): what round 0 sends. Page-cache pages of mapped files are left out,
        as CRIU leaves them out."""
        return present_pages_fallback(self.pid)

    def read(self, addrs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        if not os.path.exists(f"/proc/{self.pid}"):
            raise ProcessGone(self.pid, "exited during the migration")
        if self._proc is not None and hasattr(self._proc, "read_pages"):
            pages, ok = self._proc.read_pages(self.pid, addrs)
            return np.asarray(pages), np.asarray(ok, dtype=bool)
        return read_pages_fallback(self.pid, addrs)

    def attach_tracker(self, method: str = "auto") -> str:
        """Start dirty tracking; returns the method actually used."""
        tracker_cls = None
        try:
            from .tracking import Tracker as tracker_cls  # noqa: N813
        except ImportError:
            pass
        if tracker_cls is not None and method != "hash-fallback":
            t = tracker_cls(self.pid, method=method)
            if hasattr(t, "__enter__"):
                t = t.__enter__() or t
            self.tracker = t
            return str(getattr(t, "method", method))
        self.tracker = _HashTracker(self.pid)
        return self.tracker.method

    def collect(self) -> np.ndarray:
        return np.asarray(self.tracker.collect().pages, dtype=np.uint64)

    def detach(self) -> None:
        t, self.tracker = self.tracker, None
        if t is not None:
            t.detach()
