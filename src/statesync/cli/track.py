"""``statesync track`` and ``statesync track-methods``."""
from __future__ import annotations

import sys

from statesync.tracking import METHODS, Tracker, live_table, tracking_methods


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
