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

from statesync.dirtyset import DirtySet
from statesync.tracking.live import live_table
from statesync.tracking.probes import METHODS, tracking_methods
from statesync.tracking.tracker import Tracker

__all__ = ["Tracker", "DirtySet", "tracking_methods", "live_table", "METHODS"]
