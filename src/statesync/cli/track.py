"""``statesync track`` and ``statesync track-methods``."""
from __future__ import annotations

import sys
import time

from statesync.cli._common import (
    EXIT_FAILED,
    add_json,
    check_output_file,
    check_pid,
    nonneg_int,
    pid_arg,
    positive_float,
    write_json,
)
from statesync.tracking import METHODS, Tracker, live_table, tracking_methods


def _json_rows(t: Tracker, interval: float, count: int, out) -> int:
    """``--json``: one JSON object per interval (JSON lines)."""
    import json
    t_start = last = time.monotonic()
    rows = 0
    while count <= 0 or rows < count:
        time.sleep(max(0.0, last + interval - time.monotonic()))
        d = t.collect()
        now = time.monotonic()
        dt, last = max(now - last, 1e-9), now
        out.write(json.dumps({"pid": t.pid, "method": t.method, "time_s": now - t_start,
                              "interval_s": dt, "dirty_pages": len(d),
                              "pages_per_s": len(d) / dt, "bytes_per_s": d.nbytes / dt,
                              "collect_s": t.last_collect_s}) + "\n")
        out.flush()
        rows += 1
    return rows


def _cli_track(a) -> int:
    check_output_file(a.json, "--json")
    check_pid(a.pid)
    t = Tracker(a.pid, method=a.method, timeout=a.timeout)
    out = None
    try:
        if a.json is not None:
            out = sys.stdout if a.json == "-" else open(a.json, "w")
            _json_rows(t, a.interval, a.count, out)
        else:
            live_table(t, a.interval, a.count)
    except KeyboardInterrupt:
        print(f"interrupted: detaching from pid {a.pid}", file=sys.stderr)
    finally:
        t.detach()
        if out is not None and out is not sys.stdout:
            out.close()
    print(f"detached from pid {a.pid}; it was left as it was", file=sys.stderr)
    return 0


def cli_register(sub) -> None:
    p = sub.add_parser("track", help="show which pages a running process writes (live table)",
                       description="Attach a dirty-page tracker to a running process and print "
                                   "one row per interval. Ctrl-C detaches cleanly.")
    p.add_argument("--pid", type=pid_arg, required=True, help="process to track")
    p.add_argument("--method", choices=("auto",) + METHODS, default="auto",
                   help="tracking method (auto: the best available)")
    p.add_argument("--interval", type=positive_float, default=1.0,
                   help="seconds between rows (> 0)")
    p.add_argument("--count", type=nonneg_int, default=0,
                   help="stop after N rows (0: until Ctrl-C)")
    p.add_argument("--timeout", type=positive_float, default=2.0,
                   help="seconds to wait for the target to stop during uffd attach")
    add_json(p, "print one JSON object per row (JSON lines) instead of the table, or "
                "write them to FILE")
    p.set_defaults(func=_cli_track)
    m = sub.add_parser("track-methods", help="which tracking methods work here, and why",
                       description="Probe each dirty-page tracking method on this host (and "
                                   "on --pid). Exit status 1 when --pid cannot be tracked.")
    m.add_argument("--pid", type=pid_arg, default=None, help="also check this process")
    add_json(m)
    m.set_defaults(func=_cli_methods)


def _cli_methods(a) -> int:
    check_output_file(a.json, "--json")
    if a.pid is not None:
        check_pid(a.pid)
    res = tracking_methods(a.pid)
    if a.json is not None:
        write_json({"pid": a.pid, "methods": {k: {"ok": ok, "reason": why}
                                              for k, (ok, why) in res.items()}}, a.json)
    else:
        for name, (ok, why) in res.items():
            print(f"{name:10s} {'yes' if ok else 'no ':3s}  {why}")
    if not any(ok for ok, _ in res.values()):
        print(f"statesync track-methods: error: no tracking method works"
              f"{f' for pid {a.pid}' if a.pid else ' here'}: see the reasons above",
              file=sys.stderr)
        return EXIT_FAILED
    return 0
