"""The one in-memory page store: rows keyed by page address, numpy all the way down.

:class:`PageStore` is what every in-memory holder of pages uses: the destination
agent's received pages (``width=page_size``, ``uint8``), the source agent's hash
shadow of what the destination holds (``width=2``, ``uint64``) and its XOR mirror,
and any user of :mod:`statesync.stream` that wants pages in memory
(:class:`MemoryPageStore` is the same type with the stream API's constructor).
It is a stream target itself: ``apply(stream, store)`` decodes into it, and a
stream's pages become visible together at commit.

Layout: ``keys`` (sorted uint64 addresses) and ``slots`` (the row of each key), the
rows in a list of chunks. Growth adds a chunk (geometric up to 64 MiB, then fixed
64 MiB chunks; :meth:`PageStore.reserve` adds room ahead of time) and never copies
the rows already held, so no insert pays for the whole store: a 512 MiB
destination store grows without a 512 MiB copy inside the downtime. No per-page
Python objects. Not thread-safe against concurrent writers; reading while nobody
writes is safe.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import numpy.typing as npt

from statesync._util import sorted as _srt
from statesync.errors import StreamError

__all__ = ["PageStore", "MemoryPageStore"]

_MIN_CHUNK_BYTES = 1 << 20
_MAX_CHUNK_BYTES = 64 << 20


class _Rows:
    """``store.rows``: the rows by slot, as :meth:`PageStore.lookup` returns slots.

    ``rows[slots]`` gathers (a new array), ``rows[a:b]`` is a view when the slots lie
    in one chunk (a copy otherwise), ``rows[slots] = values`` writes in place."""

    __slots__ = ("_s",)

    def __init__(self, store: "PageStore"):
        self._s = store

    def __len__(self) -> int:
        return self._s.used

    @property
    def shape(self) -> Tuple[int, int]:
        return (self._s.used, self._s.width)

    def __getitem__(self, key) -> np.ndarray:
        s = self._s
        if isinstance(key, slice):
            start, stop, step = key.indices(s.used)
            if step != 1:
                return s._gather(np.arange(start, stop, step, dtype=np.int64))
            return s._range(start, stop)
        if isinstance(key, (int, np.integer)):
            return s._range(int(key), int(key) + 1)[0]
        return s._gather(np.asarray(key, dtype=np.int64))

    def __setitem__(self, key, values) -> None:
        s = self._s
        if isinstance(key, slice):
            start, stop, step = key.indices(s.used)
            idx = np.arange(start, stop, step, dtype=np.int64)
        else:
            idx = np.asarray(key, dtype=np.int64).reshape(-1)
        s._scatter(idx, np.asarray(values, dtype=s.dtype).reshape(idx.size, s.width))


class PageStore:
    """Rows of ``width`` elements of ``dtype``, keyed by page address.

    ``PageStore(4096)`` holds page contents; ``PageStore(2, np.uint64)`` holds a 128-bit
    hash per page. ``capacity`` rows are reserved up front (see :meth:`reserve`).

    * :meth:`put` inserts or overwrites rows, :meth:`get` returns ``(rows, ok)``
      (zero rows where ``ok`` is False), :meth:`take` returns rows and raises
      ``KeyError`` naming the first missing address, :meth:`contains` is the mask;
    * :meth:`lookup` gives the slot of each address and ``rows[slots]`` the rows by
      slot (slots stay valid until :meth:`clear`);
    * ``addrs`` (sorted, uint64) and ``pages`` (the rows in address order: a view
      when the store is compact, else a copy) are the stream API's view;
    * :meth:`begin` makes the store a :class:`~statesync.stream.targets.PageTarget`
      (uint8 rows of ``page_size`` bytes only).
    """

    def __init__(self, width: int = 4096, dtype: npt.DTypeLike = np.uint8, capacity: int = 0):
        self.width = int(width)
        self.dtype = np.dtype(dtype)
        if self.width <= 0:
            raise ValueError(f"row width must be positive (got {width})")
        self._row_bytes = self.width * self.dtype.itemsize
        self.clear()
        # Staging arena of streams applied to this store, kept warm between streams.
        self._scratch: List[np.ndarray] = []
        if capacity > 0:
            self.reserve(capacity)

    def clear(self) -> None:
        """Drop every row (and the chunks holding them)."""
        self.keys = np.zeros(0, dtype=np.uint64)      # sorted
        self.slots = np.zeros(0, dtype=np.int64)      # row slot of each key
        self._chunks: List[np.ndarray] = []
        self._starts: List[int] = []                  # first slot of each chunk
        self._cap = 0                                 # slots the chunks hold
        self.used = 0                                 # next free slot

    # -- construction from arrays

    @classmethod
    def wrap(cls, addrs: npt.ArrayLike, pages: np.ndarray) -> "PageStore":
        """A store over sorted unique ``addrs`` and their rows ``pages`` without copying
        ``pages`` (which may be read-only, e.g. an mmap: the first write to them then
        copies). For uint8 rows the width is the page size."""
        p = np.asarray(pages)
        if p.ndim != 2:
            raise ValueError("pages must be a 2-d array (rows, width)")
        s = cls.__new__(cls)
        PageStore.__init__(s, p.shape[1], p.dtype)
        s._adopt_sorted(np.ascontiguousarray(addrs, dtype=np.uint64), p)
        return s

    def _adopt_sorted(self, addrs: np.ndarray, rows: np.ndarray) -> None:
        """Become exactly (addrs, rows): addrs sorted unique, rows one chunk (no copy)."""
        if addrs.shape[0] != rows.shape[0]:
            raise ValueError(f"{addrs.shape[0]} addresses but {rows.shape[0]} rows")
        self.clear()
        n = int(addrs.shape[0])
        self.keys = addrs
        self.slots = np.arange(n, dtype=np.int64)
        if n:
            self._append_chunk(rows)
        self.used = n

    # -- size

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @property
    def page_size(self) -> int:
        """The row width (bytes of a page for a uint8 store)."""
        return self.width

    @property
    def nbytes(self) -> int:
        """Bytes of the rows held (not of the capacity reserved)."""
        return len(self) * self._row_bytes

    @property
    def capacity(self) -> int:
        """Rows that fit before the store allocates another chunk."""
        return self._cap - self.used

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more rows in one allocation now (e.g. the state's page
        count before a switch-over), so that later inserts allocate nothing."""
        n = int(n)
        free = self._cap - self.used
        if n > free:
            self._append_chunk(np.empty((n - free, self.width), dtype=self.dtype))

    def _append_chunk(self, arr: np.ndarray) -> None:
        self._starts.append(self._cap)
        self._chunks.append(arr)
        self._cap += int(arr.shape[0])

    def _new_slots(self, k: int) -> np.ndarray:
        """k fresh consecutive slots, allocating a chunk if needed (never copying)."""
        free = self._cap - self.used
        if k > free:
            rows = max(k - free, self._cap, _MIN_CHUNK_BYTES // self._row_bytes, 1)
            rows = max(k - free, min(rows, max(1, _MAX_CHUNK_BYTES // self._row_bytes)))
            self._append_chunk(np.empty((rows, self.width), dtype=self.dtype))
        out = np.arange(self.used, self.used + k, dtype=np.int64)
        self.used += k
        return out

    # -- rows by slot

    @property
    def rows(self) -> _Rows:
        return _Rows(self)

    def pieces(self) -> List[Tuple[int, np.ndarray]]:
        """The row storage in place, for code that serves rows without gathering them
        (the lazy-pages daemon): ``(first_slot, rows)`` per chunk, in slot order; the row
        of slot ``s`` is ``rows[s - first_slot]`` of the piece holding it. Valid until
        the store next grows or is cleared (writes in place stay visible)."""
        return list(zip(self._starts, self._chunks))

    def as_array(self) -> np.ndarray:
        """Every row as one array indexed by slot (``as_array()[slots]``), e.g. for C
        code that wants one buffer: the chunk itself (no copy) while the store has one
        chunk, which :meth:`reserve` of the expected size up front keeps so; else a
        copy of all rows."""
        if len(self._chunks) == 1:
            return self._chunks[0][:self.used]
        return self._range(0, self.used)

    def _chunk_of(self, slots: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.asarray(self._starts, dtype=np.int64), slots,
                               side="right") - 1

    def _writable(self, c: int) -> np.ndarray:
        arr = self._chunks[c]
        if not arr.flags.writeable:         # a wrapped read-only array: copy on write
            arr = self._chunks[c] = np.array(arr, dtype=self.dtype, copy=True)
        return arr

    def _range(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.empty((0, self.width), dtype=self.dtype)
        c = int(self._chunk_of(np.array([start], dtype=np.int64))[0])
        base = self._starts[c]
        if stop - base <= self._chunks[c].shape[0]:
            return self._chunks[c][start - base:stop - base]
        return self._gather(np.arange(start, stop, dtype=np.int64))

    def _gather(self, slots: np.ndarray) -> np.ndarray:
        if slots.size == 0:
            return np.empty((0, self.width), dtype=self.dtype)
        if len(self._chunks) == 1:
            return self._chunks[0][slots]
        lo, hi = int(slots.min()), int(slots.max())
        c = self._chunk_of(np.array([lo, hi], dtype=np.int64))
        if c[0] == c[1]:
            return self._chunks[int(c[0])][slots - self._starts[int(c[0])]]
        ch = self._chunk_of(slots)
        out = np.empty((slots.size, self.width), dtype=self.dtype)
        for k in np.unique(ch).tolist():
            sel = ch == k
            out[sel] = self._chunks[k][slots[sel] - self._starts[k]]
        return out

    def _scatter(self, slots: np.ndarray, values: np.ndarray) -> None:
        """rows[slots] = values; runs of consecutive slots are copied as slices."""
        if slots.size == 0:
            return
        ch = self._chunk_of(slots) if len(self._chunks) > 1 else np.zeros(slots.size, np.int64)
        for k in (np.unique(ch).tolist() if len(self._chunks) > 1 else [0]):
            sel = np.flatnonzero(ch == k) if len(self._chunks) > 1 else None
            local = (slots if sel is None else slots[sel]) - self._starts[k]
            vals = values if sel is None else values[sel]
            dst = self._writable(k)
            if _increasing(local):
                starts, lengths = _srt.runs(local)
                if starts.size * 16 <= local.size:     # few runs: copy them as slices
                    for s0, n in zip(starts.tolist(), lengths.tolist()):
                        d0 = int(local[s0])
                        dst[d0:d0 + n] = vals[s0:s0 + n]
                    continue
            dst[local] = vals

    # -- by address

    def lookup(self, addrs: npt.ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
        """``(slots, found)``: the row slot of each address (undefined where not found)."""
        pos, found = _srt.lookup(self.keys, addrs)
        if self.keys.shape[0] == 0:
            return pos.astype(np.int64), found
        return self.slots[pos], found

    def contains(self, addrs: npt.ArrayLike) -> np.ndarray:
        return self.lookup(addrs)[1]

    def put(self, addrs: npt.ArrayLike, values: npt.ArrayLike) -> None:
        """Insert or overwrite. ``addrs`` must be duplicate-free."""
        a = np.asarray(addrs, dtype=np.uint64).reshape(-1)
        if a.size == 0:
            return
        vals = np.asarray(values, dtype=self.dtype).reshape(a.size, self.width)
        slots, found = self.lookup(a)
        if found.any():
            self._scatter(slots[found], vals[found] if not found.all() else vals)
        new = ~found
        k = int(new.sum())
        if k:
            ns = self._new_slots(k)
            self._scatter(ns, vals[new] if k != a.size else vals)
            self._insert_keys(a[new] if k != a.size else a, ns)

    def _insert_keys(self, new_keys: np.ndarray, new_slots: np.ndarray) -> None:
        if self.keys.shape[0] == 0 or (new_keys.shape[0] and _increasing(new_keys)
                                       and new_keys[0] > self.keys[-1]):
            # appended in address order (the common case): no sort
            order = np.argsort(new_keys, kind="stable") if not _increasing(new_keys) else None
            nk = new_keys if order is None else new_keys[order]
            nsl = new_slots if order is None else new_slots[order]
            self.keys = np.concatenate([self.keys, nk])
            self.slots = np.concatenate([self.slots, nsl])
            return
        keys = np.concatenate([self.keys, new_keys])
        sl = np.concatenate([self.slots, new_slots])
        order = np.argsort(keys, kind="stable")
        self.keys, self.slots = keys[order], sl[order]

    def get(self, addrs: npt.ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
        """``(rows, ok)`` for the given addresses; rows where ok is False are zero."""
        a = np.ascontiguousarray(addrs, dtype=np.uint64)
        slots, ok = self.lookup(a)
        if a.shape[0] and ok.all():
            return self._gather(slots), ok        # a fresh array already
        out = np.zeros((a.shape[0], self.width), dtype=self.dtype)
        if ok.any():
            out[ok] = self._gather(slots[ok])
        return out, ok

    def take(self, addrs: npt.ArrayLike) -> np.ndarray:
        """Rows for ``addrs``; raises ``KeyError`` naming the first missing address."""
        a = np.asarray(addrs, dtype=np.uint64)
        slots, found = self.lookup(a)
        if not found.all():
            miss = a[~found]
            raise KeyError(f"{miss.size} pages missing, first at {int(miss[0]):#x}")
        return self._gather(slots)

    @property
    def addrs(self) -> np.ndarray:
        """The addresses held, sorted (uint64)."""
        return self.keys

    @property
    def pages(self) -> np.ndarray:
        """The rows in address order: the chunk itself when the store is compact (one
        chunk, rows in address order), else a gathered copy."""
        n = self.keys.shape[0]
        if n == 0:
            return np.empty((0, self.width), dtype=self.dtype)
        if len(self._chunks) == 1 and self.used == n and int(self.slots[0]) == 0 \
                and _increasing(self.slots) and int(self.slots[-1]) == n - 1:
            return self._chunks[0][:n]
        return self._gather(self.slots)

    def to_dict(self) -> Dict[int, bytes]:
        pages = self.pages
        return {int(a): pages[i].tobytes() for i, a in enumerate(self.keys)}

    # -- as a stream target

    def begin(self, page_size: int) -> "_StoreTxn":
        if page_size != self.width or self.dtype != np.uint8:
            raise StreamError(f"stream page size {page_size} differs from the store's "
                              f"{self.width if self.dtype == np.uint8 else 'hash rows'}",
                              offset=8)
        return _StoreTxn(self)


class MemoryPageStore(PageStore):
    """A :class:`PageStore` of page contents with the stream API's constructor:
    ``MemoryPageStore(page_size, addrs, pages)`` starts with copies of the given
    pages (any order of addresses)."""

    def __init__(self, page_size: int = 4096, addrs: Optional[npt.ArrayLike] = None,
                 pages: Optional[npt.ArrayLike] = None):
        super().__init__(page_size, np.uint8)
        if addrs is not None:
            a = np.ascontiguousarray(addrs, dtype=np.uint64)
            p = np.ascontiguousarray(pages, dtype=np.uint8).reshape(-1, page_size)
            order = np.argsort(a, kind="stable")
            self._adopt_sorted(a[order], p[order])


def _increasing(a: np.ndarray) -> bool:
    return a.shape[0] < 2 or bool(np.all(a[1:] > a[:-1]))


class _StoreTxn:
    """A stream's transaction on a :class:`PageStore`: decoded pages are staged in an
    arena of large arrays and land in the store at commit (abort drops them).

    The arena chunks double from 8 MiB: numpy asks for transparent huge pages on
    allocations of 4 MiB and more, which made first-touch page faults, the main
    cost of decoding into fresh memory in a VM, about 4x cheaper than one small
    array per block. After commit the arena is kept for the next stream (up to
    256 MiB) so steady-state rounds decode into memory already mapped; a stream
    that fits in one arena chunk and brings only new pages gives that chunk to the
    store instead of copying out of it."""

    _FIRST_CHUNK = 8 << 20
    _MAX_CHUNK = 512 << 20
    _SCRATCH_MAX = 256 << 20

    def __init__(self, store: PageStore):
        self.store = store
        self.addr_blocks: List[np.ndarray] = []
        self.page_blocks: List[np.ndarray] = []
        self._cat: Optional[Tuple[int, np.ndarray, np.ndarray]] = None
        self.chunks: List[list] = []        # [array, rows used]
        self._next = self._FIRST_CHUNK

    def alloc(self, n: int) -> np.ndarray:
        """Rows for n decoded pages, owned by this transaction."""
        ps = self.store.width
        if self.chunks:
            c = self.chunks[-1]
            if c[0].shape[0] - c[1] >= n:
                v = c[0][c[1]:c[1] + n]
                c[1] += n
                return v
        scratch = self.store._scratch
        while scratch:
            arr = scratch.pop(0)                  # warm memory from an earlier stream
            if arr.shape[0] >= n:
                self.chunks.append([arr, n])
                return arr[:n]
        rows = max(n, self._next // ps)
        self._next = min(self._next * 2, self._MAX_CHUNK)
        self.chunks.append([np.empty((rows, ps), dtype=np.uint8), n])
        return self.chunks[-1][0][:n]

    def _recycle(self) -> None:
        keep: List[np.ndarray] = []
        total = 0
        for arr, _ in self.chunks:
            if total + arr.nbytes <= self._SCRATCH_MAX:
                keep.append(arr)
                total += arr.nbytes
        self.store._scratch = keep
        self.chunks = []

    def _staged(self) -> Tuple[int, np.ndarray, np.ndarray]:
        if self._cat is None or self._cat[0] != len(self.addr_blocks):
            a = (np.concatenate(self.addr_blocks) if self.addr_blocks
                 else np.empty(0, np.uint64))
            starts = np.cumsum([0] + [x.shape[0] for x in self.addr_blocks])
            self._cat = (len(self.addr_blocks), a, starts)
        return self._cat

    def read(self, addrs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        out, ok = self.store.get(addrs)
        if self.addr_blocks:
            _, sa, starts = self._staged()
            rows, hit = _srt.lookup(sa, addrs)
            if hit.any():
                js = np.flatnonzero(hit)
                rows = rows[js]
                blk = np.searchsorted(starts, rows, side="right") - 1
                for b in np.unique(blk).tolist():     # one gather per staged block
                    sel = blk == b
                    out[js[sel]] = self.page_blocks[b][rows[sel] - int(starts[b])]
            ok = ok | hit
        return out, ok

    def write(self, addrs: np.ndarray, pages: np.ndarray) -> None:
        self.addr_blocks.append(np.asarray(addrs, dtype=np.uint64))
        self.page_blocks.append(pages)

    def _staged_pages(self) -> np.ndarray:
        # Blocks written from our own arena are contiguous within a chunk: a stream that
        # fits in one chunk needs no copy at all.
        if self._in_one_chunk():
            return self.chunks[0][0][:self.chunks[0][1]]
        return (self.page_blocks[0] if len(self.page_blocks) == 1
                else np.concatenate(self.page_blocks))

    def _in_one_chunk(self) -> bool:
        return len(self.chunks) == 1 and len(self.page_blocks) > 0 and all(
            p.base is self.chunks[0][0] for p in self.page_blocks) and \
            sum(p.shape[0] for p in self.page_blocks) == self.chunks[0][1]

    def commit(self) -> None:
        s = self.store
        if not self.addr_blocks:
            self._recycle()
            return
        na = np.concatenate(self.addr_blocks)
        slots, found = s.lookup(na)
        nfound = int(found.sum())
        if nfound == 0 and self._adopt_arena(na):
            return
        # One copy per page, block by block: pages the store holds are overwritten in
        # place, new ones go to fresh slots (appended chunks: nothing held moves).
        nnew = na.size - nfound
        new_slots = s._new_slots(nnew) if nnew else np.zeros(0, np.int64)
        off = noff = 0
        for pb in self.page_blocks:
            k = pb.shape[0]
            f = found[off:off + k]
            if nnew == 0 or f.all():
                s._scatter(slots[off:off + k], pb)
            elif not f.any():
                s._scatter(new_slots[noff:noff + k], pb)
                noff += k
            else:
                s._scatter(slots[off:off + k][f], pb[f])
                m = k - int(f.sum())
                s._scatter(new_slots[noff:noff + m], pb[~f])
                noff += m
            off += k
        if nnew:
            s._insert_keys(na if nfound == 0 else na[~found], new_slots)
        self._recycle()

    def _adopt_arena(self, na: np.ndarray) -> bool:
        """A stream of new pages only, decoded into our arena chunks in allocation order:
        the chunks they mostly fill become the store's own (no copy; their spare rows
        are capacity), the rest is copied. Not when the store has room reserved for
        them (copying keeps it one chunk). False when the blocks do not tile the arena."""
        s = self.store
        if not self.chunks or s.capacity >= na.size:
            return False
        rb = s._row_bytes
        ci, off = 0, 0
        for p in self.page_blocks:
            if off == self.chunks[ci][1] and p.base is not self.chunks[ci][0] \
                    and ci + 1 < len(self.chunks):
                ci, off = ci + 1, 0
            arena: np.ndarray = self.chunks[ci][0]
            if p.base is not arena or p.ctypes.data != arena.ctypes.data + off * rb:
                return False
            off += p.shape[0]
        if ci != len(self.chunks) - 1 or off != self.chunks[ci][1]:
            return False
        parts: List[np.ndarray] = []
        kept: List[list] = []
        for c in self.chunks:
            arena, used = c
            if 2 * used * rb >= arena.nbytes:
                s.used = s._cap                     # spare rows of the last chunk stay unused
                base = s._cap
                s._append_chunk(arena)
                s.used = base + used
                parts.append(np.arange(base, base + used, dtype=np.int64))
            else:
                ns = s._new_slots(used)
                s._scatter(ns, arena[:used])
                parts.append(ns)
                kept.append(c)
        s._insert_keys(na, np.concatenate(parts))
        self.chunks = kept
        self._recycle()
        return True

    def abort(self) -> None:
        self.addr_blocks, self.page_blocks = [], []
        self._recycle()

