"""``statesync bench``: trackers, codecs and strategies side by side on one process
(:mod:`statesync.testing.bench`)."""
from __future__ import annotations

import sys

from statesync.cli._common import (
    add_json,
    check_output_file,
    check_pid,
    pid_arg,
    positive_float,
    positive_int,
    require_module,
    write_json,
)
from statesync.errors import PrerequisiteMissing, UsageError


def _names(text: str, allowed, option: str):
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise UsageError(f"unknown {', '.join(bad) or 'empty list'}; choose from "
                         f"{', '.join(allowed)}", option)
    return items


def _cmd_bench(a) -> int:
    import os

    from statesync.testing import bench
    from statesync.testing.testbed import parse_rate
    trackers = _names(a.trackers, bench.TRACKERS, "--trackers")
    codecs = _names(a.codecs, bench.CODECS, "--codecs")
    strategies = _names(a.strategies, bench.STRATEGIES, "--strategies")
    try:
        parse_rate(a.link)
    except ValueError as exc:
        raise UsageError(str(exc), "--link") from None
    check_output_file(a.json, "--json")
    if a.plot:
        check_output_file(a.plot, "--plot")
        require_module("matplotlib", "--plot", "plot")
    if a.pid is not None:
        check_pid(a.pid)
    elif os.geteuid() != 0:
        raise PrerequisiteMissing("the built-in workload is migrated across the two-host "
                                  "testbed (network namespaces, CRIU): run as root, or name "
                                  "a process with --pid")
    log = sys.stderr if a.json == "-" else sys.stdout
    res = bench.run(a.pid, size=a.size, rate=a.rate, link=a.link, trackers=trackers,
                    codecs=codecs, strategies=strategies, rounds=a.rounds,
                    interval=a.interval, max_downtime_s=a.max_downtime,
                    progress=lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True))
    print(bench.format_table(res), file=log, flush=True)
    if a.json is not None:
        write_json(res, a.json)
    if a.plot:
        bench.plot(res, a.plot)
        print(f"plot saved to {a.plot}", file=log)
    failed = [r for r in res.get("strategies", []) if r.get("ok") is False]
    return 1 if failed else 0


def cli_register(sub) -> None:
    from statesync.testing import bench
    p = sub.add_parser(
        "bench", help="compare trackers, codecs and strategies on a process or the workload",
        description="Measure side by side, in one run, each dirty-page tracker, each page "
        "codec and each migration strategy. With --pid: trackers and codecs on that "
        "process, strategies predicted by the cost model (a real migration would move it). "
        "Without: the built-in workload generator, strategies migrated for real across the "
        "two-host testbed (root). Prints a table; --json and --plot write the results.")
    p.add_argument("--pid", type=pid_arg, help="your process (default: the built-in workload)")
    p.add_argument("--size", default="16M", help="built-in workload: state size (K/M/G)")
    p.add_argument("--rate", type=positive_float, default=2000.0,
                   help="built-in workload: page writes per second")
    p.add_argument("--link", default="1gbit", help="testbed link rate (10mbit, 1gbit), also "
                   "the link the predictions assume")
    p.add_argument("--trackers", default=",".join(bench.TRACKERS), help="trackers to compare")
    p.add_argument("--codecs", default=",".join(bench.CODECS), help="codecs to compare")
    p.add_argument("--strategies", default=",".join(bench.STRATEGIES),
                   help="strategies to compare")
    p.add_argument("--rounds", type=positive_int, default=3, help="collects per tracker")
    p.add_argument("--interval", type=positive_float, default=0.5,
                   help="seconds between collects (and the xor codec's rewrite window)")
    p.add_argument("--max-downtime", type=positive_float, default=1.0,
                   help="downtime target of the iterative plan, seconds")
    add_json(p, "write the results as JSON to FILE (or stdout)")
    p.add_argument("--plot", metavar="FILE", help="save a plot (needs the 'plot' extra)")
    p.set_defaults(func=_cmd_bench)
