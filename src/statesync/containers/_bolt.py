"""A read-only reader of bbolt database files (podman <= 4.x keeps its state in one).

Format (bbolt's on-disk layout): fixed-size pages; each starts with a 16-byte header
(id u64, flags u16, count u16, overflow u32). Pages 0 and 1 are meta pages (magic
0xED0CDAED, version 2, page size, flags, root bucket {root page u64, sequence u64},
freelist page, high-water page, txid, checksum); the one with the higher txid whose magic
is right is current. Branch pages (flag 0x01) hold ``count`` elements {pos u32, ksize u32,
page u64}; leaf pages (0x02) hold {flags u32, pos u32, ksize u32, vsize u32}, ``pos``
counted from the element's own offset, key then value. A leaf element with flag 0x01 is a
sub-bucket: its value is a bucket header {root page u64, sequence u64}, and root page 0
means the bucket's own leaf page follows inline in the value. A page with ``overflow``
N spans N+1 pages.

Readers take a shared flock on the file (bbolt writers hold an exclusive one while the
database is open read-write), so the snapshot is consistent.
"""
from __future__ import annotations

import fcntl
import os
import struct
from typing import Dict, Iterator, Optional, Tuple, Union

from ..errors import ContainerError

MAGIC = 0xED0CDAED
_BRANCH, _LEAF, _META = 0x01, 0x02, 0x04
_BUCKET_LEAF = 0x01
_HDR = struct.Struct("<QHHI")


class BoltError(ContainerError):
    def __init__(self, path: str, msg: str):
        super().__init__("", f"{path}: {msg}")


class _Page:
    __slots__ = ("data", "off")

    def __init__(self, data: bytes, off: int):
        self.data, self.off = data, off

    def header(self) -> Tuple[int, int, int, int]:
        return _HDR.unpack_from(self.data, self.off)


class Bucket:
    """A bucket: :meth:`get`, :meth:`bucket`, :meth:`items` (sub-buckets come as Bucket)."""

    def __init__(self, db: "BoltDB", root: int, inline: Optional[bytes] = None):
        self.db, self.root, self.inline = db, root, inline

    def _leaf_items(self, page: _Page) -> Iterator[Tuple[bytes, int, bytes]]:
        _pid, flags, count, _ov = page.header()
        base = page.off + _HDR.size
        if flags & _LEAF:
            for i in range(count):
                eo = base + 16 * i
                eflags, pos, ks, vs = struct.unpack_from("<IIII", page.data, eo)
                k = page.data[eo + pos: eo + pos + ks]
                v = page.data[eo + pos + ks: eo + pos + ks + vs]
                yield bytes(k), eflags, bytes(v)
        elif flags & _BRANCH:
            for i in range(count):
                eo = base + 16 * i
                _pos, _ks, child = struct.unpack_from("<IIQ", page.data, eo)
                yield from self._leaf_items(self.db._page(child))
        else:
            raise BoltError(
                self.db.path, f"page {_pid}: neither branch nor leaf (flags {flags:#x})"
            )

    def _pages(self) -> _Page:
        if self.root == 0:
            return _Page(self.inline or b"", 0)
        return self.db._page(self.root)

    def raw_items(self) -> Iterator[Tuple[bytes, int, bytes]]:
        yield from self._leaf_items(self._pages())

    def items(self) -> Iterator[Tuple[bytes, Union[bytes, "Bucket"]]]:
        for k, fl, v in self.raw_items():
            yield k, (self._sub(v) if fl & _BUCKET_LEAF else v)

    def _sub(self, v: bytes) -> "Bucket":
        root, _seq = struct.unpack_from("<QQ", v, 0)
        return Bucket(self.db, root, v[16:] if root == 0 else None)

    def get(self, key: Union[str, bytes]) -> Optional[bytes]:
        key = key.encode() if isinstance(key, str) else key
        for k, fl, v in self.raw_items():
            if k == key and not fl & _BUCKET_LEAF:
                return v
        return None

    def bucket(self, key: Union[str, bytes]) -> Optional["Bucket"]:
        key = key.encode() if isinstance(key, str) else key
        for k, fl, v in self.raw_items():
            if k == key and fl & _BUCKET_LEAF:
                return self._sub(v)
        return None

    def keys(self):
        return [k for k, _fl, _v in self.raw_items()]


class BoltDB:
    """``with BoltDB(path) as db: db.root.bucket("ctr")...`` (read-only snapshot)."""

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH)
            size = os.fstat(self._fd).st_size
            self.data = os.pread(self._fd, size, 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        metas = []
        offsets = [0]
        while offsets:
            off = offsets.pop(0)
            if off + _HDR.size + 64 > len(self.data):
                continue
            _pid, flags, _c, _o = _HDR.unpack_from(self.data, off)
            magic, _version, psize, _fl, root, _seq, _free, _hw, txid = struct.unpack_from(
                "<IIIIQQQQQ", self.data, off + _HDR.size)
            if magic == MAGIC and flags & _META:
                metas.append((txid, psize, root))
                if off == 0:
                    offsets.append(psize)  # meta page 1
            elif off == 0:
                offsets.append(4096)
        if not metas:
            raise BoltError(path, "not a bbolt database (bad meta page magic)")
        txid, self.page_size, root = max(metas)
        self.root = Bucket(self, root)

    def _page(self, pid: int) -> _Page:
        off = pid * self.page_size
        if off + _HDR.size > len(self.data):
            raise BoltError(self.path, f"page {pid} beyond the end of the file")
        return _Page(self.data, off)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "BoltDB":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def dump_tree(b: Bucket, depth: int = 0, out: Optional[Dict] = None) -> Dict:
    """A nested dict of a bucket (for debugging): values truncated to 80 bytes."""
    out = {} if out is None else out
    for k, v in b.items():
        out[k.decode(errors="replace")] = (
            dump_tree(v, depth + 1) if isinstance(v, Bucket) else v[:80]
        )
    return out
