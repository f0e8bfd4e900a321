"""The migration source's view of a live process's memory: which pages to send, their
contents, and which were written since the last round.

Page contents come from :func:`statesync.proc.read_pages` (process_vm_readv), dirty
pages from :class:`statesync.Tracker`. Which pages to send in round 0 is decided here:
what CRIU would dump (see :func:`dumpable_pages`).

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


def dumpable_pages(pid: int) -> np.ndarray:
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


class MemorySource:
    """Round-0 pages, page reads and dirty tracking for one live process."""

    backend = "statesync.proc"

    def __init__(self, pid: int):
        self.pid = pid
        self.tracker = None

    def present_pages(self) -> np.ndarray:
        """The pages CRIU would dump: what round 0 sends."""
        return dumpable_pages(self.pid)

    def read(self, addrs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        from . import proc
        if not proc.exists(self.pid):
            raise ProcessGone(self.pid, "exited during the migration")
        pages, ok = proc.read_pages(self.pid, addrs)
        return np.asarray(pages), np.asarray(ok, dtype=bool)

    def attach_tracker(self, method: str = "auto") -> str:
        """Start dirty tracking; returns the method actually used."""
        from .tracking import Tracker
        self.tracker = Tracker(self.pid, method=method)
        return str(self.tracker.method)

    def collect(self) -> np.ndarray:
        return np.asarray(self.tracker.collect().pages, dtype=np.uint64)

    def detach(self) -> None:
        t, self.tracker = self.tracker, None
        if t is not None:
            t.detach()
