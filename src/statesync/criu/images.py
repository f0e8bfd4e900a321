"""CRIU image files: our own reader and writer for the few messages statesync needs.

Package-private; :mod:`statesync.criu` is the public face.

Why a small protobuf codec of our own instead of the ``protobuf`` package and CRIU's
``.proto`` files: we touch five messages (PagemapHead, PagemapEntry, MmEntry/VmaEntry,
PstreeEntry, InventoryEntry and the stats) and only their scalar fields; the decoder is
~60 lines whose every length is checked against the bytes really present, so a
malformed file gives a :class:`CriuImageError` with file and offset instead of a
library exception without a location; and statesync does not need generated code or
a protobuf runtime whose major versions break compatibility. Unknown fields are
skipped (as protobuf does), so images of newer CRIU versions still read.

Image file layout (CRIU ``criu/include/magic.h`` and ``images/*.proto``): a u32
``IMG_COMMON_MAGIC`` (or ``IMG_SERVICE_MAGIC`` for stats), then the image's own u32
magic (``inventory.img`` has only its own magic), then entries, each a u32
little-endian size followed by that many bytes of protobuf. ``pages-N.img`` is raw
pages with no header.
"""
from __future__ import annotations

import os
import stat
import struct
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np

from statesync._util import sorted as _srt
from statesync.errors import CriuImageError

IMG_COMMON_MAGIC = 0x54564319
IMG_SERVICE_MAGIC = 0x55105940
INVENTORY_MAGIC = 0x58313116
PAGEMAP_MAGIC = 0x56084025
MM_MAGIC = 0x57492820
PSTREE_MAGIC = 0x50273030
STATS_MAGIC = 0x57093306

PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2

# A pagemap entry's nr_pages is a u32 in every CRIU release so far; runs we write are
# split so that they always fit it.
MAX_RUN_PAGES = 0xFFFFFFFF

_U32 = struct.Struct("<I")

# --------------------------------------------------------------------------- protobuf


def open_regular(path) -> int:
    """An O_RDONLY fd of ``path`` after checking, on the opened fd, that it is a
    regular file: a FIFO (opened O_NONBLOCK, so the open itself cannot hang), a
    device (/dev/zero) or a directory is refused with a one-line CriuImageError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CriuImageError("image file missing", path) from None
    except OSError as exc:
        raise CriuImageError(f"cannot open: {exc.strerror}", path) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket"
                if stat.S_ISSOCK(mode) else "not a regular file")
        raise CriuImageError(f"is {kind}, not a regular image file: refusing to read it", path)
    os.set_blocking(fd, True)
    return fd


def read_regular(path) -> bytes:
    """The whole content of a regular image file, never more than its size at open."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        parts, got = [], 0
        while got < size:
            b = os.read(fd, min(size - got, 1 << 24))
            if not b:
                break
            parts.append(b)
            got += len(b)
        return b"".join(parts)
    except OSError as exc:
        raise CriuImageError(f"cannot read: {exc.strerror}", path) from None
    finally:
        os.close(fd)


def _varint(buf: bytes, pos: int, end: int, path, base: int) -> Tuple[int, int]:
    """Decode a varint at buf[pos:end]. ``base`` is buf's offset in the file (for errors)."""
    result = 0
    shift = 0
    start = pos
    while True:
        if pos >= end:
            raise CriuImageError("truncated varint", path, base + start)
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            # Protobuf keeps the low 64 bits of an over-long varint; so do we, so a
            # value never overflows the uint64 arrays it goes into.
            return result & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7
        if shift >= 70:
            raise CriuImageError("varint longer than 10 bytes", path, base + start)


def decode_fields(buf: bytes, start: int, end: int, path, base: int = 0
                  ) -> Iterator[Tuple[int, int, Any, int]]:
    """Yield (field_number, wire_type, value, offset) of a protobuf message in
    buf[start:end]. Varint and fixed values are ints; length-delimited values are
    (begin, end) index pairs into buf. Offsets are file offsets (buf index + base)."""
    pos = start
    val: Any  # an int, or for wire type 2 a (begin, end) pair
    while pos < end:
        off = pos
        key, pos = _varint(buf, pos, end, path, base)
        field, wt = key >> 3, key & 7
        if field == 0:
            raise CriuImageError("protobuf field number 0", path, base + off)
        if wt == 0:
            val, pos = _varint(buf, pos, end, path, base)
        elif wt == 1:
            if pos + 8 > end:
                raise CriuImageError("truncated fixed64 field", path, base + off)
            val = int.from_bytes(buf[pos:pos + 8], "little")
            pos += 8
        elif wt == 5:
            if pos + 4 > end:
                raise CriuImageError("truncated fixed32 field", path, base + off)
            val = int.from_bytes(buf[pos:pos + 4], "little")
            pos += 4
        elif wt == 2:
            ln, pos = _varint(buf, pos, end, path, base)
            if ln > end - pos:
                raise CriuImageError(f"field {field} length {ln} runs past the end of its "
                                     f"message ({end - pos} bytes left)", path, base + off)
            val = (pos, pos + ln)
            pos += ln
        else:
            raise CriuImageError(f"unsupported protobuf wire type {wt} (field {field})",
                                 path, base + off)
        yield field, wt, val, base + off


def enc_varint(v: int) -> bytes:
    if v < 0:
        v &= (1 << 64) - 1
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def enc_field_varint(field: int, v: int) -> bytes:
    return enc_varint(field << 3) + enc_varint(v)


def _zigzag_dec(v: int) -> int:
    return (v >> 1) ^ -(v & 1)


def _as_u32(v: int, what: str, path, off: int) -> int:
    if v > 0xFFFFFFFF:
        raise CriuImageError(f"{what} {v} does not fit in 32 bits", path, off)
    return v


# --------------------------------------------------------------------------- files


class ImageFile:
    """An image file read whole: its magic and the (offset, begin, end) spans of its
    entries. Image files other than pages-N.img are small (kilobytes), so reading
    them is bounded by the real file size, never by a field inside them."""

    def __init__(self, path, magic: int, service: bool = False):
        self.path = str(path)
        self.data = read_regular(path)
        d = self.data
        pos = 0
        if magic != INVENTORY_MAGIC:
            first = IMG_SERVICE_MAGIC if service else IMG_COMMON_MAGIC
            if len(d) < 4:
                raise CriuImageError("truncated: no image header", path, 0)
            got = _U32.unpack_from(d, 0)[0]
            if got != first:
                raise CriuImageError(f"wrong header magic {got:#x}, expected {first:#x} "
                                     "(not a CRIU image?)", path, 0)
            pos = 4
        if len(d) < pos + 4:
            raise CriuImageError("truncated: no image magic", path, pos)
        got = _U32.unpack_from(d, pos)[0]
        if got != magic:
            raise CriuImageError(f"wrong image magic {got:#x}, expected {magic:#x}", path, pos)
        pos += 4
        self.entries: List[Tuple[int, int, int]] = []
        while pos < len(d):
            if len(d) - pos < 4:
                raise CriuImageError(f"truncated entry size ({len(d) - pos} bytes left)", path, pos)
            size = _U32.unpack_from(d, pos)[0]
            if size > len(d) - pos - 4:
                raise CriuImageError(f"entry size {size} runs past the end of the file "
                                     f"({len(d) - pos - 4} bytes left)", path, pos)
            self.entries.append((pos, pos + 4, pos + 4 + size))
            pos += 4 + size

    def fields(self, i: int):
        off, b, e = self.entries[i]
        return decode_fields(self.data, b, e, self.path)


def _message(img: ImageFile, idx: int, spec: Dict[int, str]) -> dict:
    """Decode entry idx into a dict of the varint fields named in spec."""
    out = {}
    for field, wt, val, _off in img.fields(idx):
        name = spec.get(field)
        if name is not None and wt == 0:
            out[name] = val
    return out


def read_inventory(path) -> dict:
    img = ImageFile(path, INVENTORY_MAGIC)
    if not img.entries:
        raise CriuImageError("inventory has no entry", path, 8)
    inv = _message(img, 0, {1: "img_version", 2: "fdinfo_per_id", 4: "ns_per_id",
                            5: "root_cg_set", 6: "lsmtype", 8: "dump_uptime",
                            9: "pre_dump_mode", 10: "tcp_close", 11: "network_lock_method"})
    for field, wt, val, _off in img.fields(0):
        if field == 13 and wt == 2:
            inv["dump_criu_run_id"] = img.data[val[0]:val[1]].decode("utf-8", "replace")
    if "img_version" not in inv:
        raise CriuImageError("inventory lacks img_version", path, img.entries[0][0])
    return inv


def read_pstree(path) -> List[dict]:
    img = ImageFile(path, PSTREE_MAGIC)
    out = []
    for i in range(len(img.entries)):
        e = _message(img, i, {1: "pid", 2: "ppid", 3: "pgid", 4: "sid"})
        threads = []
        for field, wt, val, _off in img.fields(i):
            if field == 5:
                if wt == 0:
                    threads.append(val)
                elif wt == 2:  # packed repeated
                    p, end = val
                    while p < end:
                        t, p = _varint(img.data, p, end, path, 0)
                        threads.append(t)
        e["threads"] = threads
        if "pid" not in e:
            raise CriuImageError("pstree entry without pid", path, img.entries[i][0])
        out.append(e)
    return out


_STATS_DUMP = {1: "freezing_time", 2: "frozen_time", 3: "memdump_time", 4: "memwrite_time",
               5: "pages_scanned", 6: "pages_skipped_parent", 7: "pages_written",
               8: "irmap_resolve", 9: "pages_lazy", 10: "page_pipes", 11: "page_pipe_bufs",
               12: "shpages_scanned", 13: "shpages_skipped_parent", 14: "shpages_written"}
_STATS_RESTORE = {1: "pages_compared", 2: "pages_skipped_cow", 3: "forking_time",
                  4: "restore_time", 5: "pages_restored"}


def read_stats(path) -> dict:
    """stats-dump / stats-restore as a flat dict (times in microseconds)."""
    img = ImageFile(path, STATS_MAGIC, service=True)
    out: dict = {}
    for i in range(len(img.entries)):
        for field, wt, val, _off in img.fields(i):
            if wt != 2 or field not in (1, 2):
                continue
            spec = _STATS_DUMP if field == 1 else _STATS_RESTORE
            for f2, wt2, v2, _ in decode_fields(img.data, val[0], val[1], path):
                if wt2 == 0 and f2 in spec:
                    out[spec[f2]] = v2
    return out


VMA_DTYPE = np.dtype([("start", "<u8"), ("end", "<u8"), ("pgoff", "<u8"), ("shmid", "<u8"),
                      ("prot", "<u4"), ("flags", "<u4"), ("status", "<u4"), ("fd", "<i4"),
                      ("madv", "<u8"), ("fdflags", "<u4")])
_VMA_FIELDS = {1: "start", 2: "end", 3: "pgoff", 4: "shmid", 5: "prot", 6: "flags",
               7: "status", 8: "fd", 9: "madv", 10: "fdflags"}


def read_mm(path) -> Tuple[dict, np.ndarray]:
    """(mm fields, VMAs as a structured array with VMA_DTYPE fields)."""
    img = ImageFile(path, MM_MAGIC)
    if not img.entries:
        raise CriuImageError("mm image has no entry", path, 8)
    mm: dict = {}
    rows = []
    for field, wt, val, off in img.fields(0):
        if field == 14 and wt == 2:
            v: Dict[str, int] = {}
            for f2, wt2, v2, _off2 in decode_fields(img.data, val[0], val[1], path):
                name = _VMA_FIELDS.get(f2)
                if name and wt2 == 0:
                    v[name] = _zigzag_dec(v2) if name == "fd" else v2
            for need in ("start", "end"):
                if need not in v:
                    raise CriuImageError(f"VMA without {need}", path, off)
            if v["end"] < v["start"] or v["end"] >= 1 << 64:
                raise CriuImageError(f"VMA end {v['end']:#x} below start {v['start']:#x}",
                                     path, off)
            if not -(1 << 31) <= v.get("fd", 0) < (1 << 31):
                raise CriuImageError("VMA fd out of range", path, off)
            for k in ("prot", "flags", "status", "fdflags"):
                v[k] = v.get(k, 0) & 0xFFFFFFFF
            rows.append(tuple(v.get(n, 0) for n in VMA_DTYPE.names or ()))
        elif wt == 0 and field <= 12:
            mm[{1: "mm_start_code", 2: "mm_end_code", 3: "mm_start_data", 4: "mm_end_data",
                5: "mm_start_stack", 6: "mm_start_brk", 7: "mm_brk", 8: "mm_arg_start",
                9: "mm_arg_end", 10: "mm_env_start", 11: "mm_env_end",
                12: "exe_file_id"}[field]] = val
    vmas = np.array(rows, dtype=VMA_DTYPE)
    vmas.sort(order="start")
    return mm, vmas


class Pagemap:
    """A parsed pagemap-*.img: ``pages_id`` and the entries as numpy arrays ``vaddr``
    (uint64), ``nr_pages`` (uint64), ``flags`` (uint32, old ``in_parent`` mapped to
    PE_PARENT, a missing flags field to PE_PRESENT) and ``offsets`` (int64 file offset of
    each entry, for error messages). Validated: entries sorted, page-aligned, non-empty,
    not overlapping, no address overflow, each with PE_PRESENT or PE_PARENT but not
    both."""

    def __init__(self, path, page_size: int):
        from statesync import _core

        self.path = str(path)
        data = read_regular(path)
        for off, want, what in ((0, IMG_COMMON_MAGIC, "header"), (4, PAGEMAP_MAGIC, "image")):
            if len(data) < off + 4:
                raise CriuImageError(f"truncated: no {what} magic", path, off)
            got = _U32.unpack_from(data, off)[0]
            if got != want:
                raise CriuImageError(f"wrong {what} magic {got:#x}, expected {want:#x} "
                                     "(not a CRIU pagemap image?)", path, off)
        # The head (first entry) in Python, the many run entries in C.
        if len(data) < 12:
            raise CriuImageError("pagemap has no head entry", path, 8)
        size = _U32.unpack_from(data, 8)[0]
        if size > len(data) - 12:
            raise CriuImageError(f"entry size {size} runs past the end of the file "
                                 f"({len(data) - 12} bytes left)", path, 8)
        head = {}
        for field, wt, val, _off in decode_fields(data, 12, 12 + size, path):
            if field == 1 and wt == 0:
                head["pages_id"] = val
        if "pages_id" not in head:
            raise CriuImageError("pagemap head lacks pages_id", path, 8)
        self.pages_id = _as_u32(head["pages_id"], "pages_id", path, 8)
        res = _core.pagemap_decode(data, 12 + size)
        if res[0] is None:
            _, msg, off, eoff = res
            raise CriuImageError(f"{msg} (entry at byte {eoff})", path, int(off))
        vaddr, nr, flags, offsets, self.wide = res
        self.vaddr, self.nr_pages, self.flags = vaddr, nr, flags
        self.offsets = offsets.astype(np.int64)
        self._validate(page_size)

    def _validate(self, page_size: int) -> None:
        """Vectorised checks; the first offending entry (lowest index) is reported."""
        va, nr, fl = self.vaddr, self.nr_pages, self.flags
        n = va.size
        if n == 0:
            return
        ps = np.uint64(page_size)
        checks = []
        checks.append((va % ps != 0, lambda i: f"vaddr {int(va[i]):#x} is not page-aligned"))
        checks.append((nr == 0, lambda i: f"run at {int(va[i]):#x} has nr_pages 0"))
        # Pages available from an aligned vaddr to the top of the 64-bit space.
        room = (np.uint64(2**64 - 1) - va) // ps + np.uint64(1)
        checks.append((nr > room, lambda i: f"{int(va[i]):#x} + {int(nr[i])} pages passes the end "
                                            "of the address space"))
        end = va + np.minimum(nr, room) * ps          # wraps to 0 exactly at 2**64
        bad_order = np.zeros(n, dtype=bool)
        bad_order[1:] = (va[1:] < end[:-1]) | ((end[:-1] == 0) & (nr[:-1] > 0))
        checks.append((bad_order, lambda i: f"run at {int(va[i]):#x} overlaps or is out of order "
                                            f"(previous run ends at {int(end[i - 1]):#x})"))
        pres = (fl & PE_PRESENT) != 0
        par = (fl & PE_PARENT) != 0
        checks.append((pres & par, lambda i: f"run at {int(va[i]):#x} is both PE_PRESENT and "
                                             "PE_PARENT"))
        checks.append((~pres & ~par, lambda i: f"run at {int(va[i]):#x} has neither PE_PRESENT "
                                               f"nor PE_PARENT (flags {int(fl[i]):#x}; lazy-pages "
                                               "dumps without data are not supported)"))
        first = None
        for mask, msg in checks:
            idx = np.flatnonzero(mask)
            if idx.size and (first is None or idx[0] < first[0]):
                first = (int(idx[0]), msg)
        if first is not None:
            i, msg = first
            raise CriuImageError(f"pagemap entry {i}: " + msg(i), self.path, int(self.offsets[i]))

    @property
    def present_pages(self) -> int:
        return int(self.nr_pages[(self.flags & PE_PRESENT) != 0].sum())


def encode_pagemap(pages_id: int, vaddr: np.ndarray, nr_pages: np.ndarray,
                   flags: np.ndarray, wide: bool = False) -> bytes:
    """A pagemap image: head then one entry per run, fields in the order CRIU writes
    them. ``wide=False``: vaddr, nr_pages (field 2, u32), flags, as CRIU <= 4.1 writes
    and reads. ``wide=True``: vaddr, compat_nr_pages = 0, flags, nr_pages (field 5,
    u64), as CRIU >= 4.2 writes (it reads both). No in_parent (CRIU >= 1.x uses flags)."""
    parts = [_U32.pack(IMG_COMMON_MAGIC), _U32.pack(PAGEMAP_MAGIC)]
    head = enc_field_varint(1, int(pages_id))
    parts += [_U32.pack(len(head)), head]
    from statesync import _core
    parts.append(_core.pagemap_encode(np.ascontiguousarray(vaddr, dtype=np.uint64),
                                      np.ascontiguousarray(nr_pages, dtype=np.uint64),
                                      np.ascontiguousarray(flags, dtype=np.uint32), wide))
    return b"".join(parts)


def expand_runs(vaddr: np.ndarray, nr: np.ndarray, page_size: int) -> np.ndarray:
    """Page addresses of runs (vaddr, nr pages each), as one uint64 array. The caller
    bounds nr.sum() by real data before calling (this allocates that many entries)."""
    return _srt.expand_runs(vaddr, nr, page_size)


def run_breaks(addrs: np.ndarray, page_size: int, *keys: np.ndarray) -> np.ndarray:
    """Indices where a new run starts: address discontinuity or any key changes."""
    n = addrs.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    brk = np.ones(n, dtype=bool)
    brk[1:] = addrs[1:] != addrs[:-1] + np.uint64(page_size)
    for k in keys:
        brk[1:] |= k[1:] != k[:-1]
    return np.flatnonzero(brk)


def pagemap_files(directory) -> List[str]:
    """pagemap-*.img names in a directory, sorted."""
    return sorted(n for n in os.listdir(directory)
                  if n.startswith("pagemap-") and n.endswith(".img"))


def is_task_pagemap(name: str) -> bool:
    """True for a process's pagemap-PID.img (not a shared-memory pagemap-shmem-*)."""
    return name[len("pagemap-"):-len(".img")].isdigit()
