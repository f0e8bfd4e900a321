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

Targets: :class:`PageStore` / :class:`MemoryPageStore` (numpy, in memory; the
one page store of statesync, also the migration agents'), :class:`FilePageStore`
(one file, replaced atomically), :class:`FileTarget` (a plain file where the page
at address A lives at offset A - base), :class:`CriuImageTarget` (a CRIU image
set written with statesync.criu's writer). Any object with ``begin(page_size)``
returning a transaction with ``read``/``write``/``commit``/``abort`` works: the
Protocols :class:`PageTarget` and :class:`PageTransaction` say what is needed.

Many rounds over one connection: each round is its own stream (own header,
stream id, round number and END), and streams are simply concatenated on the
connection. A stream's DUP and XOR records may refer to pages the receiver got
in earlier rounds (they are part of its current content), and every such
reference is verified by hash, so a receiver whose copy diverged from what the
sender assumed gets a clean error instead of wrong memory.

Modules: :mod:`~statesync.stream.format` (constants, bounds, stats),
:mod:`~statesync.stream.encoder`, :mod:`~statesync.stream.decoder`,
:mod:`~statesync.stream.store` (the in-memory page store),
:mod:`~statesync.stream.targets` (the target Protocols, file and CRIU targets).
"""
from __future__ import annotations

from statesync.stream.decoder import StreamReader, apply, inspect
from statesync.stream.encoder import Encoder, encode
from statesync.stream.format import *  # noqa: F401,F403  (the format's constants)
from statesync.stream.format import MAGIC, VERSION, StreamStats
from statesync.stream.store import MemoryPageStore, PageStore
from statesync.stream.targets import (
                                      CriuImageTarget,
                                      FilePageStore,
                                      FileTarget,
                                      PageTarget,
                                      PageTransaction,
                                      Transaction,
)

__all__ = ["Encoder", "encode", "apply", "inspect", "StreamReader", "StreamStats",
           "PageStore", "MemoryPageStore", "FilePageStore", "FileTarget", "CriuImageTarget",
           "PageTarget", "PageTransaction", "Transaction", "MAGIC", "VERSION"]
