"""The public entry points: migrate() and serve_destination()."""
from __future__ import annotations

import asyncio
import os
from typing import Callable, List, Optional

from statesync.migration import protocol as wire
from statesync.migration.common import DEFAULT_PORT, STRATEGIES
from statesync.migration.destination import DestinationServer
from statesync.migration.report import Report
from statesync.migration.source import _SourceAgent
from statesync.planning.costs import CriuCosts


def serve_destination(listen: str = f"127.0.0.1:{DEFAULT_PORT}", images_dir: str = ".",
                      secret=None, *, once: bool = True, restore: bool = True,
                      keep_images: bool = False, io_timeout: float = 30.0,
                      timeout: Optional[float] = None,
                      ready: Optional[Callable[[int], None]] = None) -> List[dict]:
    """Run a destination agent until one migration finished (``once``) or forever.

    Listens on ``listen`` (``HOST:PORT``; loopback unless told otherwise), accepts
    only peers that prove they hold ``secret`` (bytes, str, or ``"@PATH"``), writes
    the received image set under ``images_dir`` and restores it with CRIU in this
    process's network namespace. Returns one result dict per migration attempt
    (``ok``, ``pid`` of the restored process, ``error``...). ``ready(port)`` is called
    once listening.
    """
    async def main():
        srv = await DestinationServer(listen, images_dir, secret, once=once, restore=restore,
                                      keep_images=keep_images, io_timeout=io_timeout).start()
        if ready:
            ready(srv.port)
        return await srv.serve(timeout)

    return asyncio.run(main())


# --------------------------------------------------------------------------- public API


def migrate(pid: int, dest: str, strategy: str = "auto", targets=None, secret=None, *,
            tracker: str = "auto", compression: Optional[str] = "auto", xor: bool = False,
            max_rounds: int = 10,
            scheduler: str = "adaptive", work_dir: Optional[str] = None,
            io_timeout: float = 30.0, progress: Optional[Callable[[dict], None]] = None,
            criu_args=(), link_rate: Optional[float] = None,
            costs: Optional[CriuCosts] = None, netns: Optional[str] = None,
            dump_retries: int = 4, calibration: Optional[str] = None) -> Report:
    """Live-migrate process ``pid`` (and its children) to the destination agent at
    ``dest`` (``HOST:PORT``; :func:`serve_destination` or ``statesync receive`` must be
    listening there). Returns a :class:`~statesync.migration.report.Report` (times in seconds,
    sizes in bytes or pages as the field names say).

    ``secret`` (required): the shared secret both agents hold, as ``bytes``, as a
    ``str`` (its UTF-8 bytes), or ``"@PATH"`` / ``"file:PATH"`` to read it from a file
    (surrounding whitespace stripped); at least 16 bytes. A missing, unreadable or
    short secret raises :class:`~statesync.errors.SecretError` (a ``ValueError``)
    before anything is sent. Nothing of the process leaves this host before the
    destination proved it holds the same secret.

    ``strategy``: ``cold`` (dump, send everything, restore), ``precopy`` (one live
    round, then switch over), ``iterative`` (live rounds until the scheduler says stop,
    at most ``max_rounds``), ``auto`` (the scheduler's plan decides cold or iterative).
    ``targets``: a :class:`statesync.planning.kpi.Targets` (default: max downtime 1 s).
    ``scheduler``: a name for :func:`statesync.scheduler.get` (default ``adaptive``).
    ``compression``: ``"auto"`` (the scheduler picks from the link rate and a
    measured lz4 sample), ``None``/``"none"``, or ``"lz4"``; pages travel as
    :mod:`statesync.stream` streams (zero pages always elided). ``xor``: with lz4,
    send XBZRLE deltas of re-sent pages against the destination's copy (costs a
    mirror of the state in the source's memory: one page per page of state).
    ``tracker``: a :class:`statesync.Tracker` method (``auto``, ``uffd``, ``hash``).
    ``link_rate`` (bits/s): the link's rate if known (else 100 Mbit/s until round 0
    measured it). ``io_timeout`` (seconds) bounds every wait on the peer. ``netns``:
    make the connection from this named network namespace (/run/netns/NAME) instead
    of the caller's, as the two-host testbed does; CRIU always runs in the target's
    network namespace (:func:`statesync.criu.netns_of`).

    ``work_dir``: the directory of the local CRIU dump at switch-over (a temporary
    directory is made in it and removed afterwards; default ``/dev/shm``, so the dump
    stays in memory: a disk there adds its write time to the downtime).
    ``criu_args``: extra arguments for ``criu dump`` (after ``--leave-stopped``), e.g.
    ``["--tcp-established"]`` for a process with open TCP connections.
    ``costs``: a :class:`CriuCosts` (dump and restore cost priors in seconds and
    seconds per MiB of state) for the scheduler's downtime model; ``calibration``: a
    JSON file of :class:`CriuCosts` for this host, read before and refined after every
    successful migration (``costs`` then is ignored). ``dump_retries``: further dump
    attempts when ``criu dump`` fails because a client's UNIX stream connection was
    open or in flight when CRIU collected sockets (other dump failures abort at once).

    ``progress``: called with one ``dict`` per event, from the calling thread (keep it
    quick; its exceptions are ignored). Every dict has ``"event"``:

    - ``"plan"``: ``strategy``, ``codec``, ``state_pages``, ``dirty_rate_pages_per_s``,
      ``dirty_rate_window_s``, ``predicted_downtime_s``, ``reason``;
    - ``"round"`` (after each live round): ``round`` (0-based), ``pages``,
      ``bytes_wire``, ``duration_s``, ``mbps`` (MB/s), ``dirty_pages`` (written
      during the round, to send next), ``predicted_downtime_s``, ``decision``;
    - ``"phase"`` (switch-over steps): ``phase`` = ``"dump"``, ``"final transfer"``
      (with ``dump_s``) or ``"restore"`` (with ``final_pages``);
    - ``"done"`` once the destination runs the process.

    On failure raises :class:`MigrationError` (``.phase``, ``.report``); the process
    then runs on at the source with its state intact (``report.source_resumed``).
    Must be run as root (ptrace, CRIU). Blocking; runs its own event loop, so call it
    from a thread without a running loop. Not thread-safe for the same ``pid``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if compression not in (None, "none", "auto", "lz4"):
        raise ValueError(f"unknown compression {compression!r} (auto, none, lz4)")
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    if not os.path.exists(f"/proc/{int(pid)}"):
        from statesync.errors import NoSuchProcess
        raise NoSuchProcess(int(pid), "no such process: nothing to migrate")
    key = wire.load_secret(secret)
    if calibration:
        costs = CriuCosts.load(calibration)
    agent = _SourceAgent(int(pid), dest, key, strategy, tracker, compression or "none",
                         max_rounds, targets, scheduler, work_dir, io_timeout, progress,
                         list(criu_args), link_rate / 8 if link_rate else None,
                         costs or CriuCosts(), netns, xor)
    agent.dump_retries = max(0, int(dump_retries))
    report = asyncio.run(agent.run())
    if calibration:
        try:
            agent.costs.observe(report).save(calibration)
        except OSError as exc:
            report.notes.append(f"could not save the calibration to {calibration}: {exc}")
    return report
