"""Which pages a running process writes: exact dirty-page tracking of unmodified
processes.

    with statesync.Tracker(pid, method="auto") as t:   # "uffd" | "softdirty" | "hash"
        t.method          # the method actually used
        d = t.collect()   # pages written since attach or the last collect
        d.pages           # sorted uint64 array of page addresses; len(d), d.nbytes

Methods (see docs/tracking.md for the kernel mechanics and their limits):

``uffd``
    userfaultfd write-protection in async mode plus the PAGEMAP_SCAN ioctl
    (Linux >= 6.7, x86_64). One ``userfaultfd()`` call is injected into the
    target with ptrace at attach (registers, signal mask and any interrupted
    system call are restored exactly; nothing in its memory is written), the
    descriptor is moved here with ``pidfd_getfd`` and the target's copy closed.
    The writable private anonymous VMAs are registered from here;
    ``collect()`` is a PAGEMAP_SCAN with PM_SCAN_WP_MATCHING|PM_SCAN_CHECK_WPASYNC
    per run of adjacent registered VMAs, which reports and re-arms in one
    atomic pass. VMAs the kernel refuses (file-backed, shared, owned by another
    userfaultfd) are tracked by content hashing inside the same tracker.
``softdirty``
    clear_refs "4" + pagemap bit 55. Detected at run time (needs
    CONFIG_MEM_SOFT_DIRTY).
``hash``
    a 128-bit hash of every present page of the writable VMAs, computed in C;
    dirty = hash changed, page appeared, or page vanished from a VMA that is
    still mapped. Needs only ptrace-read rights.

A tracker is not thread-safe: use it from one thread at a time. The target
keeps running throughout; every error leaves it running and unharmed.
"""
from __future__ import annotations

import errno
import functools
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import _core, proc
from .errors import (AccessDenied, AlreadyTraced, InjectionFailed, ProcessError, ProcessGone,
                     TrackerUnavailable, TrackingError)
from .proc import Vma
from ._consts import PAGE_SIZE

METHODS = ("uffd", "softdirty", "hash")

class DirtySet:
    """A set of dirty pages: ``pages`` is a sorted, duplicate-free ``uint64`` numpy
    array of page-aligned virtual addresses. Immutable by convention; cheap to build
    from any iterable or array of addresses (they are aligned down, sorted and
    de-duplicated)."""

    __slots__ = ("pages", "page_size")

    def __init__(self, pages=(), page_size: int = PAGE_SIZE):
        arr = np.asarray(pages, dtype=np.uint64).ravel()
        if arr.size:
            arr = np.unique(arr & ~np.uint64(page_size - 1))
        self.pages = arr
        self.page_size = int(page_size)

    @classmethod
    def _trusted(cls, pages: np.ndarray, page_size: int = PAGE_SIZE) -> "DirtySet":
        """Wrap an array already sorted, unique and aligned (no copy)."""
        d = cls.__new__(cls)
        d.pages = pages
        d.page_size = int(page_size)
        return d

    def __len__(self) -> int:
        return int(self.pages.size)

    @property
    def nbytes(self) -> int:
        """Bytes of memory the dirty pages cover (len * page_size)."""
        return len(self) * self.page_size

    def __iter__(self):
        return iter(self.pages.tolist())

    def __contains__(self, addr) -> bool:
        a = np.uint64(int(addr) & ~(self.page_size - 1))
        i = np.searchsorted(self.pages, a)
        return bool(i < self.pages.size and self.pages[i] == a)

    def __or__(self, other: "DirtySet") -> "DirtySet":
        return DirtySet._trusted(np.union1d(self.pages, other.pages), self.page_size)

    def __and__(self, other: "DirtySet") -> "DirtySet":
        return DirtySet._trusted(np.intersect1d(self.pages, other.pages, assume_unique=True),
                                 self.page_size)

    def __sub__(self, other: "DirtySet") -> "DirtySet":
        return DirtySet._trusted(np.setdiff1d(self.pages, other.pages, assume_unique=True),
                                 self.page_size)

    def __eq__(self, other) -> bool:
        return isinstance(other, DirtySet) and np.array_equal(self.pages, other.pages)

    def within(self, start: int, end: int) -> "DirtySet":
        """The pages in [start, end)."""
        lo, hi = np.searchsorted(self.pages, [np.uint64(start), np.uint64(end)])
        return DirtySet._trusted(self.pages[lo:hi], self.page_size)

    def __repr__(self) -> str:
        return f"DirtySet({len(self)} pages, {self.nbytes} bytes)"


# --------------------------------------------------------------------------- probes

_EMPTY = np.zeros(0, dtype=np.uint64)


def _merge(arrays) -> np.ndarray:
    """Sorted union of sorted uint64 arrays (no Python objects per page)."""
    arrays = [a for a in arrays if a.size]
    if not arrays:
        return _EMPTY
    if len(arrays) == 1:
        return arrays[0]
    a = np.concatenate(arrays)
    a.sort(kind="stable")  # runs of sorted input: timsort-like merge is fast
    keep = np.empty(a.size, dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def _in_sorted(x: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Boolean mask: which elements of x are in the sorted array sorted_set."""
    if not sorted_set.size or not x.size:
        return np.zeros(x.size, dtype=bool)
    i = np.minimum(np.searchsorted(sorted_set, x), sorted_set.size - 1)
    return sorted_set[i] == x


def _select(pm: int, ranges, mask: int) -> np.ndarray:
    """Sorted addresses of the pages in ``ranges`` ([(start, end)], ascending and
    disjoint, as VMAs and runs of them are) whose pagemap entry (read through the
    descriptor pm) has any bit of mask."""
    parts = [_core.pagemap_select(pm, s, e, mask, PAGE_SIZE) for s, e in ranges]
    parts = [p for p in parts if p.size]
    if not parts:
        return _EMPTY
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _tracked(v: Vma) -> bool:
    """VMAs whose pages the process can write: writable, not kernel-special."""
    return v.writable and not v.special


def _uffd_candidate(v: Vma) -> bool:
    """Writable private anonymous VMAs: what uffd-wp async mode can register."""
    return _tracked(v) and v.private and v.anonymous


@functools.lru_cache(maxsize=None)
def _probe_uffd() -> Tuple[bool, str]:
    """Can this kernel do async uffd-wp + PAGEMAP_SCAN? Tried on our own memory."""
    if sys.platform != "linux":
        return False, "needs Linux"
    if platform.machine() not in ("x86_64", "AMD64"):
        return False, (f"system-call injection into the target is implemented for x86_64 "
                       f"only (this is {platform.machine()})")
    import mmap
    fd = pm = -1
    try:
        fd = _core.uffd_create(os.O_CLOEXEC | os.O_NONBLOCK | _core.UFFD_USER_MODE_ONLY)
        want = _core.UFFD_FEATURE_WP_ASYNC | _core.UFFD_FEATURE_WP_UNPOPULATED
        got = _core.uffd_api(fd, want)
        if got & want != want:
            return False, "kernel lacks UFFD_FEATURE_WP_ASYNC/WP_UNPOPULATED (Linux >= 6.7)"
        m = mmap.mmap(-1, 4 * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf = np.frombuffer(m, dtype=np.uint8)
        addr = buf.ctypes.data
        try:
            rc = _core.uffd_register_wp(fd, addr, 4 * PAGE_SIZE)
            if rc < 0:
                return False, f"UFFDIO_REGISTER(MODE_WP) fails: {os.strerror(-rc)}"
            pm = _core.pagemap_open(os.getpid())
            flags = _core.PM_SCAN_WP_MATCHING | _core.PM_SCAN_CHECK_WPASYNC
            _, err = _core.scan_written(pm, addr, addr + 4 * PAGE_SIZE, flags, arm_only=True)
            if err:
                return False, f"PAGEMAP_SCAN fails: {os.strerror(-err)} (needs Linux >= 6.7)"
            buf[2 * PAGE_SIZE] = 1
            pages, err = _core.scan_written(pm, addr, addr + 4 * PAGE_SIZE, flags)
            _core.uffd_unregister(fd, addr, 4 * PAGE_SIZE)
            if err or pages.tolist() != [addr + 2 * PAGE_SIZE]:
                return False, "PAGEMAP_SCAN does not report the written page exactly"
        finally:
            del buf
            m.close()
    except OSError as exc:
        if exc.errno == errno.ENOTTY:
            return False, "kernel lacks the PAGEMAP_SCAN ioctl (Linux >= 6.7)"
        if exc.errno == errno.ENOSYS:
            return False, "kernel built without CONFIG_USERFAULTFD"
        return False, f"userfaultfd probe failed: {exc}"
    finally:
        for f in (fd, pm):
            if f >= 0:
                os.close(f)
    if not hasattr(os, "pidfd_open"):
        return False, "needs os.pidfd_open (Python >= 3.9, Linux >= 5.3)"
    return True, "userfaultfd async write-protect + PAGEMAP_SCAN work here"


@functools.lru_cache(maxsize=None)
def _probe_softdirty() -> Tuple[bool, str]:
    """Does writing "4" to clear_refs and then writing a page set pagemap bit 55?
    Tried on our own process (clearing our own soft-dirty bits is harmless)."""
    import mmap
    try:
        m = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as exc:
        return False, f"probe failed: {exc}"
    buf = np.frombuffer(m, dtype=np.uint8)
    try:
        addr = buf.ctypes.data
        buf[0] = 1
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("4")
        except OSError as exc:
            return False, f"cannot write /proc/self/clear_refs: {exc}"
        buf[0] = 2
        ent = proc.pagemap(os.getpid(), addr, addr + PAGE_SIZE)
        if not ent.soft_dirty[0]:
            return False, ("kernel without CONFIG_MEM_SOFT_DIRTY: clear_refs \"4\" is accepted "
                           "but pagemap bit 55 never sets")
        return True, "clear_refs 4 + pagemap bit 55 work here"
    finally:
        del buf
        m.close()


def _target_problem(pid: int) -> Optional[str]:
    """Why syscall injection into pid would be unsafe or impossible, or None."""
    st = proc.status(pid)
    tracer = int(st.get("TracerPid", "0") or 0)
    if tracer:
        return f"already traced by pid {tracer}"
    if st.get("Seccomp", "0") not in ("0", ""):
        return (f"runs under seccomp (mode {st['Seccomp']}): an injected userfaultfd() "
                "could be refused or kill it")
    state = st.get("State", "")[:1]
    if state in ("T", "t"):
        return "is stopped (job control or a debugger); resume it first"
    if state in ("Z", "X"):
        return "is a zombie"
    return None


def tracking_methods(pid: Optional[int] = None) -> Dict[str, Tuple[bool, str]]:
    """``{method: (available, reason)}`` for this kernel, and for process ``pid``
    when given (rights, seccomp, tracer). Ordered best first, as ``auto`` tries."""
    out: Dict[str, Tuple[bool, str]] = {}
    unreadable = None  # why pid's maps cannot be read (no such process, no rights)
    if pid is not None:
        try:
            proc.read_maps(pid)
        except ProcessError as exc:
            unreadable = str(exc)
    ok, why = _probe_uffd()
    if ok and pid is not None:
        try:
            problem = unreadable or _target_problem(pid)
        except ProcessError as exc:
            problem = str(exc)
        if problem:
            ok, why = False, f"pid {pid} {problem}"
    out["uffd"] = (ok, why)
    out["softdirty"] = _probe_softdirty()
    hok, hwhy = True, "content hashing works wherever the pages can be read"
    if unreadable:
        hok, hwhy = False, unreadable
    elif pid is not None and not os.access(f"/proc/{int(pid)}/mem", os.R_OK):
        hok, hwhy = False, f"no read access to pid {pid}'s memory"
    out["hash"] = (hok, hwhy)
    return out


# --------------------------------------------------------------------------- backends


class _HashState:
    """Content hashes of the present pages of a set of VMAs; ``refresh`` returns
    the pages whose content changed, appeared or vanished since the last call."""

    def __init__(self, pid: int, pm_fd: int):
        self.pid = pid
        self.pm = pm_fd
        self.addrs = _EMPTY
        self.hashes = np.zeros((0, 2), dtype=np.uint64)

    def refresh(self, vmas: List[Vma], baseline: bool = False) -> np.ndarray:
        vmas = sorted(vmas, key=lambda v: v.start)
        addrs = _select(self.pm, [(v.start, v.end) for v in vmas],
                        proc.PM_PRESENT | proc.PM_SWAPPED)
        hashes, ok = _core.hash_remote(self.pid, addrs, PAGE_SIZE)
        if not ok.all():  # vanished between pagemap and read: not there now
            addrs, hashes = addrs[ok], hashes[ok]
        old_a, old_h = self.addrs, self.hashes
        self.addrs, self.hashes = addrs, hashes
        if baseline:
            return _EMPTY
        if old_a.size == 0:
            return addrs
        idx = np.searchsorted(old_a, addrs)
        idx_c = np.minimum(idx, old_a.size - 1)
        same = (old_a[idx_c] == addrs) & (old_h[idx_c] == hashes).all(axis=1)
        changed = addrs[~same]
        # Pages that were present and are gone while their VMA is still mapped
        # (MADV_DONTNEED, truncation): their content changed too.
        gone = old_a[~_in_sorted(old_a, addrs)]
        if gone.size and vmas:
            starts = np.array([v.start for v in vmas], dtype=np.uint64)
            ends = np.array([v.end for v in vmas], dtype=np.uint64)
            k = np.searchsorted(starts, gone, side="right") - 1
            inside = (k >= 0) & (gone < ends[np.maximum(k, 0)])
            gone = gone[inside]
            if gone.size:
                return _merge([changed, gone])
        return changed


class _Backend:
    name = "?"

    def collect(self) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _HashBackend(_Backend):
    name = "hash"

    def __init__(self, tracker: "Tracker"):
        self.t = tracker
        self.state = _HashState(tracker.pid, tracker._pm)
        self.state.refresh(self.t._vmas_now(_tracked), baseline=True)

    def collect(self) -> np.ndarray:
        return self.state.refresh(self.t._vmas_now(_tracked))


class _SoftDirtyBackend(_Backend):
    name = "softdirty"

    def __init__(self, tracker: "Tracker"):
        self.t = tracker
        self._clear()

    def _clear(self) -> None:
        try:
            with open(f"/proc/{self.t.pid}/clear_refs", "w") as f:
                f.write("4")
        except OSError as exc:
            raise proc.os_error(self.t.pid, exc, "write clear_refs", gone=True) from exc

    def collect(self) -> np.ndarray:
        # The kernel has no atomic read-and-clear for soft-dirty bits (CRIU
        # freezes the task around it): a write landing between the pagemap read
        # and the clear_refs write below can be missed. See docs/tracking.md.
        vmas = self.t._vmas_now(_tracked)
        pages = _select(self.t._pm, [(v.start, v.end) for v in vmas], proc.PM_SOFT_DIRTY)
        self._clear()
        return pages


def _calls_began(exc: Optional[OSError]) -> bool:
    """True when an injection error happened once the injected calls had begun
    (the thread's registers and mask had been changed)."""
    info = getattr(exc, "inject_info", None) or {}
    return info.get("stage", 0) >= _core.INJECT_STAGE_CALL


def _raise_injection_failed(pid: int, exc: OSError):
    info = getattr(exc, "inject_info", None) or {}
    what = ("the injected call did not finish in time" if exc.errno == errno.ETIMEDOUT
            else f"the injection failed after its calls began: {exc.strerror} "
                 f"(errno {exc.errno})")
    if info.get("restored"):
        raise InjectionFailed(
            pid, f"{what}; its registers and signal mask were put back and it runs on, "
                 "but a userfaultfd descriptor may remain open in it; not retried",
            True, info.get("stage", 0), exc)
    raise InjectionFailed(
        pid, f"{what}, and its registers and signal mask could NOT be put back: the "
             "process's state may be damaged (check it; restarting it is the safe "
             "course); not retried", False, info.get("stage", 0), exc)


class _UffdBackend(_Backend):
    """See the module docstring. Holds our copy of the target's userfaultfd."""

    name = "uffd"

    def __init__(self, tracker: "Tracker", timeout: float):
        self.t = tracker
        pid = tracker.pid
        self.uffd = -1
        self.pidfd = -1
        self.registered: Dict[int, int] = {}   # start -> end of VMAs registered by us
        self.refused: Dict[Tuple[int, int], int] = {}  # (start, end) -> -errno
        self.inject_info: dict = {}
        self.flags = _core.PM_SCAN_WP_MATCHING | _core.PM_SCAN_CHECK_WPASYNC
        self._synced_maps: Optional[List[Vma]] = None
        self._runs_cache: List[Tuple[int, int]] = []
        self._hashed: List[Vma] = []
        self.present = _EMPTY   # present/swapped pages of the registered VMAs
        self.rescans = 0        # scans redone after CHECK_WPASYNC found a replaced VMA
        try:
            self._attach(pid, timeout)
            self.hash = _HashState(pid, tracker._pm)
            try:
                self._sync_vmas(arm=True)
                self.hash.refresh(self._hashed, baseline=True)
            except OSError as exc:  # e.g. it exited right after the injection
                raise proc.os_error(pid, exc, "set up uffd tracking",
                                    gone=True) from exc
        except BaseException:
            self.close()
            raise

    # -- attach

    def _attach(self, pid: int, timeout: float) -> None:
        ok, why = _probe_uffd()
        if not ok:
            raise TrackerUnavailable("uffd", why)
        problem = _target_problem(pid)
        if problem and problem.startswith("already traced"):
            tracer = int(problem.split()[-1])
            raise AlreadyTraced(pid, f"cannot attach: {problem} (detach it first, or use "
                                     "method='hash')", tracer)
        if problem:
            raise TrackerUnavailable("uffd", f"pid {pid} {problem}")
        if pid == os.getpid():
            # Our own memory: no injection needed (and ptrace cannot attach to its
            # own thread group).
            self.uffd = _core.uffd_create(os.O_CLOEXEC | os.O_NONBLOCK |
                                          _core.UFFD_USER_MODE_ONLY)
            self._api(pid)
            return
        vmas = proc.read_maps(pid)
        addr = None
        for v in [x for x in vmas if x.path == "[vdso]"] + \
                 [x for x in vmas if x.executable and x.readable and not x.special]:
            try:
                addr = _core.find_syscall_insn(pid, v.start, v.end)
            except OSError as exc:
                raise proc.os_error(pid, exc, "look for a syscall instruction") from exc
            if addr is not None:
                break
        if addr is None:
            raise TrackerUnavailable("uffd", f"pid {pid} has no readable `syscall` instruction "
                                             "to run userfaultfd() with")
        try:
            self.pidfd = os.pidfd_open(pid)
        except OSError as exc:
            raise proc.os_error(pid, exc, "pidfd_open") from exc
        flags = os.O_CLOEXEC | os.O_NONBLOCK | _core.UFFD_USER_MODE_ONLY
        last: Optional[OSError] = None
        tids = [t for t in proc.threads(pid)
                if proc.state(t, procfs=f"{proc.PROCFS}/{pid}/task") not in (None, "Z", "X", "D")]
        for tid in tids[:3] or [pid]:
            try:
                self.uffd, self.inject_info = _core.inject_userfaultfd(
                    pid, tid, self.pidfd, addr, flags, int(timeout * 1000))
                break
            except OSError as exc:
                last = exc
                if _calls_began(exc):
                    break  # the target was changed: never try it again
                if exc.errno in (errno.ETIMEDOUT, errno.ESRCH) and proc.exists(pid):
                    continue  # this thread would not stop: try another one
                break
        if self.uffd < 0:
            self._raise_inject_error(pid, last)
        self._api(pid)

    def _api(self, pid: int) -> None:
        want = _core.UFFD_FEATURE_WP_ASYNC | _core.UFFD_FEATURE_WP_UNPOPULATED
        try:
            got = _core.uffd_api(self.uffd, want)
        except OSError as exc:
            raise TrackerUnavailable("uffd", f"UFFDIO_API on pid {pid}'s userfaultfd failed: "
                                             f"{exc.strerror}") from exc
        if got & want != want:
            raise TrackerUnavailable("uffd", "kernel lacks async write-protect features")

    @staticmethod
    def _raise_inject_error(pid: int, exc: Optional[OSError]):
        e = exc.errno if exc else errno.EIO
        msg = exc.strerror if exc else "unknown error"
        if not proc.exists(pid) or (e == errno.ESRCH and not _calls_began(exc)):
            raise ProcessGone(pid, "exited while we attached", exc)
        if _calls_began(exc):
            _raise_injection_failed(pid, exc)
        if e == errno.EPERM:
            st = proc.status(pid)
            tracer = int(st.get("TracerPid", "0") or 0)
            if tracer:
                raise AlreadyTraced(pid, f"already traced by pid {tracer}", tracer, exc)
            raise AccessDenied(pid, "may not ptrace it (needs CAP_SYS_PTRACE or the same user "
                                    "and Yama ptrace_scope 0)", exc)
        if e == errno.EAGAIN:
            raise TrackerUnavailable("uffd", f"pid {pid} is stopped by job control; resume it "
                                             "(SIGCONT) first")
        if e == errno.ETIMEDOUT:
            raise TrackerUnavailable("uffd", f"pid {pid} did not stop for the injection in time "
                                             "(uninterruptible sleep?); it was left as it was")
        if e == errno.ENOEXEC:
            raise TrackerUnavailable("uffd", f"pid {pid} is not a 64-bit x86 process")
        raise TrackerUnavailable("uffd", f"userfaultfd() inside pid {pid} failed: {msg} "
                                         f"(errno {e}); it was left as it was")

    # -- VMAs

    def _sync_vmas(self, arm: bool = False) -> List[Tuple[int, int]]:
        """Register new candidate VMAs, forget vanished ones, and update the hashed
        set. Returns the runs [(start, end)] of adjacent registered VMAs."""
        maps = self.t._maps()
        if maps is self._synced_maps and not arm:
            return self._runs_cache
        present = {v.start: v for v in maps}
        for s in [s for s, e in self.registered.items()
                  if s not in present or present[s].end != e]:
            del self.registered[s]
        hashed = []
        for v in maps:
            if not _tracked(v):
                continue
            if self.registered.get(v.start) == v.end:
                continue
            rc = -errno.EINVAL
            if _uffd_candidate(v):
                rc = _core.uffd_register_wp(self.uffd, v.start, v.size)
                if rc == -errno.ESRCH:
                    self.t._check_alive()
            if rc == 0:
                self.registered[v.start] = v.end
            else:
                self.refused[(v.start, v.end)] = rc
                hashed.append(v)
        runs = self._runs()
        self._synced_maps, self._runs_cache = maps, runs
        self._restrict_present(runs)
        if arm:
            self.present = _select(self.t._pm, runs, proc.PM_PRESENT | proc.PM_SWAPPED)
            for s, e in runs:
                _, err = _core.scan_written(self.t._pm, s, e, self.flags, arm_only=True)
                if err == -errno.EPERM:
                    # replaced since the maps read: the next collect registers the
                    # new VMA and reports all its pages
                    self.registered.pop(s, None)
        self._hashed = hashed
        return runs

    def _restrict_present(self, runs) -> None:
        """Forget present pages outside the registered VMAs (unmapped ones)."""
        if not self.present.size:
            return
        starts = np.array([s for s, _ in runs], dtype=np.uint64)
        ends = np.array([e for _, e in runs], dtype=np.uint64)
        k = np.searchsorted(starts, self.present, side="right") - 1
        keep = (k >= 0) & (self.present < ends[np.maximum(k, 0)]) if runs else \
            np.zeros(self.present.size, dtype=bool)
        if not keep.all():
            self.present = self.present[keep]

    def _vanished(self, runs) -> np.ndarray:
        """Pages present at the last collect that are neither present nor swapped
        now (MADV_DONTNEED, munmap of part of a VMA...): their content changed
        (to zero) without a write, which uffd-wp cannot see. One PAGEMAP_SCAN per
        run for the not-present regions, matched against the present set."""
        if not self.present.size:
            return _EMPTY
        r = _core.not_present_runs(self.t._pm, np.asarray(runs, dtype=np.uint64))
        if not r.size:
            return _EMPTY
        lo = np.searchsorted(self.present, r[:, 0])
        hi = np.searchsorted(self.present, r[:, 1])
        sel = hi > lo
        if not sel.any():
            return _EMPTY
        # Mark the present-set indices that fall inside a not-present region.
        mark = np.zeros(self.present.size + 1, dtype=np.int32)
        np.add.at(mark, lo[sel], 1)
        np.add.at(mark, hi[sel], -1)
        inside = np.cumsum(mark[:-1]) > 0
        gone = self.present[inside]
        self.present = self.present[~inside]
        return gone

    def _runs(self) -> List[Tuple[int, int]]:
        runs: List[Tuple[int, int]] = []
        for s in sorted(self.registered):
            e = self.registered[s]
            if runs and runs[-1][1] == s:
                runs[-1] = (runs[-1][0], e)
            else:
                runs.append((s, e))
        return runs

    def _reregister(self, s: int, e: int) -> None:
        """Register every candidate VMA of [s, e) again: a no-op for those still
        registered, and the way back for one the target replaced in place (same
        maps line, new VMA), which then reports all its present pages. VMAs the
        kernel refuses now are forgotten, so the next sync hashes them."""
        self._synced_maps = None
        self.rescans += 1
        for v in self.t._maps():
            if s <= v.start and v.end <= e and _uffd_candidate(v):
                if _core.uffd_register_wp(self.uffd, v.start, v.size) == 0:
                    self.registered[v.start] = v.end
                else:
                    self.registered.pop(v.start, None)
            elif s <= v.start < e:
                self.registered.pop(v.start, None)

    def collect(self) -> np.ndarray:
        runs = self._sync_vmas()
        parts = []
        todo = np.asarray(runs, dtype=np.uint64).reshape(-1, 2)
        for attempt in range(4):
            pages, err, failed = _core.scan_written_runs(self.t._pm, todo, self.flags)
            if pages.size:
                parts.append(pages)
            if err == 0:
                break
            s, e = int(todo[failed, 0]), int(todo[failed, 1])
            if err == -errno.EPERM and attempt < 3:
                # A VMA of that run lost its registration (the target replaced
                # it since we read its maps): read the maps again, register what
                # can be, hash the rest, and go on from that run (the pages
                # reported so far are already re-armed).
                self._reregister(s, e)
                runs = self._sync_vmas()
                todo = np.asarray([r for r in runs if r[1] > s], dtype=np.uint64).reshape(-1, 2)
                continue
            self.t._check_alive()
            raise TrackingError(f"pid {self.t.pid}: PAGEMAP_SCAN {s:#x}-{e:#x} failed: "
                                f"{os.strerror(-err)}")
        written = _merge(parts)
        gone = self._vanished(runs)
        if written.size:
            new = written[~_in_sorted(written, self.present)]
            if new.size:
                self.present = _merge([self.present, new])
        hashed = self.hash.refresh(self._hashed)
        return _merge([written, gone, hashed])

    def close(self) -> None:
        if self.uffd >= 0:
            for s, e in list(self.registered.items()):
                _core.uffd_unregister(self.uffd, s, e - s)  # errors: VMA gone, fine
            self.registered.clear()
            os.close(self.uffd)
            self.uffd = -1
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


# --------------------------------------------------------------------------- Tracker


class Tracker:
    """Tracks the pages process ``pid`` writes. A context manager: ``detach()`` on
    exit. ``method``: "auto" (uffd, else softdirty, else hash), "uffd",
    "softdirty" or "hash". ``timeout`` (seconds) bounds each wait for the target
    to stop during uffd's syscall injection.

    Attributes: ``pid``, ``method`` (used), ``fallbacks`` ({method: reason} for
    the methods ``auto`` passed over), ``last_collect_s`` (duration of the last
    collect). Not thread-safe.

    Raises NoSuchProcess, AccessDenied (AlreadyTraced), TrackerUnavailable (for an
    explicit method that cannot work here; ``auto`` falls back instead),
    InjectionFailed (uffd's injection failed once its calls had begun; never
    retried, and ``auto`` does not fall back: the caller must learn of it).
    """

    def __init__(self, pid: int, method: str = "auto", *, timeout: float = 2.0):
        if method not in METHODS + ("auto",):
            raise ValueError(f"unknown tracking method {method!r}; use one of "
                             f"{', '.join(METHODS + ('auto',))}")
        self.pid = int(pid)
        self.fallbacks: Dict[str, str] = {}
        self.last_collect_s = 0.0
        self._backend: Optional[_Backend] = None
        self._pm = -1
        self._maps_cache: List[Vma] = []
        self._maps_raw: Optional[bytes] = None
        proc.read_maps(self.pid)  # NoSuchProcess / AccessDenied early, with the pid
        try:
            self._pm = _core.pagemap_open(self.pid)
        except OSError as exc:
            raise proc.os_error(self.pid, exc, "open pagemap") from exc
        try:
            self._backend = self._start(method, timeout)
        except BaseException:
            self._close_fds()
            raise
        self.method = self._backend.name

    def _start(self, method: str, timeout: float) -> _Backend:
        if method == "uffd":
            return _UffdBackend(self, timeout)
        if method == "softdirty":
            ok, why = _probe_softdirty()
            if not ok:
                raise TrackerUnavailable("softdirty", why)
            return _SoftDirtyBackend(self)
        if method == "hash":
            return self._guard(lambda: _HashBackend(self))
        # auto
        try:
            return _UffdBackend(self, timeout)
        except (TrackerUnavailable, AlreadyTraced) as exc:
            self.fallbacks["uffd"] = getattr(exc, "reason", str(exc))
        ok, why = _probe_softdirty()
        if ok:
            return _SoftDirtyBackend(self)
        self.fallbacks["softdirty"] = why
        return self._guard(lambda: _HashBackend(self))

    def _guard(self, fn):
        try:
            return fn()
        except OSError as exc:
            self._check_alive()
            raise proc.os_error(self.pid, exc, "read memory", gone=True) from exc

    # -- helpers used by the backends

    def _maps(self) -> List[Vma]:
        """The target's VMAs now; parsed again only when the maps text changed."""
        try:
            with open(f"/proc/{self.pid}/maps", "rb") as f:
                raw = f.read()
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ESRCH):
                raise ProcessGone(self.pid, "exited while tracked", exc) from exc
            raise proc.os_error(self.pid, exc, "read maps", gone=True) from exc
        if raw != self._maps_raw:
            self._maps_cache = proc.parse_maps(raw)
            self._maps_raw = raw
        return self._maps_cache

    def _vmas_now(self, pred) -> List[Vma]:
        return [v for v in self._maps() if pred(v)]

    def _check_alive(self) -> None:
        """Raise ProcessGone when the target exited or exec'd (its old memory,
        which our pagemap descriptor refers to, is gone)."""
        if not proc.exists(self.pid):
            raise ProcessGone(self.pid, "exited while tracked")
        # pagemap reads through a descriptor opened before an exec return nothing:
        # the mm they belong to has been released.
        if self._pm < 0:
            return
        try:
            gone = _core.pagemap_read(self._pm, 0, 1, PAGE_SIZE).size == 0
        except OSError:
            gone = True
        if gone:
            raise ProcessGone(self.pid, "exec'd a new program while tracked: the memory we "
                                        "tracked is gone; attach again")

    # -- public

    def collect(self) -> DirtySet:
        """Pages written since attach or the previous collect: a :class:`DirtySet`
        (sorted uint64 addresses). Raises ProcessGone if the target exited or exec'd."""
        if self._backend is None:
            raise TrackingError(f"pid {self.pid}: tracker is detached")
        t0 = time.perf_counter()
        self._check_alive()
        try:
            pages = self._backend.collect()
        except OSError as exc:
            self._check_alive()
            raise proc.os_error(self.pid, exc, "collect", gone=True) from exc
        self._check_alive()
        self.last_collect_s = time.perf_counter() - t0
        return DirtySet._trusted(pages, PAGE_SIZE)

    def detach(self) -> None:
        """Stop tracking; leaves the target as it was. Idempotent."""
        b, self._backend = self._backend, None
        try:
            if b is not None:
                b.close()
        finally:
            self._close_fds()

    def _close_fds(self) -> None:
        if self._pm >= 0:
            os.close(self._pm)
            self._pm = -1

    @property
    def info(self) -> dict:
        """Diagnostics: registered / hashed VMA counts (uffd), injection details."""
        b = self._backend
        out = {"pid": self.pid, "method": getattr(self, "method", None),
               "fallbacks": dict(self.fallbacks)}
        if isinstance(b, _UffdBackend):
            out.update(registered_vmas=len(b.registered), hashed_vmas=len(b._hashed),
                       rescans=b.rescans,
                       inject=dict(b.inject_info))
        return out

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __del__(self):
        try:
            self.detach()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "detached" if self._backend is None else "attached"
        return f"Tracker(pid={self.pid}, method={getattr(self, 'method', '?')!r}, {state})"


# --------------------------------------------------------------------------- CLI


def live_table(tracker: Tracker, interval: float = 1.0, count: int = 0, out=None,
               truth=None) -> int:
    """Print one row per ``interval`` seconds: pages written in the interval,
    rate in pages/s and MB/s, collect cost, method. ``count`` rows (0: until
    Ctrl-C). ``truth`` (optional callable returning a page array) adds columns
    with what the target itself says it wrote in the previous interval and how
    many of those pages we missed (must be 0).
    Returns the number of rows printed. KeyboardInterrupt propagates after the
    current row; the caller detaches."""
    out = out or sys.stdout
    cols = f"{'time s':>8} {'dirty pages':>12} {'pages/s':>10} {'MB/s':>8} {'collect ms':>10}"
    if truth is not None:
        cols += f" {'truth-1':>8} {'missed':>7}"
    print(f"tracking pid {tracker.pid} with method {tracker.method!r}"
          + "".join(f"  ({m} unavailable: {why})" for m, why in tracker.fallbacks.items()),
          file=out)
    print(cols + "  method", file=out, flush=True)
    t_start = last = time.monotonic()
    rows = 0
    prev = None
    if truth is not None:
        truth()  # start the ground truth's interval with ours
    while count <= 0 or rows < count:
        time.sleep(max(0.0, last + interval - time.monotonic()))
        d = tracker.collect()
        now = time.monotonic()
        dt, last = max(now - last, 1e-9), now
        row = (f"{now - t_start:8.1f} {len(d):12d} {len(d) / dt:10.0f} "
               f"{d.nbytes / dt / 1e6:8.2f} {tracker.last_collect_s * 1e3:10.2f}")
        if truth is not None:
            # The target reports its writes a moment after our collect: a write in
            # between shows up in our next round, so the pages it listed for the
            # previous interval are checked against our last two rounds.
            w = np.asarray(truth(), dtype=np.uint64)
            if prev is not None:
                missed = np.setdiff1d(prev[1], np.union1d(prev[0], d.pages)).size
                row += f" {prev[1].size:8d} {missed:7d}"
            else:
                row += f" {'':8s} {'':7s}"
            prev = (d.pages, w)
        print(row + f"  {tracker.method}", file=out, flush=True)
        rows += 1
    return rows


def _cli_track(a) -> int:
    t = Tracker(a.pid, method=a.method, timeout=a.timeout)
    try:
        live_table(t, a.interval, a.count)
    except KeyboardInterrupt:
        print(f"interrupted: detaching from pid {a.pid}", file=sys.stderr)
    finally:
        t.detach()
    print(f"detached from pid {a.pid}; it was left as it was", file=sys.stderr)
    return 0


def cli_register(sub) -> None:
    p = sub.add_parser("track", help="show which pages a running process writes (live table)",
                       description="Attach a dirty-page tracker to a running process and print "
                                   "one row per interval. Ctrl-C detaches cleanly.")
    p.add_argument("--pid", type=int, required=True, help="process to track")
    p.add_argument("--method", choices=("auto",) + METHODS, default="auto",
                   help="tracking method (default: the best available)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between rows")
    p.add_argument("--count", type=int, default=0, help="stop after N rows (0: until Ctrl-C)")
    p.add_argument("--timeout", type=float, default=2.0,
                   help="seconds to wait for the target to stop during uffd attach")
    p.set_defaults(func=_cli_track)
    m = sub.add_parser("track-methods", help="which tracking methods work here, and why")
    m.add_argument("--pid", type=int, default=None, help="also check this process")
    m.set_defaults(func=_cli_methods)


def _cli_methods(a) -> int:
    for name, (ok, why) in tracking_methods(a.pid).items():
        print(f"{name:10s} {'yes' if ok else 'no ':3s}  {why}")
    return 0
