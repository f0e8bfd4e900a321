"""statesync: move the state of a running Linux process to another host with the
least possible downtime.

Packages, one per layer (docs/design.md walks through them):

- :mod:`statesync.proc`       /proc maps, pagemap and page reads of a live process
- :mod:`statesync.tracking`   which pages a running process writes (``Tracker``)
- :mod:`statesync.criu`       CRIU driving, image reading/writing, image deltas
- :mod:`statesync.stream`     the compressed page-delta wire format
- :mod:`statesync.planning`   KPI targets, cost model, schedulers, simulator
- :mod:`statesync.migration`  the live migration engine (:func:`statesync.migrate`,
  :func:`statesync.serve_destination`), its protocol, agents and report
- :mod:`statesync.testing`    workloads, services, the two-host testbed, downtime probes
- :mod:`statesync.cli`        the ``statesync`` command

``statesync.scheduler``, ``statesync.kpi`` and ``statesync.sim`` remain as names for
:mod:`statesync.planning.scheduler`, :mod:`~statesync.planning.kpi` and
:mod:`~statesync.planning.sim`.

Submodules load on first use, so ``import statesync`` stays cheap.
"""
from __future__ import annotations

import importlib

from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all


def _version() -> str:
    """The installed distribution's version: pyproject.toml's [project] version is the
    one source (a source tree used without installing says 0+unknown)."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return "0+unknown"
    try:
        return version("statesync")
    except PackageNotFoundError:
        return "0+unknown"

# Public names that live in submodules, loaded lazily on first access.
_LAZY = {
    "Tracker": "statesync.tracking",
    "DirtySet": "statesync.dirtyset",
    "tracking_methods": "statesync.tracking",
    "migrate": "statesync.migration.api",
    "serve_destination": "statesync.migration.api",
    "migrate_async": "statesync.migration.api",
    "serve_destination_async": "statesync.migration.api",
    "Migration": "statesync.migration.api",
    "Report": "statesync.migration.report",
    "Targets": "statesync.planning.kpi",
    "Observations": "statesync.planning.kpi",
}
_SUBMODULES = {
    "proc": "statesync.proc", "tracking": "statesync.tracking", "criu": "statesync.criu",
    "stream": "statesync.stream", "planning": "statesync.planning",
    "migration": "statesync.migration", "testing": "statesync.testing", "cli": "statesync.cli",
    "errors": "statesync.errors", "dirtyset": "statesync.dirtyset",
    # names of the 0.1 flat layout that users met in the docs
    "scheduler": "statesync.planning.scheduler", "kpi": "statesync.planning.kpi",
    "sim": "statesync.planning.sim",
}


def __getattr__(name):
    if name == "__version__":
        v = globals()["__version__"] = _version()
        return v
    if name in _LAZY:
        mod = importlib.import_module(_LAZY[name])
        value = getattr(mod, name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        mod = importlib.import_module(_SUBMODULES[name])
        globals()[name] = mod
        return mod
    raise AttributeError(f"module 'statesync' has no attribute {name!r}")


__all__ = list(_errors_all) + list(_LAZY) + ["__version__"]  # noqa: F405 (lazy)
