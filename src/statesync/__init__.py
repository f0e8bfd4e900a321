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
- :mod:`statesync.engine`    the live migration engine (:func:`statesync.migrate`,
  :func:`statesync.serve_destination`)
- :mod:`statesync.wire`      the agents' authenticated wire protocol
- :mod:`statesync.memsource` the migration source's view of a live process's memory
- :mod:`statesync.pagetable` the destination's page store (address -> contents)
- :mod:`statesync.report`    a migration's ``Report`` (JSON, Prometheus, table)
- :mod:`statesync.downtime`  downtime measured from outside (a prober)
- :mod:`statesync.testbed`   two "hosts" on one machine (network namespaces, tc)
- :mod:`statesync.services`  third-party services (redis) as migration targets
- :mod:`statesync.workloads` a controllable dirty-page workload process
- :mod:`statesync.cli`       the ``statesync`` command

``statesync.migrate`` is the function (``statesync.migrate(pid, dest, ...)``); the
module that implements it is :mod:`statesync.engine`.

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
    "migrate": "engine",
    "serve_destination": "engine",
    "Report": "report",
    "Targets": "kpi",
    "Observations": "kpi",
}
_SUBMODULES = {"proc", "tracking", "criu", "stream", "kpi", "scheduler", "sim", "engine",
               "wire", "memsource", "pagetable", "report", "downtime", "testbed", "services",
               "workloads", "cli"}


def __getattr__(name):
    if name in _LAZY:
        mod = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(mod, name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        mod = importlib.import_module(f".{name}", __name__)
        globals()[name] = mod
        return mod
    raise AttributeError(f"module 'statesync' has no attribute {name!r}")


__all__ = list(_errors_all) + list(_LAZY) + ["__version__"]
