"""DirtySet: a set of dirty pages (sorted uint64 page addresses).

Its own module so that both :mod:`statesync.tracking` and :mod:`statesync.criu` use it
without one importing the other.
"""
from __future__ import annotations

import numpy as np

from statesync._consts import PAGE_SIZE
from statesync._util import sorted as _srt


class DirtySet:
    """A set of dirty pages: ``pages`` is a sorted, duplicate-free ``uint64`` numpy
    array of page-aligned virtual addresses. Immutable by convention; cheap to build
    from any iterable or array of addresses (they are aligned down, sorted and
    de-duplicated)."""

    __slots__ = ("pages", "page_size")

    def __init__(self, pages=(), page_size: int = PAGE_SIZE):
        arr = np.asarray(pages, dtype=np.uint64).ravel()
        if arr.size:
            arr = np.unique(arr & ~np.uint64(page_size - 1))
        self.pages = arr
        self.page_size = int(page_size)

    @classmethod
    def _trusted(cls, pages: np.ndarray, page_size: int = PAGE_SIZE) -> "DirtySet":
        """Wrap an array already sorted, unique and aligned (no copy)."""
        d = cls.__new__(cls)
        d.pages = pages
        d.page_size = int(page_size)
        return d

    def __len__(self) -> int:
        return int(self.pages.size)

    @property
    def nbytes(self) -> int:
        """Bytes of memory the dirty pages cover (len * page_size)."""
        return len(self) * self.page_size

    def __iter__(self):
        return iter(self.pages.tolist())

    def __contains__(self, addr) -> bool:
        return _srt.contains(self.pages, int(addr) & ~(self.page_size - 1))

    def __or__(self, other: "DirtySet") -> "DirtySet":
        return DirtySet._trusted(np.union1d(self.pages, other.pages), self.page_size)

    def __and__(self, other: "DirtySet") -> "DirtySet":
        return DirtySet._trusted(np.intersect1d(self.pages, other.pages, assume_unique=True),
                                 self.page_size)

    def __sub__(self, other: "DirtySet") -> "DirtySet":
        return DirtySet._trusted(np.setdiff1d(self.pages, other.pages, assume_unique=True),
                                 self.page_size)

    def __eq__(self, other) -> bool:
        return isinstance(other, DirtySet) and np.array_equal(self.pages, other.pages)

    def within(self, start: int, end: int) -> "DirtySet":
        """The pages in [start, end)."""
        lo, hi = np.searchsorted(self.pages, [np.uint64(start), np.uint64(end)])
        return DirtySet._trusted(self.pages[lo:hi], self.page_size)

    def __repr__(self) -> str:
        return f"DirtySet({len(self)} pages, {self.nbytes} bytes)"
