"""The few CRIU image facts the migration engine needs, read from its own dumps.

The engine only reads images that CRIU just wrote on the same host (trusted), but the
readers still check every length against the data. Format facts: shared/FIELD-NOTES.md
("CRIU image format"). ``statesync.criu`` has the full reader/writer; this module is the
engine's minimal, dependency-free path for pagemaps and stats.
"""
from __future__ import annotations

import os
import re
import struct
from typing import Dict, List, Tuple

import numpy as np

from .errors import CriuImageError

IMG_COMMON_MAGIC = 0x54564319
PAGEMAP_MAGIC = 0x56084025
PE_PARENT, PE_LAZY, PE_PRESENT = 1, 2, 4


def pb_fields(buf: bytes, path=None, base: int = 0) -> Dict[int, list]:
    """Decode one protobuf message into {field number: [values]} (varints as ints,
    length-delimited fields as bytes, fixed64/32 as ints)."""
    out: Dict[int, list] = {}
    i, n = 0, len(buf)

    def varint(j):
        shift = val = 0
        while True:
            if j >= n:
                raise CriuImageError("truncated varint", path, base + j)
            b = buf[j]
            j += 1
            val |= (b & 0x7F) << shift
            if not b & 0x80:
                return val, j
            shift += 7
            if shift > 63:
                raise CriuImageError("varint too long", path, base + j)

    while i < n:
        key, i = varint(i)
        fno, wt = key >> 3, key & 7
        if wt == 0:
            v, i = varint(i)
        elif wt == 1:
            if i + 8 > n:
                raise CriuImageError("truncated fixed64", path, base + i)
            (v,) = struct.unpack_from("<Q", buf, i)
            i += 8
        elif wt == 2:
            ln, i = varint(i)
            if ln > n - i:
                raise CriuImageError(f"field length {ln} past the end", path, base + i)
            v = bytes(buf[i:i + ln])
            i += ln
        elif wt == 5:
            if i + 4 > n:
                raise CriuImageError("truncated fixed32", path, base + i)
            (v,) = struct.unpack_from("<I", buf, i)
            i += 4
        else:
            raise CriuImageError(f"unsupported wire type {wt}", path, base + i)
        out.setdefault(fno, []).append(v)
    return out


def read_entries(path: str, magic: int) -> List[Dict[int, list]]:
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise CriuImageError("file too short for its magic", path, 0)
    m0, m1 = struct.unpack_from("<II", data)
    if m0 != IMG_COMMON_MAGIC or m1 != magic:
        raise CriuImageError(f"bad magic {m0:#x} {m1:#x}", path, 0)
    off, entries = 8, []
    while off < len(data):
        if off + 4 > len(data):
            raise CriuImageError("truncated entry size", path, off)
        (sz,) = struct.unpack_from("<I", data, off)
        if sz > len(data) - off - 4:
            raise CriuImageError(f"entry size {sz} past the end", path, off)
        entries.append(pb_fields(data[off + 4:off + 4 + sz], path, off + 4))
        off += 4 + sz
    return entries


def read_pagemap(path: str) -> Tuple[int, np.ndarray]:
    """(pages_id, addresses of the PE_PRESENT pages in pages-file order)."""
    entries = read_entries(path, PAGEMAP_MAGIC)
    if not entries:
        raise CriuImageError("no pagemap head", path, 8)
    pages_id = int(entries[0].get(1, [0])[0])
    runs = []
    for e in entries[1:]:
        vaddr = int(e.get(1, [0])[0])
        nr = int(e.get(5, e.get(2, [0]))[0])
        if 4 in e:
            flags = int(e[4][0])
        else:
            flags = PE_PARENT if (3 in e and e[3][0]) else PE_PRESENT
        if flags & PE_PRESENT and nr:
            runs.append(np.uint64(vaddr) + np.arange(nr, dtype=np.uint64) * np.uint64(4096))
    addrs = np.concatenate(runs) if runs else np.zeros(0, dtype=np.uint64)
    return pages_id, addrs


def find_pagemaps(images_dir: str) -> Dict[str, str]:
    """{pagemap file name: pages file name} for process pagemaps (pagemap-<pid>.img)."""
    out = {}
    for name in os.listdir(images_dir):
        if re.fullmatch(r"pagemap-\d+\.img", name):
            pid, _ = read_pagemap(os.path.join(images_dir, name))
            out[name] = f"pages-{pid}.img"
    return out


# stats.proto: StatsEntry {1: dump DumpStatsEntry, 2: restore RestoreStatsEntry}
_DUMP_STATS = {1: "freezing_time_us", 2: "frozen_time_us", 3: "memdump_time_us",
               4: "memwrite_time_us", 5: "pages_scanned", 6: "pages_skipped_parent",
               7: "pages_written", 9: "pages_lazy"}
_RESTORE_STATS = {1: "pages_compared", 2: "pages_skipped_cow", 3: "forking_time_us",
                  4: "restore_time_us", 5: "pages_restored"}


def read_stats(path: str) -> Dict[str, int]:
    """CRIU's ``stats-dump``/``stats-restore`` as a flat dict (times in microseconds).
    Empty dict if the file is missing or unreadable: stats are informative only."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return {}
    # The stats file has one magic (no common magic) then one entry.
    for off in (4, 8):
        try:
            (sz,) = struct.unpack_from("<I", data, off)
            if sz != len(data) - off - 4:
                continue
            top = pb_fields(data[off + 4:], path, off + 4)
        except (struct.error, CriuImageError):
            continue
        out: Dict[str, int] = {}
        for fno, names in ((1, _DUMP_STATS), (2, _RESTORE_STATS)):
            if fno in top:
                sub = pb_fields(top[fno][0], path)
                out.update({names[k]: int(v[0]) for k, v in sub.items() if k in names})
        return out
    return {}
