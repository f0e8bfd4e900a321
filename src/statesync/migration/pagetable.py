"""A table of pages keyed by address, numpy all the way down.

Both migration agents keep one: the destination holds the page contents it received
(``width=page_size``, ``uint8``), the source holds a 128-bit hash of each page it
sent (``width=2``, ``uint64``) so that, at switch-over, a content diff of the CRIU
dump against what the destination holds finds exactly the pages still to send.

Keys are a sorted ``uint64`` array; rows live in one array grown by doubling (so a
whole round costs one ``searchsorted`` plus at most one merge). No per-page Python
objects. Not thread-safe.
"""
from __future__ import annotations

import numpy as np


class PageTable:
    def __init__(self, width: int, dtype=np.uint8, capacity: int = 1024):
        self.width = int(width)
        self.dtype = np.dtype(dtype)
        self.keys = np.zeros(0, dtype=np.uint64)      # sorted
        self.slots = np.zeros(0, dtype=np.int64)      # row of each key
        self.rows = np.empty((max(1, capacity), self.width), dtype=self.dtype)
        self.used = 0

    def __len__(self) -> int:
        return int(self.keys.size)

    @property
    def nbytes(self) -> int:
        return self.used * self.width * self.dtype.itemsize

    def lookup(self, addrs: np.ndarray):
        """(slots, found): row index of each address (undefined where not found)."""
        addrs = np.asarray(addrs, dtype=np.uint64)
        if self.keys.size == 0:
            return np.zeros(addrs.size, dtype=np.int64), np.zeros(addrs.size, dtype=bool)
        pos = np.searchsorted(self.keys, addrs)
        pos_c = np.minimum(pos, self.keys.size - 1)
        found = self.keys[pos_c] == addrs
        return self.slots[pos_c], found

    def _grow(self, need: int) -> None:
        cap = self.rows.shape[0]
        if need <= cap:
            return
        while cap < need:
            cap *= 2
        rows = np.empty((cap, self.width), dtype=self.dtype)
        rows[:self.used] = self.rows[:self.used]
        self.rows = rows

    def put(self, addrs: np.ndarray, values: np.ndarray) -> None:
        """Insert or overwrite. ``addrs`` must be duplicate-free."""
        addrs = np.asarray(addrs, dtype=np.uint64)
        if addrs.size == 0:
            return
        values = np.asarray(values, dtype=self.dtype).reshape(addrs.size, self.width)
        slots, found = self.lookup(addrs)
        if found.any():
            self.rows[slots[found]] = values[found]
        new = ~found
        k = int(new.sum())
        if k:
            self._grow(self.used + k)
            new_slots = np.arange(self.used, self.used + k, dtype=np.int64)
            self.rows[new_slots] = values[new]
            self.used += k
            keys = np.concatenate([self.keys, addrs[new]])
            sl = np.concatenate([self.slots, new_slots])
            order = np.argsort(keys, kind="stable")
            self.keys, self.slots = keys[order], sl[order]

    def get(self, addrs: np.ndarray) -> np.ndarray:
        """Rows for ``addrs``; raises ``KeyError`` naming the first missing address."""
        slots, found = self.lookup(addrs)
        if not found.all():
            miss = np.asarray(addrs, dtype=np.uint64)[~found]
            raise KeyError(f"{miss.size} pages missing, first at {int(miss[0]):#x}")
        return self.rows[slots]

    def contains(self, addrs: np.ndarray) -> np.ndarray:
        return self.lookup(addrs)[1]
