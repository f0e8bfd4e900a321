"""Helpers the tracking backends share: merging page sets, VMA selection."""
from __future__ import annotations

import numpy as np

from statesync import _core
from statesync._consts import PAGE_SIZE
from statesync._util import sorted as _srt
from statesync.proc import Vma

_EMPTY = np.zeros(0, dtype=np.uint64)

# Sorted union of sorted uint64 arrays (no Python objects per page).
_merge = _srt.merge


def _in_sorted(x: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Boolean mask: which elements of x are in the sorted array sorted_set."""
    return _srt.member(x, sorted_set)


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
