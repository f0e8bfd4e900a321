"""Soft-dirty tracking: clear_refs "4" + pagemap bit 55 (CONFIG_MEM_SOFT_DIRTY)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from statesync import proc
from statesync.tracking.common import _select, _tracked
from statesync.tracking.hashing import _Backend

if TYPE_CHECKING:
    from statesync.tracking.tracker import Tracker



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
