"""How pages travel between the agents: one page stream per batch (PageCodec)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from statesync._consts import PAGE_SIZE
from statesync.migration.common import MAX_BATCH_PAGES
from statesync.stream.store import PageStore

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


def decode_pages(payload: bytes, table: PageStore) -> int:
    """Apply one page stream (a PAGES frame's payload) into ``table`` (the store is
    the stream target); returns the number of pages. Raises StreamError; the table
    is unchanged then."""
    from statesync import stream
    st = stream.apply([payload], table, max_block_pages=MAX_BATCH_PAGES,
                      max_pages=MAX_BATCH_PAGES)
    return int(st.total_pages)
