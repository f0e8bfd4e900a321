"""The public entry points: :func:`migrate`, :func:`migrate_async`, :class:`Migration`,
:func:`serve_destination` and :func:`serve_destination_async`.

Blocking or asyncio, the same engine runs: :func:`migrate` is a thin wrapper that runs
a :class:`Migration` on a private event loop in the calling thread.

Cancellation (:meth:`Migration.cancel`, or cancelling the task that awaits
:func:`migrate_async`) is safe at any phase: before the destination confirmed that the
restored process runs, the migration aborts the way a failed one does (the source
process resumes with its state intact, the destination kills what it restored and
deletes its partial image set). Work that must not be cut in half (a tracker attaching,
``criu dump``) finishes first, then the abort undoes it. Once the destination has
confirmed the restore, the migration is committed: ``cancel()`` returns ``False`` and
the migration completes (the process then runs at the destination only).
"""
from __future__ import annotations

import asyncio
import math
import socket
import time
import uuid
from typing import Any, AsyncIterator, Callable, List, Optional, Union

from statesync.errors import (
    AuthenticationError,
    MigrationCancelled,
    MigrationError,
)
from statesync.migration import protocol as wire
from statesync.migration.common import DEFAULT_PORT, STRATEGIES
from statesync.migration.destination import DestinationServer
from statesync.migration.report import Report
from statesync.migration.source import _SourceAgent
from statesync.planning.costs import CriuCosts

ABORT_IF = (None, "predicted_downtime")
# The wire encryption setting: None/True/"on", False/"off"/"none", or a cipher name
# (statesync.migration.protocol.encryption_options).
Encryption = Union[bool, str, None]
SWITCHOVERS = ("auto", "lazy", "full")


def _no_running_loop(what: str, instead: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(f"{what}() blocks and cannot run inside a running event loop "
                       f"(this thread runs one): use `await statesync.{instead}(...)` there, "
                       f"or call {what}() from another thread")


# --------------------------------------------------------------------------- destination


async def serve_destination_async(listen: str = f"127.0.0.1:{DEFAULT_PORT}",
                                  images_dir: str = ".", secret=None, *, once: bool = True,
                                  restore: bool = True, keep_images: bool = False,
                                  io_timeout: float = 30.0, timeout: Optional[float] = None,
                                  ready: Optional[Callable[[int], None]] = None,
                                  log: Optional[Callable[[str], None]] = None,
                                  encryption: Encryption = None,
                                  rootfs: Optional[str] = None,
                                  container_root: Optional[str] = None,
                                  container_name: Optional[str] = None,
                                  container_netns: Optional[str] = None,
                                  service_lower: Optional[str] = None) -> List[dict]:
    """The destination agent as a coroutine (see :func:`serve_destination` for the
    arguments): serves on the running loop until one migration finished (``once``),
    ``timeout`` seconds passed (``asyncio.TimeoutError``) or the awaiting task is
    cancelled (the listening socket closes; a migration in progress is aborted by
    the session's cleanup: whatever it restored is killed, its images deleted).
    ``log(message)`` receives the agent's log lines (default: stderr).
    For finer control (the port before serving, several servers on one loop) use
    :class:`~statesync.migration.destination.DestinationServer` directly."""
    from statesync.migration.target_dest import DestOptions
    opts = DestOptions(rootfs=rootfs, runc_root=container_root, name=container_name,
                       netns=container_netns, service_lower=service_lower)
    srv = await DestinationServer(listen, images_dir, secret, once=once, restore=restore,
                                  keep_images=keep_images, io_timeout=io_timeout,
                                  log=log, encryption=encryption,
                                  target_options=opts).start()
    if ready:
        ready(srv.port)
    return await srv.serve(timeout)


def serve_destination(listen: str = f"127.0.0.1:{DEFAULT_PORT}", images_dir: str = ".",
                      secret=None, *, once: bool = True, restore: bool = True,
                      keep_images: bool = False, io_timeout: float = 30.0,
                      timeout: Optional[float] = None,
                      ready: Optional[Callable[[int], None]] = None,
                      log: Optional[Callable[[str], None]] = None,
                      encryption: Encryption = None, rootfs: Optional[str] = None,
                      container_root: Optional[str] = None,
                      container_name: Optional[str] = None,
                      container_netns: Optional[str] = None,
                      service_lower: Optional[str] = None) -> List[dict]:
    """Run a destination agent until one migration finished (``once``) or forever.

    Listens on ``listen`` (``HOST:PORT``; loopback unless told otherwise), accepts
    only peers that prove they hold ``secret`` (bytes, str, or ``"@PATH"``), writes
    the received image set under ``images_dir`` and restores it with CRIU in this
    process's network namespace. Returns one result dict per migration attempt
    (``ok``, ``pid`` of the restored process, ``encryption`` (the cipher suite the
    session used), ``error``...). ``ready(port)`` is called once listening.

    ``encryption``: ``None``/``True``/``"on"`` (default): every frame is encrypted
    (AES-256-GCM or ChaCha20-Poly1305, as the source asks); ``False``/``"off"``:
    authenticated-only frames, only for links already protected (a VPN, an SSH
    tunnel): process memory then travels in clear and the log says so. Both agents
    must agree: a source with the other setting is refused. Invalid values raise
    ``ValueError`` before anything listens.

    Containers (a source migrating ``runc:NAME`` / ``podman:NAME``): ``rootfs`` is
    the container's root file system on this host (read-only lower dir of the restored
    container's overlay; the source's changes travel and are replayed above it),
    ``container_root`` runc's state directory here (default /run/statesync/runc),
    ``container_name`` the restored container's name (default: the source's),
    ``container_netns`` the network namespace it joins (path, or a name under
    /run/netns; default: this agent's), ``service_lower`` the LAN interface the
    service IP's macvlan goes on (default: the source's name for it).

    Blocking: runs a private event loop in the calling thread, so it works from any
    thread that does not itself run an event loop (there it raises ``RuntimeError``:
    use :func:`serve_destination_async`).
    """
    _no_running_loop("serve_destination", "serve_destination_async")
    wire.encryption_options(encryption)     # ValueError before anything starts
    return asyncio.run(serve_destination_async(
        listen, images_dir, secret, once=once, restore=restore, keep_images=keep_images,
        io_timeout=io_timeout, timeout=timeout, ready=ready, log=log, encryption=encryption,
        rootfs=rootfs, container_root=container_root, container_name=container_name,
        container_netns=container_netns, service_lower=service_lower))


# --------------------------------------------------------------------------- source


class Migration:
    """One live migration of process ``pid`` to the destination agent at ``dest``,
    for asyncio programs. The arguments are those of :func:`migrate`.

    ::

        m = statesync.Migration(pid, "10.0.0.2:7411", secret="@/etc/statesync/secret")
        m.start()                      # on the running loop (or: async with m / await m)
        async for ev in m.events():    # progress dicts as migrate() documents them
            print(ev)
        report = await m               # the Report; raises MigrationError on failure

    Every event is kept: each :meth:`events` iterator starts from the first event and
    ends after the last one, so late or several consumers see them all. The
    ``progress`` callback, if given, is called with each event as well (from the
    loop's thread; keep it quick; its exceptions are ignored, except a
    :class:`~statesync.errors.MigrationError`, which aborts the migration).

    Thread-safety: create, start and await a Migration on one event loop. Only
    :meth:`cancel` may be called from any thread.

    Cancellation: :meth:`cancel` (or cancelling the task awaiting it) aborts safely
    at any phase before the commit: the source process runs on with its state
    intact, the destination keeps nothing, and awaiting the migration raises
    :class:`~statesync.errors.MigrationCancelled` (a ``MigrationError``; its
    ``.report`` says ``source_resumed``). A worker thread in a step that must not be
    cut (tracker attach, ``criu dump``) finishes first, so an abort can take up to the
    length of that step. After the destination confirmed the restored process runs
    (the ``"commit"`` phase event), the migration is committed: ``cancel()`` returns
    ``False`` and the migration completes normally.
    """

    def __init__(self, pid: Union[int, str, None], dest: str, strategy: str = "auto",
                 targets=None, secret=None, *, tracker: str = "auto",
                 compression: Optional[str] = "auto",
                 xor: bool = False, max_rounds: int = 10, scheduler: str = "adaptive",
                 work_dir: Optional[str] = None, io_timeout: float = 30.0,
                 progress: Optional[Callable[[dict], None]] = None, criu_args=(),
                 link_rate: Optional[float] = None, costs: Optional[CriuCosts] = None,
                 netns: Optional[str] = None, dump_retries: int = 4,
                 calibration: Optional[str] = None, abort_if: Optional[str] = None,
                 encryption: Encryption = None, switchover: str = "auto",
                 container: Optional[str] = None, tcp_established: bool = False,
                 service_ip: Optional[str] = None, service_dev: str = "svc0",
                 criu_opts=(), network_lock: Optional[str] = None):
        wire.encryption_options(encryption)     # ValueError before the process is touched
        from statesync.migration.target import source_target
        tgt = source_target(pid, container, criu_opts=criu_opts, tcp_established=tcp_established,
                            service_ip=service_ip, service_dev=service_dev,
                            network_lock=network_lock)
        pid = tgt.pid
        tracker = tgt.tracker_method(tracker)
        if tgt.lazy_problem() and strategy in ("postcopy", "hybrid"):
            raise ValueError(f"strategy {strategy!r} needs the lazy switch-over, and "
                             f"{tgt.label}: {tgt.lazy_problem()}; use strategy='iterative'")
        if tgt.lazy_problem() and switchover == "lazy":
            tgt.notes.append(f"full switch-over instead of lazy: {tgt.lazy_problem()}")
            switchover = "full"
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of "
                             f"{', '.join(STRATEGIES)}")
        if compression not in (None, "none", "auto", "lz4"):
            raise ValueError(f"unknown compression {compression!r} (auto, none, lz4)")
        if max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
        if switchover not in SWITCHOVERS:
            raise ValueError(f"unknown switchover {switchover!r}; choose one of "
                             f"{', '.join(SWITCHOVERS)}")
        if abort_if not in ABORT_IF:
            raise ValueError(f"unknown abort_if {abort_if!r} (None or 'predicted_downtime')")
        if link_rate is not None and not (link_rate > 0 and math.isfinite(link_rate)):
            raise ValueError(f"link_rate must be a positive number of bits/s, got {link_rate!r}")
        from statesync.cli._common import check_pid
        check_pid(int(pid))     # NoSuchProcess (also a zombie) / ProcessError, with what to do
        from statesync.migration.common import load_secret_checked
        key = load_secret_checked(secret)      # refuses a secret file others can read
        if calibration:
            costs = CriuCosts.load(calibration)
        self.encryption = encryption
        self.pid = int(pid)
        self.dest = dest
        self.targets = targets
        self.abort_if = abort_if
        self.calibration = calibration
        self._link_rate = link_rate
        self._user_progress = progress
        self._agent = _SourceAgent(self.pid, dest, key, strategy, tracker, compression or "none",
                                   max_rounds, targets, scheduler, work_dir, io_timeout,
                                   self._on_event, list(criu_args),
                                   link_rate / 8 if link_rate else None,
                                   costs or CriuCosts(), netns, xor, encryption=encryption,
                                   target=tgt)
        self._agent.report.notes += tgt.notes
        self._agent.dump_retries = max(0, int(dump_retries))
        self._agent.switchover = switchover
        self._events: List[dict] = []
        self._changed: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._cancel_requested = False
        self._running = False
        self._finished = False

    # -- state

    @property
    def report(self) -> Report:
        """The report so far (final once the migration finished)."""
        return self._agent.report

    @property
    def phase(self) -> str:
        """The last phase reached: ``"starting"``, ``"plan"``, ``"precopy"``, ``"dump"``,
        ``"final transfer"``, ``"restore"``, ``"commit"``, ``"done"``, or ``"failed"``."""
        if self._finished and not self._agent.report.ok:
            return "failed"
        for ev in reversed(self._events):
            kind = ev.get("event")
            if kind == "phase":
                return str(ev.get("phase"))
            if kind in ("plan", "done"):
                return str(kind)
            if kind == "round":
                return "precopy"
        return "starting"

    @property
    def committed(self) -> bool:
        """True once the destination runs the process: cancel() can no longer abort."""
        return bool(self._agent.committed or getattr(self._agent, "committing", False))

    def done(self) -> bool:
        return self._finished

    # -- life cycle

    def start(self) -> "Migration":
        """Start the migration as a task of the running loop (idempotent)."""
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._changed = asyncio.Event()
            self._task = self._loop.create_task(self._run(), name=f"statesync-migrate-{self.pid}")
        return self

    def _cancelled(self) -> MigrationCancelled:
        rep = self._agent.report
        rep.ok = False
        rep.error = "cancelled" + (f" ({rep.error})" if rep.error else "")
        return MigrationCancelled(f"migration of pid {self.pid} cancelled in phase "
                                  f"{rep.failed_phase or self.phase}; source resumed: "
                                  f"{rep.source_resumed}", rep.failed_phase, rep)

    async def _run(self) -> Report:
        self._running = True
        rep = self._agent.report
        rep.migration_id = uuid.uuid4().hex[:16]
        rep.source = socket.gethostname()
        rep.started_at = time.time()
        rep.netns = self._agent.netns
        try:
            if self._cancel_requested:      # cancelled before it began: nothing touched
                self._agent.report.failed_phase = "start"
                self._agent.report.source_resumed = True
                raise self._cancelled()
            report = await self._agent.run()
        except asyncio.CancelledError:
            raise self._cancelled() from None
        except MigrationCancelled:
            raise
        except MigrationError as exc:
            if self._cancel_requested:      # the agent's own check before its commit
                raise self._cancelled() from exc
            if isinstance(exc.__cause__, AuthenticationError):
                raise MigrationError(
                    f"destination {self.dest} did not accept this host's shared secret, or "
                    f"failed to prove it holds it ({exc.__cause__}): both hosts must use the "
                    f"same secret (compare `sha256sum SECRET_FILE` on both); nothing of pid "
                    f"{self.pid} was sent", exc.phase, exc.report) from exc
            raise
        finally:
            from statesync.planning.kpi import Targets
            rep.set_targets(self.targets or Targets(max_downtime_s=1.0))
            if self._link_rate is None and not rep.rounds and rep.strategy.endswith("cold"):
                rep.notes.append("the cold plan's prediction assumed a 100 Mbit/s link (no "
                                 "link_rate given and no live round to measure it): pass "
                                 "link_rate= / --link-rate for a true prediction")
            self._finished = True
            if self._changed is not None:
                self._changed.set()
        if self.calibration:
            try:
                self._agent.costs.observe(report).save(self.calibration)
            except OSError as exc:
                report.notes.append(f"could not save the calibration to {self.calibration}: {exc}")
        return report

    def cancel(self) -> bool:
        """Ask the migration to abort (see the class docstring). Thread-safe. Returns
        False if it is too late (committed, or already finished), True if the abort
        was requested; await the migration to learn when the source runs again."""
        if self._finished or self.committed:
            return False
        self._cancel_requested = True
        self._agent.cancel_requested = True     # checked by the agent before its commit
        if self._task is None or not self._running:
            return True                         # the task aborts as it begins
        loop = self._loop
        assert loop is not None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._task.cancel()
        else:
            loop.call_soon_threadsafe(self._task.cancel)
        return True

    async def wait(self) -> Report:
        """Start if needed and wait for the end: the Report, or MigrationError
        (MigrationCancelled after cancel()). Cancelling the task that waits here
        cancels the migration (safely, as :meth:`cancel`) and waits for its abort."""
        self.start()
        task = self._task
        assert task is not None
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            # Our waiter was cancelled, not the migration: abort it, wait for the abort.
            self.cancel()
            try:
                await asyncio.wait([task])
                if not task.cancelled():
                    task.exception()    # retrieved: no "never retrieved" traceback at exit
            finally:
                raise asyncio.CancelledError()

    def __await__(self):
        return self.wait().__await__()

    async def __aenter__(self) -> "Migration":
        return self.start()

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if self._task is not None and not self._task.done():
            if exc_type is not None:
                self.cancel()
            await asyncio.wait([self._task])

    async def events(self) -> AsyncIterator[dict]:
        """Progress events from the first one, until the migration ends. Does not
        raise the migration's error: await the Migration for that."""
        self.start()
        assert self._changed is not None
        i = 0
        while True:
            while i < len(self._events):
                yield self._events[i]
                i += 1
            if self._finished:
                return
            self._changed.clear()
            await self._changed.wait()

    def __aiter__(self) -> AsyncIterator[dict]:
        return self.events()

    # -- the agent's progress hook (runs on the loop, inside the agent's task)

    def _on_event(self, ev: dict) -> None:
        self._events.append(ev)
        if self._changed is not None:
            self._changed.set()
        if self._user_progress is not None:
            try:
                self._user_progress(ev)
            except MigrationError:
                if not self.committed:      # an abort request; too late once committed
                    raise
            except Exception:
                pass
        if ev.get("event") == "phase" and ev.get("phase") == "dump":
            self._check_abort_if()

    def _check_abort_if(self) -> None:
        """abort_if="predicted_downtime": before the freeze, abort when the downtime
        the engine predicts for the switch-over exceeds the target (virsh's
        migrate-setmaxdowntime, as a hard limit)."""
        if self.abort_if != "predicted_downtime":
            return
        from statesync.planning.kpi import Targets
        target = (self.targets or Targets(max_downtime_s=1.0)).max_downtime_s
        pred = self._agent.report.predicted_downtime_s
        if pred is not None and not math.isnan(pred) and pred > target:
            raise MigrationError(
                f"predicted downtime {pred * 1e3:.0f} ms exceeds the target "
                f"{target * 1e3:.0f} ms (abort_if=predicted_downtime): not freezing pid "
                f"{self.pid}; raise the target, lower the dirty rate or use a faster link",
                "precopy")


async def migrate_async(pid: int, dest: str, strategy: str = "auto", targets=None,
                        secret=None, **options: Any) -> Report:
    """:func:`migrate` for asyncio programs: ``report = await migrate_async(pid, dest,
    ...)`` with the same arguments. Runs on the caller's loop; cancelling the awaiting
    task aborts the migration safely (see :class:`Migration`) and then raises
    ``CancelledError``. For progress events or ``cancel()`` from elsewhere, use
    :class:`Migration` directly."""
    return await Migration(pid, dest, strategy, targets, secret, **options).wait()


def migrate(pid: Union[int, str, None], dest: str, strategy: str = "auto", targets=None,
            secret=None, *,
            tracker: str = "auto", compression: Optional[str] = "auto", xor: bool = False,
            max_rounds: int = 10,
            scheduler: str = "adaptive", work_dir: Optional[str] = None,
            io_timeout: float = 30.0, progress: Optional[Callable[[dict], None]] = None,
            criu_args=(), link_rate: Optional[float] = None,
            costs: Optional[CriuCosts] = None, netns: Optional[str] = None,
            dump_retries: int = 4, calibration: Optional[str] = None,
            abort_if: Optional[str] = None, encryption: Encryption = None,
            switchover: str = "auto", container: Optional[str] = None,
            tcp_established: bool = False, service_ip: Optional[str] = None,
            service_dev: str = "svc0", criu_opts=(),
            network_lock: Optional[str] = None) -> Report:
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
    at most ``max_rounds``), ``hybrid`` (at most 3 rounds, then switch over before
    convergence; what is still dirty is fetched after the resume: docs/postcopy.md),
    ``postcopy`` (no pre-copy round, everything fetched after the resume), ``auto``
    (the scheduler's plan decides cold, iterative or hybrid).
    ``targets``: a :class:`statesync.planning.kpi.Targets` (default: max downtime 1 s);
    the report says whether each was met (``Report.kpi``).
    ``abort_if``: ``None`` (default: the targets steer the scheduler only) or
    ``"predicted_downtime"``: abort before the freeze (the process never stops) when
    the downtime predicted for the switch-over exceeds ``targets.max_downtime_s``.
    ``scheduler``: a name for :func:`statesync.scheduler.get` (default ``adaptive``).
    ``compression``: ``"auto"`` (the scheduler picks from the link rate and a
    measured lz4 sample), ``None``/``"none"``, or ``"lz4"``; pages travel as
    :mod:`statesync.stream` streams (zero pages always elided). ``xor``: with lz4,
    send XBZRLE deltas of re-sent pages against the destination's copy (costs a
    mirror of the state in the source's memory: one page per page of state).
    ``tracker``: a :class:`statesync.Tracker` method (``auto``, ``uffd``, ``hash``).
    ``link_rate`` (bits/s): the link's rate if known (else 100 Mbit/s until round 0
    measured it; a cold migration has no round 0, so pass it for a true prediction).
    ``io_timeout`` (seconds) bounds every wait on the peer. ``netns``:
    make the connection from this named network namespace (/run/netns/NAME) instead
    of the caller's, as the two-host testbed does; CRIU always runs in the target's
    network namespace (:func:`statesync.criu.netns_of`).

    ``encryption``: ``None``/``True``/``"on"`` (default): every frame after the
    handshake is encrypted and authenticated with AES-256-GCM;
    ``"aes-256-gcm"``/``"chacha20-poly1305"``: encrypted with that cipher;
    ``False``/``"off"``/``"none"``: authenticated-only frames (HMAC-SHA256), only for
    links already protected (a VPN, an SSH tunnel): process memory then travels in
    clear. The destination must be configured the same way (``serve_destination(...,
    encryption=False)``, ``statesync receive --no-encryption``) or it refuses the
    migration at the handshake (``MigrationError``, phase ``"authenticate"``; nothing
    was sent, the process runs on). ``Report.encryption`` says which cipher suite was
    used (``"hmac-sha256"`` when off). An invalid value raises ``ValueError`` before
    the process is touched.

    ``switchover``: ``"auto"`` (default: lazy where this host can, else full),
    ``"lazy"`` (raise before the freeze when it cannot) or ``"full"``. Lazy: the tracker
    stays attached through the freeze, ``criu dump --lazy-pages`` writes no lazy
    page, only the final dirty set (read from the frozen process) travels, and the
    destination restores with ``criu restore --lazy-pages`` from the pages it already
    holds (statesync's own lazy-pages daemon fills them in the background after the
    resume: ``Report.post_switch``). Needs CRIU's lazy pages, a userfaultfd with
    non-cooperative events, a tracker (not ``cold``) and a one-process tree. Full:
    a complete image set and a full ``criu restore``.

    ``work_dir``: the directory of the local CRIU dump at switch-over (a temporary
    directory is made in it and removed afterwards; default ``/dev/shm``, so the dump
    stays in memory: a disk there adds its write time to the downtime).
    ``criu_args``: extra arguments for ``criu dump`` only (after ``--leave-stopped``).
    ``criu_opts``: CRIU options for the dump AND the restore (``["--shell-job",
    "--ext-unix-sk", "--file-locks"]``; long options, ``--name`` or ``--name=value``),
    carried to the destination in BEGIN; for a container they go into the CRIU config
    file runc hands CRIU (org.criu.config). ``tcp_established`` for a process: CRIU's
    ``--tcp-established`` on dump and restore; a failure after the dump kills the
    frozen tree and restores it here from the dump (never SIGCONT); no IP moves.

    Containers (docs/containers.md): ``pid`` may be ``"runc:NAME"``,
    ``"runc:NAME@ROOT"`` (another runc state directory) or ``"podman:NAME"`` (a podman
    container under ``--runtime runc``), or give ``container=`` that way and ``pid=None``.
    Pre-copy tracks the container's processes from their host pids (uffd where its
    seccomp filter allows userfaultfd, else hash: the report's notes say which), the
    switch-over checkpoints through runc with CRIU leaving the tree stopped, and the
    destination (``serve_destination(..., rootfs=DIR)`` / ``statesync receive --rootfs
    DIR``) restores it through runc (podman: ``podman container restore --import``),
    stopped until COMMIT. Lazy switch-overs fall back to full (a note says so).
    ``tcp_established``: the container's TCP connections survive (runc containers in an
    external network namespace); ``service_ip`` (``A.B.C.D[/len]``, on macvlan
    ``service_dev``, default ``svc0``) moves with it: CRIU's network lock is replicated at
    the destination before the IP appears there, lifted at COMMIT, and a gratuitous ARP
    announces the move. A failure after such a dump rolls back by killing the frozen
    container and restoring it here from its dump (never SIGCONT: the sockets are in
    repair mode). ``network_lock``: CRIU's lock method (``"iptables"``, ``"nftables"``).
    ``costs``: a :class:`CriuCosts` (dump and restore cost priors in seconds and
    seconds per MiB of state) for the scheduler's downtime model; ``calibration``: a
    JSON file of :class:`CriuCosts` for this host, read before and refined after every
    successful migration (``costs`` then is ignored). ``dump_retries``: further dump
    attempts when ``criu dump`` fails because a client's UNIX stream connection was
    open or in flight when CRIU collected sockets (other dump failures abort at once).

    ``progress``: called with one ``dict`` per event, from the calling thread (keep it
    quick; its exceptions are ignored, except a ``MigrationError``, which aborts the
    migration). Every dict has ``"event"``:

    - ``"plan"``: ``strategy``, ``codec``, ``state_pages``, ``dirty_rate_pages_per_s``,
      ``dirty_rate_window_s``, ``predicted_downtime_s``, ``reason``;
    - ``"transfer"`` (after each batch of pages sent, in a round or the final
      transfer): ``pages_sent``, ``pages_total``, ``bytes_wire`` (so far in this pass);
    - ``"round"`` (after each live round): ``round`` (0-based), ``pages``,
      ``bytes_wire``, ``duration_s``, ``mbps`` (MB/s), ``dirty_pages`` (written
      during the round, to send next), ``predicted_downtime_s``, ``decision``;
    - ``"phase"`` (switch-over steps): ``phase`` = ``"dump"``, ``"final transfer"``
      (with ``dump_s``), ``"restore"`` (with ``final_pages``) or ``"commit"`` (the
      destination runs the process; the source copy is being removed);
    - ``"done"`` once the destination runs the process.

    On failure raises :class:`MigrationError` (``.phase``, ``.report``); the process
    then runs on at the source with its state intact (``report.source_resumed``).
    Must be run as root (ptrace, CRIU).

    Blocking: runs a private event loop in the calling thread, so it works from any
    thread that does not run an event loop itself, also while other threads run
    theirs; called from inside a running loop it raises ``RuntimeError`` (use
    ``await`` :func:`migrate_async` there). Ctrl-C (KeyboardInterrupt) aborts the
    migration safely before re-raising. Not thread-safe for the same ``pid``: one
    migration per process at a time.
    """
    _no_running_loop("migrate", "migrate_async")
    m = Migration(pid, dest, strategy, targets, secret, tracker=tracker,
                  compression=compression, xor=xor, max_rounds=max_rounds, scheduler=scheduler,
                  work_dir=work_dir, io_timeout=io_timeout, progress=progress,
                  criu_args=criu_args, link_rate=link_rate, costs=costs, netns=netns,
                  dump_retries=dump_retries, calibration=calibration, abort_if=abort_if,
                  encryption=encryption, switchover=switchover, container=container,
                  tcp_established=tcp_established, service_ip=service_ip,
                  service_dev=service_dev, criu_opts=criu_opts, network_lock=network_lock)
    return asyncio.run(m.wait())


__all__ = ["migrate", "migrate_async", "Migration", "serve_destination", "SWITCHOVERS",
           "serve_destination_async", "ABORT_IF"]
