"""The memory of a live process as /proc shows it: VMAs, pagemap entries, page contents.

Nothing here stops or changes the target. Reading pagemap and page contents
needs ptrace-read rights on it (same user without Yama restrictions, or
CAP_SYS_PTRACE); the PFN field of pagemap reads as 0 without CAP_SYS_ADMIN.

Errors: a pid that does not exist raises :class:`~statesync.errors.NoSuchProcess`,
missing rights :class:`~statesync.errors.AccessDenied`; both carry ``pid``.
Functions are thread-safe; the C parts release the GIL.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Tuple

import numpy as np

from . import _core
from ._consts import PAGE_SIZE
from .errors import AccessDenied, NoSuchProcess, ProcessError, ProcessGone

PROCFS = "/proc"

# pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)
PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_FILE = 1 << 61          # file page or shared anonymous
PM_UFFD_WP = 1 << 57
PM_EXCLUSIVE = 1 << 56
PM_SOFT_DIRTY = 1 << 55
PM_PFN_MASK = (1 << 55) - 1

#: Refuse pagemap() ranges bigger than this many pages (8 bytes each): 2 GiB of
#: entries. Walk big ranges with present_pages(), whose memory follows the result.
MAX_PAGEMAP_PAGES = 1 << 28


def os_error(pid: int, exc: OSError, what: str, gone: bool = False) -> ProcessError:
    """Turn an OSError about pid into statesync's error for it. ``gone`` says the
    process existed when we started (so vanishing means it exited meanwhile)."""
    e = exc.errno
    if e in (errno.ENOENT, errno.ESRCH):
        cls = ProcessGone if gone else NoSuchProcess
        verb = "exited while we were working on it" if gone else "no such process"
        return cls(pid, f"{what}: {verb}", exc)
    if e in (errno.EACCES, errno.EPERM):
        return AccessDenied(pid, f"{what}: permission denied (needs ptrace rights on the "
                                 "process: same user, or root / CAP_SYS_PTRACE)", exc)
    return ProcessError(pid, f"{what}: {exc.strerror or exc}", exc)


@dataclass(frozen=True)
class Vma:
    """One line of /proc/PID/maps: a virtual memory area [start, end)."""

    start: int
    end: int
    perms: str        # "rwxp" style: r, w, x, then p (private) or s (shared)
    offset: int       # file offset of start, bytes
    dev: str          # "major:minor" of the backing file, "00:00" for none
    inode: int
    path: str         # file path, "[heap]", "[stack]", "[vdso]", "[anon:NAME]" or ""

    @property
    def size(self) -> int:
        """Bytes."""
        return self.end - self.start

    @property
    def npages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def readable(self) -> bool:
        return self.perms[0:1] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1:2] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2:3] == "x"

    @property
    def private(self) -> bool:
        return self.perms[3:4] == "p"

    @property
    def shared(self) -> bool:
        return self.perms[3:4] == "s"

    @property
    def special(self) -> bool:
        """Kernel-provided areas ([vdso], [vvar], [vsyscall] ...), not process memory."""
        return self.path in ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]")

    @property
    def anonymous(self) -> bool:
        """Private or shared memory with no file behind it (heap, stacks, anon mmaps).
        Shared anonymous memory shows as "/dev/zero (deleted)" with an inode."""
        return self.inode == 0 and not self.special and (
            self.path == "" or self.path.startswith("[heap]") or
            self.path.startswith("[stack") or self.path.startswith("[anon:"))

    def __contains__(self, addr: int) -> bool:
        return self.start <= int(addr) < self.end


def parse_maps(data: bytes) -> List[Vma]:
    """Parse the bytes of a /proc/PID/maps file. Raises ValueError, naming the
    line, on anything that is not a maps line."""
    out: List[Vma] = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw:
            continue
        parts = raw.split(None, 5)
        try:
            rng, perms, off, dev, ino = parts[:5]
            lo, hi = rng.split(b"-")
            start, end = int(lo, 16), int(hi, 16)
            offset, inode = int(off, 16), int(ino)
            perms_s = perms.decode("ascii")
            dev_s = dev.decode("ascii")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"maps line {lineno}: not a VMA: {raw[:120]!r}") from exc
        if (end < start or len(perms_s) != 4 or start % PAGE_SIZE or end % PAGE_SIZE or
                start < 0 or end >= 1 << 64 or inode < 0 or dev_s.count(":") != 1):
            raise ValueError(f"maps line {lineno}: not a VMA: {raw[:120]!r}")
        path = parts[5].decode("utf-8", "surrogateescape").strip() if len(parts) > 5 else ""
        out.append(Vma(start, end, perms_s, offset, dev_s, inode, path))
    return out


def read_maps(pid: int, procfs: str = PROCFS) -> List[Vma]:
    """The VMAs of process pid, ascending. ``procfs`` lets tests point at fixtures."""
    try:
        with open(f"{procfs}/{int(pid)}/maps", "rb") as f:
            data = f.read()
    except OSError as exc:
        raise os_error(pid, exc, "read maps") from exc
    return parse_maps(data)


class PagemapEntries:
    """Pagemap entries of the pages [start, start + n * page_size), as numpy arrays.

    ``raw`` is the uint64 entry per page; the properties decode it (bool arrays,
    ``pfn`` uint64, zero where not readable or not present).
    """

    __slots__ = ("start", "raw", "page_size")

    def __init__(self, start: int, raw: np.ndarray, page_size: int = PAGE_SIZE):
        self.start = int(start)
        self.raw = raw
        self.page_size = int(page_size)

    def __len__(self) -> int:
        return int(self.raw.size)

    def _bit(self, mask: int) -> np.ndarray:
        return (self.raw & np.uint64(mask)) != 0

    @property
    def addrs(self) -> np.ndarray:
        return np.uint64(self.start) + np.arange(self.raw.size, dtype=np.uint64) * \
            np.uint64(self.page_size)

    @property
    def present(self) -> np.ndarray:
        return self._bit(PM_PRESENT)

    @property
    def swapped(self) -> np.ndarray:
        return self._bit(PM_SWAPPED)

    @property
    def file_shared(self) -> np.ndarray:
        """Page cache page or shared anonymous page."""
        return self._bit(PM_FILE)

    @property
    def exclusive(self) -> np.ndarray:
        return self._bit(PM_EXCLUSIVE)

    @property
    def soft_dirty(self) -> np.ndarray:
        return self._bit(PM_SOFT_DIRTY)

    @property
    def uffd_wp(self) -> np.ndarray:
        return self._bit(PM_UFFD_WP)

    @property
    def pfn(self) -> np.ndarray:
        """Page frame numbers of present pages (0 without CAP_SYS_ADMIN)."""
        return np.where(self.present, self.raw & np.uint64(PM_PFN_MASK), np.uint64(0))

    def __repr__(self) -> str:
        return (f"PagemapEntries(start={self.start:#x}, {len(self)} pages, "
                f"{int(self.present.sum())} present)")


def _open_pagemap(pid: int) -> int:
    try:
        return _core.pagemap_open(int(pid))
    except OSError as exc:
        raise os_error(pid, exc, "open pagemap") from exc


def pagemap(pid: int, start: int, end: int) -> PagemapEntries:
    """Pagemap entries for [start, end) (rounded out to pages) of process pid.
    Unmapped pages read as 0. Raises ValueError for ranges over MAX_PAGEMAP_PAGES."""
    ps = PAGE_SIZE
    lo, hi = int(start) // ps * ps, -(-int(end) // ps) * ps
    if hi < lo:
        raise ValueError(f"pagemap range end {end:#x} < start {start:#x}")
    n = (hi - lo) // ps
    if n > MAX_PAGEMAP_PAGES:
        raise ValueError(f"pagemap range of {n} pages is too big for one array "
                         f"(max {MAX_PAGEMAP_PAGES}); use present_pages() or smaller ranges")
    fd = _open_pagemap(pid)
    try:
        raw = _core.pagemap_read(fd, lo, n, ps)
    except OSError as exc:
        raise os_error(pid, exc, f"read pagemap {lo:#x}-{hi:#x}", gone=True) from exc
    finally:
        os.close(fd)
    return PagemapEntries(lo, raw, ps)


def present_pages(pid: int, vmas: Optional[Iterable[Vma]] = None, *,
                  swapped: bool = True, exclude: int = 0) -> np.ndarray:
    """Sorted uint64 addresses of the pages of ``vmas`` (default: every VMA except
    [vsyscall]-like special areas) that are present in RAM, or swapped out when
    ``swapped`` is true, leaving out pages whose pagemap entry has any bit of
    ``exclude`` (``PM_FILE``: page-cache pages of a file). Reads pagemap in bounded
    chunks in C: memory use follows the number of pages found, not the size of
    the VMAs."""
    if vmas is None:
        vmas = [v for v in read_maps(pid) if not v.special]
    mask = PM_PRESENT | (PM_SWAPPED if swapped else 0)
    fd = _open_pagemap(pid)
    parts = []
    try:
        for v in sorted(vmas, key=lambda v: v.start):
            a = _core.pagemap_select(fd, v.start, v.end, mask, PAGE_SIZE, exclude=exclude)
            if a.size:
                parts.append(a)
    except OSError as exc:
        raise os_error(pid, exc, "read pagemap", gone=True) from exc
    finally:
        os.close(fd)
    if not parts:
        return np.zeros(0, dtype=np.uint64)
    out = np.concatenate(parts)
    return np.unique(out) if len(parts) > 1 else out


def read_pages(pid: int, addrs) -> Tuple[np.ndarray, np.ndarray]:
    """Contents of process pid's pages at ``addrs`` (page-aligned addresses, any
    order): returns ``(contents, ok)``, an (n, page_size) uint8 array and an (n,)
    bool mask. Pages unmapped or unreadable meanwhile have ``ok`` False and zero
    bytes; the read goes on past them. Copies with process_vm_readv in batches
    (contiguous pages in one iovec), GIL released."""
    a = np.ascontiguousarray(addrs, dtype=np.uint64)
    if a.size and np.any(a % np.uint64(PAGE_SIZE)):
        raise ValueError("read_pages: addresses must be page aligned")
    try:
        return _core.read_pages(int(pid), a, PAGE_SIZE)
    except OSError as exc:
        raise os_error(pid, exc, "read pages") from exc


def hash_pages(pid: int, addrs) -> Tuple[np.ndarray, np.ndarray]:
    """128-bit content hash of each page at ``addrs`` in process pid, read and
    hashed in bounded batches in C: ``(hashes (n, 2) uint64, ok bool)``."""
    a = np.ascontiguousarray(addrs, dtype=np.uint64)
    if a.size and np.any(a % np.uint64(PAGE_SIZE)):
        raise ValueError("hash_pages: addresses must be page aligned")
    try:
        return _core.hash_remote(int(pid), a, PAGE_SIZE)
    except OSError as exc:
        raise os_error(pid, exc, "read pages") from exc


def status(pid: int, procfs: str = PROCFS) -> dict:
    """/proc/PID/status as a dict of strings."""
    try:
        with open(f"{procfs}/{int(pid)}/status") as f:
            text = f.read()
    except OSError as exc:
        raise os_error(pid, exc, "read status") from exc
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        out[k.strip()] = v.strip()
    return out


def threads(pid: int, procfs: str = PROCFS) -> List[int]:
    """Thread ids of process pid, main thread first."""
    try:
        tids = sorted(int(t) for t in os.listdir(f"{procfs}/{int(pid)}/task"))
    except OSError as exc:
        raise os_error(pid, exc, "list threads") from exc
    if pid in tids:
        tids.remove(pid)
        tids.insert(0, pid)
    return tids


def state(pid: int, procfs: str = PROCFS) -> Optional[str]:
    """The one-letter state of process pid from /proc/PID/stat (``R`` running, ``S``
    sleeping, ``D`` disk wait, ``T`` stopped, ``t`` traced, ``Z`` zombie, ``X``
    dead ...), or None when there is no such process."""
    try:
        with open(f"{procfs}/{int(pid)}/stat", "rb") as f:
            # comm (in parentheses) may hold spaces and ")": the state follows the last ")".
            return f.read().rsplit(b")", 1)[1].split()[0].decode("ascii")
    except (OSError, IndexError, UnicodeDecodeError):
        return None


def exists(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    return state(pid) not in (None, "Z")


def descendants(pid: int, procfs: str = PROCFS) -> List[int]:
    """The pids of every descendant of process pid (children of any of its threads,
    recursively), parents before their children; pid itself is not included. Empty
    when pid does not exist. A snapshot: processes may start or exit meanwhile."""
    out: List[int] = []
    todo = [int(pid)]
    seen = {int(pid)}
    while todo:
        p = todo.pop(0)
        try:
            tids = os.listdir(f"{procfs}/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"{procfs}/{p}/task/{tid}/children") as f:
                    kids = [int(c) for c in f.read().split()]
            except OSError:
                continue
            for c in kids:
                if c not in seen:
                    seen.add(c)
                    out.append(c)
                    todo.append(c)
    return out


def find_by_cmdline(match: Callable[[List[str]], bool], procfs: str = PROCFS) -> List[int]:
    """pids of the processes whose command line (``/proc/PID/cmdline`` split at NULs,
    decoded as UTF-8 with replacement; ``[]`` for kernel threads) satisfies
    ``match(args)``. A snapshot: processes may come and go meanwhile."""
    out: List[int] = []
    for d in os.listdir(procfs):
        if not d.isdigit():
            continue
        try:
            with open(f"{procfs}/{d}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        parts = raw.split(b"\0")
        if parts and parts[-1] == b"":
            parts.pop()         # the NUL that ends the last argument
        args = [a.decode("utf-8", "replace") for a in parts]
        if args and match(args):
            out.append(int(d))
    return out


def kill_tree(pids: Iterable[Optional[int]], popen=None, timeout: float = 10.0) -> None:
    """SIGKILL every process in ``pids`` and all their descendants, then reap
    ``popen`` (a :class:`subprocess.Popen`, e.g. the ``unshare``/``nsenter`` wrapper
    that started them), and wait until none of them runs any more, at most ``timeout``
    seconds in all. Pids that are 0, None
    or already gone are skipped. SIGKILL because the init of a pid namespace ignores
    SIGTERM sent from outside; descendants are collected before anything is killed,
    so none is missed by being reparented."""
    roots = [int(p) for p in pids if p]
    if popen is not None:
        roots.append(popen.pid)
    victims: List[int] = []
    for p in roots:
        for q in [p] + descendants(p):
            if q not in victims:
                victims.append(q)
    for q in victims:
        try:
            os.kill(q, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    if popen is not None:
        try:
            popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    # SIGKILL is delivered asynchronously: a pid-namespace init first has to take
    # down its namespace, and a victim reparented by the wrapper's death is reaped
    # by its new parent later. Return only once none of them runs any more (reaping
    # those that are our own children), so callers can rely on "killed" meaning gone.
    pending = [q for q in victims if popen is None or q != popen.pid]
    while pending and time.monotonic() < deadline:
        for q in pending:
            try:
                os.waitpid(q, os.WNOHANG)
            except ChildProcessError:
                pass
        pending = [q for q in pending if exists(q)]
        if pending:
            time.sleep(0.005)


def fd_count(pid: int) -> int:
    """Number of open file descriptors of pid."""
    try:
        return len(os.listdir(f"{PROCFS}/{int(pid)}/fd"))
    except OSError as exc:
        raise os_error(pid, exc, "list fds") from exc
