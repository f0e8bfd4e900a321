"""The destination side of a lazy switch-over: statesync's own lazy-pages daemon.

``criu restore --lazy-pages`` restores a process tree without the pages its pagemap
marks ``PE_LAZY`` and hands each task's userfaultfd to a daemon listening on
``lazy-pages.socket`` in CRIU's work directory. :class:`LazyPagesDaemon` is that
daemon: the hot loop is C (csrc/ss_lazy.c, one thread, GIL released); it serves every
fault from a page store that is already at the destination and copies every
remaining page in the background, then exits. Nothing is fetched from anywhere
after the switch. See docs/lazy.md for the protocol, the events handled, and what
statesync must do when the daemon dies before the fill completes.

    d = LazyPagesDaemon("restore-dir", pages={pid: (addrs, pages)})
    d.start()                                   # listening before CRIU starts
    criu.restore("restore-dir", extra_args=["--lazy-pages"])
    stats = d.wait(30)                          # LazyStats; raises LazyPagesError

or in one call: ``restore, daemon = lazy_restore("restore-dir", pages)``.

:func:`write_lazy_image_set` turns a full dump into a restore set whose lazy-able
pages (private anonymous VMAs, as CRIU's ``vma_entry_can_be_lazy``) are ``PE_LAZY``
and absent from pages-N.img, which is what a switch-over with the pages already at
the destination needs.
"""
from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from statesync._consts import PAGE_SIZE
from statesync.criu import images as _img
from statesync.criu import imageset as _iset
from statesync.criu.images import PE_LAZY, PE_PARENT, PE_PRESENT
from statesync.errors import StateSyncError

LAZY_SOCKET = "lazy-pages.socket"

# VmaEntry bits CRIU's vma_entry_can_be_lazy() looks at (criu/include/image.h and
# mmap flags as stored in mm-*.img).
_MAP_PRIVATE = 0x02
_MAP_ANONYMOUS = 0x20
_MAP_LOCKED = 0x2000
_MAP_HUGETLB = 0x40000
_VMA_AREA_STACK = 1 << 1
_VMA_AREA_VSYSCALL = 1 << 2
_VMA_AREA_VDSO = 1 << 3
_VMA_AREA_VVAR = 1 << 12


class LazyPagesError(StateSyncError):
    """The lazy-pages daemon failed. ``pid`` is the task it concerns (0 when none),
    ``errno`` the cause, ``stats`` what it had done. ``unfilled``: some restored task
    still had pages missing. ``killed``: the daemon then killed the restored tree
    (root pid ``restored_pid``) BEFORE releasing those tasks' userfaultfds, so nothing
    ran on with zeros in place of its pages; otherwise (``unfilled`` and not
    ``killed``: the tree's pid was not known yet, or ``on_failure="keep"``) the
    caller must kill it. Either way restore again from a full image set (the source
    keeps its copy until the fill is confirmed)."""

    def __init__(self, msg: str, pid: int = 0, errno: int = 0, stats=None,
                 unfilled: bool = False, killed: bool = False, restored_pid: int = 0):
        self.pid = pid
        self.errno = errno
        self.stats = stats
        self.unfilled = unfilled
        self.killed = killed
        self.restored_pid = restored_pid
        super().__init__(msg)


@dataclass
class LazyStats:
    """What the daemon did. Counts are pages unless named otherwise; times are
    seconds; latencies nanoseconds (daemon-side: from reading the fault message to
    the copy that wakes the thread; queueing behind one background chunk adds at
    most one chunk's copy time)."""

    tasks: int = 0
    zombies: int = 0
    total_pages: int = 0       # lazy pages of the received tasks
    left: int = 0              # pages still missing when the daemon stopped (0 on success)
    faults: int = 0            # fault messages served
    fault_copied: int = 0
    fault_zero: int = 0
    fault_woken: int = 0
    prefetch_copied: int = 0
    prefetch_zero: int = 0
    prefetch_ioctls: int = 0
    dropped: int = 0           # freed by MADV_DONTNEED / munmap before they were needed
    exist: int = 0
    unreachable: int = 0
    lost_exited: int = 0
    eagain: int = 0
    forks: int = 0
    remaps: int = 0
    removes: int = 0
    unmaps: int = 0
    connect_wait_s: float = 0.0   # daemon start -> CRIU connected
    restore_s: float = 0.0        # CRIU connected -> restore finished word
    fill_s: float = 0.0           # restore finished -> every page in place
    fault_p50_ns: float = 0.0
    fault_p99_ns: float = 0.0
    fault_max_ns: float = 0.0
    # post-copy (docs/postcopy.md): pages that were still at the source
    remote_pages: int = 0       # lazy pages whose content came from the source
    remote_faults: int = 0      # faults that waited for a page from the source
    remote_requested: int = 0   # pages the daemon asked the source for
    remote_supplied: int = 0    # pages the post-copy loop handed to the daemon
    remote_placed: int = 0
    remote_exist: int = 0       # already present when they came: left untouched
    remote_p50_ns: float = 0.0  # remote fault: fault read -> page placed (incl. the round trip)
    remote_p99_ns: float = 0.0
    remote_max_ns: float = 0.0
    latencies_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64),
                                     repr=False)
    remote_latencies_ns: np.ndarray = field(
        default_factory=lambda: np.zeros(0, dtype=np.uint64), repr=False)

    @classmethod
    def from_raw(cls, raw: dict, lat: np.ndarray) -> "LazyStats":
        s = cls(**{k: int(v) for k, v in raw.items()  # type: ignore[arg-type]
                   if k in cls.__dataclass_fields__})
        t0, tc, tf, tz = (raw["t_start_ns"], raw["t_connected_ns"], raw["t_finished_ns"],
                          raw["t_filled_ns"])
        s.connect_wait_s = max(0, tc - t0) / 1e9
        if tf:
            s.restore_s = max(0, tf - tc) / 1e9
            if tz:
                s.fill_s = max(0, tz - tf) / 1e9
        s.latencies_ns = lat
        if lat.size:
            s.fault_p50_ns, s.fault_p99_ns = (float(x) for x in np.percentile(lat, [50, 99]))
            s.fault_max_ns = float(lat.max())
        rl = raw.get("remote_latencies")
        if rl is not None and len(rl):
            s.remote_latencies_ns = rl
            s.remote_p50_ns, s.remote_p99_ns = (float(x) for x in np.percentile(rl, [50, 99]))
            s.remote_max_ns = float(rl.max())
        return s

    @property
    def pages_filled(self) -> int:
        return self.fault_copied + self.prefetch_copied + self.prefetch_zero + self.remote_placed

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__
             if k not in ("latencies_ns", "remote_latencies_ns")}
        return d


# --------------------------------------------------------------------------- images


def _rows_u8(data, ps: int) -> np.ndarray:
    """(n, ps) C-contiguous uint8 rows (a view when data already is one)."""
    if not isinstance(data, np.ndarray):
        data = np.asarray(data)
    data = data.reshape(-1, ps) if data.ndim == 1 else data
    if data.dtype != np.uint8 or not data.flags.c_contiguous:
        data = np.ascontiguousarray(data, dtype=np.uint8)
    return data


def _is_page_table(x) -> bool:
    return all(hasattr(x, a) for a in ("keys", "slots", "rows", "used"))


def _lazy_able(vmas: np.ndarray) -> np.ndarray:
    """Mask of the VMAs CRIU's restorer registers with userfaultfd (vma_entry_can_be_lazy),
    minus the main stack, which CRIU's lazy dump never makes lazy either."""
    f, st = vmas["flags"], vmas["status"]
    ok = ((f & _MAP_ANONYMOUS) != 0) & ((f & _MAP_PRIVATE) != 0)
    ok &= (f & (_MAP_LOCKED | _MAP_HUGETLB)) == 0
    for bit in (_VMA_AREA_VDSO, _VMA_AREA_VVAR, _VMA_AREA_VSYSCALL, _VMA_AREA_STACK):
        ok &= (st & bit) != bit
    return ok


def _in_vmas(addrs: np.ndarray, vmas: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    i = np.searchsorted(vmas["start"], addrs, side="right") - 1
    ok = i >= 0
    ok[ok] = addrs[ok] < vmas["end"][i[ok]]
    return ok, i


class _LazyPagemap(_img.Pagemap):
    """A pagemap that may hold PE_LAZY runs without data (what `criu dump --lazy-pages`
    and :func:`write_lazy_image_set` write); the image reader proper refuses those,
    as a plain restore cannot use them. Validated the same way otherwise."""

    def _validate(self, page_size: int) -> None:
        fl = self.flags
        lazy_only = ((fl & PE_LAZY) != 0) & ((fl & (PE_PRESENT | PE_PARENT)) == 0)
        self.flags = np.where(lazy_only, fl | PE_PRESENT, fl).astype(fl.dtype)
        try:
            super()._validate(page_size)
        finally:
            self.flags = fl


def lazy_pages(images_dir, pid: int, page_size: int = PAGE_SIZE) -> np.ndarray:
    """Sorted uint64 addresses of the pages pagemap-<pid>.img of images_dir marks
    PE_LAZY (with or without data in pages-N.img)."""
    pm = _LazyPagemap(os.path.join(os.fspath(images_dir), f"pagemap-{int(pid)}.img"), page_size)
    sel = (pm.flags & PE_LAZY) != 0
    return _img.expand_runs(pm.vaddr[sel], pm.nr_pages[sel], page_size)


def vma_breaks(images_dir, pid: int) -> np.ndarray:
    """Every VMA start and end of mm-<pid>.img (a copy run must not cross one)."""
    _, vmas = _img.read_mm(os.path.join(os.fspath(images_dir), f"mm-{int(pid)}.img"))
    return np.unique(np.concatenate([vmas["start"], vmas["end"]]).astype(np.uint64))


@dataclass
class LazySetResult:
    path: str
    lazy_pages: Dict[int, int]      # per pid: pages marked PE_LAZY (not stored)
    stored_pages: Dict[int, int]    # per pid: pages kept in pages-N.img


def write_lazy_image_set(full_dir, out_dir, keep_data: bool = False) -> LazySetResult:
    """Write out_dir from a full (or incremental) image set: the same images, with
    every page in a lazy-able VMA (private anonymous, not locked/hugetlb/vdso/vvar/
    vsyscall, not the main stack) marked PE_LAZY and, unless keep_data, left out of
    pages-N.img. ``criu restore --lazy-pages -D out_dir`` then restores every other
    page itself and leaves the lazy ones to the daemon. Shared-memory pagemaps are
    copied as they are. Atomic like statesync.criu.write_incremental."""
    base = _iset.ImageSet(full_dir)
    ps = base.page_size
    lazy_n: Dict[int, int] = {}
    stored_n: Dict[int, int] = {}
    names = base.pagemap_names
    tables = {n: base.table(n) for n in names}
    with _iset.AtomicDir(out_dir) as ad:
        _iset.copy_non_memory(base.path, ad.tmp)
        for n in names:
            t = tables[n]
            pm = base.pagemap(n)
            lazy = np.zeros(t.addrs.size, dtype=bool)
            if _img.is_task_pagemap(n):
                vmas = base.vmas(n)
                ok, vi = _in_vmas(t.addrs, vmas)
                able = _lazy_able(vmas)
                lazy[ok] = able[vi[ok]]
            key = t.entry
            # The writer stores every page not "in parent": pass the lazy pages as
            # in-parent so their data stays out, then write the real flags.
            hold = lazy if not keep_data else np.zeros_like(lazy)
            _iset.write_pagemap_and_pages(ad.tmp, n, pm.pages_id, t.addrs, hold, lazy, key,
                                          t.sources, t.src, t.row, ps, wide=pm.wide)
            brk = _img.run_breaks(t.addrs, ps, lazy, key)
            lens = np.diff(np.append(brk, t.addrs.size)).astype(np.uint64)
            present = ~lazy[brk] if not keep_data else np.ones(brk.size, dtype=bool)
            flags = (np.where(present, PE_PRESENT, 0) |
                     np.where(lazy[brk], PE_LAZY, 0)).astype(np.uint32)
            data = _img.encode_pagemap(pm.pages_id, t.addrs[brk], lens, flags, pm.wide)
            tmp = os.path.join(ad.tmp, n + ".tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(ad.tmp, n))
            if _img.is_task_pagemap(n):
                pid = int(n[len("pagemap-"):-len(".img")])
                lazy_n[pid] = int(lazy.sum())
                stored_n[pid] = int(t.addrs.size - (0 if keep_data else lazy.sum()))
    return LazySetResult(ad.final, lazy_n, stored_n)


# --------------------------------------------------------------------------- the daemon

_MADV_POPULATE_READ = 22  # Linux 5.14


def _populate(arr: np.ndarray) -> None:
    """Map the store's pages into our page tables now (MADV_POPULATE_READ), so the
    fill does not take a page fault per source page of a file mmap (pages-N.img).
    Best effort: older kernels or anonymous memory already present just return."""
    import ctypes
    import mmap
    if arr.size == 0:
        return
    start = arr.ctypes.data & ~(mmap.PAGESIZE - 1)
    end = arr.ctypes.data + arr.nbytes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_POPULATE_READ)


def _bind_in(directory: str) -> socket.socket:
    """A listening UNIX socket named LAZY_SOCKET in directory (a stale one is
    replaced). Long directory paths go through /proc/self/fd (sun_path holds 107)."""
    path = os.path.join(directory, LAZY_SOCKET)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if len(path.encode()) < 100:
            s.bind(path)
        else:
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                s.bind(f"/proc/self/fd/{dfd}/{LAZY_SOCKET}")
            finally:
                os.close(dfd)
        s.listen(4)
    except BaseException:
        s.close()
        raise
    return s


class LazyPagesDaemon:
    """Serve ``criu restore --lazy-pages`` of ``images_dir`` from a page store.

    ``pages``: the content of the lazy pages, per dumped pid: a mapping
    ``{pid: store}`` where a store is ``(addrs, pages)`` (sorted uint64 addresses,
    (n, page_size) uint8 rows; read-only mmap views are fine and are not copied) or
    the destination's :class:`statesync.migration.pagetable.PageTable` (served in
    place, no copy); a single store when the tree is one task; or an image set (path
    or ImageSet) holding every page (a full dump). Every PE_LAZY page of the restore
    set must be in the store, else :class:`LazyPagesError` at construction;
    ``missing="zero"`` serves absent ones as zero pages instead (for a store that
    leaves out all-zero pages).

    ``work_dir``: CRIU's ``-W`` (default: images_dir), where the socket is made.
    ``chunk``: pages per background copy ioctl. ``prefetch=False`` serves faults only
    (a measurement mode: the daemon then ends only when every page was faulted in or
    dropped, or by :meth:`cancel`; an exited task is noticed by a failing copy,
    which only the background fill makes). ``accept_timeout``: seconds to wait for
    CRIU. ``populate``: from :meth:`start` on, a helper thread maps the store into
    our page tables (MADV_POPULATE_READ), in parallel with CRIU's restore, so the
    fill does not take a page fault per source page of a pages-N.img mmap (about
    0.2 s per GiB here, off the critical path).

    ``on_failure="kill"``: when the daemon fails (or is cancelled) while restored
    tasks still miss pages, it SIGKILLs the restored tree (:meth:`set_restored`
    names it; :func:`lazy_restore` does that) before it releases their
    userfaultfds; ``"keep"`` leaves that to the caller.

    One thread runs the C loop with the GIL released; :meth:`wait` joins it.
    """

    def __init__(self, images_dir, pages, work_dir=None, chunk: int = 256,
                 prefetch: bool = True, missing: str = "error",
                 accept_timeout: Optional[float] = 120.0, page_size: int = PAGE_SIZE,
                 max_latencies: int = 1 << 20, populate: bool = True,
                 on_failure: str = "kill", remote=None, on_close=None):
        if missing not in ("error", "zero"):
            raise ValueError("missing must be 'error' or 'zero'")
        self.images_dir = os.path.abspath(os.fspath(images_dir))
        self.work_dir = os.path.abspath(os.fspath(work_dir)) if work_dir else self.images_dir
        self.page_size = int(page_size)
        self.chunk = int(chunk)
        self.prefetch = bool(prefetch)
        self.accept_timeout = accept_timeout
        self.max_latencies = int(max_latencies)
        self.populate = bool(populate)
        # post-copy: (addrs, buffer, req_fd, supply_fd) of the pages still at the source
        # (see _core.lazy_serve and migration.postcopy); their rows become remote rows
        self.remote = remote
        self.on_close = on_close        # called by close() once the C loop has stopped
        self._stores = self._build_stores(pages, missing)
        self._sock: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._cancel_r = self._cancel_w = -1
        self._result: Optional[LazyStats] = None
        self._error: Optional[BaseException] = None
        if on_failure not in ("kill", "keep"):
            raise ValueError("on_failure must be 'kill' or 'keep'")
        self.on_failure = on_failure
        self.restored_pid = 0
        self._fail_lock = threading.Lock()
        self._left_fds: list = []
        self._killed = False

    # -- stores

    def _pids(self):
        tree = _img.read_pstree(os.path.join(self.images_dir, "pstree.img"))
        return [int(e["pid"]) for e in tree]

    def _source_for(self, pages, pid):
        """(addrs, slots or None, rows array) of pid's pages in the store."""
        if isinstance(pages, Mapping):
            got = pages.get(pid)
        elif isinstance(pages, tuple) and len(pages) == 2:
            got = pages
        elif _is_page_table(pages):
            got = pages
        else:
            s = pages if isinstance(pages, _iset.ImageSet) else _iset.ImageSet(pages,
                                                                               self.page_size)
            if not os.path.exists(os.path.join(s.path, f"pagemap-{pid}.img")):
                return None
            got = (s.addresses(pid), s.pages(pid))
        if got is None:
            return None
        if _is_page_table(got):
            # statesync's PageStore (migration.pagetable.PageTable, the destination's
            # store): keys sorted, slots[i] the row of keys[i], rows in chunks; the
            # chunks are served in place (pieces), never gathered
            if hasattr(got, "pieces"):
                return got.keys, got.slots, [(int(a), c) for a, c in got.pieces()]
            return got.keys, got.slots, got.rows[:got.used]
        return got[0], None, got[1]

    def _build_stores(self, pages, missing):
        stores = []
        ps = self.page_size
        pids = self._pids()
        if (isinstance(pages, tuple) or _is_page_table(pages)) and len(pids) != 1:
            raise ValueError(f"{len(pids)} tasks in {self.images_dir}: give pages per pid")
        self.lazy_total = 0
        for pid in pids:
            pm_path = os.path.join(self.images_dir, f"pagemap-{pid}.img")
            if not os.path.exists(pm_path):
                continue  # a zombie or a thread-less helper: no memory
            lazy = lazy_pages(self.images_dir, pid, ps)
            if lazy.size == 0:
                continue
            src = self._source_for(pages, pid)
            if src is None:
                raise LazyPagesError(f"pid {pid}: {lazy.size} lazy pages in {pm_path} but the "
                                     "page store has nothing for this pid; pass its pages",
                                     pid=pid)
            addrs = np.ascontiguousarray(src[0], dtype=np.uint64)
            slots = src[1]
            data = src[2]
            if isinstance(data, list):
                data = [(first, _rows_u8(c, ps)) for first, c in data]
                nrows = max((first + c.shape[0] for first, c in data), default=0)
            else:
                data = _rows_u8(data, ps)
                nrows = data.shape[0]
            if slots is None and nrows != addrs.size:
                raise ValueError(f"pid {pid}: {addrs.size} addresses but {nrows} pages")
            if slots is not None and slots.size != addrs.size:
                raise ValueError(f"pid {pid}: {addrs.size} keys but {slots.size} slots")
            if addrs.size > 1 and np.any(addrs[1:] <= addrs[:-1]):
                raise ValueError(f"pid {pid}: store addresses must be sorted and unique")
            pos = np.searchsorted(addrs, lazy)
            ok = pos < addrs.size
            ok[ok] = addrs[pos[ok]] == lazy[ok]
            rows = np.full(lazy.size, -1, dtype=np.int64)
            if slots is None:
                rows[ok] = pos[ok]
            else:
                rows[ok] = np.asarray(slots, dtype=np.int64)[pos[ok]]
                if rows.size and int(rows.max()) >= nrows:
                    raise ValueError(f"pid {pid}: a slot points past the store's "
                                     f"{nrows} rows")
            if self.remote is not None and self.remote[0].size:
                # pages still at the source (post-copy): remote page k has row
                # LAZY_ROW_REMOTE - k, whatever (stale) copy the store may hold
                from statesync._core import LAZY_ROW_REMOTE
                raddrs = self.remote[0]
                rpos = np.searchsorted(raddrs, lazy)
                rin = rpos < raddrs.size
                rin[rin] = raddrs[rpos[rin]] == lazy[rin]
                rows[rin] = LAZY_ROW_REMOTE - rpos[rin].astype(np.int64)
                ok |= rin
            if not ok.all() and missing == "error":
                bad = int(lazy[~ok][0])
                raise LazyPagesError(f"pid {pid}: page {bad:#x} is lazy in {pm_path} but not in "
                                     f"the page store ({int((~ok).sum())} such pages); restore "
                                     "it fully or pass missing='zero' if they are zero pages",
                                     pid=pid)
            stores.append((pid, lazy, rows, data, vma_breaks(self.images_dir, pid)))
            self.lazy_total += int(lazy.size)
        return stores

    # -- running

    @property
    def socket_path(self) -> str:
        return os.path.join(self.work_dir, LAZY_SOCKET)

    def start(self) -> "LazyPagesDaemon":
        """Listen on work_dir/lazy-pages.socket and start serving in a thread. Call
        before ``criu restore --lazy-pages`` starts (it connects at once)."""
        if self._thread is not None:
            raise RuntimeError("LazyPagesDaemon already started")
        self._sock = _bind_in(self.work_dir)
        self._cancel_r, self._cancel_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="statesync-lazy-pages",
                                        daemon=True)
        self._thread.start()
        if self.populate:
            threading.Thread(target=self._populate_all, name="statesync-lazy-populate",
                             daemon=True).start()
        return self

    def _populate_all(self):
        for st in self._stores:
            for arr in ([c for _, c in st[3]] if isinstance(st[3], list) else [st[3]]):
                if self.done:
                    return
                _populate(arr)

    def _run(self):
        from statesync import _core
        tmo = int(self.accept_timeout * 1000) if self.accept_timeout else 0
        try:
            raw, lat = _core.lazy_serve(self._sock.fileno(), self._stores, accept=True,
                                        page_size=self.page_size, chunk=self.chunk,
                                        cancel_fd=self._cancel_r, accept_timeout_ms=tmo,
                                        prefetch=self.prefetch,
                                        max_latencies=self.max_latencies,
                                        remote=self.remote)
            self._result = LazyStats.from_raw(raw, lat)
        except OSError as exc:
            self._error = exc
            with self._fail_lock:
                self._left_fds = list(getattr(exc, "left_fds", []))
            self._fail_stop()
        except BaseException as exc:  # a bug: keep it for wait()
            self._error = exc
        finally:
            self._close_sock()

    def set_restored(self, pid: int) -> None:
        """The restored tree's root pid (in our pid namespace), once ``criu restore``
        returned: from then on a failing daemon kills that tree before it releases
        the userfaultfds of tasks that still miss pages (``on_failure="kill"``)."""
        self.restored_pid = int(pid)
        self._fail_stop()

    def _fail_stop(self) -> None:
        """After a failure: kill the restored tree if its pid is known, then close
        the userfaultfds the C loop handed back open. Until the pid is known they
        stay open, and a task touching a missing page blocks instead of reading a
        zero page."""
        with self._fail_lock:
            if not self._left_fds:
                return
            if self.restored_pid <= 0 and self.on_failure == "kill":
                return  # wait for set_restored() (or close())
            if self.on_failure == "kill" and self.restored_pid > 0:
                from statesync import proc
                try:
                    proc.kill_tree([self.restored_pid], None)
                except Exception:  # noqa: BLE001 - gone already, or not ours to see
                    pass
                self._killed = True
            for fd in self._left_fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._left_fds = []

    def _close_sock(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    @property
    def stats(self) -> Optional[LazyStats]:
        """The statistics once the daemon has finished (None before)."""
        return self._result

    def wait(self, timeout: Optional[float] = None) -> LazyStats:
        """Wait until every page is in place. Raises TimeoutError (the daemon goes
        on) or LazyPagesError."""
        if self._thread is None:
            raise RuntimeError("LazyPagesDaemon not started")
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"lazy-pages daemon of {self.images_dir} still filling after "
                               f"{timeout:g} s")
        self._close_cancel()
        if self._error is not None:
            raise self._as_error(self._error)
        assert self._result is not None     # the thread ended without an error
        return self._result

    def _as_error(self, exc: BaseException) -> BaseException:
        if not isinstance(exc, OSError):
            return exc
        raw = getattr(exc, "stats", None) or {}
        lat = getattr(exc, "latencies", np.zeros(0, dtype=np.uint64))
        st = LazyStats.from_raw(raw, lat) if raw else None
        unfilled = st is not None and st.left > 0
        left = st.left if st is not None else 0
        import errno as _e
        why = {
            _e.ETIMEDOUT: f"criu restore never connected to {self.socket_path} within "
                          f"{self.accept_timeout} s (was --lazy-pages given, with -W/-D "
                          "pointing here?)",
            _e.ECONNRESET: "criu restore closed the lazy-pages socket before it finished "
                           "(the restore failed; see restore.log)",
            _e.ECANCELED: "cancelled",
        }.get(exc.errno or 0, str(exc))
        msg = f"lazy-pages daemon for {self.images_dir}: {why}"
        if unfilled and self._killed:
            msg += (f"; restored tasks still missed {left} pages: the restored tree "
                    f"(pid {self.restored_pid}) was killed; restore from a full image set")
        elif unfilled:
            msg += (f"; restored tasks still missed {left} pages, which now read as "
                    "zeros: kill the restored tree and restore from a full image set")
        return LazyPagesError(msg, pid=int(raw.get("err_pid", 0) or 0), errno=exc.errno or 0,
                              stats=st, unfilled=unfilled, killed=self._killed,
                              restored_pid=self.restored_pid)

    def cancel(self) -> None:
        """Stop the daemon now (its wait() then raises LazyPagesError, errno
        ECANCELED). With pages still missing, the restored tree is killed
        (``on_failure="kill"``) or, with ``"keep"``, reads zeros for them."""
        if self._cancel_w >= 0:
            try:
                os.write(self._cancel_w, b"x")
            except OSError:
                pass

    def _close_cancel(self):
        for fd in (self._cancel_r, self._cancel_w):
            if fd >= 0:
                os.close(fd)
        self._cancel_r = self._cancel_w = -1

    def close(self) -> None:
        """Cancel if still running, join, release everything (descriptors still held
        for a tree whose pid never came are closed: its tasks then read zeros)."""
        if self._thread is not None and self._thread.is_alive():
            self.cancel()
            self._thread.join(10)
        if self._thread is None or not self._thread.is_alive():
            self._close_cancel()
        with self._fail_lock:
            fds, self._left_fds = self._left_fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._close_sock()
        if self.on_close is not None and (self._thread is None or not self._thread.is_alive()):
            cb, self.on_close = self.on_close, None
            cb()        # e.g. the post-copy pipes: nothing reads them any more

    def __enter__(self):
        return self.start() if self._thread is None else self

    def __exit__(self, *exc):
        self.close()


def lazy_restore(images_dir, pages, work_dir=None, extra_args: Sequence[str] = (),
                 timeout: float = 300.0, netns: Optional[str] = None,
                 **daemon_kw) -> Tuple["object", LazyPagesDaemon]:
    """Start a :class:`LazyPagesDaemon` on images_dir, run ``criu restore -d
    --lazy-pages`` and return ``(RestoreResult, daemon)`` as soon as CRIU has
    returned (the tree runs; the daemon goes on filling: ``daemon.wait()``). When the
    restore fails the daemon is stopped and CriuError raised. The daemon knows the
    restored tree (``set_restored``): if it fails later, it kills the tree first."""
    from statesync.criu import driver
    d = LazyPagesDaemon(images_dir, pages, work_dir=work_dir, **daemon_kw)
    d.start()
    args = ["--lazy-pages"] + list(extra_args)
    if work_dir:
        args += ["-W", d.work_dir]
    try:
        r = driver.restore(images_dir, extra_args=args, timeout=timeout, netns=netns)
    except BaseException:
        d.close()
        raise
    d.set_restored(r.pid)
    return r, d
