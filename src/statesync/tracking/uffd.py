"""userfaultfd write-protect tracking (WP_ASYNC + PAGEMAP_SCAN), injected with ptrace."""
from __future__ import annotations

import errno
import os
import signal
import socket
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np

from statesync import _core, proc
from statesync.errors import (
    AccessDenied,
    AlreadyTraced,
    InjectionFailed,
    ProcessGone,
    TrackerUnavailable,
    TrackingError,
)
from statesync.proc import Vma
from statesync.tracking.common import (
    PM_MARKER,
    _EMPTY,
    _in_sorted,
    _merge,
    _select,
    _tracked,
    _uffd_candidate,
)
from statesync.tracking.hashing import _Backend, _HashState
from statesync.tracking.probes import _probe_uffd, _target_problem

if TYPE_CHECKING:
    from statesync.tracking.tracker import Tracker



# Test hook: "POINT:MS[:FD]" pauses every injection of this process MS ms at POINT
# (a key of _core.INJECT_PAUSE_POINTS), writing one byte to FD first, so that a test
# can kill the tracker inside the injection (tests/test_inject_kill.py).
TEST_PAUSE_ENV = "STATESYNC_TEST_INJECT_PAUSE"


def _test_pause() -> Optional[Tuple[int, int, int]]:
    spec = os.environ.get(TEST_PAUSE_ENV)
    if not spec:
        return None
    parts = spec.split(":")
    try:
        point = _core.INJECT_PAUSE_POINTS[parts[0]]
        ms = int(parts[1])
        fd = int(parts[2]) if len(parts) > 2 else -1
    except (KeyError, IndexError, ValueError):
        raise ValueError(f"{TEST_PAUSE_ENV}={spec!r}: expected POINT:MS[:FD], POINT one of "
                         f"{', '.join(_core.INJECT_PAUSE_POINTS)}") from None
    return point, ms, fd


# Where each injection runs: "helper" (default when built) = the statesync-injector
# program next to the module, a process of its own that nothing killing the tracker
# takes along, an OOM kill included; "inprocess" = an injector task of this process
# (clone CLONE_VM, its own thread group: survives SIGKILL of the tracker, not an OOM
# kill of it). docs/tracking.md, "A tracker killed during the injection".
INJECTOR_ENV = "STATESYNC_INJECTOR"
_HELPER = os.path.join(os.path.dirname(os.path.abspath(_core.__file__)), "statesync-injector")


def _helper() -> Optional[str]:
    if os.environ.get(INJECTOR_ENV) == "inprocess":
        return None
    return _HELPER if os.access(_HELPER, os.X_OK) else None


_INFO_INT = ("rc", "stage", "ncalls", "orig_syscall", "orig_ret", "forwarded_signals",
             "held_stop", "window_ns")


def _inject_userfaultfd(pid: int, tid: int, pidfd: int, addr: int, flags: int,
                        timeout_ms: int) -> Tuple[int, dict]:
    """_core.inject_userfaultfd's contract (fd, info; OSError with .inject_info), run in
    the helper when there is one, else in-process. info["injector"] says which."""
    pause = _test_pause()
    helper = _helper()
    if helper is not None:
        try:
            return _inject_via_helper(helper, pid, tid, addr, flags, timeout_ms, pause)
        except _SpawnFailed:
            pass   # (exec refused: a noexec mount...) the in-process injector then
    if pause:
        _core.inject_test_pause(*pause)
    fd, info = _core.inject_userfaultfd(pid, tid, pidfd, addr, flags, timeout_ms)
    info["injector"] = "inprocess"
    return fd, info


class _SpawnFailed(Exception):
    pass


def _inject_via_helper(helper: str, pid: int, tid: int, addr: int, flags: int,
                       timeout_ms: int, pause: Optional[Tuple[int, int, int]]
                       ) -> Tuple[int, dict]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    argv = [helper, str(pid), str(tid), str(addr), str(flags), str(timeout_ms)]
    if pause:
        argv += [str(v) for v in pause]
    try:
        try:
            child = os.posix_spawn(helper, argv, os.environ,
                                   file_actions=[(os.POSIX_SPAWN_DUP2, theirs.fileno(), 3)],
                                   setsid=True, setsigmask=signal.valid_signals())
        except OSError as exc:
            raise _SpawnFailed(exc) from exc
        finally:
            theirs.close()
        try:
            # every wait of the injection is bounded by timeout_ms; a few of them
            ours.settimeout(8 * timeout_ms / 1000 + 10)
            try:
                data, anc, _, _ = ours.recvmsg(1024, socket.CMSG_SPACE(4),
                                               socket.MSG_CMSG_CLOEXEC)
            except socket.timeout:
                data, anc = b"", []
        finally:
            try:
                os.waitpid(child, 0 if data else os.WNOHANG)
            except ChildProcessError:
                pass
    finally:
        ours.close()
    fds = [int.from_bytes(d[:4], "little", signed=True) for lvl, typ, d in anc
           if lvl == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS]
    fields = dict(kv.split("=", 1) for kv in data.decode("ascii", "replace").split()
                  if "=" in kv)
    if not data or "rc" not in fields:
        for fd in fds:
            os.close(fd)
        # (what it did is unknown: treated as begun and not put back, never retried)
        raise _inject_error(errno.EIO, f"inject userfaultfd into pid {pid}: the injector "
                                       "gave no answer",
                            {"stage": _core.INJECT_STAGE_CALL, "restored": False,
                             "injector": "helper", "unanswered": True})
    info: dict = {k: int(fields.get(k, "0")) for k in _INFO_INT}
    rc = info.pop("rc")
    info["was_in_syscall"] = fields.get("was_in_syscall") == "1"
    info["restored"] = fields.get("restored") == "1"
    info["ret"] = [int(x) for x in fields.get("ret", "").split(",") if x][:min(info["ncalls"], 4)]
    info["injector"] = "helper"
    if rc < 0:
        for fd in fds:
            os.close(fd)
        raise _inject_error(-rc, f"inject userfaultfd into pid {pid}: {os.strerror(-rc)}", info)
    if not fds:
        raise _inject_error(errno.EIO, f"inject userfaultfd into pid {pid}: no descriptor "
                                       "came back", info)
    return fds[0], info


def _inject_error(err: int, msg: str, info: dict) -> OSError:
    """An OSError like _core.inject_userfaultfd's, with .inject_info."""
    e = OSError(err, msg)
    e.inject_info = info  # type: ignore[attr-defined]
    return e


def _calls_began(exc: Optional[OSError]) -> bool:
    """True when an injection error happened once the injected calls had begun
    (the thread's registers and mask had been changed)."""
    info = getattr(exc, "inject_info", None) or {}
    return info.get("stage", 0) >= _core.INJECT_STAGE_CALL


def _raise_injection_failed(pid: int, exc: OSError):
    info = getattr(exc, "inject_info", None) or {}
    if info.get("unanswered"):
        raise InjectionFailed(
            pid, "the injector helper ended without an answer (killed?); its injector task "
                 "finishes or rolls back the injection on its own, so the process should run "
                 "on as it was: check it; not retried", False, info.get("stage", 0), exc)
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
                self.uffd, self.inject_info = _inject_userfaultfd(
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
        if exc is not None and _calls_began(exc):
            _raise_injection_failed(pid, exc)
        if exc is not None and getattr(exc, "inject_info", {}).get("stage", -1) == 0:
            hint = ("raise the process limit (ulimit -u) or free memory; "
                    if e in (errno.EAGAIN, errno.ENOMEM) else "")
            raise TrackerUnavailable("uffd", f"could not start the injector task for pid {pid}: "
                                             f"{msg} (errno {e}); {hint}it was left as it was")
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
        """Register new VMAs, forget vanished ones, and update the hashed set.
        Returns the runs [(start, end)] of registered VMAs to scan: a run spans
        unmapped gaps (the scan walks no page table there, and a VMA mapped into
        a gap meanwhile fails the scan with EPERM, see collect) and ends at a VMA
        we do not track through uffd."""
        maps = self.t._maps()
        if maps is self._synced_maps and not arm:
            return self._runs_cache
        present = {v.start: v for v in maps}
        removed = [(s, e) for s, e in self.registered.items()
                   if s not in present or present[s].end != e]
        for s, _ in removed:
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
        runs = self._runs(maps)
        self._synced_maps, self._runs_cache = maps, runs
        if removed:
            self._restrict_present(removed)
        if arm:
            # (pagemap is read per VMA: a run may span terabytes of unmapped gap)
            self.present = _select(self.t._pm, sorted(self.registered.items()),
                                   proc.PM_PRESENT | proc.PM_SWAPPED, exclude=PM_MARKER)
            for s, e in runs:
                _, err = _core.scan_written(self.t._pm, s, e, self.flags, arm_only=True)
                if err == -errno.EPERM:
                    # replaced since the maps read: the next collect registers the
                    # new VMA and reports all its pages
                    for a in [a for a in self.registered if s <= a < e]:
                        self.registered.pop(a, None)
        self._hashed = hashed
        return runs

    def _restrict_present(self, removed: List[Tuple[int, int]]) -> None:
        """Forget present pages of VMAs that are no longer registered as they were
        (unmapped, resized): those in the removed ranges and outside every registered
        VMA now. Costs O(pages in the removed ranges), not O(present pages)."""
        if not self.present.size:
            return
        cand = []
        for s, e in removed:
            lo = int(np.searchsorted(self.present, np.uint64(s)))
            hi = int(np.searchsorted(self.present, np.uint64(e)))
            if hi > lo:
                cand.append(np.arange(lo, hi))
        if not cand:
            return
        idx = np.unique(np.concatenate(cand))
        pages = self.present[idx]
        starts = np.array(sorted(self.registered), dtype=np.uint64)
        if starts.size:
            ends = np.array([self.registered[int(s)] for s in starts], dtype=np.uint64)
            k = np.searchsorted(starts, pages, side="right") - 1
            still = (k >= 0) & (pages < ends[np.maximum(k, 0)])
            idx = idx[~still]
        if idx.size:
            self.present = np.delete(self.present, idx)

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
        # The present-set indices inside a not-present region (regions are disjoint
        # and sorted: the index ranges are too). O(pages gone), not O(present set).
        lo, hi = lo[sel], hi[sel]
        n = hi - lo
        idx = np.repeat(lo - np.cumsum(n) + n, n) + np.arange(int(n.sum()))
        gone = self.present[idx]
        self.present = np.delete(self.present, idx)
        return gone

    def _runs(self, maps: List[Vma]) -> List[Tuple[int, int]]:
        runs: List[Tuple[int, int]] = []
        cur: Optional[List[int]] = None
        for v in maps:     # ascending
            if self.registered.get(v.start) == v.end:
                if cur is None:
                    cur = [v.start, v.end]
                else:
                    cur[1] = v.end
            elif cur is not None:
                runs.append((cur[0], cur[1]))
                cur = None
        if cur is not None:
            runs.append((cur[0], cur[1]))
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
            if new.size:   # both sorted: one O(n) insert, no re-sort of the present set
                self.present = np.insert(self.present,
                                         np.searchsorted(self.present, new), new)
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
