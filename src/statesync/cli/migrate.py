"""``statesync migrate`` and ``statesync receive``."""
from __future__ import annotations

import json
import math
import os
import sys

from statesync.errors import MigrationError
from statesync.migration import protocol as wire
from statesync.migration.api import migrate, serve_destination
from statesync.migration.common import DEFAULT_PORT, STRATEGIES

# --------------------------------------------------------------------------- CLI


def _print_progress(ev: dict) -> None:
    if ev["event"] == "plan":
        print(f"plan: {ev['strategy']}, codec {ev['codec']}, {ev['state_pages']} pages of state, "
              f"dirty rate {ev['dirty_rate_pages_per_s']:.0f} pages/s, predicted downtime "
              f"{ev['predicted_downtime_s'] * 1e3:.0f} ms ({ev['reason']})", flush=True)
    elif ev["event"] == "round":
        pd = ev["predicted_downtime_s"]
        print(f"round {ev['round']:3d}: {ev['pages']:8d} pages {ev['bytes_wire'] / 1e6:9.2f} MB "
              f"in {ev['duration_s']:6.2f} s ({ev['mbps']:7.1f} MB/s); "
              f"{ev['dirty_pages']} dirty; predicted downtime "
              f"{pd * 1e3:.0f} ms -> {ev['decision']}", flush=True)
    elif ev["event"] == "phase":
        print(f"switch-over: {ev['phase']}", flush=True)


def _default_calibration() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "statesync", "criu-costs.json")


def _secret_arg(a) -> bytes:
    if a.secret_file:
        from statesync.migration.common import load_secret_checked
        return load_secret_checked("@" + a.secret_file)
    env = os.environ.get("STATESYNC_SECRET")
    if env:
        return wire.load_secret(env)
    raise SystemExit("statesync: a shared secret is required: --secret-file PATH or "
                     "STATESYNC_SECRET")


def _terminate_as_interrupt() -> dict:
    """SIGTERM (kill, timeout, systemctl stop) and SIGHUP (the SSH session went away)
    mean what Ctrl-C means: abort in order (the agent resumes the source), exit
    non-zero. The handler turns them into SIGINT, which asyncio.run delivers to the
    running agent as a cancellation."""
    import signal
    got: dict = {}

    def handler(signum, frame):
        got["sig"] = signal.Signals(signum).name
        os.kill(os.getpid(), signal.SIGINT)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
    return got


def _say(msg: str) -> None:
    try:
        print(msg, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _encryption_arg(a):
    """``--no-encryption`` / ``--cipher`` as migrate()'s ``encryption``."""
    return False if a.no_encryption else (a.cipher or None)


_NO_ENCRYPTION_HELP = ("authenticated-only frames, not encrypted: only for links already "
                       "protected; pages then travel in clear. Both agents must say so "
                       "(statesync migrate and statesync receive): a mismatch is refused")


def _cmd_migrate(a) -> int:
    report = None
    got = _terminate_as_interrupt()
    try:
        targets = None
        if a.max_downtime or a.max_time:
            from statesync.planning.kpi import Targets
            targets = Targets(max_downtime_s=a.max_downtime or 1.0,
                              max_total_time_s=a.max_time or math.inf)
        report = migrate(a.pid, a.to, strategy=a.strategy, secret=_secret_arg(a),
                         tracker=a.tracker, compression=a.compression, targets=targets,
                         xor=a.xor,
                         max_rounds=a.max_rounds, io_timeout=a.io_timeout,
                         scheduler=a.scheduler,
                         progress=None if a.quiet else _print_progress,
                         link_rate=a.link_rate, work_dir=a.work_dir,
                         calibration=a.calibration or None,
                         encryption=_encryption_arg(a))
        rc = 0
    except MigrationError as exc:
        report = exc.report
        _say(f"statesync: error: {exc}")
        rc = 1
    except KeyboardInterrupt:
        from statesync import proc
        st = proc.state(a.pid)
        where = ("the source runs on" if st is not None and st not in ("T", "t", "Z", "X")
                 else f"pid {a.pid} is {'gone here' if st in (None, 'Z', 'X') else 'stopped'}"
                 f" (see `statesync recover`)")
        _say(f"statesync: migration of pid {a.pid} interrupted by {got.get('sig', 'SIGINT')}: "
             f"aborted, {where}")
        return 130
    if report is not None:
        if a.json:
            with open(a.json, "w") as f:
                f.write(report.to_json())
        if a.metrics_file:
            report.write_prometheus(a.metrics_file)
        print(report.table())
    return rc


def _cmd_receive(a) -> int:
    _terminate_as_interrupt()

    def ready(port):
        print(f"listening on {a.listen.rpartition(':')[0] or '127.0.0.1'}:{port}", flush=True)
    results = serve_destination(a.listen, a.images_dir, _secret_arg(a), once=not a.forever,
                                restore=not a.no_restore, keep_images=a.keep_images,
                                io_timeout=a.io_timeout, ready=ready,
                                encryption=False if a.no_encryption else None)
    for r in results:
        print(json.dumps(r))
    return 0 if results and results[-1].get("ok") else 1


def cli_register(sub) -> None:
    p = sub.add_parser("migrate", help="live-migrate a process to a destination agent")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--to", required=True, metavar="HOST:PORT")
    p.add_argument("--strategy", choices=STRATEGIES, default="auto")
    p.add_argument("--tracker", default="auto", help="auto, uffd, hash (dirty-page tracker)")
    p.add_argument("--compression", choices=["auto", "none", "lz4"], default="auto")
    p.add_argument("--xor", action="store_true", help="with lz4: XOR deltas of re-sent pages")
    p.add_argument("--max-rounds", type=int, default=10)
    p.add_argument("--scheduler", default="adaptive", help="scheduler name (statesync.scheduler)")
    p.add_argument("--max-downtime", type=float, default=None,
                   help="target: longest acceptable downtime, seconds")
    p.add_argument("--max-time", type=float, default=None,
                   help="target: longest acceptable total migration time, seconds")
    p.add_argument("--link-rate", type=float, default=None,
                   help="link rate in bits/s for predictions (default: measured)")
    p.add_argument("--secret-file", help="file holding the shared secret "
                   "(or STATESYNC_SECRET in the environment)")
    p.add_argument("--io-timeout", type=float, default=30.0)
    enc = p.add_mutually_exclusive_group()
    enc.add_argument("--no-encryption", action="store_true", help=_NO_ENCRYPTION_HELP)
    enc.add_argument("--cipher", choices=["aes-256-gcm", "chacha20-poly1305"], default=None,
                   help="the cipher of the encrypted frames (default aes-256-gcm; the "
                   "destination accepts either)")
    p.add_argument("--work-dir", help="where the local CRIU dump goes (default /dev/shm)")
    p.add_argument("--calibration", default=_default_calibration(),
                   help="JSON file of this host's measured CRIU costs, refined by every "
                   "migration (default %(default)s; '' to use the built-in priors)")
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.add_argument("--metrics-file", help="write Prometheus metrics (text format) here")
    p.add_argument("--quiet", action="store_true", help="no per-round progress")
    p.set_defaults(func=_cmd_migrate)

    r = sub.add_parser("receive", help="run a destination agent that restores migrated processes")
    r.add_argument("--listen", default=f"127.0.0.1:{DEFAULT_PORT}", metavar="HOST:PORT")
    r.add_argument("--images-dir", default=".", help="where received image sets are written")
    r.add_argument("--secret-file")
    r.add_argument("--forever", action="store_true", help="serve migrations until killed")
    r.add_argument("--no-restore", action="store_true",
                   help="only write the image set (no criu restore)")
    r.add_argument("--keep-images", action="store_true")
    r.add_argument("--no-encryption", action="store_true", help=_NO_ENCRYPTION_HELP)
    r.add_argument("--io-timeout", type=float, default=30.0)
    r.set_defaults(func=_cmd_receive)
