"""Content-hash tracking: a 128-bit hash of every present page, computed in C."""
from __future__ import annotations

from typing import TYPE_CHECKING, List

import numpy as np

from statesync import proc
from statesync.proc import Vma
from statesync.tracking.common import (
    PM_MARKER,
    _EMPTY,
    _hash_any,
    _hash_ranges,
    _in_sorted,
    _merge,
    _select,
    _tracked,
)

if TYPE_CHECKING:
    from statesync.tracking.tracker import Tracker



class _HashState:
    """Content hashes of the present pages of a set of VMAs; ``refresh`` returns
    the pages whose content changed, appeared or vanished since the last call."""

    def __init__(self, pid: int, pm_fd: int):
        self.pid = pid
        self.pm = pm_fd
        self.addrs = _EMPTY
        self.hashes = np.zeros((0, 2), dtype=np.uint64)

    def refresh(self, vmas: List[Vma], baseline: bool = False) -> np.ndarray:
        vmas = sorted(vmas, key=lambda v: v.start)
        priv, shared = _hash_ranges(vmas)
        mask = proc.PM_PRESENT | proc.PM_SWAPPED
        addrs = _merge([_select(self.pm, priv, mask, exclude=proc.PM_FILE | PM_MARKER),
                        _select(self.pm, shared, mask, exclude=PM_MARKER)])
        hashes, ok = _hash_any(self.pid, addrs)
        if not ok.all():  # vanished between pagemap and read: not there now
            addrs, hashes = addrs[ok], hashes[ok]
        old_a, old_h = self.addrs, self.hashes
        self.addrs, self.hashes = addrs, hashes
        if baseline:
            return _EMPTY
        if old_a.size == 0:
            return addrs
        idx = np.searchsorted(old_a, addrs)
        idx_c = np.minimum(idx, old_a.size - 1)
        same = (old_a[idx_c] == addrs) & (old_h[idx_c] == hashes).all(axis=1)
        changed = addrs[~same]
        # Pages that were present and are gone while their VMA is still mapped
        # (MADV_DONTNEED, truncation): their content changed too.
        gone = old_a[~_in_sorted(old_a, addrs)]
        if gone.size and vmas:
            starts = np.array([v.start for v in vmas], dtype=np.uint64)
            ends = np.array([v.end for v in vmas], dtype=np.uint64)
            k = np.searchsorted(starts, gone, side="right") - 1
            inside = (k >= 0) & (gone < ends[np.maximum(k, 0)])
            gone = gone[inside]
            if gone.size:
                return _merge([changed, gone])
        return changed


class _Backend:
    name = "?"

    def collect(self) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _HashBackend(_Backend):
    name = "hash"

    def __init__(self, tracker: "Tracker"):
        self.t = tracker
        self.state = _HashState(tracker.pid, tracker._pm)
        self.state.refresh(self.t._vmas_now(_tracked), baseline=True)

    def collect(self) -> np.ndarray:
        return self.state.refresh(self.t._vmas_now(_tracked))
