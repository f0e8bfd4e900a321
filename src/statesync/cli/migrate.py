"""``statesync migrate`` and ``statesync receive``.

Both check every argument, output path and optional dependency before they touch a
process or open a port (exit status 2 or 3, one line on stderr). ``migrate`` runs a
:class:`statesync.Migration` on its own event loop: SIGINT, SIGTERM and SIGHUP cancel
it safely (the source process runs on unless the migration had already committed),
and the exit status says whether the source runs (4) or must be checked (5).
"""
from __future__ import annotations

import asyncio
import math
import os
import signal
import sys

from statesync.cli._common import (
    EXIT_ABORTED,
    EXIT_INTERRUPTED,
    EXIT_PREREQ,
    EXIT_SOURCE_UNKNOWN,
    Progress,
    add_json,
    check_output_file,
    check_pid,
    hostport,
    input_dir,
    one_line,
    pid_arg,
    positive_float,
    positive_int,
    require_module,
    write_json,
)
from statesync.errors import MigrationCancelled, MigrationError, UsageError
from statesync.migration import protocol as wire
from statesync.migration.common import DEFAULT_PORT, STRATEGIES

# --------------------------------------------------------------------------- arguments


def link_rate_arg(text: str) -> float:
    """``--link-rate``: bits/s as a number or ``10mbit`` / ``1gbit``."""
    import argparse

    from statesync.testing.testbed import parse_rate
    try:
        return float(parse_rate(float(text) if text.replace(".", "", 1).isdigit() else text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _default_calibration() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "statesync", "criu-costs.json")


def _default_images_dir() -> str:
    return (os.environ.get("STATESYNC_IMAGES_DIR") or os.environ.get("STATE_DIRECTORY")
            or "/var/lib/statesync/images")


def _secret_arg(a) -> bytes:
    if a.secret_file:
        from statesync.migration.common import load_secret_checked
        return load_secret_checked("@" + a.secret_file)
    env = os.environ.get("STATESYNC_SECRET")
    if env:
        return wire.load_secret(env)
    raise UsageError("a shared secret is required: --secret-file PATH (the same file on "
                     "both hosts) or STATESYNC_SECRET in the environment; create one with "
                     "`head -c 32 /dev/urandom | base64 > PATH`", "--secret-file")


def _terminate_as_interrupt() -> dict:
    """SIGTERM (kill, timeout, systemctl stop) and SIGHUP (the SSH session went away)
    mean what Ctrl-C means: abort in order, exit non-zero. The handler turns them into
    SIGINT, which asyncio.run delivers to the running agent as a cancellation."""
    got: dict = {}

    def handler(signum, frame):
        got["sig"] = signal.Signals(signum).name
        os.kill(os.getpid(), signal.SIGINT)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
    return got


def _encryption_arg(a):
    """``--no-encryption`` / ``--cipher`` as migrate()'s ``encryption``."""
    return False if a.no_encryption else (a.cipher or None)


_NO_ENCRYPTION_HELP = ("authenticated-only frames, not encrypted: only for links already "
                       "protected; pages then travel in clear. Both agents must say so "
                       "(statesync migrate and statesync receive): a mismatch is refused")


# --------------------------------------------------------------------------- progress


class _Printer:
    """Per-event lines (stdout, or stderr when the JSON report goes to stdout) and
    a transfer progress line on stderr when it is a terminal."""

    def __init__(self, quiet: bool, out):
        self.quiet = quiet
        self.out = out
        self.bar = Progress(enabled=None if not quiet else False)
        self.label = "round 0"

    def __call__(self, ev: dict) -> None:
        kind = ev["event"]
        if kind == "transfer":
            self.bar.update(self.label, ev["pages_sent"], ev["pages_total"], ev["bytes_wire"])
            return
        self.bar.clear()
        self.bar.start()
        if kind == "round":
            self.label = f"round {ev['round'] + 1}"
        elif kind == "phase" and ev["phase"] == "final transfer":
            self.label = "final transfer (process frozen)"
        if self.quiet:
            return
        p = lambda *x: print(*x, file=self.out, flush=True)  # noqa: E731
        if kind == "plan":
            p(f"plan: {ev['strategy']}, codec {ev['codec']}, {ev['state_pages']} pages of state, "
              f"dirty rate {ev['dirty_rate_pages_per_s']:.0f} pages/s, predicted downtime "
              f"{ev['predicted_downtime_s'] * 1e3:.0f} ms ({ev['reason']})")
            self.label = "round 0" if ev["strategy"] != "cold" else "cold copy"
        elif kind == "round":
            pd = ev["predicted_downtime_s"]
            p(f"round {ev['round']:3d}: {ev['pages']:8d} pages {ev['bytes_wire'] / 1e6:9.2f} MB "
              f"in {ev['duration_s']:6.2f} s ({ev['mbps']:7.1f} MB/s); "
              f"{ev['dirty_pages']} dirty; predicted downtime "
              f"{pd * 1e3:.0f} ms -> {ev['decision']}")
        elif kind == "phase":
            p(f"switch-over: {ev['phase']}")


# --------------------------------------------------------------------------- migrate


def _check_migrate_args(a):
    """Everything that can be wrong before the process is touched."""
    check_output_file(a.json, "--json")
    if a.metrics_file:
        check_output_file(a.metrics_file, "--metrics-file")
        require_module("prometheus_client", "--metrics-file", "metrics")
    if a.calibration:
        from statesync.planning.costs import CriuCosts
        if os.path.isdir(a.calibration):   # (its directory is created when missing)
            raise UsageError(f"{a.calibration}: is a directory; give a file name",
                             "--calibration")
        try:
            CriuCosts.load(a.calibration)
        except ValueError as exc:
            raise UsageError(one_line(exc), "--calibration") from None
    secret = _secret_arg(a)
    ref = a.container or a.target
    if ref and a.pid:
        raise UsageError("give --pid or a container (runc:NAME, podman:NAME), not both",
                         "--container")
    if ref and ref.isdigit():
        a.pid, ref = int(ref), None
    a.container = ref
    if not ref and not a.pid:
        raise UsageError("nothing to migrate: --pid PID, or a container as runc:NAME[@ROOT] "
                         "or podman:NAME", "--pid")
    if a.pid:
        check_pid(a.pid)
    from statesync.migration.target import check_criu_opts
    try:
        check_criu_opts(a.criu_opt)
    except ValueError as exc:
        raise UsageError(one_line(exc), "--criu-opt") from None
    targets = None
    if a.max_downtime or a.max_time:
        from statesync.planning.kpi import Targets
        targets = Targets(max_downtime_s=a.max_downtime or 1.0,
                          max_total_time_s=a.max_time or math.inf)
    if a.abort_if and not a.max_downtime:
        raise UsageError("needs --max-downtime (the limit to compare the prediction with)",
                         "--abort-if")
    return secret, targets


def _cmd_migrate(a) -> int:
    secret, targets = _check_migrate_args(a)
    json_to_stdout = a.json == "-"
    out = sys.stderr if json_to_stdout else sys.stdout
    printer = _Printer(a.quiet, out)
    try:
        m = _migration(a, secret, targets, printer)
    except ValueError as exc:
        raise UsageError(one_line(exc), "--container" if a.container else "--pid") from None
    interrupted = []

    async def run():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, lambda s=sig: (interrupted.append(s), m.cancel()))
        try:
            return await m
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
    return _finish(a, m, run, interrupted, printer, out)


def _migration(a, secret, targets, printer):
    from statesync.migration.api import Migration
    return Migration(a.pid or None, a.to, strategy=a.strategy, secret=secret,
                     tracker=a.tracker, compression=a.compression, targets=targets, xor=a.xor,
                     max_rounds=a.max_rounds, io_timeout=a.io_timeout, scheduler=a.scheduler,
                     progress=printer, link_rate=a.link_rate, work_dir=a.work_dir,
                     calibration=a.calibration or None,
                     abort_if="predicted_downtime" if a.abort_if else None,
                     encryption=_encryption_arg(a), switchover=a.switchover,
                     container=a.container, tcp_established=a.tcp_established,
                     service_ip=a.service_ip, service_dev=a.service_dev,
                     criu_opts=a.criu_opt, network_lock=a.network_lock)


def _finish(a, m, run, interrupted, printer, out) -> int:
    report, error = None, None
    try:
        report = asyncio.run(run())
    except MigrationError as exc:
        report, error = exc.report, exc
    finally:
        printer.bar.clear()
    if report is not None:
        if a.json is not None:
            write_json(report.to_dict(), a.json)
        if a.metrics_file:
            report.write_prometheus(a.metrics_file)
        print(report.table(), file=out)
    if error is None:
        return 0
    if isinstance(error, MigrationCancelled) and interrupted:
        from statesync import proc
        names = ", ".join(signal.Signals(s).name for s in interrupted)
        a.pid = m.pid
        st = proc.state(a.pid)
        runs = st is not None and st not in ("T", "t", "Z", "X")
        where = ("the source runs on" if runs else
                 f"pid {a.pid} is {'gone here' if st in (None, 'Z', 'X') else 'stopped'}: "
                 f"check it (statesync recover)")
        print(f"statesync migrate: error: migration of pid {a.pid} interrupted by {names}: "
              f"aborted, {where}", file=sys.stderr)
        if not runs:
            return EXIT_SOURCE_UNKNOWN
        return EXIT_INTERRUPTED if interrupted[0] == signal.SIGINT else EXIT_ABORTED
    raise error


# --------------------------------------------------------------------------- receive


def _cmd_receive(a) -> int:
    from statesync.cli.check import preflight
    from statesync.migration.destination import DestinationServer

    _terminate_as_interrupt()
    secret = _secret_arg(a)
    images_dir = a.images_dir
    try:
        os.makedirs(images_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{images_dir}: cannot create it ({exc.strerror or exc})",
                         "--images-dir") from None
    if not os.path.isdir(images_dir):
        raise UsageError(f"{images_dir}: not a directory", "--images-dir")
    check_output_file(os.path.join(images_dir, ".statesync-probe"), "--images-dir")
    if a.metrics_listen:
        require_module("prometheus_client", "--metrics-listen", "metrics")
    if not a.no_preflight:
        problems = [c for c in preflight(images_dir=images_dir, restore=not a.no_restore)
                    if not c["ok"] and c.get("required", True)]
        if problems:
            c = problems[0]
            more = (f" (and {len(problems) - 1} more: run statesync check)"
                    if len(problems) > 1 else "")
            print(f"statesync receive: error: preflight: {c['name']}: {c['detail']}{more}",
                  file=sys.stderr)
            return EXIT_PREREQ
    metrics = _ReceiverMetrics(a.metrics_listen) if a.metrics_listen else None

    async def main():
        from statesync.migration.target_dest import DestOptions
        opts = DestOptions(rootfs=a.rootfs, runc_root=a.container_root, name=a.container_name,
                           netns=a.container_netns, service_lower=a.service_lower)
        srv = DestinationServer(a.listen, images_dir, secret, once=not a.forever,
                                restore=not a.no_restore, keep_images=a.keep_images,
                                io_timeout=a.io_timeout,
                                encryption=False if a.no_encryption else None,
                                target_options=opts)
        if metrics is not None:
            metrics.wrap(srv)
        try:
            await srv.start()
        except OSError as exc:
            raise UsageError(f"cannot listen on {a.listen}: {exc.strerror or exc}",
                             "--listen") from None
        print(f"listening on {srv.host}:{srv.port}", flush=True)
        return await srv.serve()

    results = asyncio.run(main())
    for r in results:
        write_json(r, "-", indent=None)
    return 0 if results and results[-1].get("ok") else 1


class _ReceiverMetrics:
    """``--metrics-listen``: a Prometheus /metrics endpoint with counters of
    migrations received (authenticated), succeeded and failed, connections refused,
    and the time of the last finished migration, read from the server at each scrape
    (its ``results`` and refusal count)."""

    def __init__(self, listen: str):
        import prometheus_client as pc

        from statesync.migration.common import _parse_hostport
        host, port = _parse_hostport(listen)
        self.registry = pc.CollectorRegistry()
        self.srv = None
        self.last = 0.0
        self.seen = 0
        self.registry.register(self)
        try:
            pc.start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise UsageError(f"cannot listen on {listen}: {exc.strerror or exc}",
                             "--metrics-listen") from None

    def wrap(self, srv) -> None:
        self.srv = srv

    def collect(self):
        import time

        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        results = list(getattr(self.srv, "results", []) or [])
        if len(results) != self.seen:
            self.seen, self.last = len(results), time.time()
        ok = sum(1 for r in results if r.get("ok"))
        ns = "statesync_receiver"
        for name, doc, value in (
                ("migrations_received", "Migrations from authenticated sources", len(results)),
                ("migrations_succeeded", "Migrations restored and committed", ok),
                ("migrations_failed", "Migrations that failed or were aborted",
                 len(results) - ok),
                ("connections_refused", "Connections refused (authentication failed, too "
                 "many unauthenticated)", int(getattr(self.srv, "_refused", 0) or 0))):
            yield CounterMetricFamily(f"{ns}_{name}", doc, value=value)
        yield GaugeMetricFamily(f"{ns}_last_migration_timestamp_seconds",
                                "Unix time the receiver last saw a migration finish "
                                "(0: none yet)", value=self.last)


# --------------------------------------------------------------------------- parsers


def cli_register(sub) -> None:
    p = sub.add_parser("migrate", help="live-migrate a process to a destination agent",
                       description="Live-migrate a process (and its children) to a host "
                       "running `statesync receive`. Ctrl-C, SIGTERM and SIGHUP abort "
                       "safely: the process runs on at the source. Exit status 4: aborted, "
                       "the source runs; 5: failed and the source must be checked.")
    p.add_argument("target", nargs="?", default=None, metavar="TARGET",
                   help="what to migrate: a pid, runc:NAME[@ROOT] (a runc container; ROOT "
                   "its state directory, default /run/statesync/runc) or podman:NAME (a "
                   "podman container under --runtime runc)")
    p.add_argument("--pid", type=pid_arg, default=None, help="the process to migrate")
    p.add_argument("--container", default=None, metavar="REF",
                   help="a container to migrate: runc:NAME[@ROOT] or podman:NAME")
    p.add_argument("--tcp-established", action="store_true",
                   help="keep the target's established TCP connections (CRIU "
                   "--tcp-established on dump and restore)")
    p.add_argument("--service-ip", default=None, metavar="A.B.C.D[/LEN]",
                   help="a container's service IP that moves with it (on macvlan "
                   "--service-dev; docs/containers.md)")
    p.add_argument("--service-dev", default="svc0", help="the service IP's interface "
                   "(default svc0)")
    p.add_argument("--network-lock", choices=["iptables", "nftables"], default=None,
                   help="CRIU's network lock method for --tcp-established (default iptables)")
    p.add_argument("--criu-opt", action="append", default=[], metavar="--OPTION[=VALUE]",
                   help="a CRIU option for the dump and the restore, repeatable: "
                   "--criu-opt=--shell-job --criu-opt=--ext-unix-sk")
    p.add_argument("--to", type=hostport, required=True, metavar="HOST:PORT",
                   help=f"the destination agent (statesync receive; port {DEFAULT_PORT} "
                   "by default there)")
    p.add_argument("--strategy", choices=STRATEGIES, default="auto",
                   help="cold: freeze and copy; precopy: one live round; iterative: live "
                   "rounds until the scheduler stops; hybrid: at most 3 rounds, the rest "
                   "fetched after the resume; postcopy: no round, everything fetched after "
                   "the resume (docs/postcopy.md); auto: the scheduler decides")
    p.add_argument("--tracker", default="auto", choices=["auto", "uffd", "softdirty", "hash"],
                   help="dirty-page tracker")
    p.add_argument("--switchover", choices=["auto", "lazy", "full"], default="auto",
                   help="lazy: only the final dirty set travels in the freeze and the "
                   "destination restores lazily from the pages it holds; full: a complete "
                   "image set and a full criu restore; auto (default): lazy where this host "
                   "can")
    p.add_argument("--compression", choices=["auto", "none", "lz4"], default="auto",
                   help="page compression (auto: the scheduler decides)")
    p.add_argument("--xor", action="store_true", help="with lz4: XOR deltas of re-sent pages")
    p.add_argument("--max-rounds", type=positive_int, default=10, help="most live rounds")
    p.add_argument("--scheduler", default="adaptive", help="scheduler name (statesync.scheduler)")
    p.add_argument("--max-downtime", type=positive_float, default=None,
                   help="target: longest acceptable downtime, seconds (default: 1)")
    p.add_argument("--max-time", type=positive_float, default=None,
                   help="target: longest acceptable total migration time, seconds "
                   "(default: no limit)")
    p.add_argument("--abort-if", choices=["predicted-downtime"], default=None,
                   help="abort before the freeze if the predicted downtime exceeds "
                   "--max-downtime (the process never stops)")
    p.add_argument("--link-rate", type=link_rate_arg, default=None,
                   help="link rate (bits/s, or 10mbit, 1gbit) for the predictions "
                   "(default: 100mbit until round 0 measured it)")
    p.add_argument("--secret-file", help="file holding the shared secret "
                   "(or STATESYNC_SECRET in the environment)")
    p.add_argument("--io-timeout", type=positive_float, default=30.0,
                   help="seconds to wait for the peer at any step")
    enc = p.add_mutually_exclusive_group()
    enc.add_argument("--no-encryption", action="store_true", help=_NO_ENCRYPTION_HELP)
    enc.add_argument("--cipher", choices=["aes-256-gcm", "chacha20-poly1305"], default=None,
                     help="the cipher of the encrypted frames (default aes-256-gcm; the "
                     "destination accepts either)")
    p.add_argument("--work-dir", type=input_dir, help="where the local CRIU dump goes "
                   "(default /dev/shm: tmpfs, the dump is in the downtime)")
    p.add_argument("--calibration", default=_default_calibration(),
                   help="JSON file of this host's measured CRIU costs, refined by every "
                   "migration ('' to use the built-in priors)")
    add_json(p, "write the report as JSON to FILE (- or no FILE: stdout; the human "
                "output then goes to stderr)")
    p.add_argument("--metrics-file", help="write Prometheus metrics (text format, for "
                   "node-exporter's textfile collector) here; needs the 'metrics' extra")
    p.add_argument("--quiet", action="store_true",
                   help="no per-round progress (the report table is still printed)")
    p.set_defaults(func=_cmd_migrate)

    r = sub.add_parser("receive", help="run a destination agent that restores migrated processes",
                       description="Listen for migrations, write each image set under "
                       "--images-dir and restore it with CRIU. Runs `statesync check`'s "
                       "preflight first (exit status 3 if this host cannot restore).")
    r.add_argument("--listen", type=hostport, default=f"127.0.0.1:{DEFAULT_PORT}",
                   metavar="HOST:PORT", help="address to listen on (0.0.0.0:PORT: all)")
    r.add_argument("--images-dir", default=_default_images_dir(),
                   help="where received image sets are written (tmpfs is fastest; env "
                   "STATESYNC_IMAGES_DIR or systemd's STATE_DIRECTORY)")
    r.add_argument("--secret-file", help="file holding the shared secret "
                   "(or STATESYNC_SECRET in the environment)")
    r.add_argument("--forever", action="store_true", help="serve migrations until killed")
    r.add_argument("--no-restore", action="store_true",
                   help="only write the image set (no criu restore)")
    r.add_argument("--keep-images", action="store_true",
                   help="keep each image set after a committed restore")
    r.add_argument("--io-timeout", type=positive_float, default=30.0,
                   help="seconds to wait for the source at any step")
    r.add_argument("--no-encryption", action="store_true", help=_NO_ENCRYPTION_HELP)
    r.add_argument("--metrics-listen", type=hostport, metavar="HOST:PORT",
                   help="serve Prometheus /metrics here (needs the 'metrics' extra)")
    r.add_argument("--rootfs", type=input_dir, default=None,
                   help="for containers: their root file system on this host (the lower "
                   "dir of the restored container's overlay; the source's changes are "
                   "replayed above it)")
    r.add_argument("--container-root", default=None,
                   help="runc state directory for restored containers (default "
                   "/run/statesync/runc)")
    r.add_argument("--container-name", default=None,
                   help="name of the restored container (default: the source's)")
    r.add_argument("--container-netns", default=None,
                   help="network namespace (path or /run/netns name) the restored container "
                   "joins (default: this agent's)")
    r.add_argument("--service-lower", default=None,
                   help="LAN interface the moved service IP's macvlan goes on (default: the "
                   "source's name for it)")
    r.add_argument("--no-preflight", action="store_true",
                   help="skip the start-up check of CRIU, kernel and --images-dir")
    r.set_defaults(func=_cmd_receive)
