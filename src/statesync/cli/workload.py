"""``statesync workload``: run the dirty-page workload generator."""
from __future__ import annotations

import argparse

from statesync.testing.workloads import run_workload


def cli_register(sub) -> None:
    p = sub.add_parser("workload", help="run the dirty-page workload generator",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: run_workload(a.rest))


