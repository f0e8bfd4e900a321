"""CRIU: driving it, reading and writing its image sets, deltas between dumps.

Driving CRIU (root needed)::

    info = statesync.criu.check()            # CriuInfo: path, version, ok, features, reasons
    r = statesync.criu.dump(pid, "img1", leave_running=True)
    r.stats["frozen_time"]                    # microseconds, from stats-dump
    p = statesync.criu.restore("img1")        # RestoreResult: .pid (in our pid namespace)

A failing CRIU call raises :class:`~statesync.errors.CriuError` carrying the command,
exit status and the tail of CRIU's log.

Images (no root, no CRIU binary needed; our own reader/writer, see
:mod:`statesync._criu_images`)::

    s = statesync.criu.ImageSet("img2")       # resolves the ``parent`` chain
    s.addresses()                             # uint64 page addresses (sorted)
    s.pages()                                 # (n, page_size) uint8, mmap view for a full dump
    d = statesync.criu.diff("img1", "img2")   # DirtySet of the pages of img2 that differ
    statesync.criu.write_incremental("img2", "img1", "inc")   # PE_PARENT where unchanged
    statesync.criu.flatten("inc", "full")     # one self-contained image set

Which CRIU: ``$STATESYNC_CRIU`` when set, else the one scripts/install-criu.sh installed
and probed (recorded in /var/lib/statesync/criu-ok), else the first ``criu`` of version
>= 4 on PATH (then /usr/local/sbin, /usr/sbin, /sbin), else the first ``criu`` found.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from . import _criu_images as _img
from ._criu_images import PE_LAZY, PE_PARENT, PE_PRESENT, VMA_DTYPE  # noqa: F401  (re-exported)
from .errors import CriuError, CriuImageError, NoSuchProcess
from .tracking import DirtySet
from ._consts import PAGE_SIZE

__all__ = ["CriuInfo", "DumpResult", "RestoreResult", "ImageSet", "find_criu", "check", "dump",
           "restore", "diff", "write_incremental", "flatten", "write_image_set", "info",
           "PE_PARENT", "PE_LAZY", "PE_PRESENT", "VMA_DTYPE", "WriteResult"]

MIN_VERSION = (4, 0)
# Features probed with `criu check --feature NAME`, under the names we report.
FEATURES = {"mem_dirty_track": "mem_dirty_track", "lazy_pages": "uffd-noncoop",
            "uffd": "uffd", "pidfd_store": "pidfd_store", "timens": "timens",
            "clone3_set_tid": "clone3_set_tid", "network_lock_nftables": "network_lock_nftables"}
_SEARCH_EXTRA = ["/usr/local/sbin", "/usr/sbin", "/sbin"]


# --------------------------------------------------------------------------- finding CRIU


def _version_of(path: str):
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    m = re.search(r"Version:\s*(\S+)", out)
    if not m:
        return None, None
    nums = tuple(int(x) for x in re.findall(r"\d+", m.group(1))[:3])
    return m.group(1), nums


@functools.lru_cache(maxsize=8)
def _version_cached(path: str):
    """:func:`_version_of`, run once per binary (until ``check(refresh=True)``)."""
    return _version_of(path)


INSTALL_STAMP = "/var/lib/statesync/criu-ok"


def find_criu() -> Optional[str]:
    """Path of the CRIU binary statesync uses (see the module docstring), or None."""
    env = os.environ.get("STATESYNC_CRIU")
    if env:
        return env
    # The binary scripts/install-criu.sh probed last (it may shadow an older distribution
    # criu that comes first on a PATH without /usr/local/sbin).
    try:
        with open(INSTALL_STAMP) as f:
            stamped = f.read().split()[0]
        if os.access(stamped, os.X_OK):
            return stamped
    except (OSError, IndexError):
        pass
    return _find_criu_cached(os.environ.get("PATH", ""))


@functools.lru_cache(maxsize=4)
def _find_criu_cached(path_env: str) -> Optional[str]:
    dirs = [d for d in path_env.split(os.pathsep) if d] + _SEARCH_EXTRA
    seen, found = set(), []
    for d in dirs:
        p = os.path.join(d, "criu")
        if p in seen or not (os.path.isfile(p) and os.access(p, os.X_OK)):
            continue
        seen.add(p)
        found.append(p)
        _, ver = _version_cached(p)
        if ver and ver >= MIN_VERSION:
            return p
    return found[0] if found else None


@dataclass
class CriuInfo:
    """What :func:`check` found. ``ok`` is True when CRIU is >= 4.0 and ``criu check``
    passes; ``reasons`` says why not, and per feature why it is missing."""

    path: Optional[str]
    version: Optional[str]
    version_tuple: tuple
    ok: bool
    features: Dict[str, bool] = field(default_factory=dict)
    reasons: Dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"path": self.path, "version": self.version, "ok": self.ok,
                "features": dict(self.features), "reasons": dict(self.reasons)}


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@functools.lru_cache(maxsize=4)
def _check_cached(path: Optional[str]) -> CriuInfo:
    if not path:
        return CriuInfo(None, None, (), False, {}, {
            "criu": "no criu binary found (set STATESYNC_CRIU or run scripts/install-criu.sh)"})
    version, vt = _version_cached(path)
    info = CriuInfo(path, version, vt or (), False)
    if not version:
        info.reasons["criu"] = f"{path} --version did not report a version"
        return info
    if vt < MIN_VERSION:
        info.reasons["criu"] = (f"CRIU {version} at {path} is older than "
                                f"{'.'.join(map(str, MIN_VERSION))} (run scripts/install-criu.sh)")
    if os.geteuid() != 0:
        info.reasons.setdefault("criu", "criu check needs root")
        return info
    r = subprocess.run([path, "check"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        info.reasons.setdefault("criu", f"criu check failed: {_last_line(r.stdout + r.stderr)}")
    else:
        info.ok = vt >= MIN_VERSION
    for name, feat in FEATURES.items():
        r = subprocess.run([path, "check", "--feature", feat], capture_output=True, text=True,
                           timeout=60)
        info.features[name] = r.returncode == 0
        if r.returncode != 0:
            info.reasons[name] = _last_line(r.stdout + r.stderr) or f"exit status {r.returncode}"
    return info


def check(refresh: bool = False) -> CriuInfo:
    """Find CRIU and probe it (version, ``criu check``, features). Cached per binary;
    ``refresh=True`` probes again. Never raises for a missing/broken CRIU: look at
    ``ok`` and ``reasons``."""
    if refresh:
        _check_cached.cache_clear()
        _find_criu_cached.cache_clear()
        _version_cached.cache_clear()
    return _check_cached(find_criu())


def _criu_or_raise() -> str:
    """The CRIU binary for dump/restore: found and new enough. Only ``criu --version``
    (once per binary), not the full :func:`check` (about 0.5 s of ``criu check`` runs
    here): dump and restore sit on a migration's switch-over path. A CRIU that cannot
    work on this kernel fails the command itself, with its log tail."""
    path = find_criu()
    if not path:
        raise CriuError("no criu binary found (set STATESYNC_CRIU or run "
                        "scripts/install-criu.sh as root)")
    version, vt = _version_cached(path)
    if not vt or vt < MIN_VERSION:
        raise CriuError(f"{path}: CRIU {version or '(no version reported)'} is unusable, "
                        f"statesync needs >= {'.'.join(map(str, MIN_VERSION))} "
                        f"(run scripts/install-criu.sh as root)")
    return path


def netns_of(pid: int) -> Optional[str]:
    """``/proc/PID/ns/net`` when process pid lives in another network namespace than
    ours, else None: what :func:`dump` / :func:`restore` take as ``netns`` to run CRIU
    beside the process (CRIU then never tries to dump a network namespace)."""
    try:
        if os.stat(f"/proc/{int(pid)}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino:
            return None
    except OSError:
        return None
    return f"/proc/{int(pid)}/ns/net"


def _in_netns(netns: Optional[str]) -> List[str]:
    """Command prefix that runs a program in network namespace ``netns``: a path to a
    namespace file, or a name under /run/netns; nothing for None."""
    if not netns:
        return []
    path = netns if "/" in netns else f"/run/netns/{netns}"
    return ["nsenter", f"--net={path}", "--"]


# --------------------------------------------------------------------------- dump / restore


@dataclass
class DumpResult:
    """A finished ``criu dump``: ``stats`` from stats-dump (times in microseconds,
    counts in pages), ``wall_time`` in seconds as we measured it."""

    images_dir: str
    stats: dict
    wall_time: float
    cmd: List[str]


@dataclass
class RestoreResult:
    """A finished ``criu restore``: ``pid`` of the restored root task in our pid
    namespace, ``stats`` from stats-restore (microseconds), ``wall_time`` seconds."""

    pid: int
    images_dir: str
    stats: dict
    wall_time: float
    cmd: List[str]


def _log_tail(path: str, lines: int = 25) -> str:
    """The last ``lines`` error lines of a CRIU log (the last lines when it has no
    error line): what a CriuError carries. Reads at most the last 64 KiB."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 65536))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    all_lines = text.splitlines()
    errors = [ln for ln in all_lines if "Error" in ln or "error" in ln]
    return "\n".join((errors or all_lines)[-lines:])


def _run_criu(cmd: List[str], log: str, what: str, timeout: float,
              netns: Optional[str] = None) -> float:
    """Run a CRIU command line (in network namespace ``netns`` when given); returns
    its wall time in seconds. Raises CriuError with the log tail of ``log``."""
    cmd = _in_netns(netns) + list(cmd)
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise CriuError(f"criu {what} did not finish within {timeout:g} s", cmd, None,
                        _log_tail(log)) from None
    wall = time.monotonic() - t0
    if r.returncode != 0:
        tail = _log_tail(log) or (r.stdout + r.stderr)
        raise CriuError(f"criu {what} failed", cmd, r.returncode, tail)
    return wall


def dump(pid: int, images_dir, leave_running: bool = False, parent=None,
         track_mem: Optional[bool] = None, extra_args: Sequence[str] = (),
         timeout: float = 300.0, netns: Optional[str] = None) -> DumpResult:
    """``criu dump`` of process ``pid`` (and its children) into ``images_dir`` (created
    if missing). ``leave_running`` keeps it running afterwards (else CRIU kills it).
    ``parent`` is passed as ``--prev-images-dir`` (relative to images_dir); CRIU itself
    only accepts a pre-dump there and needs soft-dirty tracking (``track_mem``; None =
    on when a parent is given and the kernel supports it) — on kernels without
    soft-dirty use a plain dump and :func:`write_incremental`. ``extra_args`` go to
    CRIU as they are (``--leave-stopped``: keep the tree frozen after the dump, as a
    migration's switch-over does). ``netns`` runs CRIU in that network namespace
    (a path such as :func:`netns_of` returns, or a name under /run/netns): needed when
    the process lives in another one, so CRIU does not try to dump it. ``timeout`` in
    seconds. The log is ``images_dir/dump.log``. Raises NoSuchProcess, CriuError."""
    criu = _criu_or_raise()
    if not os.path.exists(f"/proc/{int(pid)}"):
        raise NoSuchProcess(int(pid), "no such process to dump")
    images_dir = os.path.abspath(os.fspath(images_dir))
    os.makedirs(images_dir, exist_ok=True)
    cmd = [criu, "dump", "-t", str(int(pid)), "-D", images_dir, "-o", "dump.log"]
    if leave_running:
        cmd.append("--leave-running")
    if parent is not None:
        cmd += ["--prev-images-dir", os.path.relpath(os.path.abspath(os.fspath(parent)), images_dir)]
        if track_mem is None:
            track_mem = check().features.get("mem_dirty_track", False)
    if track_mem:
        cmd.append("--track-mem")
    cmd += list(extra_args)
    wall = _run_criu(cmd, os.path.join(images_dir, "dump.log"), f"dump of pid {int(pid)}",
                     timeout, netns)
    stats = {}
    sp = os.path.join(images_dir, "stats-dump")
    if os.path.exists(sp):
        stats = _img.read_stats(sp)
    return DumpResult(images_dir, stats, wall, cmd)


def restore(images_dir, detach: bool = True, extra_args: Sequence[str] = (),
            timeout: float = 300.0, netns: Optional[str] = None) -> RestoreResult:
    """``criu restore`` from ``images_dir``. With ``detach`` (``-d``) CRIU returns once
    the tree runs; the restored root's pid (in our pid namespace) is read from a pid
    file. The original pids must be free, or the dumped root was the init of its own
    pid namespace (then CRIU makes a new one). ``netns``: run CRIU in that network
    namespace (as for :func:`dump`); the restored tree then lives there. Raises
    CriuError."""
    criu = _criu_or_raise()
    images_dir = os.path.abspath(os.fspath(images_dir))
    if not os.path.isdir(images_dir):
        raise CriuError(f"restore: {images_dir} is not a directory")
    pidfile = os.path.join(images_dir, f".restore-{os.getpid()}-{time.monotonic_ns()}.pid")
    cmd = [criu, "restore", "-D", images_dir, "-o", "restore.log", "--pidfile", pidfile]
    if detach:
        cmd.append("-d")
    cmd += list(extra_args)
    try:
        wall = _run_criu(cmd, os.path.join(images_dir, "restore.log"), "restore", timeout,
                         netns)
        try:
            with open(pidfile) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            pid = -1
    finally:
        try:
            os.unlink(pidfile)
        except OSError:
            pass
    stats = {}
    sp = os.path.join(images_dir, "stats-restore")
    if os.path.exists(sp):
        stats = _img.read_stats(sp)
    return RestoreResult(pid, images_dir, stats, wall, cmd)


# --------------------------------------------------------------------------- images


class ImageSet(_img.ImageSet):
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
        s = self
        while s is not None:
            s._tables.clear()
            s._pages.clear()
            s = s.parent

    def __repr__(self) -> str:
        return f"ImageSet({self.path!r}, chain={len(self.chain)})"


def _as_set(x) -> ImageSet:
    return x if isinstance(x, _img.ImageSet) else ImageSet(x)


def diff(old, new, pid=None) -> DirtySet:
    """The pages of ``new`` whose content differs from ``old`` (both image sets or
    directories of the same process), as a :class:`DirtySet` of page addresses.
    Pages of ``new`` absent from ``old`` count as changed; pages only in ``old`` do
    not appear. The compare runs in C with the GIL released. Raises CriuImageError."""
    from . import _core

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
        pos = np.searchsorted(to.addrs, tn.addrs)
        match = pos < to.addrs.size
        match[match] = to.addrs[pos[match]] == tn.addrs[match]
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
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
               if os.path.isfile(os.path.join(path, n)) and not os.path.islink(os.path.join(path, n)))


def _write(base: ImageSet, out_dir, parent: Optional[ImageSet],
           overrides: Optional[Dict[str, tuple]] = None) -> WriteResult:
    from . import _core

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
    with _img.AtomicDir(out_dir) as ad:
        _img.copy_non_memory(base.path, ad.tmp)
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
            tt = _img.PageTable(addrs, src, row, key, None, sources)
            in_parent = np.zeros(addrs.size, dtype=bool)
            pt = ptables.get(n)
            if pt is not None:
                in_parent = ~_changed_pages(tt, pt, ps, _core)
            e, w = _img.write_pagemap_and_pages(ad.tmp, n, pm.pages_id, addrs, in_parent, lazy,
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
    keep = ~np.isin(t.addrs, o_addrs, assume_unique=True)
    addrs = np.concatenate([t.addrs[keep], o_addrs])
    order = np.argsort(addrs, kind="stable")
    extra = len(t.sources)
    src = np.concatenate([t.src[keep], np.full(o_addrs.size, extra, dtype=np.int32)])[order]
    row = np.concatenate([t.row[keep], np.arange(o_addrs.size, dtype=np.int64)])[order]
    # Replaced pages keep their template entry (and PE_LAZY); new ones form runs of
    # their own (key -1 - ...) and are not lazy.
    pos = np.searchsorted(t.addrs, o_addrs)
    inside = pos < t.addrs.size
    inside[inside] = t.addrs[pos[inside]] == o_addrs[inside]
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
        i = np.searchsorted(v["start"], addrs, side="right") - 1
        ok = i >= 0
        ok[ok] = addrs[ok] < v["end"][i[ok]]
        if not ok.all():
            raise ValueError(f"page {int(addrs[~ok][0]):#x} lies in no VMA of the template "
                             f"{base.path} ({int((~ok).sum())} such pages)")
    return _write(base, out_dir, parent, {name: (addrs, pages)})


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


# --------------------------------------------------------------------------- CLI


def cli_register(sub) -> None:
    p = sub.add_parser("criu", help="CRIU images: info, diff, incremental, flatten, check")
    csub = p.add_subparsers(dest="criu_command", metavar="SUBCOMMAND")
    c = csub.add_parser("info", help="pages, bytes, VMAs and parent chain of an image set")
    c.add_argument("dir")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_cli_info)
    c = csub.add_parser("diff", help="pages of NEW whose content differs from OLD")
    c.add_argument("old")
    c.add_argument("new")
    c.add_argument("--pid", type=int)
    c.add_argument("--list", action="store_true", help="print every changed page address")
    c.set_defaults(func=_cli_diff)
    c = csub.add_parser("incremental", help="write NEW as an incremental set over --parent")
    c.add_argument("new")
    c.add_argument("--parent", required=True)
    c.add_argument("-o", "--output", required=True)
    c.set_defaults(func=_cli_incremental)
    c = csub.add_parser("flatten", help="write a chain as one self-contained set")
    c.add_argument("dir")
    c.add_argument("-o", "--output", required=True)
    c.set_defaults(func=_cli_flatten)
    c = csub.add_parser("check", help="find CRIU and report its version and features")
    c.set_defaults(func=_cli_check)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _mb(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def _cli_info(a) -> int:
    import json
    d = info(a.dir)
    if a.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"{d['path']}")
    print(f"  chain: {' -> '.join(d['chain'])}")
    for p in d["processes"]:
        print(f"  {p['pagemap']}: {p['pages']} pages ({_mb(p['bytes'])}), "
              f"{p['pages_here']} stored here, {p['pages_in_parent']} in parent, "
              f"{p['entries']} entries" + (f", {p['vmas']} VMAs ({_mb(p['vma_bytes'])})"
                                          if p.get("vmas") else ""))
    return 0


def _cli_diff(a) -> int:
    t0 = time.monotonic()
    new = ImageSet(a.new)
    d = diff(a.old, new, a.pid)
    dt = time.monotonic() - t0
    n = new.table(a.pid).addrs.size
    print(f"{len(d)} of {n} pages differ ({_mb(d.nbytes)}) in {dt * 1000:.1f} ms")
    if a.list:
        for x in d.pages.tolist():
            print(f"{x:#x}")
    return 0


def _cli_incremental(a) -> int:
    r = write_incremental(a.new, a.parent, a.output)
    print(f"{r.path}: {r.pages_written} pages stored, {r.pages_in_parent} in parent, "
          f"{_mb(r.nbytes)}")
    return 0


def _cli_flatten(a) -> int:
    r = flatten(a.dir, a.output)
    print(f"{r.path}: {r.pages_written} pages, {_mb(r.nbytes)}")
    return 0


def _cli_check(a) -> int:
    i = check()
    print(f"criu: {i.path or 'not found'}  version: {i.version}  ok: {i.ok}")
    for k, v in sorted(i.features.items()):
        print(f"  {k}: {'yes' if v else 'no'}" + ("" if v else f"  ({i.reasons.get(k, '')})"))
    if "criu" in i.reasons:
        print(f"  {i.reasons['criu']}")
    return 0 if i.ok else 1
