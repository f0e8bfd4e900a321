"""``statesync workload``: run the dirty-page workload generator."""
from __future__ import annotations

import argparse

from statesync.testing.workloads import run_workload


def cli_register(sub) -> None:
    # The generator's own parser (statesync.testing.workloads) reads every argument,
    # --help included: `statesync workload --help` prints its options.
    p = sub.add_parser("workload", help="run the dirty-page workload generator "
                                        "(statesync workload --help for its options)",
                       add_help=False, prefix_chars="\0")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: run_workload(a.rest))
