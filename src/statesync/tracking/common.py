"""Helpers the tracking backends share: merging page sets, VMA selection."""
from __future__ import annotations

import numpy as np

from statesync import _core
from statesync._consts import PAGE_SIZE
from statesync.proc import Vma

_EMPTY = np.zeros(0, dtype=np.uint64)


def _merge(arrays) -> np.ndarray:
    """Sorted union of sorted uint64 arrays (no Python objects per page)."""
    arrays = [a for a in arrays if a.size]
    if not arrays:
        return _EMPTY
    if len(arrays) == 1:
        return arrays[0]
    a = np.concatenate(arrays)
    a.sort(kind="stable")  # runs of sorted input: timsort-like merge is fast
    keep = np.empty(a.size, dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def _in_sorted(x: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Boolean mask: which elements of x are in the sorted array sorted_set."""
    if not sorted_set.size or not x.size:
        return np.zeros(x.size, dtype=bool)
    i = np.minimum(np.searchsorted(sorted_set, x), sorted_set.size - 1)
    return sorted_set[i] == x


def _select(pm: int, ranges, mask: int) -> np.ndarray:
    """Sorted addresses of the pages in ``ranges`` ([(start, end)], ascending and
    disjoint, as VMAs and runs of them are) whose pagemap entry (read through the
    descriptor pm) has any bit of mask."""
    parts = [_core.pagemap_select(pm, s, e, mask, PAGE_SIZE) for s, e in ranges]
    parts = [p for p in parts if p.size]
    if not parts:
        return _EMPTY
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _tracked(v: Vma) -> bool:
    """VMAs whose pages the process can write: writable, not kernel-special."""
    return v.writable and not v.special


def _uffd_candidate(v: Vma) -> bool:
    """Writable private anonymous VMAs: what uffd-wp async mode can register."""
    return _tracked(v) and v.private and v.anonymous
