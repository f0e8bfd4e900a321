"""The stream decoder: bounded, atomic application of streams to a target."""
from __future__ import annotations

import zlib
from typing import Any, Optional, Union

import numpy as np

from statesync import _core
from statesync._util import sorted as _srt
from statesync.errors import StreamError
from statesync.stream.targets import PageTarget, PageTransaction
from statesync.stream.format import (
    _KNOWN_FLAGS,
    BLOCK,
    CODEC_LZ4,
    CODEC_NONE,
    DEFAULT_MAX_BLOCK_BYTES,
    DEFAULT_MAX_BLOCK_PAGES,
    DEFAULT_MAX_PAGES,
    END_BODY,
    FLAG_LZ4,
    HEADER,
    KIND_DATA,
    KIND_END,
    KIND_NAMES,
    MAGIC,
    MAX_BLOCK_PAGES,
    MAX_PAGE_SIZE,
    MIN_PAGE_SIZE,
    REC_DUP,
    REC_XOR,
    VERSION,
    StreamStats,
    _chain,
    _hash_lo,
    _payload_bound,
    _stored_bound,
)

# ---------------------------------------------------------------------------- decoder


class _Decoder:
    """Push parser of one stream. feed() consumes bytes up to the end of the END
    block and returns how many it used. Works with or without a transaction
    (without: parses and checks everything except XOR/DUP references)."""

    def __init__(self, target: Optional[PageTarget] = None,
                 max_block_pages=DEFAULT_MAX_BLOCK_PAGES,
                 max_pages=DEFAULT_MAX_PAGES, page_size=None,
                 max_block_bytes=DEFAULT_MAX_BLOCK_BYTES):
        self.target = target
        self.txn: Optional[PageTransaction] = None
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
                pos, hit = _srt.lookup(pagenos, src)
                inblk = (pos < di) & hit
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


def apply(chunks, target: PageTarget, *, max_block_pages: int = DEFAULT_MAX_BLOCK_PAGES,
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
        self._left: Union[bytes, memoryview] = b""
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

    def apply(self, target: Optional[PageTarget],
              _exclusive: bool = False) -> Optional[StreamStats]:
        dec = _Decoder(target, self.max_block_pages, self.max_pages,
                       max_block_bytes=self.max_block_bytes)
        started = False
        data: Any  # one chunk of the source: any bytes-like object
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
