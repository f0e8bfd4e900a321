"""Stream format constants and bounds (docs/stream-format.md), and the stats type."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Dict, Tuple

from statesync import _core

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
