"""Image sets: a pagemap resolved across a parent chain, atomic directories, writing."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from statesync._util import sorted as _srt
from statesync._util.fsutil import atomic_replace, fsync_dir
from statesync.criu.images import (
    MAX_RUN_PAGES,
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    Pagemap,
    encode_pagemap,
    expand_runs,
    is_task_pagemap,
    open_regular,
    pagemap_files,
    read_inventory,
    read_mm,
    read_pstree,
    run_breaks,
)
from statesync.errors import CriuImageError

# --------------------------------------------------------------------------- image sets

MAX_CHAIN = 64  # deeper parent chains are refused (CRIU itself has no limit; loops do)


class ResolvedPages:
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
    if not os.path.lexists(path):
        return np.zeros((0, page_size), dtype=np.uint8)
    fd = open_regular(path)     # a FIFO, device or directory is refused, never mapped
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
        self._tables: Dict[str, ResolvedPages] = {}
        self._pages: Dict[int, np.ndarray] = {}
        self._pstree: Optional[List[dict]] = None

    # -- structure

    @property
    def chain(self) -> List[str]:
        out: List[str] = []
        s: Optional[ImageSet] = self
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

    def table(self, pid=None) -> ResolvedPages:
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
                raise CriuImageError(
                    f"{parent_n} pages marked PE_PARENT but the parent chain holds "
                    f"only {pt.addrs.size} pages",
                    *where,
                )
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
            pos, ok = _srt.lookup(pt.addrs, want)
            if not ok.all():
                bad = int(np.flatnonzero(~ok)[0])
                e = int(entry[np.flatnonzero(sel)[bad]])
                parent_path = self.parent.path if self.parent is not None else "?"
                raise CriuImageError(f"page {int(want[bad]):#x} is marked PE_PARENT but the parent "
                                     f"chain ({parent_path}) has no such page", pm.path,
                                     int(pm.offsets[e]))
            src[sel] = pt.src[pos] + 1
            row[sel] = pt.row[pos]
            sources = [pages] + pt.sources
        t = ResolvedPages(addrs, src, row, entry, pm.flags[entry], sources)
        self._tables[name] = t
        return t

    def addresses(self, pid=None) -> np.ndarray:
        return self.table(pid).addrs

    def pages(self, pid=None) -> np.ndarray:
        t = self.table(pid)
        view = t.contiguous_source()
        if view is not None:
            return view
        from statesync import _core
        return _core.pages_gather(t.sources, t.src, t.row, self.page_size)

    def read(self, addrs, pid=None) -> np.ndarray:
        t = self.table(pid)
        addrs = np.asarray(addrs, dtype=np.uint64)
        pos, ok = _srt.lookup(t.addrs, addrs)
        if not ok.all():
            raise KeyError(f"page {int(addrs[~ok][0]):#x} is not in image set {self.path}")
        from statesync import _core
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
    with os.fdopen(open_regular(src), "rb") as f:
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
    from statesync import _core
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
