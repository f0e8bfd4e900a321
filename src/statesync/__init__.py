"""statesync: move the state of a running Linux process to another host with the
least possible downtime.

Modules, one per concept:

- :mod:`statesync.proc`      /proc maps, pagemap and page reads of a live process
- :mod:`statesync.tracking`  which pages a running process writes (``Tracker``)
- :mod:`statesync.criu`      CRIU driving, image reading/writing, image deltas
- :mod:`statesync.stream`    the compressed page-delta wire format
- :mod:`statesync.kpi`       migration targets and observations
- :mod:`statesync.scheduler` pluggable migration schedulers
- :mod:`statesync.sim`       scenario simulator for schedulers
- :mod:`statesync.migrate`   the live migration engine
- :mod:`statesync.workloads` a controllable dirty-page workload process
- :mod:`statesync.cli`       the ``statesync`` command

Submodules load on first use, so ``import statesync`` stays cheap.
"""
from __future__ import annotations

import importlib

from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all

__version__ = "0.1.0"

# Public names that live in submodules, loaded lazily on first access.
_LAZY = {
    "Tracker": "tracking",
    "DirtySet": "tracking",
    "tracking_methods": "tracking",
    "migrate": "migrate",
    "serve_destination": "migrate",
    "Targets": "kpi",
    "Observations": "kpi",
}
_SUBMODULES = {"proc", "tracking", "criu", "stream", "kpi", "scheduler", "sim", "migrate",
               "workloads", "cli", "testbed"}


def __getattr__(name):
    if name in _LAZY:
        mod = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(mod, name)
        if name == "migrate" and callable(getattr(mod, "migrate", None)):
            value = mod.migrate
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        mod = importlib.import_module(f".{name}", __name__)
        globals()[name] = mod
        return mod
    raise AttributeError(f"module 'statesync' has no attribute {name!r}")


__all__ = list(_errors_all) + list(_LAZY) + ["__version__"]
