"""The migration source's view of a live process's memory: which pages to send, their
contents, and which were written since the last round.

Page contents come from :func:`statesync.proc.read_pages` (process_vm_readv), dirty
pages from :class:`statesync.Tracker`. Which pages to send in round 0 is decided here:
what CRIU would dump (see :func:`dumpable_pages`).

Pages that vanish while being read (the process unmapped them) are reported as not
ok and skipped; the CRIU dump at switch-over is the authority on what exists.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from statesync import proc
from statesync.errors import ProcessGone


def dumpable_pages(pid: int) -> np.ndarray:
    """Sorted uint64 addresses of the pages CRIU would dump: present or swapped pages
    of readable private mappings that are not page-cache pages of a file (bit 61 of
    pagemap clear). Kernel areas ([vdso], [vvar] ...) are left out.

    Reads /proc/PID/maps with :func:`statesync.proc.read_maps` and pagemap with
    :func:`statesync.proc.present_pages` (bounded chunks, O_CLOEXEC): memory follows
    the number of pages found, not the size of the mappings, so a 1 TiB
    reservation costs nothing. Raises :class:`~statesync.errors.NoSuchProcess` /
    :class:`~statesync.errors.AccessDenied` (with the pid) like :mod:`statesync.proc`.
    """
    vmas = [v for v in proc.read_maps(pid) if v.private and v.readable and not v.special]
    return proc.present_pages(pid, vmas, swapped=True, exclude=proc.PM_FILE)


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
        if not proc.exists(self.pid):
            raise ProcessGone(self.pid, "exited during the migration")
        pages, ok = proc.read_pages(self.pid, addrs)
        return np.asarray(pages), np.asarray(ok, dtype=bool)

    def attach_tracker(self, method: str = "auto") -> str:
        """Start dirty tracking; returns the method actually used."""
        from statesync.tracking import Tracker
        self.tracker = Tracker(self.pid, method=method)
        return str(self.tracker.method)

    def collect(self) -> np.ndarray:
        return np.asarray(self.tracker.collect().pages, dtype=np.uint64)

    def detach(self) -> None:
        t, self.tracker = self.tracker, None
        if t is not None:
            t.detach()
