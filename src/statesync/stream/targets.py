"""Stream targets: where decoded pages land (memory, files, CRIU image sets)."""
from __future__ import annotations

import os
import struct
from typing import Dict, List, Tuple

import numpy as np

from statesync._util.fsutil import atomic_replace, discard, temp_beside
from statesync.errors import StreamError

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
        self._scratch: List[np.ndarray] = []  # staging arena kept between streams (see _MemoryTxn)
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
        self.addr_blocks: List[np.ndarray] = []
        self.page_blocks: List[np.ndarray] = []
        self._cat = None
        self.chunks: List[list] = []        # [array, rows used]
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
    """Split sorted integer positions into (start_index_in_idx, length) runs of consecutive
    values."""
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
        from statesync import criu
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
        self.new_addrs: List[np.ndarray] = []          # addresses appended (slot n.. in order)
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
