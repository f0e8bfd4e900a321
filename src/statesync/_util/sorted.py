"""Sorted uint64 arrays: the handful of numpy idioms statesync uses everywhere.

Page addresses, slots and VMA bounds are kept as sorted numpy arrays; these are the
operations on them, written once (no Python object per element):

* :func:`lookup` / :func:`member` / :func:`contains`: "is x in this sorted array"
  (and where);
* :func:`runs` / :func:`run_list` / :func:`page_runs`: split sorted positions or page
  addresses into runs of consecutive values;
* :func:`in_intervals` / :func:`interval_of`: "does x lie inside one of these sorted,
  disjoint [start, end) intervals" (VMAs, regions) and which one;
* :func:`expand_runs`: the inverse of :func:`page_runs` (runs back to pages);
* :func:`merge`: the sorted union of sorted arrays.
"""
from __future__ import annotations

from typing import Iterable, List, Tuple

import numpy as np
import numpy.typing as npt

__all__ = ["lookup", "member", "contains", "runs", "run_list", "page_runs", "interval_of",
           "in_intervals", "expand_runs", "merge"]

_EMPTY_U64 = np.zeros(0, dtype=np.uint64)


def lookup(keys: np.ndarray, x: npt.ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """``(pos, found)`` for each element of ``x`` in the sorted array ``keys``:
    ``found[i]`` is ``keys[pos[i]] == x[i]``. ``pos`` is an index into ``keys``
    (clamped, so ``keys[pos]`` is always valid when ``keys`` is not empty; all zero
    when it is); where ``found`` is False it means nothing."""
    xa = np.asarray(x, dtype=keys.dtype)
    n = keys.shape[0]
    if n == 0 or xa.size == 0:
        return np.zeros(xa.shape, dtype=np.intp), np.zeros(xa.shape, dtype=bool)
    pos = np.searchsorted(keys, xa)
    np.minimum(pos, n - 1, out=pos)
    return pos, keys[pos] == xa


def member(x: npt.ArrayLike, keys: np.ndarray) -> np.ndarray:
    """Boolean mask: which elements of ``x`` are in the sorted array ``keys``."""
    return lookup(keys, x)[1]


def contains(keys: np.ndarray, value: int) -> bool:
    """Whether the scalar ``value`` is in the sorted array ``keys``."""
    v = keys.dtype.type(value)
    i = int(np.searchsorted(keys, v))
    return i < keys.shape[0] and bool(keys[i] == v)


def runs(idx: np.ndarray, step: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """Split a strictly increasing integer array into runs where each value is the
    previous one plus ``step``: returns ``(starts, lengths)``, positions into ``idx``
    (int64)."""
    n = idx.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if int(idx[-1]) - int(idx[0]) == (n - 1) * step:  # the common case: one run
        return np.zeros(1, dtype=np.int64), np.array([n], dtype=np.int64)
    breaks = np.flatnonzero(np.diff(idx) != step) + 1
    starts = np.concatenate(([0], breaks)).astype(np.int64)
    ends = np.concatenate((breaks, [n])).astype(np.int64)
    return starts, ends - starts


def run_list(idx: np.ndarray, step: int = 1) -> List[Tuple[int, int]]:
    """:func:`runs` as a list of ``(start_position, length)`` Python int pairs."""
    starts, lengths = runs(idx, step)
    return list(zip(starts.tolist(), lengths.tolist()))


def page_runs(addrs: np.ndarray, page_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Sorted unique page addresses as runs of adjacent pages: ``(first address of
    each run (uint64), pages in it (uint64))``; :func:`expand_runs` inverts it."""
    a = np.asarray(addrs, dtype=np.uint64)
    starts, lengths = runs(a, page_size)
    return a[starts], lengths.astype(np.uint64)


def interval_of(x: npt.ArrayLike, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """For each element of ``x``, the index of the interval ``[starts[k], ends[k])``
    holding it, or -1. ``starts`` must be sorted and the intervals disjoint."""
    xa = np.asarray(x, dtype=starts.dtype)
    if starts.shape[0] == 0 or xa.size == 0:
        return np.full(xa.shape, -1, dtype=np.int64)
    k = np.searchsorted(starts, xa, side="right").astype(np.int64) - 1
    inside = (k >= 0) & (xa < ends[np.maximum(k, 0)])
    return np.where(inside, k, -1)


def in_intervals(x: npt.ArrayLike, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Boolean mask: which elements of ``x`` lie inside one of the sorted, disjoint
    intervals ``[starts[k], ends[k])``."""
    return interval_of(x, starts, ends) >= 0


def expand_runs(starts: np.ndarray, counts: np.ndarray, step: int = 1) -> np.ndarray:
    """Every element of the runs ``starts[i] + step * j`` for ``j < counts[i]``, in run
    order, as uint64 (for page runs ``step`` is the page size). Sized by the sum of
    ``counts``: check that against real data before calling with untrusted input."""
    s = np.asarray(starts, dtype=np.uint64)
    c = np.asarray(counts, dtype=np.int64)
    total = int(c.sum()) if c.size else 0
    if total == 0:
        return _EMPTY_U64.copy()
    first = np.repeat(s, c)
    within = np.arange(total, dtype=np.uint64) - np.repeat(
        (np.cumsum(c) - c).astype(np.uint64), c)
    return first + within * np.uint64(step)


def merge(arrays: Iterable[np.ndarray]) -> np.ndarray:
    """Sorted union (duplicates dropped) of sorted uint64 arrays. One input is
    returned as it is (no copy)."""
    parts = [a for a in arrays if a.size]
    if not parts:
        return _EMPTY_U64
    if len(parts) == 1:
        return parts[0]
    a = np.concatenate(parts)
    a.sort(kind="stable")  # runs of sorted input: the merge sort is fast on them
    keep = np.empty(a.size, dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]
