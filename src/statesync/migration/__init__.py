"""The live migration engine behind :func:`statesync.migrate`: a source agent and a
destination agent over one authenticated TCP connection.

Modules, one concern each (QEMU's migration/ is the model):

- :mod:`~statesync.migration.api`         ``migrate()`` and ``serve_destination()``
- :mod:`~statesync.migration.protocol`    authentication, frames, message types
- :mod:`~statesync.migration.codec`       how pages travel (page streams per batch)
- :mod:`~statesync.migration.source`      the source agent: plan, pre-copy rounds
- :mod:`~statesync.migration.switchover`  the source's switch-over (freeze, final diff, commit)
- :mod:`~statesync.migration.destination` the destination agent
- :mod:`~statesync.migration.memsource`   the source's view of a live process's memory
- :mod:`~statesync.migration.report`      the ``Report``

    report = statesync.migrate(pid, dest="HOST:PORT", strategy="auto", secret=...)
    statesync.serve_destination(listen="HOST:PORT", images_dir=..., secret=...)

Flow (strategy ``iterative``; ``precopy`` stops after round 0; ``cold`` has no rounds):

1. Authenticate (:mod:`statesync.migration.protocol`); nothing of the process is sent before the
   destination proved it holds the shared secret.
2. Attach a dirty-page tracker; round 0 sends every page CRIU would dump while the
   process runs; rounds 1..N send what the tracker reports written. The source keeps
   a 128-bit hash of every page the destination holds. A stop rule (the scheduler)
   decides after each round whether another round still lowers the downtime.
3. Switch-over: detach the tracker, ``criu dump --leave-stopped`` into a local
   directory (the process is frozen from here on), hash the dumped pages and send
   only those whose content differs from what the destination holds, plus every
   non-memory image. The content diff makes the final state exact whatever the
   tracker said.
4. The destination writes a complete image set (pages gathered from what it
   received), atomically (temporary directory, fsync, rename), runs
   ``criu restore`` and confirms that the restored process runs.
5. Only then does the source kill its stopped copy. On any failure before that, the
   source sends SIGCONT (the process resumes with its state intact), the destination
   kills anything it restored and deletes its partial image set.

Both agents run CRIU in the target's network namespace (``nsenter --net``) when it is
not their own, so CRIU never tries to dump a network namespace.
"""
from __future__ import annotations

from statesync.migration.api import (
    Migration,
    migrate,
    migrate_async,
    serve_destination,
    serve_destination_async,
)
from statesync.migration.common import DEFAULT_PORT, STRATEGIES
from statesync.migration.destination import DestinationServer
from statesync.migration.report import Report, RoundReport

__all__ = ["migrate", "migrate_async", "Migration", "serve_destination",
           "serve_destination_async", "DestinationServer", "Report", "RoundReport",
           "STRATEGIES", "DEFAULT_PORT"]
