"""Stream targets: where decoded pages land (memory, files, CRIU image sets), and the
Protocols a target and its transaction follow."""
from __future__ import annotations

import os
import struct
from typing import List, Protocol, Tuple, runtime_checkable

import numpy as np

from statesync._util import sorted as _srt
from statesync._util.fsutil import atomic_replace, discard, temp_beside
from statesync.errors import StreamError
from statesync.stream.store import MemoryPageStore, PageStore, _StoreTxn

__all__ = ["PageTarget", "PageTransaction", "Transaction", "PageStore", "MemoryPageStore",
           "FileTarget", "FilePageStore", "CriuImageTarget"]

# ---------------------------------------------------------------------------- targets


@runtime_checkable
class PageTransaction(Protocol):
    """What apply() needs from a target between begin() and commit().

    * ``read(addrs) -> (pages (k, page_size) uint8, ok bool[k])``: the current
      content (committed, overlaid with what this transaction wrote) of each
      address; ``ok`` False where the target holds no such page.
    * ``write(addrs, pages)``: stage pages; addresses strictly increase across
      calls. Ownership of ``pages`` passes to the transaction.
    * ``commit()``: make every staged page visible at once. ``abort()``: drop them.

    Optionally ``alloc(n) -> (n, page_size) uint8``: rows the decoder decodes into
    and then passes to ``write`` (lets the target stage without a copy).
    """

    def read(self, addrs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]: ...

    def write(self, addrs: np.ndarray, pages: np.ndarray) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


@runtime_checkable
class PageTarget(Protocol):
    """Where a stream's pages land: ``begin(page_size)`` starts one stream's
    :class:`PageTransaction` (raise :class:`~statesync.errors.StreamError` for a page
    size the target cannot hold). :class:`~statesync.stream.store.PageStore` (and
    :class:`MemoryPageStore`), :class:`FilePageStore`, :class:`FileTarget` and
    :class:`CriuImageTarget` are page targets."""

    def begin(self, page_size: int) -> PageTransaction: ...


# The name the stream API documented transactions under before the Protocol.
Transaction = PageTransaction


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
        for s, n in _srt.run_list(slots):
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
        from statesync import criu
        if page_size != self.page_size:
            raise StreamError(f"stream page size {page_size} differs from the image set's "
                              f"{self.page_size}", offset=8)
        if os.path.exists(self.out_dir) and os.listdir(self.out_dir):
            raise StreamError(f"CRIU target {self.out_dir} exists and is not empty; give "
                              f"each stream a new output directory", offset=0)
        images = criu.ImageSet(self.base_dir, page_size)
        # read-only view of the base's pages (no copy)
        view = PageStore.wrap(images.addresses(self.pid), images.pages(self.pid))
        return _CriuTxn(self, view)


class _CriuTxn(_StoreTxn):
    def __init__(self, target: CriuImageTarget, view: PageStore):
        super().__init__(view)
        self.target = target

    def commit(self):
        from statesync import criu
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
        pos, hit = _srt.lookup(sorted_addrs, addrs)
        return np.where(hit, sorted_slots[pos], -1)

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
        return _FileStoreTxn(self)


class _FileStoreTxn(_CopyTxn):
    def __init__(self, s: FilePageStore):
        super().__init__(s.path)
        self.s = s
        self.n = s.n
        self.new_addrs: List[np.ndarray] = []          # addresses appended (slot n.. in order)
        self._new_sorted = np.empty(0, np.uint64)

    def _slots(self, addrs):
        slots = self.s._slots(addrs, self.s.sorted_addrs, self.s.sorted_slots)
        if self._new_sorted.size:
            # appended in increasing address order: slot = s.n + position
            pos, hit = _srt.lookup(self._new_sorted, addrs)
            slots = np.where(hit, self.s.n + pos, slots)
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
        for s, n in _srt.run_list(ss):
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
