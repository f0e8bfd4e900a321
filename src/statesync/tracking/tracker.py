"""The public Tracker: picks a backend and collects what the target wrote."""
from __future__ import annotations

import errno
import os
import time
from typing import Dict, List, Optional

import numpy as np

from statesync import _core, proc
from statesync._consts import PAGE_SIZE
from statesync.dirtyset import DirtySet
from statesync.errors import (
    AlreadyTraced,
    ProcessGone,
    TrackerUnavailable,
    TrackingError,
)
from statesync.proc import Vma
from statesync.tracking.hashing import _Backend, _HashBackend
from statesync.tracking.probes import METHODS, _probe_softdirty
from statesync.tracking.softdirty import _SoftDirtyBackend
from statesync.tracking.uffd import _UffdBackend

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
        self._line_cache: Dict[bytes, Vma] = {}
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
            # Parse only the lines that changed (a heap that grew, a new mapping):
            # the rest of a process's few hundred VMAs are the same objects as before.
            cache = self._line_cache
            out: List[Vma] = []
            fresh: Dict[bytes, Vma] = {}
            for line in raw.split(b"\n"):
                if not line:
                    continue
                v = cache.get(line)
                if v is None:
                    v = proc.parse_maps(line)[0]
                fresh[line] = v
                out.append(v)
            self._line_cache = fresh
            self._maps_cache = out
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
        if pages.size > 1 and not (pages[1:] > pages[:-1]).all():
            pages = np.unique(pages)   # seen once under load, cause not pinned; O(n)
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
