"""The page-delta stream: statesync's wire format for moving pages between hosts.

A stream is a 48-byte header followed by blocks. Each data block carries records
for a run of pages (at most ``block_pages`` pages, the chunk size), one record
kind per run of consecutive pages:

* ``ZERO`` the pages are all zero (no payload);
* ``DUP``  the page equals another page the receiver holds at that point of the
  stream (an earlier page of this stream, or a page of its current content),
  named by page number and verified by its 128-bit hash;
* ``XOR``  XBZRLE delta against the receiver's current content of the page;
* ``RAW``  the page bytes.

Block payloads are LZ4 frames (liblz4, in C) unless compression is off or does
not pay; every block header carries a hash of its stored bytes, and an ``END``
block closes the stream with the counts and a checksum chained over every byte
before it. The exact bytes are
specified in docs/stream-format.md.

Sending: :class:`Encoder`. ``Encoder(...).encode(addrs, pages, previous=None)``
yields ``bytes`` chunks (the header, then one chunk per block, then END) as it
goes; page classification and record building run in C with the GIL released.

Receiving: :func:`apply` (one stream from an iterable of chunks) or
:class:`StreamReader` (successive streams from one socket/file, one per
migration round). Application is atomic: pages are staged and become visible in
the target only after END verified; any error raises
:class:`~statesync.errors.StreamError` (byte offset, record number) and leaves the
target as it was. Decoder memory is bounded by the block size the receiver
accepts (``max_block_pages`` pages and ``max_block_bytes`` bytes), never by
lengths or sizes read from the input.

Targets: :class:`MemoryPageStore` (numpy, in memory), :class:`FilePageStore`
(one file, replaced atomically), :class:`FileTarget` (a plain file where the page
at address A lives at offset A - base), :class:`CriuImageTarget` (a CRIU image
set written with statesync.criu's writer). Any object with ``begin(page_size)``
returning a transaction with ``read``/``write``/``commit``/``abort`` works (see
:class:`Transaction`).

Many rounds over one connection: each round is its own stream (own header,
stream id, round number and END), and streams are simply concatenated on the
connection. A stream's DUP and XOR records may refer to pages the receiver got
in earlier rounds (they are part of its current content), and every such
reference is verified by hash, so a receiver whose copy diverged from what the
sender assumed gets a clean error instead of wrong memory.
"""
from __future__ import annotations

import os
import secrets
import struct
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

from . import _core
from ._fsutil import atomic_replace, discard, temp_beside
from .errors import StreamError

MAGIC = b"SSPS"
VERSION = 1

HEADER = struct.Struct("<4sHHIIII16siI")      # 48 bytes, see docs/stream-format.md
BLOCK = struct.Struct("<BBHIIIQII")           # 32 bytes
END_BODY = struct.Struct("<QQQQQQQQQQ")       # 80 bytes
assert HEADER.size == 48 and BLOCK.size == 32 and END_BODY.size == 80

FLAG_LZ4 = 1 << 0
FLAG_XOR = 1 << 1
FLAG_DEDUP = 1 << 2
_KNOWN_FLAGS = FLAG_LZ4 | FLAG_XOR | FLAG_DEDUP

KIND_DATA = 0x44  # 'D'
KIND_END = 0x45   # 'E'
CODEC_NONE = 0
CODEC_LZ4 = 1

REC_ZERO, REC_RAW, REC_DUP, REC_XOR = 1, 2, 3, 4
KIND_NAMES = {REC_ZERO: "zero", REC_RAW: "raw", REC_DUP: "dup", REC_XOR: "xor"}

MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 1 << 20
MAX_BLOCK_PAGES = 1 << 16            # format limit
DEFAULT_BLOCK_PAGES = 256            # 1 MiB of 4 KiB pages per block
DEFAULT_MAX_BLOCK_PAGES = 4096       # what a receiver accepts by default
DEFAULT_MAX_BLOCK_BYTES = 64 << 20   # largest block (block_pages * page_size) accepted by default
DEFAULT_MAX_PAGES = 1 << 22          # 16 GiB of 4 KiB pages per stream
_LZ4_OVERHEAD = 64                   # frame header + end mark + checksums, generously


def _hash_lo(data) -> int:
    return _core.hash128(data)[0]


def _chain(state: int, unit) -> Tuple[int, int]:
    lo, hi = _core.hash128(unit, state)
    return lo, hi


def _payload_bound(block_pages: int, page_size: int) -> int:
    return _core.codec_enc_bound(block_pages, page_size)


def _stored_bound(raw_len: int) -> int:
    # LZ4_compressBound plus frame overhead (block headers and checksums per 64 KiB block).
    return raw_len + raw_len // 255 + 16 + _LZ4_OVERHEAD + 8 * (raw_len // 65536 + 1)


# ---------------------------------------------------------------------------- results


@dataclass
class StreamStats:
    """What a stream carried. Byte counts: ``bytes_in`` = stream bytes,
    ``bytes_out`` = page bytes represented (pages * page_size)."""

    page_size: int = 0
    stream_id: str = ""
    round: int = 0
    flags: int = 0
    blocks: int = 0
    records: int = 0
    pages: Dict[str, int] = field(default_factory=lambda: {k: 0 for k in KIND_NAMES.values()})
    records_by_kind: Dict[str, int] = field(
        default_factory=lambda: {k: 0 for k in KIND_NAMES.values()})
    payload_bytes: int = 0      # record payload bytes before compression
    bytes_in: int = 0
    bytes_out: int = 0

    @property
    def total_pages(self) -> int:
        return sum(self.pages.values())

    @property
    def ratio(self) -> float:
        """Stream bytes / page bytes (smaller is better)."""
        return self.bytes_in / self.bytes_out if self.bytes_out else 0.0


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


# ---------------------------------------------------------------------------- decoder


class _Decoder:
    """Push parser of one stream. feed() consumes bytes up to the end of the END
    block and returns how many it used. Works with or without a transaction
    (without: parses and checks everything except XOR/DUP references)."""

    def __init__(self, target=None, max_block_pages=DEFAULT_MAX_BLOCK_PAGES,
                 max_pages=DEFAULT_MAX_PAGES, page_size=None,
                 max_block_bytes=DEFAULT_MAX_BLOCK_BYTES):
        self.target = target
        self.txn = None
        self.max_block_pages = max_block_pages
        self.max_block_bytes = max_block_bytes
        self.max_pages = max_pages
        self.expect_page_size = page_size
        self.st = StreamStats()
        self.pos = 0              # stream offset of the next unread byte
        self._partial = bytearray()
        self._need = HEADER.size
        self._state = "header"
        self._unit_offset = 0
        self._block = None
        self._buf = None
        self._min_page = 0
        self._chain = (0, 0)
        self.done = False
        self.bytes_in = 0

    # -- error helper
    def _err(self, msg, offset=None, record=None):
        return StreamError(msg, offset=self._unit_offset if offset is None else offset,
                           record=self.st.records if record is None else record)

    def feed(self, data) -> int:
        mv = memoryview(data).cast("B")
        n, i = len(mv), 0
        while i < n and not self.done:
            want = self._need - len(self._partial)
            if not self._partial and n - i >= self._need:
                unit = mv[i:i + self._need]
                i += self._need
            else:
                take = min(want, n - i)
                self._partial += mv[i:i + take]
                i += take
                if len(self._partial) < self._need:
                    break
                unit = memoryview(self._partial)
            self._unit_offset = self.pos
            self.pos += self._need
            self._unit(unit)
            if self._partial:
                self._partial = bytearray()
        self.bytes_in += i
        return i

    def _unit(self, unit):
        if self._state == "header":
            self._header(unit)
        elif self._state == "block":
            self._block_header(unit)
        else:
            self._payload(unit)

    def _header(self, b):
        b = bytes(b)
        magic, version, hlen, ps, flags, block_pages, rnd, sid, level, crc = HEADER.unpack(b)
        if magic != MAGIC:
            raise self._err(f"not a statesync page stream (magic {magic!r}, expected {MAGIC!r})", 0)
        if version != VERSION:
            raise self._err(f"stream format version {version} is not supported by this reader "
                            f"(it reads version {VERSION}); use the same statesync version on "
                            f"both hosts", 4)
        if zlib.crc32(b[:-4]) != crc:
            raise self._err("stream header checksum mismatch (corrupt header)", 44)
        if hlen != HEADER.size:
            raise self._err(f"header length {hlen} invalid for version 1 (must be 48)", 6)
        if ps < MIN_PAGE_SIZE or ps > MAX_PAGE_SIZE or ps & (ps - 1):
            raise self._err(f"page size {ps} invalid (power of two in [{MIN_PAGE_SIZE}, "
                            f"{MAX_PAGE_SIZE}])", 8)
        if flags & ~_KNOWN_FLAGS:
            raise self._err(f"unknown flag bits {flags & ~_KNOWN_FLAGS:#x}", 12)
        if not 1 <= block_pages <= MAX_BLOCK_PAGES:
            raise self._err(f"block size {block_pages} pages is outside [1, {MAX_BLOCK_PAGES}]", 16)
        if block_pages > self.max_block_pages:
            raise self._err(f"block size {block_pages} pages exceeds this receiver's limit of "
                            f"{self.max_block_pages} (raise max_block_pages)", 16)
        # Every decoder buffer (stored bytes, LZ4 output, decoded pages) scales with
        # block_pages * page_size, both read from this header: cap the product before
        # anything is sized by it.
        if block_pages * ps > self.max_block_bytes:
            raise self._err(f"block size {block_pages} pages x {ps} bytes = "
                            f"{block_pages * ps} bytes exceeds this receiver's limit of "
                            f"{self.max_block_bytes} bytes (raise max_block_bytes if the "
                            f"sender is trusted)", 16)
        if self.expect_page_size and ps != self.expect_page_size:
            raise self._err(f"page size {ps} differs from the target's {self.expect_page_size}", 8)
        st = self.st
        st.page_size, st.flags, st.round, st.stream_id = ps, flags, rnd, sid.hex()
        self.page_size = ps
        self.block_pages = block_pages
        self.max_payload = _payload_bound(block_pages, ps)
        self.max_page_no = (2 ** 64 - 1) // ps
        self._chain = _chain(0, b)
        st.bytes_in = HEADER.size
        if self.target is not None:
            self.txn = self.target.begin(ps)
        self._state, self._need = "block", BLOCK.size

    def _block_header(self, b):
        b = bytes(b)
        kind, codec, res, stored, raw, nrec, pcheck, npages, crc = BLOCK.unpack(b)
        if zlib.crc32(b[:-4]) != crc:
            raise self._err("block header checksum mismatch (corrupt or truncated stream)")
        if res:
            raise self._err("reserved block header bits set", self._unit_offset + 2)
        if kind == KIND_END:
            if codec != CODEC_NONE or stored != END_BODY.size or raw != END_BODY.size:
                raise self._err("malformed END block header")
        elif kind == KIND_DATA:
            if codec not in (CODEC_NONE, CODEC_LZ4):
                raise self._err(f"unknown block codec {codec}", self._unit_offset + 1)
            if codec == CODEC_LZ4 and not self.st.flags & FLAG_LZ4:
                raise self._err("LZ4 block in a stream whose header says no compression")
            if raw == 0 or raw > self.max_payload:
                raise self._err(f"block payload length {raw} outside [1, {self.max_payload}] "
                                f"for {self.block_pages}-page blocks")
            if (codec == CODEC_NONE and stored != raw) or stored > _stored_bound(raw) or not stored:
                raise self._err(f"block stored length {stored} impossible for payload {raw}")
            if nrec == 0 or npages == 0 or npages > self.block_pages or nrec > npages:
                raise self._err(f"block with {nrec} records / {npages} pages is invalid "
                                f"(1..{self.block_pages} pages)")
            if self.st.total_pages + npages > self.max_pages:
                raise self._err(f"stream exceeds the limit of {self.max_pages} pages without "
                                f"ending (endless or oversized stream; raise max_pages if "
                                f"expected)")
        else:
            raise self._err(f"unknown block kind {kind:#x}", self._unit_offset)
        self._block = (kind, codec, stored, raw, nrec, pcheck, npages, b, self._unit_offset)
        self._state, self._need = "payload", stored

    def _payload(self, stored):
        kind, codec, slen, raw, nrec, pcheck, npages, hdr, hoff = self._block
        poff = self._unit_offset
        if _hash_lo(stored) != pcheck:
            raise self._err("block payload checksum mismatch (corrupt stream)", poff)
        st = self.st
        if kind == KIND_END:
            self._end(bytes(stored), poff)
            return
        if codec == CODEC_LZ4:
            payload = self._decompress(stored, raw, poff)
        else:
            payload = stored
        self._data_block(payload, nrec, npages, poff, codec)
        self._chain = _chain(self._chain[0], hdr)
        st.blocks += 1
        st.payload_bytes += raw
        st.bytes_in = self.pos
        self._state, self._need = "block", BLOCK.size

    def _decompress(self, stored, raw, poff):
        # Into one buffer reused for every block, sized by the block size this
        # receiver accepted: never by a length read from the frame.
        if self._buf is None:
            self._buf = np.empty(self.max_payload + _core.LZ4F_SLACK, dtype=np.uint8)
        rc = _core.lz4f_decompress_into(stored, raw, self._buf)
        if rc:
            raise self._err(f"LZ4 frame of block is corrupt or does not decode to exactly "
                            f"{raw} bytes", poff)
        return self._buf[:raw]

    def _data_block(self, payload, nrec, npages, poff, codec):
        ps = self.page_size
        rec0 = self.st.records
        where = (lambda o: poff + o) if codec == CODEC_NONE else (lambda o: poff)
        rc, info, nr, eoff, erec = _core.dec_parse(payload, ps, self._min_page, self.block_pages)
        if rc:
            what = {-_core.CODEC_E2BIG: "more pages than the block size allows",
                    -_core.CODEC_ERANGE: "page numbers not increasing or out of range"}.get(
                rc, "malformed record")
            raise self._err(f"{what} (payload offset {eoff})", where(eoff), rec0 + erec)
        if nr != nrec or len(info) != npages:
            raise self._err(f"block holds {nr} records / {len(info)} pages but its header says "
                            f"{nrec} / {npages}", poff, rec0 + nr)
        pagenos = info["page"]
        if int(pagenos[-1]) > self.max_page_no:
            raise self._err(f"page number {int(pagenos[-1])} beyond the 64-bit address space",
                            poff, rec0 + int(info["rec"][-1]))
        kinds = info["kind"]
        counts = np.bincount(kinds, minlength=5)
        recs = info["rec"]
        rkinds = np.bincount(kinds[np.concatenate(([True], recs[1:] != recs[:-1]))], minlength=5)
        if self.txn is not None:
            alloc = getattr(self.txn, "alloc", None)
            out = alloc(npages) if alloc else np.empty((npages, ps), dtype=np.uint8)
            src_index = np.full(npages, -1, dtype=np.int64)
            addrs = pagenos * np.uint64(ps)
            xi = np.flatnonzero(kinds == REC_XOR)
            if xi.size:
                base, ok = self.txn.read(addrs[xi])
                if not ok.all():
                    j = int(xi[np.flatnonzero(~ok)[0]])
                    raise self._err(f"XOR record refers to page {int(addrs[j]):#x}, which the "
                                    f"receiver does not hold (stream sent against a base this "
                                    f"target lacks)", poff, rec0 + int(info["rec"][j]))
                out[xi] = base
            di = np.flatnonzero(kinds == REC_DUP)
            if di.size:
                src = info["src"][di]
                if int(src.max()) > self.max_page_no:
                    j = int(di[np.flatnonzero(src > self.max_page_no)[0]])
                    raise self._err("DUP source page number beyond the address space", poff,
                                    rec0 + int(info["rec"][j]))
                pos = np.searchsorted(pagenos, src)
                posc = np.minimum(pos, npages - 1)
                inblk = (pos < di) & (pagenos[posc] == src)
                src_index[di[inblk]] = pos[inblk]
                ext = di[~inblk]
                if ext.size:
                    content, ok = self.txn.read(src[~inblk] * np.uint64(ps))
                    if not ok.all():
                        j = int(ext[np.flatnonzero(~ok)[0]])
                        raise self._err(f"DUP record refers to page "
                                        f"{int(info['src'][j]) * ps:#x}, which the receiver "
                                        f"does not hold", poff, rec0 + int(info["rec"][j]))
                    out[ext] = content
            rc, eoff, erec, epage = _core.dec_build(payload, ps, info, src_index, out)
            if rc:
                a = int(addrs[epage])
                if rc == -_core.CODEC_EBADMSG:
                    msg = (f"page {a:#x}: the receiver's copy of the referenced page differs "
                           f"from the sender's (hash mismatch); the target diverged from what "
                           f"the sender assumed")
                else:
                    msg = f"page {a:#x}: malformed XOR delta or DUP reference"
                raise self._err(msg, where(eoff), rec0 + erec)
            self.txn.write(addrs, out)
        st = self.st
        st.records += nr
        for k, name in KIND_NAMES.items():
            st.pages[name] += int(counts[k])
            st.records_by_kind[name] += int(rkinds[k])
        st.bytes_out = st.total_pages * ps
        self._min_page = int(pagenos[-1]) + 1

    def _end(self, body, poff):
        st = self.st
        (blocks, records, pages, zero, raw, dup, xor, payload, c_lo, c_hi) = END_BODY.unpack(body)
        got = (st.blocks, st.records, st.total_pages, st.pages["zero"], st.pages["raw"],
               st.pages["dup"], st.pages["xor"], st.payload_bytes)
        want = (blocks, records, pages, zero, raw, dup, xor, payload)
        if got != want:
            raise self._err(f"END counts {want} differ from what the stream carried {got} "
                            f"(blocks, records, pages, zero, raw, dup, xor, payload bytes): "
                            f"blocks were lost or inserted", poff)
        if (c_lo, c_hi) != self._chain:
            raise self._err("END checksum does not match the stream (corrupt stream)", poff + 64)
        st.bytes_in = self.pos
        self.done = True

    def finish(self):
        """Raise StreamError if the stream did not end."""
        if not self.done:
            raise StreamError(f"stream truncated: ended after {self.pos + len(self._partial)} "
                              f"bytes without an END block", offset=self.pos + len(self._partial),
                              record=self.st.records)


def _iter_source(source, chunk_size=1 << 20):
    """Chunks from an iterable of bytes-likes, a file-like (read) or a socket (recv)."""
    if hasattr(source, "recv") and not hasattr(source, "read"):
        while True:
            b = source.recv(chunk_size)
            if not b:
                return
            yield b
    elif hasattr(source, "read"):
        while True:
            b = source.read(chunk_size)
            if not b:
                return
            yield b
    elif isinstance(source, (bytes, bytearray, memoryview)):
        yield source
    else:
        yield from source


def apply(chunks, target, *, max_block_pages: int = DEFAULT_MAX_BLOCK_PAGES,
          max_pages: int = DEFAULT_MAX_PAGES,
          max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES) -> StreamStats:
    """Apply exactly one stream from ``chunks`` (iterable of bytes-likes, a file or
    a socket) into ``target``; returns its :class:`StreamStats` (pages and records
    per kind, ``bytes_in`` stream bytes, ``bytes_out`` page bytes).

    Atomic: the target changes only after END verified. Raises StreamError
    (``offset``, ``record``) on any corruption, truncation, reference to a page the
    target lacks, trailing bytes after END, or more than ``max_pages`` pages.
    Decoder memory is bounded by ``max_block_pages`` and ``max_block_bytes`` (the
    largest block it accepts, in pages and in bytes: a few times
    ``max_block_bytes`` at most), whatever the input claims; staged pages are held by the target's
    transaction (memory for MemoryPageStore, a temporary file for the file targets).
    """
    reader = StreamReader(chunks, max_block_pages=max_block_pages, max_pages=max_pages,
                          max_block_bytes=max_block_bytes)
    st = reader.apply(target, _exclusive=True)
    if st is None:
        raise StreamError("stream truncated: no bytes at all (expected a stream header)",
                          offset=0, record=0)
    return st


def inspect(chunks, *, max_block_pages: int = MAX_BLOCK_PAGES,
            max_pages: int = 1 << 40,
            max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES) -> StreamStats:
    """Check one stream (framing, checksums, record syntax, END) without a target;
    XOR and DUP references are not resolved. Returns its StreamStats. Any block
    size in pages is accepted, but still at most ``max_block_bytes`` bytes."""
    reader = StreamReader(chunks, max_block_pages=max_block_pages, max_pages=max_pages,
                          max_block_bytes=max_block_bytes)
    st = reader.apply(None)
    if st is None:
        raise StreamError("stream truncated: no bytes at all", offset=0, record=0)
    return st


class StreamReader:
    """Reads successive streams from one source (a socket, a file, or an iterable
    of chunks), e.g. one stream per migration round over one connection.

    ``apply(target)`` consumes exactly one stream and keeps any bytes after its
    END for the next call; returns None at a clean end of the source (no bytes
    before the next stream's header). Not thread-safe.

    Limits (per stream): ``max_block_pages`` pages and ``max_block_bytes`` bytes
    (block_pages * page_size) per block, checked when the header is read;
    ``max_pages`` pages in all.
    """

    def __init__(self, source, *, max_block_pages: int = DEFAULT_MAX_BLOCK_PAGES,
                 max_pages: int = DEFAULT_MAX_PAGES,
                 max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES):
        self._it = iter(_iter_source(source))
        self._left = b""
        self.max_block_pages = max_block_pages
        self.max_block_bytes = max_block_bytes
        self.max_pages = max_pages
        self.offset = 0     # bytes of the source consumed by completed streams

    def _take_leftover(self) -> int:
        n = len(self._left)
        for b in self._it:
            n += len(b)
            if n > 0:
                break
        return n

    def apply(self, target, _exclusive=False) -> Optional[StreamStats]:
        dec = _Decoder(target, self.max_block_pages, self.max_pages,
                       max_block_bytes=self.max_block_bytes)
        started = False
        try:
            while not dec.done:
                if self._left:
                    data, self._left = self._left, b""
                else:
                    data = next(self._it, None)
                    if data is None:
                        break
                if not len(data):
                    continue
                started = True
                used = dec.feed(data)
                if used < len(data):
                    self._left = memoryview(data).cast("B")[used:]
            if not started and not dec.done:
                return None
            dec.finish()
            if _exclusive:
                # The source must end with this stream: checked before anything is committed.
                extra = self._take_leftover()
                if extra:
                    raise StreamError(f"{extra} unexpected bytes after the END block",
                                      offset=dec.pos, record=dec.st.records)
            if dec.txn is not None:
                dec.txn.commit()
        except BaseException as exc:
            if dec.txn is not None:
                try:
                    dec.txn.abort()
                except Exception:
                    pass
            if isinstance(exc, StreamError):
                if exc.offset is None or exc.record is None:
                    # A target refused something: say where in the stream it happened.
                    msg = str(exc).split(": ", 1)[-1]
                    raise StreamError(msg, offset=self.offset + dec._unit_offset,
                                      record=dec.st.records) from None
                # Offsets are reported relative to the whole source.
                exc.offset += self.offset
                exc.args = (str(exc).replace(f"byte {exc.offset - self.offset}",
                                             f"byte {exc.offset}", 1),) if self.offset else exc.args
            raise
        self.offset += dec.pos
        return dec.st


# ---------------------------------------------------------------------------- targets


class Transaction:
    """What apply() needs from a target between begin() and commit().

    * ``read(addrs) -> (pages (k, page_size) uint8, ok bool[k])``: the current
      content (committed, overlaid with what this transaction wrote) of each
      address; ``ok`` False where the target holds no such page.
    * ``write(addrs, pages)``: stage pages; addresses strictly increase across
      calls. Ownership of ``pages`` passes to the transaction.
    * ``commit()``: make every staged page visible at once. ``abort()``: drop them.
    """


class MemoryPageStore:
    """Pages in memory: sorted ``addrs`` (uint64) and ``pages`` ((n, page_size) uint8).

    A stream's pages become visible together at commit (addresses already present
    are overwritten in place; new ones are merged into fresh arrays). Decoded pages
    are staged in an arena of large arrays that the store keeps for the next stream
    (at most 256 MiB) once their content was copied in. Not thread-safe against
    concurrent apply(); reading while nobody applies is safe.
    """

    def __init__(self, page_size: int = 4096, addrs=None, pages=None):
        self.page_size = page_size
        self._scratch = []    # staging arena kept between streams (see _MemoryTxn)
        if addrs is None:
            self.addrs = np.empty(0, dtype=np.uint64)
            self.pages = np.empty((0, page_size), dtype=np.uint8)
        else:
            a = np.ascontiguousarray(addrs, dtype=np.uint64)
            p = np.ascontiguousarray(pages, dtype=np.uint8).reshape(-1, page_size)
            order = np.argsort(a, kind="stable")
            self.addrs, self.pages = a[order], p[order]

    def __len__(self):
        return int(self.addrs.shape[0])

    def get(self, addrs) -> Tuple[np.ndarray, np.ndarray]:
        """(pages, ok) for the given addresses; rows where ok is False are zero."""
        addrs = np.ascontiguousarray(addrs, dtype=np.uint64)
        return _lookup(self.addrs, self.pages, addrs, self.page_size)

    def to_dict(self) -> Dict[int, bytes]:
        return {int(a): self.pages[i].tobytes() for i, a in enumerate(self.addrs)}

    def begin(self, page_size: int):
        if page_size != self.page_size:
            raise StreamError(f"stream page size {page_size} differs from the store's "
                              f"{self.page_size}", offset=8)
        return _MemoryTxn(self)


def _lookup(keys, rows, addrs, ps):
    out = np.zeros((addrs.shape[0], ps), dtype=np.uint8)
    if keys.shape[0] == 0 or addrs.shape[0] == 0:
        return out, np.zeros(addrs.shape[0], dtype=bool)
    pos = np.searchsorted(keys, addrs)
    posc = np.minimum(pos, keys.shape[0] - 1)
    ok = keys[posc] == addrs
    out[ok] = rows[posc[ok]]
    return out, ok


class _MemoryTxn:
    # Decoded pages go straight into large arena chunks (doubling from 8 MiB): numpy
    # asks for transparent huge pages on allocations of 4 MiB and more, which made
    # first-touch page faults, the main cost of decoding into fresh memory in a VM,
    # about 4x cheaper than one small array per block.
    _FIRST_CHUNK = 8 << 20
    _MAX_CHUNK = 512 << 20
    _SCRATCH_MAX = 256 << 20

    def __init__(self, store: MemoryPageStore):
        self.store = store
        self.addr_blocks = []
        self.page_blocks = []
        self._cat = None
        self.chunks = []        # [array, rows used]
        self._next = self._FIRST_CHUNK

    def alloc(self, n):
        """Rows for n decoded pages, owned by this transaction."""
        ps = self.store.page_size
        if self.chunks:
            c = self.chunks[-1]
            if c[0].shape[0] - c[1] >= n:
                v = c[0][c[1]:c[1] + n]
                c[1] += n
                return v
        scratch = getattr(self.store, "_scratch", None)
        while scratch:
            arr = scratch.pop(0)                  # warm memory from an earlier stream
            if arr.shape[0] >= n:
                self.chunks.append([arr, n])
                return arr[:n]
        rows = max(n, self._next // ps)
        self._next = min(self._next * 2, self._MAX_CHUNK)
        self.chunks.append([np.empty((rows, ps), dtype=np.uint8), n])
        return self.chunks[-1][0][:n]

    def _recycle(self):
        # After the staged pages were copied into the store, keep the arena for the next
        # stream (up to _SCRATCH_MAX bytes): steady-state rounds then decode into
        # memory that is already mapped.
        if not hasattr(self.store, "_scratch"):
            return
        keep, total = [], 0
        for arr, _ in self.chunks:
            if total + arr.nbytes <= self._SCRATCH_MAX:
                keep.append(arr)
                total += arr.nbytes
        self.store._scratch = keep
        self.chunks = []

    def _staged(self):
        if self._cat is None or self._cat[0] != len(self.addr_blocks):
            a = (np.concatenate(self.addr_blocks) if self.addr_blocks
                 else np.empty(0, np.uint64))
            self._cat = (len(self.addr_blocks), a, np.cumsum([0] + [x.shape[0] for x in
                                                                      self.addr_blocks]))
        return self._cat

    def read(self, addrs):
        s = self.store
        out, ok = _lookup(s.addrs, s.pages, addrs, s.page_size)
        if self.addr_blocks:
            _, sa, starts = self._staged()
            pos = np.searchsorted(sa, addrs)
            posc = np.minimum(pos, sa.shape[0] - 1)
            hit = sa[posc] == addrs
            if hit.any():
                js = np.flatnonzero(hit)
                rows = posc[js]
                blk = np.searchsorted(starts, rows, side="right") - 1
                for b in np.unique(blk).tolist():     # one gather per staged block
                    sel = blk == b
                    out[js[sel]] = self.page_blocks[b][rows[sel] - int(starts[b])]
            ok = ok | hit
        return out, ok

    def write(self, addrs, pages):
        self.addr_blocks.append(np.asarray(addrs, dtype=np.uint64))
        self.page_blocks.append(pages)

    def _staged_pages(self):
        # Blocks written from our own arena are contiguous within a chunk: a stream that
        # fits in one chunk needs no copy at all.
        if len(self.chunks) == 1 and len(self.page_blocks) and all(
                p.base is self.chunks[0][0] for p in self.page_blocks) and \
                sum(p.shape[0] for p in self.page_blocks) == self.chunks[0][1]:
            return self.chunks[0][0][:self.chunks[0][1]]
        return (self.page_blocks[0] if len(self.page_blocks) == 1
                else np.concatenate(self.page_blocks))

    def commit(self):
        s = self.store
        if not self.addr_blocks:
            return
        na = np.concatenate(self.addr_blocks)
        if s.addrs.shape[0] and s.pages.flags.writeable:
            pos = np.searchsorted(s.addrs, na)
            posc = np.minimum(pos, s.addrs.shape[0] - 1)
            if (s.addrs[posc] == na).all():
                # Every page is already in the store: copy block by block, in place.
                off = 0
                for pb in self.page_blocks:
                    k = pb.shape[0]
                    _scatter_rows(s.pages, posc[off:off + k], pb)
                    off += k
                self._recycle()
                return
        npg = self._staged_pages()
        if s.addrs.shape[0] == 0:
            if any(npg.base is c[0] and 2 * npg.nbytes < c[0].nbytes for c in self.chunks):
                npg = npg.copy()         # do not pin a mostly empty arena chunk
            s.addrs, s.pages = na, (npg if npg.flags.writeable else npg.copy())
            if npg.base is None or not any(npg.base is c[0] for c in self.chunks):
                self._recycle()          # the arena was copied out (several chunks)
            return
        pos = np.searchsorted(s.addrs, na)
        posc = np.minimum(pos, s.addrs.shape[0] - 1)
        exists = s.addrs[posc] == na
        if exists.all() and s.pages.flags.writeable:
            _scatter_rows(s.pages, posc, npg)
        else:
            keep = np.ones(s.addrs.shape[0], dtype=bool)
            keep[posc[exists]] = False
            alla = np.concatenate([s.addrs[keep], na])
            order = np.argsort(alla, kind="stable")
            allp = np.concatenate([s.pages[keep], npg])[order]
            s.addrs, s.pages = alla[order], allp
        self._recycle()

    def abort(self):
        self.addr_blocks = self.page_blocks = []
        self._recycle()


def _scatter_rows(dst, idx, rows):
    """dst[idx] = rows, with runs of consecutive indices copied as slices."""
    for s0, n in _runs(idx):
        d0 = int(idx[s0])
        dst[d0:d0 + n] = rows[s0:s0 + n]


def _copy_to_temp(path) -> Tuple[str, int]:
    fd, tmp = temp_beside(path)
    try:
        if os.path.exists(path):
            with open(path, "rb") as src:
                size = os.fstat(src.fileno()).st_size
                off = 0
                while off < size:  # in-kernel copy (reflink where the filesystem can)
                    n = os.copy_file_range(src.fileno(), fd, size - off, off, off)
                    if n <= 0:
                        break
                    off += n
                if off < size:
                    raise OSError(f"short copy of {path}")
    except BaseException:
        discard(tmp, fd)
        raise
    return tmp, fd


class _CopyTxn:
    """Base of the file targets' transactions: the stream is applied to a private
    copy of ``path`` (``self.fd``, created O_EXCL beside it); commit() calls
    ``_finish()`` (subclasses write trailing metadata there), fsyncs the copy,
    renames it over ``path`` and fsyncs the directory; abort() removes the copy.
    Either way the original is never modified in place."""

    def __init__(self, path):
        self.path = path
        self.tmp, self.fd = _copy_to_temp(path)

    def _finish(self):
        pass

    def commit(self):
        self._finish()
        fd, self.fd = self.fd, None
        atomic_replace(self.tmp, self.path, fd)

    def abort(self):
        fd, self.fd = self.fd, None
        discard(self.tmp, fd)


def _pwrite_all(fd, data, offset):
    mv = memoryview(data).cast("B")
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv, offset = mv[n:], offset + n


def _runs(idx):
    """Split sorted integer positions into (start_index_in_idx, length) runs of consecutive values."""
    n = idx.shape[0]
    if n == 0:
        return []
    if int(idx[-1]) - int(idx[0]) == n - 1:      # the common case: one run
        return [(0, n)]
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [n]))
    return list(zip(starts.tolist(), (ends - starts).tolist()))


class FileTarget:
    """A plain file holding a memory image: the page at address A is at file offset
    A - ``base``. Pages past the end of the file are absent (a DUP/XOR reference
    to them is an error); writing past the end extends the file, up to
    ``max_size`` bytes. A stream is applied to a copy of the file (in-kernel
    copy), fsynced and renamed over the original: readers see the old or the new
    file, never a mix.
    """

    def __init__(self, path, base: int = 0, page_size: int = 4096, max_size: int = 1 << 40):
        self.path = os.fspath(path)
        self.base = base
        self.page_size = page_size
        self.max_size = max_size

    def begin(self, page_size: int):
        if page_size != self.page_size:
            raise StreamError(f"stream page size {page_size} differs from the file target's "
                              f"{self.page_size}", offset=8)
        return _FileTxn(self)

    def read_all(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()


class _FileTxn(_CopyTxn):
    def __init__(self, t: FileTarget):
        super().__init__(t.path)
        self.t = t
        self.size = os.fstat(self.fd).st_size

    def _offsets(self, addrs):
        addrs = np.asarray(addrs, dtype=np.uint64)
        if addrs.size and int(addrs.min()) < self.t.base:
            raise StreamError(f"page {int(addrs.min()):#x} lies below the file target's base "
                              f"{self.t.base:#x}")
        return (addrs - np.uint64(self.t.base)).astype(np.int64) if addrs.size else \
            np.empty(0, np.int64)

    def read(self, addrs):
        ps = self.t.page_size
        offs = self._offsets(addrs)
        out = np.zeros((offs.shape[0], ps), dtype=np.uint8)
        ok = (offs + ps) <= self.size
        for j in np.flatnonzero(ok):
            n = os.preadv(self.fd, [out[j]], int(offs[j]))
            ok[j] = n == ps
        return out, ok

    def write(self, addrs, pages):
        ps = self.t.page_size
        offs = self._offsets(addrs)
        if offs.size and int(offs[-1]) + ps > self.t.max_size:
            raise StreamError(f"page {int(addrs[-1]):#x} would grow {self.t.path} past its limit "
                              f"of {self.t.max_size} bytes")
        slots = offs // ps
        for s, n in _runs(slots):
            buf = pages[s:s + n]
            done = os.pwritev(self.fd, [buf], int(offs[s]))
            if done != buf.nbytes:
                raise OSError(f"short write to {self.tmp}")
        if offs.size:
            self.size = max(self.size, int(offs[-1]) + ps)


class CriuImageTarget:
    """Applies a stream onto a CRIU image set: ``out_dir`` becomes ``base_dir``'s
    images (registers, files, VMAs...) with the stream's pages replacing or adding to
    the base's pages, written by :func:`statesync.criu.write_image_set` (atomically,
    at commit; ``out_dir`` must not exist). XOR and DUP records resolve against the
    base image set's pages (``pid``: which process of the set; default its only or
    root one). Staged pages are held in memory until commit. Each stream needs a new
    ``out_dir``; the next round can use this one as its base.
    """

    def __init__(self, base_dir, out_dir, pid=None, page_size: int = 4096):
        self.base_dir = os.fspath(base_dir)
        self.out_dir = os.fspath(out_dir)
        self.pid = pid
        self.page_size = page_size
        self.result = None   # criu.WriteResult after a commit

    def begin(self, page_size: int):
        from . import criu
        if page_size != self.page_size:
            raise StreamError(f"stream page size {page_size} differs from the image set's "
                              f"{self.page_size}", offset=8)
        if os.path.exists(self.out_dir) and os.listdir(self.out_dir):
            raise StreamError(f"CRIU target {self.out_dir} exists and is not empty; give "
                              f"each stream a new output directory", offset=0)
        images = criu.ImageSet(self.base_dir, page_size)
        view = MemoryPageStore(page_size)
        view.addrs = np.ascontiguousarray(images.addresses(self.pid), dtype=np.uint64)
        view.pages = images.pages(self.pid)   # read-only view of the base's pages
        return _CriuTxn(self, view)


class _CriuTxn(_MemoryTxn):
    def __init__(self, target: CriuImageTarget, view: MemoryPageStore):
        super().__init__(view)
        self.target = target

    def commit(self):
        from . import criu
        if self.addr_blocks:
            addrs = np.concatenate(self.addr_blocks)
            pages = self._staged_pages()
        else:
            addrs = np.empty(0, np.uint64)
            pages = np.empty((0, self.store.page_size), np.uint8)
        self.target.result = criu.write_image_set(self.target.base_dir, self.target.out_dir,
                                                  addrs, pages, pid=self.target.pid)


_STORE_MAGIC = b"SSPSTORE"
_STORE_HEAD = struct.Struct("<8sIIQQ")   # magic, version, page_size, npages, index offset
_STORE_DATA = 4096                       # data starts here (page aligned for 4 KiB pages)


class FilePageStore:
    """A sparse page store in one file: header, page data in slot order, then the
    slot -> address index. A stream is applied to a copy (in-kernel copy),
    fsynced and renamed over the original, so the file is always either the old
    or the new state. ``get(addrs)`` reads pages; not thread-safe against apply().
    """

    def __init__(self, path, page_size: int = 4096):
        self.path = os.fspath(path)
        self.page_size = page_size
        if not os.path.exists(self.path):
            # An empty store, created under a fresh O_EXCL name and renamed into place.
            fd, tmp = temp_beside(self.path)
            try:
                _pwrite_all(fd, _STORE_HEAD.pack(_STORE_MAGIC, 1, page_size, 0, _STORE_DATA)
                            .ljust(_STORE_DATA, b"\0"), 0)
            except BaseException:
                discard(tmp, fd)
                raise
            atomic_replace(tmp, self.path, fd)
        self._load()

    def _load(self):
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_STORE_HEAD.size)
            if len(head) < _STORE_HEAD.size:
                raise StreamError(f"{self.path}: not a statesync page store (too short)", offset=0)
            magic, ver, ps, n, idx_off = _STORE_HEAD.unpack(head)
            if magic != _STORE_MAGIC or ver != 1:
                raise StreamError(f"{self.path}: not a statesync page store v1", offset=0)
            if ps != self.page_size:
                raise StreamError(f"{self.path}: page size {ps}, expected {self.page_size}",
                                  offset=12)
            if idx_off != _STORE_DATA + n * ps or idx_off + 8 * n != size:
                raise StreamError(f"{self.path}: index does not match the file size (damaged)",
                                  offset=16)
            f.seek(idx_off)
            slots_addr = np.frombuffer(f.read(8 * n), dtype=np.uint64).copy()
        order = np.argsort(slots_addr, kind="stable")
        self.n = n
        self.slot_addrs = slots_addr
        self.sorted_addrs = slots_addr[order]
        self.sorted_slots = order.astype(np.int64)

    def __len__(self):
        return int(self.n)

    def _slots(self, addrs, sorted_addrs, sorted_slots):
        if sorted_addrs.shape[0] == 0:
            return np.full(addrs.shape[0], -1, np.int64)
        pos = np.searchsorted(sorted_addrs, addrs)
        posc = np.minimum(pos, sorted_addrs.shape[0] - 1)
        hit = sorted_addrs[posc] == addrs
        return np.where(hit, sorted_slots[posc], -1)

    def get(self, addrs):
        addrs = np.ascontiguousarray(addrs, dtype=np.uint64)
        slots = self._slots(addrs, self.sorted_addrs, self.sorted_slots)
        out = np.zeros((addrs.shape[0], self.page_size), dtype=np.uint8)
        with open(self.path, "rb") as f:
            for j in np.flatnonzero(slots >= 0):
                os.preadv(f.fileno(), [out[j]], _STORE_DATA + int(slots[j]) * self.page_size)
        return out, slots >= 0

    def addresses(self) -> np.ndarray:
        return self.sorted_addrs.copy()

    def begin(self, page_size: int):
        if page_size != self.page_size:
            raise StreamError(f"stream page size {page_size} differs from the store's "
                              f"{self.page_size}", offset=8)
        return _StoreTxn(self)


class _StoreTxn(_CopyTxn):
    def __init__(self, s: FilePageStore):
        super().__init__(s.path)
        self.s = s
        self.n = s.n
        self.new_addrs = []          # addresses appended (slot n.. in order)
        self._new_sorted = np.empty(0, np.uint64)

    def _slots(self, addrs):
        slots = self.s._slots(addrs, self.s.sorted_addrs, self.s.sorted_slots)
        if self._new_sorted.size:
            # appended in increasing address order: slot = s.n + position
            pos = np.searchsorted(self._new_sorted, addrs)
            posc = np.minimum(pos, self._new_sorted.shape[0] - 1)
            hit = self._new_sorted[posc] == addrs
            slots = np.where(hit, self.s.n + posc, slots)
        return slots

    def read(self, addrs):
        addrs = np.ascontiguousarray(addrs, dtype=np.uint64)
        ps = self.s.page_size
        slots = self._slots(addrs)
        out = np.zeros((addrs.shape[0], ps), dtype=np.uint8)
        for j in np.flatnonzero(slots >= 0):
            os.preadv(self.fd, [out[j]], _STORE_DATA + int(slots[j]) * ps)
        return out, slots >= 0

    def write(self, addrs, pages):
        ps = self.s.page_size
        addrs = np.ascontiguousarray(addrs, dtype=np.uint64)
        slots = self._slots(addrs)
        new = slots < 0
        if new.any():
            k = int(new.sum())
            slots = slots.copy()
            slots[new] = np.arange(self.n, self.n + k)
            self.n += k
            self._new_sorted = np.concatenate([self._new_sorted, addrs[new]])
        order = np.argsort(slots, kind="stable")
        ss = slots[order]
        for s, n in _runs(ss):
            rows = order[s:s + n]
            buf = pages[rows[0]:rows[0] + n] if np.all(np.diff(rows) == 1) else pages[rows]
            os.pwritev(self.fd, [np.ascontiguousarray(buf)], _STORE_DATA + int(ss[s]) * ps)

    def _finish(self):
        s = self.s
        ps = s.page_size
        idx = np.concatenate([s.slot_addrs, self._new_sorted]).astype("<u8")
        idx_off = _STORE_DATA + self.n * ps
        os.ftruncate(self.fd, idx_off)
        _pwrite_all(self.fd, idx.tobytes(), idx_off)
        _pwrite_all(self.fd, _STORE_HEAD.pack(_STORE_MAGIC, 1, ps, self.n, idx_off), 0)

    def commit(self):
        super().commit()
        self.s._load()


# ---------------------------------------------------------------------------- CLI


def _cmd_stats(args) -> int:
    with open(args.file, "rb") as f:
        reader = StreamReader(f, max_block_pages=MAX_BLOCK_PAGES, max_pages=1 << 40,
                              max_block_bytes=args.max_block_mib << 20)
        n = 0
        while True:
            st = reader.apply(None)
            if st is None:
                break
            n += 1
            _print_stats(st, n, reader.offset - st.bytes_in)
        if n == 0:
            raise StreamError(f"{args.file}: empty file, no stream in it", offset=0)
    return 0


def _print_stats(st: StreamStats, n: int, offset: int):
    flags = ",".join(name for bit, name in ((FLAG_LZ4, "lz4"), (FLAG_XOR, "xor"),
                                            (FLAG_DEDUP, "dedup")) if st.flags & bit) or "-"
    print(f"stream {n} at byte {offset}: id {st.stream_id} round {st.round} "
          f"page size {st.page_size} options {flags}")
    print(f"  blocks {st.blocks}  records {st.records}  pages {st.total_pages}")
    print(f"  {'kind':<6}{'records':>10}{'pages':>12}{'share':>9}")
    for k in KIND_NAMES.values():
        share = st.pages[k] / st.total_pages if st.total_pages else 0.0
        print(f"  {k:<6}{st.records_by_kind[k]:>10}{st.pages[k]:>12}{share:>8.1%}")
    print(f"  page bytes {st.bytes_out}  record payload {st.payload_bytes}  stream bytes "
          f"{st.bytes_in}")
    if st.bytes_out:
        print(f"  stream/page bytes {st.ratio:.4f}  (saving {1 - st.ratio:.1%}); "
              f"payload/page bytes {st.payload_bytes / st.bytes_out:.4f}")


def cli_register(subparsers):
    p = subparsers.add_parser("stream", help="page-delta streams (wire format)")
    sub = p.add_subparsers(dest="stream_command", metavar="SUBCOMMAND")
    s = sub.add_parser("stats", help="check a stream file and print records per kind and ratios")
    s.add_argument("file", help="file holding one or more concatenated streams")
    s.add_argument("--max-block-mib", type=int, default=DEFAULT_MAX_BLOCK_BYTES >> 20,
                   metavar="MIB", help="refuse blocks larger than this (block pages x page "
                   "size, MiB; default %(default)s): bounds the memory the check uses")
    s.set_defaults(func=_cmd_stats)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


__all__ = ["Encoder", "encode", "apply", "inspect", "StreamReader", "StreamStats",
           "MemoryPageStore", "FilePageStore", "FileTarget", "CriuImageTarget", "Transaction",
           "MAGIC", "VERSION"]
