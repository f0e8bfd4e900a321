"""The ``statesync`` command.

One module per command group (``statesync.cli.track``, ``.criu``, ``.stream``, ``.sim``,
``.migrate``, ``.workload``), each defining ``cli_register(subparsers)``, which adds its
sub-commands and sets ``func`` on them; this module only collects them. The commands
are thin: the work is in the library.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute sub-commands, in the order they appear in --help.
COMMAND_MODULES = ["track", "criu", "stream", "sim", "migrate", "workload", "recover"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="statesync",
        description="Live state migration of running Linux processes.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"statesync.cli.{name}")
        except ImportError as exc:  # a module not built yet must not break the others
            print(f"statesync: commands of statesync.cli.{name} unavailable: {exc}",
                  file=sys.stderr)
            continue
        register = getattr(mod, "cli_register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv=None) -> int:
    from statesync.errors import StateSyncError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from statesync import __version__
        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        return 130
    except StateSyncError as exc:
        print(f"statesync: error: {exc}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
