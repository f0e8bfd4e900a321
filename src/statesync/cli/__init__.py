"""The ``statesync`` command.

One module per command group (``statesync.cli.track``, ``.criu``, ``.stream``, ``.sim``,
``.migrate``, ``.workload``, ``.check``, ``.bench``, ``.recover``), each defining
``cli_register(subparsers)``, which adds its sub-commands and sets ``func`` on them;
this module only collects them and turns every error into one line on stderr and an
exit status (:mod:`statesync.cli._common` lists them). The commands are thin: the work
is in the library. Each command validates all its arguments and output paths before
it touches a process.
"""
from __future__ import annotations

import importlib
import os
import sys

from statesync.cli._common import (
    EXIT_ABORTED,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PREREQ,
    EXIT_SOURCE_UNKNOWN,
    EXIT_TABLE,
    EXIT_USAGE,
    Parser,
    one_line,
)

# Modules that contribute sub-commands, in the order they appear in --help.
COMMAND_MODULES = ["track", "criu", "stream", "sim", "migrate", "recover", "check", "bench",
                   "workload"]


def build_parser() -> Parser:
    parser = Parser(
        prog="statesync",
        description="Live state migration of running Linux processes.",
        epilog=EXIT_TABLE,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"statesync.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"statesync.cli.{name}":
                continue            # a command group not in this version
            print(f"statesync: commands of statesync.cli.{name} unavailable: {exc}",
                  file=sys.stderr)
            continue
        except ImportError as exc:  # a module not built yet must not break the others
            print(f"statesync: commands of statesync.cli.{name} unavailable: {exc}",
                  file=sys.stderr)
            continue
        register = getattr(mod, "cli_register", None)
        if register is not None:
            register(sub)
    return parser


def exit_status(exc: BaseException) -> int:
    """The exit status for an error a command raised (see the table in --help)."""
    from statesync import errors

    if isinstance(exc, errors.MigrationError):
        rep = getattr(exc, "report", None)
        resumed = getattr(rep, "source_resumed", None)
        return EXIT_ABORTED if resumed or rep is None else EXIT_SOURCE_UNKNOWN
    if isinstance(exc, (errors.UsageError, errors.SecretError)):
        return EXIT_USAGE
    if isinstance(exc, (errors.PrerequisiteMissing, errors.TrackerUnavailable)):
        return EXIT_PREREQ
    if isinstance(exc, errors.TestbedError):
        return EXIT_PREREQ
    return EXIT_FAILED


def main(argv=None) -> int:
    from statesync.errors import StateSyncError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from statesync import __version__
        print(__version__)
        return EXIT_OK
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    prog = " ".join(["statesync", args.command] + [
        str(v) for k, v in sorted(vars(args).items()) if k.endswith("_command") and v])
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader of our output went away (| head): not an error of ours
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK
    except StateSyncError as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return exit_status(exc)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{prog}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        if os.environ.get("STATESYNC_DEBUG"):
            raise
        print(f"{prog}: internal error: {type(exc).__name__}: {one_line(exc)} (please report "
              f"it; STATESYNC_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_FAILED
    return int(rc or 0)


__all__ = ["main", "build_parser", "exit_status", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE",
           "EXIT_PREREQ", "EXIT_ABORTED", "EXIT_SOURCE_UNKNOWN", "EXIT_INTERRUPTED"]

if __name__ == "__main__":
    sys.exit(main())
