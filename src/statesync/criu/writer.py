"""Image sets as statesync reads and writes them: diff, incremental sets, flatten,
assembly from a page store, summaries."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import numpy as np

from statesync._consts import PAGE_SIZE
from statesync._util import sorted as _srt
from statesync.criu import images as _img
from statesync.criu import imageset as _iset
from statesync.criu.images import PE_LAZY, PE_PARENT, PE_PRESENT, VMA_DTYPE  # noqa: F401  (re-exported)
from statesync.dirtyset import DirtySet
from statesync.errors import CriuImageError

# --------------------------------------------------------------------------- images


class ImageSet(_iset.ImageSet):
    """A CRIU image directory, read with statesync's own parser.

    ``ImageSet(path)`` reads ``inventory.img`` and follows the ``parent`` link
    recursively (a loop, a dangling link or a chain deeper than 64 raises
    :class:`CriuImageError`). Everything else is read on first use:

    - ``pagemap_names``, ``pids()``, ``root_pid``; ``pagemap(pid)`` -> parsed entries
      (``vaddr``, ``nr_pages``, ``flags`` numpy arrays, ``pages_id``)
    - ``vmas(pid)`` -> structured numpy array (``VMA_DTYPE``: start, end, pgoff, shmid,
      prot, flags, status, fd, madv, fdflags) from mm-PID.img
    - ``addresses(pid)`` -> sorted uint64 page addresses of the process's dumped pages,
      with PE_PARENT runs resolved through the chain
    - ``pages(pid)`` -> (n, page_size) uint8 contents in address order: a read-only
      zero-copy view of the mmap'd pages file for a self-contained dump, a gathered
      copy (n * page_size bytes of memory) when pages come from several files
    - ``read(addrs, pid)`` -> copies of chosen pages; ``table(pid)`` the resolved map
    - ``chain`` -> the image directories from this one to the oldest parent

    ``pid`` defaults to the only process pagemap, else the root task of pstree.img.
    Pages files are mmap'd read-only; they must not be truncated while in use (a
    truncated mapping faults with SIGBUS). Not thread-safe while loading; the arrays
    it returns may be shared between threads."""

    def __init__(self, path, page_size: int = PAGE_SIZE):
        super().__init__(path, page_size)

    @property
    def npages(self) -> int:
        return int(self.addresses().size)

    @property
    def nbytes(self) -> int:
        return self.npages * self.page_size

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Drop this set's (and its parents') page maps; arrays handed out stay valid."""
        s: Optional[_iset.ImageSet] = self
        while s is not None:
            s._tables.clear()
            s._pages.clear()
            s = s.parent

    def __repr__(self) -> str:
        return f"ImageSet({self.path!r}, chain={len(self.chain)})"


def _as_set(x) -> _iset.ImageSet:
    return x if isinstance(x, _iset.ImageSet) else ImageSet(x)


def diff(old, new, pid=None) -> DirtySet:
    """The pages of ``new`` whose content differs from ``old`` (both image sets or
    directories of the same process), as a :class:`DirtySet` of page addresses.
    Pages of ``new`` absent from ``old`` count as changed; pages only in ``old`` do
    not appear. The compare runs in C with the GIL released. Raises CriuImageError."""
    from statesync import _core

    old, new = _as_set(old), _as_set(new)
    tn, to = new.table(pid), old.table(pid)
    changed = _changed_pages(tn, to, new.page_size, _core)
    return DirtySet._trusted(tn.addrs[changed], new.page_size)


def _changed_pages(tn, to, page_size, _core) -> np.ndarray:
    """Boolean per page of tn: absent from to, or different content."""
    n = tn.addrs.size
    if n == 0:
        return np.zeros(0, dtype=bool)
    if tn.addrs.size == to.addrs.size and np.array_equal(tn.addrs, to.addrs):
        a, b = tn.contiguous_source(), to.contiguous_source()
        if a is not None and b is not None:
            return _core.pages_differ(a, b)
        pos = np.arange(n)
        match = np.ones(n, dtype=bool)
    else:
        pos, match = _srt.lookup(to.addrs, tn.addrs)
    changed = np.ones(n, dtype=bool)
    m = np.flatnonzero(match)
    if m.size:
        p = pos[m]
        changed[m] = _core.pages_differ_indexed(tn.sources, tn.src[m], tn.row[m], to.sources,
                                                to.src[p], to.row[p], page_size)
    return changed


@dataclass
class WriteResult:
    """What a writer produced: the directory, pages stored in it and pages left to the
    parent (summed over all pagemaps), its size in bytes, and the pagemap entries."""

    path: str
    pages_written: int
    pages_in_parent: int
    nbytes: int
    entries: int


def _dir_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(path, n))
        for n in os.listdir(path)
        if os.path.isfile(os.path.join(path, n)) and not os.path.islink(os.path.join(path, n))
    )


def _write(base: _iset.ImageSet, out_dir, parent: Optional[_iset.ImageSet],
           overrides: Optional[Dict[str, tuple]] = None) -> WriteResult:
    from statesync import _core

    ps = base.page_size
    overrides = overrides or {}
    total_w = total_p = total_e = 0
    names = base.pagemap_names
    if not names:
        raise CriuImageError("image set has no pagemap", base.path)
    # Resolve everything before creating the output, so bad input fails early.
    tables = {n: base.table(n) for n in names}
    ptables = {}
    if parent is not None:
        for n in names:
            if _img.is_task_pagemap(n) and os.path.exists(os.path.join(parent.path, n)):
                ptables[n] = parent.table(n)
    with _iset.AtomicDir(out_dir) as ad:
        _iset.copy_non_memory(base.path, ad.tmp)
        for n in names:
            t = tables[n]
            pm = base.pagemap(n)
            addrs, sources, src, row = t.addrs, t.sources, t.src, t.row
            key = t.entry
            lazy = (t.flags & PE_LAZY) != 0
            if n in overrides:
                o_addrs, o_pages = overrides[n]
                addrs, sources, src, row, key, lazy = _merge_override(
                    t, o_addrs, o_pages, ps)
            tt = _iset.ResolvedPages(addrs, src, row, key, None, sources)
            in_parent = np.zeros(addrs.size, dtype=bool)
            pt = ptables.get(n)
            if pt is not None:
                in_parent = ~_changed_pages(tt, pt, ps, _core)
            e, w = _iset.write_pagemap_and_pages(ad.tmp, n, pm.pages_id, addrs, in_parent, lazy,
                                                key, sources, src, row, ps, wide=pm.wide)
            total_e += e
            total_w += w
            total_p += int(in_parent.sum())
        if parent is not None:
            final = os.path.abspath(os.fspath(out_dir))
            os.symlink(os.path.relpath(parent.path, final),
                       os.path.join(ad.tmp, "parent"))
    return WriteResult(ad.final, total_w, total_p, _dir_bytes(ad.final), total_e)


def _merge_override(t, o_addrs, o_pages, ps):
    """Combine a resolved table with replacement pages (addresses o_addrs, contents
    o_pages rows): replaced/new pages come from the extra source."""
    o_addrs = np.asarray(o_addrs, dtype=np.uint64)
    if o_addrs.size and (np.any(o_addrs[1:] <= o_addrs[:-1]) or np.any(o_addrs % np.uint64(ps))):
        raise ValueError("addrs must be sorted, unique and page-aligned")
    if callable(o_pages):
        o_pages = o_pages(o_addrs)
    o_pages = np.ascontiguousarray(o_pages, dtype=np.uint8).reshape(-1, ps)
    if o_pages.shape[0] != o_addrs.size:
        raise ValueError(f"{o_addrs.size} addresses but {o_pages.shape[0]} pages")
    keep = ~_srt.member(t.addrs, o_addrs)
    addrs = np.concatenate([t.addrs[keep], o_addrs])
    order = np.argsort(addrs, kind="stable")
    extra = len(t.sources)
    src = np.concatenate([t.src[keep], np.full(o_addrs.size, extra, dtype=np.int32)])[order]
    row = np.concatenate([t.row[keep], np.arange(o_addrs.size, dtype=np.int64)])[order]
    # Replaced pages keep their template entry (and PE_LAZY); new ones form runs of
    # their own (key -1 - ...) and are not lazy.
    pos, inside = _srt.lookup(t.addrs, o_addrs)
    o_key = np.full(o_addrs.size, -1, dtype=np.int64)
    o_key[inside] = t.entry[pos[inside]]
    o_lazy = np.zeros(o_addrs.size, dtype=bool)
    o_lazy[inside] = (t.flags[pos[inside]] & PE_LAZY) != 0
    key = np.concatenate([t.entry[keep], o_key])[order]
    lazy = np.concatenate([(t.flags[keep] & PE_LAZY) != 0, o_lazy])[order]
    return addrs[order], list(t.sources) + [o_pages], src, row, key, lazy


def write_incremental(new, parent_dir, out_dir) -> WriteResult:
    """Write ``out_dir``: the image set ``new`` with every page whose content equals the
    parent's marked PE_PARENT (not stored) and only changed or new pages stored, plus
    the ``parent`` symlink (relative) to ``parent_dir``. ``criu restore -D out_dir``
    accepts it while parent_dir stays where it is. ``new`` may itself be incremental
    (its chain is resolved first). Non-memory images are copied from ``new``;
    shared-memory pagemaps are written whole. Atomic: built in a temporary directory
    next to out_dir, fsync'd, renamed; out_dir must not exist or be empty."""
    return _write(_as_set(new), out_dir, _as_set(parent_dir))


def flatten(chain_dir, out_dir) -> WriteResult:
    """Write ``out_dir``: one self-contained image set equal in content to the chain at
    ``chain_dir`` (every page stored, no parent link; entry boundaries and PE_LAZY
    kept). Atomic like :func:`write_incremental`."""
    return _write(_as_set(chain_dir), out_dir, None)


def write_image_set(template_dir, out_dir, addrs, pages: Union[np.ndarray, Callable],
                    pid=None, parent_dir=None) -> WriteResult:
    """Write ``out_dir`` from ``template_dir``'s non-memory images (a CRIU dump of the
    process: registers, fds, VMAs...) and a page store: ``addrs`` (sorted unique
    page-aligned uint64) with contents ``pages`` ((n, page_size) uint8) or a callable
    ``pages(addrs) -> (n, page_size) array``. Pages of the template's pagemap not in
    ``addrs`` keep the template's content; every address must lie in one of the
    template's VMAs (ValueError otherwise). With ``parent_dir`` the result is
    incremental against it (unchanged pages PE_PARENT). This is how the migration
    engine turns the pages it streamed plus a final dump's metadata into a set
    ``criu restore`` accepts. Atomic like :func:`write_incremental`."""
    base = _as_set(template_dir)
    name = base._name(pid)
    parent = _as_set(parent_dir) if parent_dir is not None else None
    addrs = np.asarray(addrs, dtype=np.uint64)
    if _img.is_task_pagemap(name) and addrs.size:
        # Pages outside every VMA of the template would make criu restore fail late.
        v = base.vmas(name)
        ok = _srt.in_intervals(addrs, np.ascontiguousarray(v["start"]),
                               np.ascontiguousarray(v["end"]))
        if not ok.all():
            raise ValueError(f"page {int(addrs[~ok][0]):#x} lies in no VMA of the template "
                             f"{base.path} ({int((~ok).sum())} such pages)")
    return _write(base, out_dir, parent, {name: (addrs, pages)})


def write_image_set_pages(template_dir, out_dir, pagemaps: Dict[str, tuple],
                          parent_dir=None) -> WriteResult:
    """:func:`write_image_set` for several pagemaps at once, task and shared memory:
    ``pagemaps`` maps an image name of the template to ``(addrs, pages)`` as there
    (``pages`` an (n, page_size) array or a callable). Task pagemaps
    (``pagemap-PID.img``) take page addresses, which must lie in the task's VMAs;
    shmem pagemaps (``pagemap-shmem-SHMID.img``, written by CRIU for MAP_SHARED
    anonymous memory, memfd and SysV segments) take byte offsets in the object, which
    must lie below its size as the template's VMAs with that shmid map it. Pages of a
    pagemap not given keep the template's content. This is how a destination
    assembles a process tree's image set from pre-copied pages: one entry per task
    and one per shmem object (a page shared by several tasks is one offset of its
    object's pagemap). ValueError names the first page out of bounds."""
    base = _as_set(template_dir)
    parent = _as_set(parent_dir) if parent_dir is not None else None
    names = set(base.pagemap_names)
    shm_size: Dict[int, int] = {}
    for n in names:
        if _img.is_task_pagemap(n):
            v = base.vmas(n)
            for sid, pg, st, en in zip(v["shmid"].tolist(), v["pgoff"].tolist(),
                                       v["start"].tolist(), v["end"].tolist()):
                if sid:
                    shm_size[sid] = max(shm_size.get(sid, 0), pg + en - st)
    over = {}
    for name, (addrs, pages) in pagemaps.items():
        if name not in names:
            raise ValueError(f"{name} is not a pagemap of the template {base.path}")
        addrs = np.asarray(addrs, dtype=np.uint64)
        if addrs.size and _img.is_task_pagemap(name):
            v = base.vmas(name)
            i = np.searchsorted(v["start"], addrs, side="right") - 1
            ok = i >= 0
            ok[ok] = addrs[ok] < v["end"][i[ok]]
            if not ok.all():
                raise ValueError(f"{name}: page {int(addrs[~ok][0]):#x} lies in no VMA of the "
                                 f"template {base.path} ({int((~ok).sum())} such pages)")
        elif addrs.size and name.startswith("pagemap-shmem-"):
            sid = int(name[len("pagemap-shmem-"):-len(".img")])
            size = shm_size.get(sid)
            if size is not None and int(addrs.max()) >= size:
                raise ValueError(f"{name}: offset {int(addrs.max()):#x} lies past the end of "
                                 f"shmem {sid} ({size} bytes as the template maps it)")
        over[name] = (addrs, pages)
    return _write(base, out_dir, parent, over)


def info(path) -> dict:
    """Summary of an image set: pids, pages, bytes, VMAs, pagemap entries per process,
    the parent chain."""
    s = _as_set(path)
    out = {"path": s.path, "chain": s.chain, "inventory": s.inventory, "processes": []}
    for n in s.pagemap_names:
        pm = s.pagemap(n)
        t = s.table(n)
        entry = {"pagemap": n, "pages_id": pm.pages_id, "entries": int(pm.vaddr.size),
                 "pages": int(t.addrs.size), "bytes": int(t.addrs.size) * s.page_size,
                 "pages_here": pm.present_pages,
                 "pages_in_parent": int(pm.nr_pages[(pm.flags & PE_PARENT) != 0].sum())}
        if _img.is_task_pagemap(n):
            try:
                v = s.vmas(n)
                entry["vmas"] = int(v.size)
                entry["vma_bytes"] = int((v["end"] - v["start"]).sum())
            except CriuImageError:
                entry["vmas"] = None
        out["processes"].append(entry)
    return out
