"""``statesync sim``: run schedulers over scenarios."""
from __future__ import annotations

import json

from statesync.cli._common import (
    add_json,
    check_output_file,
    positive_int,
    require_module,
    write_json,
)
from statesync.errors import UsageError
from statesync.planning.sim import (
    MAX_ENGINE_ROUNDS,
    SUITE_SEEDS,
    SUITE_SIZE,
    CodecTruth,
    DirtyProcess,
    LinkTrace,
    List,
    OracleResult,
    Result,
    Scenario,
    StateSyncError,
    Summary,
    asdict,
    evaluate,
    format_table,
    make_scenario,
    oracle,
    plot,
    run,
    suite,
    suite_digest,
)

# --------------------------------------------------------------------------- CLI


def _load_suite(name: str, count):
    """The scenarios of ``--scenarios``, or a one-line UsageError naming the file and
    what is wrong with it."""
    if name.startswith("seed:"):
        try:
            int(name.split(":", 1)[1])
        except ValueError:
            raise UsageError(f"{name!r}: seed:N needs an integer N", "--scenarios") from None
    try:
        scenarios = suite(name, count)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{name}: not valid JSON at line {exc.lineno} column {exc.colno} "
                         f"(byte {exc.pos}): {exc.msg}", "--scenarios") from None
    except StateSyncError as exc:
        raise UsageError(str(exc), "--scenarios") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise UsageError(f"{name}: not a JSON list of scenarios: {what}; each item is what "
                         f"statesync.planning.sim.Scenario.to_dict() gives",
                         "--scenarios") from None
    if not scenarios:
        raise UsageError(f"{name}: holds no scenario", "--scenarios")
    return scenarios


def cli_register(subparsers) -> None:
    p = subparsers.add_parser("sim", help="simulate schedulers on a scenario suite",
                              description="Run schedulers on seeded scenarios and print KPI "
                                          "attainment, downtime, total time and bytes.")
    p.add_argument("--scheduler", action="append", default=None,
                   help="scheduler name(s), comma-separated or repeated, or 'all' (default: all)")
    p.add_argument("--scenarios", default="default",
                   help="suite: default, holdout, seed:N, or a JSON file (default: default)")
    p.add_argument("--count", type=positive_int, default=None,
                   help="use only the first N scenarios (default: the whole suite)")
    p.add_argument("--no-codecs", action="store_true", help="offer no page codec to any scheduler")
    p.add_argument("--objective", choices=["min_downtime", "min_resources"],
                   help="override every scenario's objective (the suites use min_downtime)")
    p.add_argument("--plot", metavar="FILE", help="save a plot of downtime vs time per scheduler "
                   "(needs matplotlib: the 'plot' extra)")
    add_json(p, "print the summaries as JSON (or write them to FILE)")
    p.set_defaults(func=_cli_sim)


def _cli_sim(args) -> int:
    from statesync.planning import scheduler as sched_mod
    names: List[str] = []
    for item in args.scheduler or ["all"]:
        for n in item.split(","):
            n = n.strip()
            if n == "all":
                names += [x for x in ("adaptive", "mose", "qemu", "threshold") if x not in names]
            elif n and n not in names:
                names.append(n)
    for n in names:
        if n not in sched_mod.available():
            raise UsageError(f"unknown scheduler {n!r}; "
                             f"available: {', '.join(sched_mod.available())}", "--scheduler")
    check_output_file(args.json, "--json")
    if args.plot:
        check_output_file(args.plot, "--plot")
        require_module("matplotlib", "--plot", "plot")
    scenarios = _load_suite(args.scenarios, args.count)
    if args.objective:
        from dataclasses import replace
        scenarios = [replace(sc, objective=args.objective) for sc in scenarios]
    summaries, results, oracles = evaluate(scenarios, names, codecs=not args.no_codecs)
    if args.json is not None:
        write_json([asdict(s) for s in summaries], args.json)
    else:
        print(f"{len(scenarios)} scenarios "
              f"({args.scenarios}{', no codecs' if args.no_codecs else ''}"
              f"{', objective ' + args.objective if args.objective else ''}), "
              f"{summaries[0].feasible} feasible with hindsight")
        print(format_table(summaries))
    if args.plot:
        plot(results, args.plot, oracles)
        print(f"plot saved to {args.plot}")
    return 0


__all__ = ["DirtyProcess", "LinkTrace", "CodecTruth", "Scenario", "Result", "OracleResult",
           "Summary", "run", "oracle", "suite", "make_scenario", "suite_digest", "evaluate",
           "format_table", "plot",
           "SUITE_SEEDS", "SUITE_SIZE", "MAX_ENGINE_ROUNDS"]
