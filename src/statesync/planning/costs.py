"""CRIU switch-over cost priors and their per-host calibration (CriuCosts)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List

import numpy as np

from statesync._consts import PAGE_SIZE
from statesync._util.fsutil import atomic_replace, discard, temp_beside
from statesync.migration.report import Report

# --------------------------------------------------------------------------- costs


@dataclass
class CriuCosts:
    """Switch-over cost priors handed to the scheduler's model (it recalibrates the
    link and the dirty rate from the rounds).

    ``dump``: CRIU's frozen dump plus the engine's read and content diff of it. The
    engine always dumps the whole state (no soft-dirty here, so no incremental CRIU
    dump), so this cost scales with the state, not with the final pages: the engine
    hands the model ``dump_fixed_s + dump_s_per_mib * state`` as its fixed dump cost.
    ``restore``: writing the image set at the destination plus ``criu restore``
    until the process runs. Defaults: a line through the means of 8 migrations of a
    25 MB and a 290 MB process (benchmarks/bench_migrate.py) with CRIU 4.2 on this
    project's machines (2 shared cores, images on tmpfs). With a calibration file
    (``migrate(..., calibration=PATH)``) every migration refines them for this host."""

    dump_fixed_s: float = 0.036
    dump_s_per_mib: float = 0.0014
    restore_fixed_s: float = 0.106
    restore_s_per_mib: float = 0.00175
    samples: List[List[float]] = field(default_factory=list)  # [state MiB, dump s, restore s]

    MAX_SAMPLES = 32

    def observe(self, report: Report) -> "CriuCosts":
        """Fold in a finished migration's measured switch-over (dump + diff,
        assemble + restore) and refit: a least-squares line over the samples when
        they span at least two state sizes (x1.5 apart), else the fixed costs shifted
        to the mean residual. Returns self."""
        ph = report.phases
        if not report.ok or "dump" not in ph or "restore" not in ph or not report.state_pages:
            return self
        mib = report.state_pages * PAGE_SIZE / (1 << 20)
        self.samples.append([mib, ph["dump"] + ph.get("final_diff", 0.0),
                             ph["restore"] + ph.get("assemble", 0.0)])
        self.samples = self.samples[-self.MAX_SAMPLES:]
        x = np.array([s[0] for s in self.samples])
        for col, fixed, slope in ((1, "dump_fixed_s", "dump_s_per_mib"),
                                  (2, "restore_fixed_s", "restore_s_per_mib")):
            y = np.array([s[col] for s in self.samples])
            if x.max() >= 1.5 * x.min() and len(x) >= 2:
                k, c = np.polyfit(x, y, 1)
                if k > 0 and c > 0:
                    setattr(self, slope, float(k))
                    setattr(self, fixed, float(c))
                    continue
            setattr(self, fixed, max(0.0, float(np.mean(y - getattr(self, slope) * x))))
        return self

    @classmethod
    def load(cls, path: str) -> "CriuCosts":
        """Costs saved by :meth:`save`; the priors if the file does not exist."""
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise ValueError(f"calibration file {path}: unreadable ({exc}); delete it to "
                             f"start from the priors") from None
        known = {k: d[k] for k in ("dump_fixed_s", "dump_s_per_mib", "restore_fixed_s",
                                   "restore_s_per_mib", "samples") if k in d}
        return cls(**known)

    def save(self, path: str) -> None:
        """Write atomically (temporary file, fsync, rename; see :mod:`statesync._util.fsutil`)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd, tmp = temp_beside(path)
        try:
            with os.fdopen(fd, "w", closefd=False) as f:
                json.dump({"dump_fixed_s": self.dump_fixed_s, "dump_s_per_mib": self.dump_s_per_mib,
                           "restore_fixed_s": self.restore_fixed_s,
                           "restore_s_per_mib": self.restore_s_per_mib,
                           "samples": self.samples}, f)
        except BaseException:
            discard(tmp, fd)
            raise
        atomic_replace(tmp, path, fd)
