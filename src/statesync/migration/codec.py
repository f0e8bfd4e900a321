"""How pages travel between the agents: one page stream per batch (PageCodec)."""
from __future__ import annotations

from typing import List, Optional

import numpy as np

from statesync._consts import PAGE_SIZE
from statesync.migration.common import MAX_BATCH_PAGES
from statesync.migration.pagetable import PageTable

# --------------------------------------------------------------------------- codec


class PageCodec:
    """How pages travel: one :mod:`statesync.stream` stream per batch of at most
    ``BATCH_PAGES`` pages, carried in one authenticated PAGES frame.

    ``compression``: ``None`` or ``"lz4"``; ``xor``: XBZRLE deltas against the
    destination's current copy (the source then keeps a mirror of every page it sent,
    one page of memory per page of state); ``dedup``: DUP records (default: with
    compression). All-zero pages always travel as ZERO records.
    """

    def __init__(self, compression: Optional[str] = None, xor: bool = False,
                 dedup: Optional[bool] = None, page_size: int = PAGE_SIZE):
        from statesync import stream
        if compression not in (None, "none", "lz4"):
            raise ValueError(f"unknown compression {compression!r} (none or lz4)")
        self.compression = None if compression in (None, "none") else "lz4"
        self.xor = bool(xor)
        self.dedup = (self.compression is not None) if dedup is None else bool(dedup)
        self.page_size = page_size
        self.encoder = stream.Encoder(page_size, compression=self.compression, xor=self.xor,
                                      dedup=self.dedup)

    @property
    def name(self) -> str:
        parts = [self.compression or "none"] + (["xor"] if self.xor else [])
        return "+".join(parts)

    def encode(self, addrs: np.ndarray, pages: np.ndarray, previous=None,
               previous_mask=None) -> bytes:
        return b"".join(self.encoder.encode(addrs, pages, previous=previous,
                                            previous_mask=previous_mask))


class _TableTarget:
    """statesync.stream target over a :class:`PageTable` (amortised growth: a round
    of many streams costs no whole-store copies). Pages of a stream are staged and
    land in the table only at commit."""

    def __init__(self, table: PageTable):
        self.table = table

    def begin(self, page_size: int):
        if page_size != self.table.width:
            from statesync.errors import StreamError
            raise StreamError(f"stream page size {page_size} differs from ours "
                              f"({self.table.width})", offset=8)
        return _TableTxn(self.table)


class _TableTxn:
    def __init__(self, table: PageTable):
        self.table = table
        self.addrs: List[np.ndarray] = []
        self.pages: List[np.ndarray] = []

    def read(self, addrs):
        addrs = np.asarray(addrs, dtype=np.uint64)
        slots, ok = self.table.lookup(addrs)
        out = np.zeros((addrs.size, self.table.width), dtype=np.uint8)
        if ok.any():
            out[ok] = self.table.rows[slots[ok]]
        for a, p in zip(self.addrs, self.pages):   # earlier pages of this stream
            if a.size == 0:
                continue
            pos = np.minimum(np.searchsorted(a, addrs), a.size - 1)
            hit = a[pos] == addrs
            if hit.any():
                out[hit] = p[pos[hit]]
                ok = ok | hit
        return out, ok

    def write(self, addrs, pages):
        self.addrs.append(np.asarray(addrs, dtype=np.uint64))
        self.pages.append(np.asarray(pages, dtype=np.uint8).reshape(-1, self.table.width))

    def commit(self):
        for a, p in zip(self.addrs, self.pages):
            self.table.put(a, p)
        self.abort()

    def abort(self):
        self.addrs, self.pages = [], []


def decode_pages(payload: bytes, table: PageTable) -> int:
    """Apply one page stream (a PAGES frame's payload) into ``table``; returns the
    number of pages. Raises StreamError; the table is unchanged then."""
    from statesync import stream
    st = stream.apply([payload], _TableTarget(table), max_block_pages=MAX_BATCH_PAGES,
                      max_pages=MAX_BATCH_PAGES)
    return int(st.total_pages)
