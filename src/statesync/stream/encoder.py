"""The stream encoder: pages -> header, data blocks, END."""
from __future__ import annotations

import os
import secrets
import struct
import zlib
from typing import Iterator, Optional

import numpy as np

from statesync import _core
from statesync.stream.format import (
    BLOCK,
    CODEC_LZ4,
    CODEC_NONE,
    DEFAULT_BLOCK_PAGES,
    END_BODY,
    FLAG_DEDUP,
    FLAG_LZ4,
    FLAG_XOR,
    HEADER,
    KIND_DATA,
    KIND_END,
    KIND_NAMES,
    MAGIC,
    MAX_BLOCK_PAGES,
    MAX_PAGE_SIZE,
    MIN_PAGE_SIZE,
    VERSION,
    StreamStats,
    _chain,
    _hash_lo,
    _payload_bound,
)

# ---------------------------------------------------------------------------- encoder


class Encoder:
    """Encodes pages into a stream.

    ``page_size`` bytes per page; ``compression`` ``"lz4"`` or ``None``;
    ``level`` the LZ4 frame compression level (0 = fast default, 3..16 = HC);
    ``xor``/``dedup`` enable those record kinds; ``block_pages`` is the chunk
    size (pages per block, also what the receiver must buffer); ``xor_limit``
    the largest XOR delta (bytes, before compression) preferred over RAW
    (default page_size/2). ``round`` is written into the header for the receiver.
    ``threads``: blocks compressed in parallel (default: CPUs, at most 4; 1 =
    everything in the calling thread). Output bytes do not depend on it.
    ``frame_checksum`` adds LZ4's XXH32 content checksum to every frame (off by
    default: each block's stored bytes are hashed in its header already, and the
    XXH32 pass halved decoding speed on the benchmark machine).

    An Encoder holds no per-stream state between calls and may be reused; one
    encode() generator must be driven from one thread at a time (it releases the
    GIL while encoding a block, so another thread can send meanwhile).
    """

    def __init__(self, page_size: int = 4096, compression: Optional[str] = "lz4", xor: bool = True,
                 dedup: bool = True, level: int = 0, block_pages: int = DEFAULT_BLOCK_PAGES,
                 xor_limit: Optional[int] = None, round: int = 0,
                 threads: Optional[int] = None, frame_checksum: bool = False):
        if page_size < MIN_PAGE_SIZE or page_size > MAX_PAGE_SIZE or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two in [{MIN_PAGE_SIZE}, "
                             f"{MAX_PAGE_SIZE}], got {page_size}")
        if compression in (None, False, "none", "off"):
            compression = None
        elif compression != "lz4":
            raise ValueError(f"compression must be 'lz4' or None, got {compression!r}")
        if not 1 <= block_pages <= MAX_BLOCK_PAGES:
            raise ValueError(f"block_pages must be in [1, {MAX_BLOCK_PAGES}], got {block_pages}")
        if not 0 <= round < 2 ** 32:
            raise ValueError("round must fit in 32 bits")
        self.page_size = page_size
        self.compression = compression
        self.level = int(level)
        self.xor = bool(xor)
        self.dedup = bool(dedup)
        self.block_pages = int(block_pages)
        self.xor_limit = page_size // 2 if xor_limit is None else int(xor_limit)
        self.round = round
        self.frame_checksum = bool(frame_checksum)
        self._pool = None
        self._bufs = None
        self._busy = False
        self.threads = max(1, min(4, os.cpu_count() or 1)) if threads is None else max(1, threads)
        self.last_stats: Optional[StreamStats] = None
        self.last_encoder_stats: Optional[dict] = None

    @property
    def flags(self) -> int:
        return ((FLAG_LZ4 if self.compression else 0) | (FLAG_XOR if self.xor else 0)
                | (FLAG_DEDUP if self.dedup else 0))

    def header(self, stream_id: bytes) -> bytes:
        body = HEADER.pack(MAGIC, VERSION, HEADER.size, self.page_size, self.flags,
                           self.block_pages, self.round, stream_id, self.level, 0)[:-4]
        return body + struct.pack("<I", zlib.crc32(body))

    def _prepare(self, addrs, pages, previous, previous_mask):
        ps = self.page_size
        addrs = np.ascontiguousarray(addrs, dtype=np.uint64).reshape(-1)
        pages = np.asarray(pages)
        if pages.dtype != np.uint8:
            raise ValueError(f"pages must be uint8, got {pages.dtype}")
        pages = np.ascontiguousarray(pages).reshape(-1, ps) if pages.size else \
            np.empty((0, ps), np.uint8)
        if pages.shape[0] != addrs.shape[0]:
            raise ValueError(f"{addrs.shape[0]} addresses but {pages.shape[0]} pages of {ps} bytes")
        if addrs.size:
            if np.any(addrs % np.uint64(ps)):
                bad = int(addrs[np.flatnonzero(addrs % np.uint64(ps))[0]])
                raise ValueError(f"address {bad:#x} is not aligned to the page size {ps}")
            if addrs.size > 1 and np.any(addrs[1:] <= addrs[:-1]):
                raise ValueError("addresses must be strictly increasing (sorted, no repeats)")
        prev = mask = None
        if previous is not None:
            if hasattr(previous, "get") and not isinstance(previous, np.ndarray):
                prev, mask = previous.get(addrs)          # a page store mirroring the receiver
            else:
                prev = np.ascontiguousarray(previous, dtype=np.uint8).reshape(-1, ps)
            if prev.shape != pages.shape:
                raise ValueError("previous must hold one page per address")
            if previous_mask is not None:
                m = np.ascontiguousarray(previous_mask, dtype=bool).reshape(-1)
                mask = m if mask is None else (mask & m)
            if mask is not None:
                mask = np.ascontiguousarray(mask, dtype=bool).view(np.uint8)
        return addrs, pages, prev, mask

    def encode(self, addrs, pages, previous=None, previous_mask=None,
               stream_id: Optional[bytes] = None) -> Iterator[bytes]:
        """Yield the stream of ``pages`` (``(n, page_size)`` uint8) at ``addrs``
        (``n`` strictly increasing, page-aligned uint64 addresses) as bytes chunks.

        ``previous``: the receiver's current content of the same addresses (array
        of the same shape, or a page store with ``get(addrs) -> (pages, ok)``),
        enabling XOR and unchanged-page (DUP-to-itself) records; ``previous_mask``
        (bool per page) says which rows of ``previous`` are valid. Without it,
        only ZERO/RAW/in-stream DUP records are produced.

        The arrays must not change until the generator is exhausted. After it
        finishes, ``last_stats`` holds a :class:`StreamStats`.
        """
        addrs, pages, prev, mask = self._prepare(addrs, pages, previous, previous_mask)
        return self._guarded(self._gen(addrs, pages, prev, mask,
                                       stream_id or secrets.token_bytes(16)))

    def _guarded(self, gen):
        # The encoder's block buffers are reused: one stream at a time per Encoder.
        if self._busy:
            raise RuntimeError("this Encoder is already producing a stream; finish or close "
                               "that generator first, or use another Encoder")
        self._busy = True
        try:
            yield from gen
        finally:
            self._busy = False

    def _gen(self, addrs, pages, prev, mask, stream_id):
        ps = self.page_size
        n = addrs.shape[0]
        pagenos = addrs // np.uint64(ps)
        st = StreamStats(page_size=ps, stream_id=stream_id.hex(), round=self.round,
                         flags=self.flags)
        session = _core.EncodeSession(pagenos, pages, prev, mask, self.dedup, self.xor,
                                      self.xor_limit)
        head = self.header(stream_id)
        chain, chain_hi = _chain(0, head)
        st.bytes_in += len(head)
        yield head
        pool = None
        if self.threads > 1 and n > self.block_pages:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="statesync-enc")
            pool = self._pool
        # Buffers are reused across blocks and calls (fresh memory costs a page fault per
        # 4 KiB, which dominated encoding in a VM): one (payload, frame) pair per block
        # in flight.
        nslots = self.threads + 1 if pool else 1
        bufs = self._buffers(nslots)
        pending = []          # blocks being compressed, in stream order
        slot = 0
        try:
            start, min_page = 0, 0
            while start < n or pending:
                # Record building is sequential (the dedup table is shared); compression of
                # finished blocks runs meanwhile in the pool (both release the GIL).
                while start < n and len(pending) < nslots:
                    out, fbuf = bufs[slot]
                    slot = (slot + 1) % nslots
                    plen, consumed, nrec = session.block(start, self.block_pages, min_page, out)
                    job = (out[:plen], fbuf, nrec, consumed)
                    pending.append(pool.submit(self._pack, *job) if pool else job)
                    min_page = int(pagenos[start + consumed - 1]) + 1
                    start += consumed
                item = pending.pop(0)
                hdr, chunk, plen, nrec = item.result() if pool else self._pack(*item)
                chain, chain_hi = _chain(chain, hdr)
                st.blocks += 1
                st.records += nrec
                st.payload_bytes += plen
                st.bytes_in += len(chunk)
                yield chunk
        finally:
            for f in pending:
                if pool is not None and not f.cancel():
                    try:
                        f.result()   # let a running compression finish before buffers go
                    except Exception:
                        pass
        es = session.stats
        for k in KIND_NAMES.values():
            st.pages[k] = es[k]
        st.bytes_out = n * ps
        end = _end_block(st, chain, chain_hi)
        st.bytes_in += len(end)
        self.last_stats = st
        self.last_encoder_stats = es
        yield end

    def _buffers(self, nslots):
        ps = self.page_size
        if self._bufs is None or len(self._bufs) < nslots:
            bound = _payload_bound(self.block_pages, ps)
            self._bufs = [(np.empty(bound, dtype=np.uint8),
                           np.empty(_core.lz4f_bound(bound), dtype=np.uint8))
                          for _ in range(nslots)]
        return self._bufs

    def _pack(self, payload, fbuf, nrec, npages):
        """Compress one record payload (if that pays) and build its block as bytes."""
        plen = payload.shape[0]
        codec, stored = CODEC_NONE, payload
        if self.compression == "lz4":
            clen = _core.lz4f_compress_into(payload, fbuf, self.level, self.frame_checksum)
            if clen < plen:
                codec, stored = CODEC_LZ4, fbuf[:clen]
        hdr = BLOCK.pack(KIND_DATA, codec, 0, stored.shape[0], plen, nrec, _hash_lo(stored),
                         npages, 0)[:-4]
        hdr += struct.pack("<I", zlib.crc32(hdr))
        return hdr, b"".join((hdr, stored.data)), plen, nrec


def _end_block(st: StreamStats, chain: int, chain_hi: int) -> bytes:
    body = END_BODY.pack(st.blocks, st.records, st.total_pages, st.pages["zero"], st.pages["raw"],
                         st.pages["dup"], st.pages["xor"], st.payload_bytes, chain, chain_hi)
    hdr = BLOCK.pack(KIND_END, CODEC_NONE, 0, len(body), len(body), 0, _hash_lo(body), 0, 0)[:-4]
    hdr += struct.pack("<I", zlib.crc32(hdr))
    return hdr + body


def encode(addrs, pages, previous=None, **options) -> bytes:
    """Convenience: the whole stream as one bytes object (see :class:`Encoder`)."""
    prev_mask = options.pop("previous_mask", None)
    sid = options.pop("stream_id", None)
    return b"".join(Encoder(**options).encode(addrs, pages, previous, prev_mask, stream_id=sid))
