"""A live table of what a tracked process writes (``statesync track``)."""
from __future__ import annotations

import sys
import time

import numpy as np

from statesync.tracking.tracker import Tracker


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
