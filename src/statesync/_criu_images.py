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
import struct
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from ._fsutil import atomic_replace, fsync_dir
from .errors import CriuImageError

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
                  ) -> Iterator[Tuple[int, int, object, int]]:
    """Yield (field_number, wire_type, value, offset) of a protobuf message in
    buf[start:end]. Varint and fixed values are ints; length-delimited values are
    (begin, end) index pairs into buf. Offsets are file offsets (buf index + base)."""
    pos = start
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
        try:
            with open(path, "rb") as f:
                self.data = f.read()
        except FileNotFoundError:
            raise CriuImageError("image file missing", path) from None
        except OSError as exc:
            raise CriuImageError(f"cannot read: {exc.strerror}", path) from None
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
    for field, wt, val, off in img.fields(idx):
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
    for field, wt, val, off in img.fields(0):
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
        for field, wt, val, off in img.fields(i):
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
        for field, wt, val, off in img.fields(i):
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
            v = {}
            for f2, wt2, v2, off2 in decode_fields(img.data, val[0], val[1], path):
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
            rows.append(tuple(v.get(n, 0) for n in VMA_DTYPE.names))
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
        from . import _core

        self.path = str(path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise CriuImageError("image file missing", path) from None
        except OSError as exc:
            raise CriuImageError(f"cannot read: {exc.strerror}", path) from None
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
        for field, wt, val, off in decode_fields(data, 12, 12 + size, path):
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
    from . import _core
    parts.append(_core.pagemap_encode(np.ascontiguousarray(vaddr, dtype=np.uint64),
                                      np.ascontiguousarray(nr_pages, dtype=np.uint64),
                                      np.ascontiguousarray(flags, dtype=np.uint32), wide))
    return b"".join(parts)


def expand_runs(vaddr: np.ndarray, nr: np.ndarray, page_size: int) -> np.ndarray:
    """Page addresses of runs (vaddr, nr pages each), as one uint64 array. The caller
    bounds nr.sum() by real data before calling (this allocates that many entries)."""
    total = int(nr.sum())
    if total == 0:
        return np.zeros(0, dtype=np.uint64)
    nr64 = nr.astype(np.int64)
    run_idx = np.repeat(np.arange(nr.size), nr64)
    first = np.cumsum(nr64) - nr64
    within = np.arange(total, dtype=np.int64) - first[run_idx]
    return vaddr[run_idx] + within.astype(np.uint64) * np.uint64(page_size)


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


# --------------------------------------------------------------------------- image sets

MAX_CHAIN = 64  # deeper parent chains are refused (CRIU itself has no limit; loops do)


class PageTable:
    """The resolved pages of one pagemap across a parent chain.

    ``addrs`` (uint64, sorted) are page addresses; page i's content is row ``row[i]``
    of ``sources[src[i]]`` (``src`` int32, ``row`` int64); ``entry[i]`` is the index
    of the entry of this level's pagemap it came from and ``flags[i]`` that entry's
    flags. ``sources`` are read-only (rows, page_size) views of pages-N.img mmaps."""

    __slots__ = ("addrs", "src", "row", "entry", "flags", "sources")

    def __init__(self, addrs, src, row, entry, flags, sources):
        self.addrs, self.src, self.row = addrs, src, row
        self.entry, self.flags, self.sources = entry, flags, sources

    def contiguous_source(self) -> Optional[np.ndarray]:
        """The (n, page_size) array holding exactly these pages in order, when one
        source does (a full dump): a zero-copy view. Else None."""
        n = self.addrs.size
        if n == 0:
            return None
        if not (self.src == 0).all():
            return None
        r0 = int(self.row[0])
        if not np.array_equal(self.row, np.arange(r0, r0 + n, dtype=np.int64)):
            return None
        return self.sources[0][r0:r0 + n]


def _map_pages(path, page_size: int) -> np.ndarray:
    """Read-only (rows, page_size) view of a pages file via mmap (empty when the file is
    empty or missing; the caller checks the row count against the pagemap)."""
    import mmap
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return np.zeros((0, page_size), dtype=np.uint8)
    except OSError as exc:
        raise CriuImageError(f"cannot open: {exc.strerror}", path) from None
    try:
        size = os.fstat(fd).st_size
        rows = size // page_size
        if rows == 0:
            return np.zeros((0, page_size), dtype=np.uint8)
        m = mmap.mmap(fd, rows * page_size, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        m.madvise(mmap.MADV_SEQUENTIAL)
    except (AttributeError, OSError):
        pass
    return np.frombuffer(m, dtype=np.uint8).reshape(rows, page_size)


class ImageSet:
    """A CRIU image directory (see :class:`statesync.criu.ImageSet` for the public
    contract)."""

    def __init__(self, path, page_size: int = 4096, _seen=None):
        self.path = os.path.abspath(os.fspath(path))
        self.page_size = int(page_size)
        if not os.path.isdir(self.path):
            raise CriuImageError("not a directory", self.path)
        inv = os.path.join(self.path, "inventory.img")
        if not os.path.exists(inv):
            raise CriuImageError("not a CRIU image directory (no inventory.img)", self.path)
        self.inventory = read_inventory(inv)
        self.parent: Optional[ImageSet] = None
        seen = set(_seen or ())
        real = os.path.realpath(self.path)
        seen.add(real)
        link = os.path.join(self.path, "parent")
        if os.path.lexists(link):
            target = os.path.realpath(link)
            if not os.path.isdir(target):
                raise CriuImageError(f"parent link points to {os.readlink(link)!r}, which is not "
                                     "an image directory (missing parent image set?)", link)
            if target in seen:
                raise CriuImageError(f"parent chain loops back to {target}", link)
            if len(seen) >= MAX_CHAIN:
                raise CriuImageError(f"parent chain deeper than {MAX_CHAIN} image sets", link)
            self.parent = ImageSet(target, page_size, seen)
        self._pagemaps: Dict[str, Pagemap] = {}
        self._tables: Dict[str, PageTable] = {}
        self._pages: Dict[int, np.ndarray] = {}
        self._pstree = None

    # -- structure

    @property
    def chain(self) -> List[str]:
        out, s = [], self
        while s is not None:
            out.append(s.path)
            s = s.parent
        return out

    @property
    def pagemap_names(self) -> List[str]:
        return pagemap_files(self.path)

    @property
    def pstree(self) -> List[dict]:
        if self._pstree is None:
            self._pstree = read_pstree(os.path.join(self.path, "pstree.img"))
        return self._pstree

    @property
    def root_pid(self) -> int:
        """The dumped root task's pid (in its pid namespace), from pstree.img."""
        tree = self.pstree
        if not tree:
            raise CriuImageError("pstree has no task", os.path.join(self.path, "pstree.img"))
        return int(tree[0]["pid"])

    def pids(self) -> List[int]:
        return [int(e["pid"]) for e in self.pstree]

    def _name(self, pid) -> str:
        if isinstance(pid, str):
            return pid
        if pid is None:
            names = [n for n in self.pagemap_names if is_task_pagemap(n)]
            if len(names) == 1:
                return names[0]
            pid = self.root_pid
        return f"pagemap-{int(pid)}.img"

    def pagemap(self, pid=None) -> Pagemap:
        name = self._name(pid)
        pm = self._pagemaps.get(name)
        if pm is None:
            pm = Pagemap(os.path.join(self.path, name), self.page_size)
            self._pagemaps[name] = pm
        return pm

    def vmas(self, pid=None) -> np.ndarray:
        name = self._name(pid)
        return read_mm(os.path.join(self.path, "mm-" + name[len("pagemap-"):]))[1]

    def _pages_file(self, pages_id: int) -> np.ndarray:
        arr = self._pages.get(pages_id)
        if arr is None:
            arr = _map_pages(os.path.join(self.path, f"pages-{pages_id}.img"), self.page_size)
            self._pages[pages_id] = arr
        return arr

    # -- resolved pages

    def table(self, pid=None) -> PageTable:
        name = self._name(pid)
        t = self._tables.get(name)
        if t is not None:
            return t
        pm = self.pagemap(name)
        ps = self.page_size
        pages = self._pages_file(pm.pages_id)
        pages_path = os.path.join(self.path, f"pages-{pm.pages_id}.img")
        present = (pm.flags & PE_PRESENT) != 0
        # Every count below is checked against real data before anything is sized by it.
        cum = np.cumsum(np.where(present, pm.nr_pages, 0).astype(np.uint64))
        if cum.size and int(cum[-1]) > pages.shape[0]:
            i = int(np.searchsorted(cum, np.uint64(pages.shape[0]), side="right"))
            raise CriuImageError(
                f"pagemap entry {i} at {int(pm.vaddr[i]):#x} needs pages up to #{int(cum[i])} but "
                f"{os.path.basename(pages_path)} holds {pages.shape[0]} pages", pm.path,
                int(pm.offsets[i]))
        parent_n = int(pm.nr_pages[~present].sum())
        pt = None
        if parent_n:
            first = int(np.flatnonzero(~present)[0])
            where = (pm.path, int(pm.offsets[first]))
            if self.parent is None:
                raise CriuImageError(f"PE_PARENT run at {int(pm.vaddr[first]):#x} but the image "
                                     "set has no parent link", *where)
            try:
                pt = self.parent.table(name)
            except CriuImageError as exc:
                if exc.offset is None and not os.path.exists(os.path.join(self.parent.path, name)):
                    raise CriuImageError(f"PE_PARENT runs but the parent {self.parent.path} has no "
                                         f"{name}", *where) from None
                raise
            if parent_n > pt.addrs.size:
                raise CriuImageError(f"{parent_n} pages marked PE_PARENT but the parent chain holds "
                                     f"only {pt.addrs.size} pages", *where)
        addrs = expand_runs(pm.vaddr, pm.nr_pages, ps)
        entry = np.repeat(np.arange(pm.vaddr.size, dtype=np.int64), pm.nr_pages.astype(np.int64))
        page_present = present[entry]
        n = addrs.size
        src = np.zeros(n, dtype=np.int32)
        row = np.zeros(n, dtype=np.int64)
        row[page_present] = np.arange(int(page_present.sum()), dtype=np.int64)
        sources = [pages]
        if pt is not None:
            sel = ~page_present
            want = addrs[sel]
            pos = np.searchsorted(pt.addrs, want)
            ok = pos < pt.addrs.size
            ok[ok] = pt.addrs[pos[ok]] == want[ok]
            if not ok.all():
                bad = int(np.flatnonzero(~ok)[0])
                e = int(entry[np.flatnonzero(sel)[bad]])
                raise CriuImageError(f"page {int(want[bad]):#x} is marked PE_PARENT but the parent "
                                     f"chain ({self.parent.path}) has no such page", pm.path,
                                     int(pm.offsets[e]))
            src[sel] = pt.src[pos] + 1
            row[sel] = pt.row[pos]
            sources = [pages] + pt.sources
        t = PageTable(addrs, src, row, entry, pm.flags[entry], sources)
        self._tables[name] = t
        return t

    def addresses(self, pid=None) -> np.ndarray:
        return self.table(pid).addrs

    def pages(self, pid=None) -> np.ndarray:
        t = self.table(pid)
        view = t.contiguous_source()
        if view is not None:
            return view
        from . import _core
        return _core.pages_gather(t.sources, t.src, t.row, self.page_size)

    def read(self, addrs, pid=None) -> np.ndarray:
        t = self.table(pid)
        addrs = np.asarray(addrs, dtype=np.uint64)
        pos = np.searchsorted(t.addrs, addrs)
        ok = pos < t.addrs.size
        ok[ok] = t.addrs[pos[ok]] == addrs[ok]
        if not ok.all():
            raise KeyError(f"page {int(addrs[~ok][0]):#x} is not in image set {self.path}")
        from . import _core
        return _core.pages_gather(t.sources, t.src[pos], t.row[pos], self.page_size)


# --------------------------------------------------------------------------- writing

_SKIP_COPY_SUFFIX = (".log",)


def _fsync_write(path: str, chunks) -> int:
    n = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        for c in chunks:
            mv = memoryview(c).cast("B")
            while mv:
                w = os.write(fd, mv)
                n += w
                mv = mv[w:]
        os.fsync(fd)
    finally:
        os.close(fd)
    return n


class AtomicDir:
    """Build a directory under a temporary name next to its final place; on success
    fsync everything and rename it into place, on failure remove it. The final
    directory must not exist (or be empty)."""

    def __init__(self, final: str):
        self.final = os.path.abspath(os.fspath(final))
        if os.path.lexists(self.final):
            if not os.path.isdir(self.final) or os.listdir(self.final):
                raise FileExistsError(f"{self.final} already exists and is not an empty directory; "
                                      "choose a new output directory")
        parent = os.path.dirname(self.final)
        os.makedirs(parent, exist_ok=True)
        import tempfile
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.final)}.tmp-", dir=parent)

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        import shutil
        if et is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        try:
            fsync_dir(self.tmp)
            atomic_replace(self.tmp, self.final)   # replaces an empty final dir atomically
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return False


def _copy_file(src: str, dst: str) -> None:
    with open(src, "rb") as f:
        def chunks():
            while True:
                b = f.read(1 << 20)
                if not b:
                    return
                yield b
        _fsync_write(dst, chunks())


def copy_non_memory(src_dir: str, dst_dir: str) -> None:
    """Copy every image of src_dir except pagemaps, pages, logs and the parent link."""
    for name in sorted(os.listdir(src_dir)):
        p = os.path.join(src_dir, name)
        if (name == "parent" or name.startswith("pagemap-") or
                (name.startswith("pages-") and name.endswith(".img")) or
                name.endswith(_SKIP_COPY_SUFFIX) or not os.path.isfile(p) or os.path.islink(p)):
            continue
        _copy_file(p, os.path.join(dst_dir, name))


def write_pagemap_and_pages(out_dir: str, name: str, pages_id: int, addrs: np.ndarray,
                            in_parent: np.ndarray, lazy: np.ndarray, key: np.ndarray,
                            sources: list, src: np.ndarray, row: np.ndarray,
                            page_size: int, chunk_pages: int = 2048,
                            wide: bool = False) -> Tuple[int, int]:
    """Write name (a pagemap) and pages-<pages_id>.img into out_dir.

    Page i at addrs[i] is written PE_PARENT when in_parent[i], else PE_PRESENT with
    the content (sources, src[i], row[i]); lazy[i] adds PE_LAZY. Runs break where the
    address jumps or in_parent / lazy / key change (key lets the caller keep another
    pagemap's entry boundaries). Returns (entries, pages written)."""
    from . import _core
    brk = run_breaks(addrs, page_size, in_parent, lazy, key)
    # A run longer than nr_pages' u32 is split (never happens with real address spaces
    # of 4 KiB pages below 16 TiB, but stays correct).
    lens = np.diff(np.append(brk, addrs.size))
    if lens.size and int(lens.max()) > MAX_RUN_PAGES:
        extra = [np.arange(b, b + ln, MAX_RUN_PAGES) for b, ln in zip(brk, lens)]
        brk = np.concatenate(extra)
        lens = np.diff(np.append(brk, addrs.size))
    flags = np.where(in_parent[brk], PE_PARENT, PE_PRESENT).astype(np.uint32)
    flags |= np.where(lazy[brk], PE_LAZY, 0).astype(np.uint32)
    data = encode_pagemap(pages_id, addrs[brk], lens.astype(np.uint64), flags, wide)
    _fsync_write(os.path.join(out_dir, name), [data])
    sel = np.flatnonzero(~in_parent)
    s_src, s_row = src[sel], row[sel]

    def page_chunks():
        buf = np.empty((min(chunk_pages, max(sel.size, 1)), page_size), dtype=np.uint8)
        for i in range(0, sel.size, chunk_pages):
            k = min(chunk_pages, sel.size - i)
            _core.pages_gather(sources, s_src[i:i + k], s_row[i:i + k], page_size, buf)
            yield buf[:k]

    _fsync_write(os.path.join(out_dir, f"pages-{pages_id}.img"), page_chunks())
    return int(brk.size), int(sel.size)
