"""What this kernel and a target allow: feature probes for each tracking method."""
from __future__ import annotations

import errno
import functools
import os
import platform
import sys
from typing import Dict, Optional, Tuple

import numpy as np

from statesync import _core, proc
from statesync._consts import PAGE_SIZE
from statesync.errors import ProcessError

METHODS = ("uffd", "softdirty", "hash")

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
