"""statesync's exceptions.

Every error a user can meet derives from :class:`StateSyncError`. Errors about a
process carry its ``pid``; errors about a file carry ``path`` and, for parse
errors, the byte ``offset``. Corruption/decoding errors also derive from
``ValueError`` so generic callers can catch them as bad input.
"""
from __future__ import annotations

from typing import Optional


class StateSyncError(Exception):
    """Base class of every statesync error."""


class ProcessError(StateSyncError):
    """Something about a target process went wrong. ``pid`` names it."""

    def __init__(self, pid: int, msg: str, cause: Optional[BaseException] = None):
        self.pid = pid
        self.cause = cause
        super().__init__(f"pid {pid}: {msg}")


class NoSuchProcess(ProcessError):
    """The process does not exist (or exited)."""


class AccessDenied(ProcessError):
    """We may not read or trace the process (ptrace rights, Yama, capabilities)."""


class ProcessGone(NoSuchProcess):
    """The process exited or exec'd while we were working on it."""


class AlreadyTraced(AccessDenied):
    """Another process is already ptrace-attached to the target (``tracer`` is its
    pid, 0 when unknown); only one tracer is possible at a time."""

    def __init__(self, pid: int, msg: str, tracer: int = 0, cause: Optional[BaseException] = None):
        self.tracer = tracer
        super().__init__(pid, msg, cause)


class TrackingError(StateSyncError):
    """Dirty-page tracking failed."""


class TrackerUnavailable(TrackingError):
    """The requested tracking method does not work here; ``reason`` says why."""

    def __init__(self, method: str, reason: str):
        self.method = method
        self.reason = reason
        super().__init__(f"tracking method {method!r} is unavailable: {reason}")


class InjectionFailed(TrackingError):
    """The system-call injection into ``pid`` failed after the injected calls had
    begun (for instance a call that did not finish within the timeout). ``restored``
    tells whether the thread's registers and signal mask were put back and it was
    detached at a stop (it then runs on where it was; effects of the interrupted
    call, such as a userfaultfd descriptor left open in it, may remain). When
    ``restored`` is False the target's state may be damaged. ``stage`` is the
    injection stage that failed; ``cause`` the OSError. Never retried."""

    def __init__(self, pid: int, msg: str, restored: bool, stage: int = 0,
                 cause: Optional[BaseException] = None):
        self.pid = pid
        self.restored = restored
        self.stage = stage
        self.cause = cause
        super().__init__(f"pid {pid}: {msg}")


class CriuError(StateSyncError):
    """A CRIU command failed. Carries the command, exit status and log tail."""

    def __init__(self, msg: str, cmd=None, returncode: Optional[int] = None, log_tail: str = ""):
        self.cmd = list(cmd) if cmd else []
        self.returncode = returncode
        self.log_tail = log_tail
        full = msg
        if cmd:
            full += f"\n  command: {' '.join(map(str, cmd))}"
        if returncode is not None:
            full += f"\n  exit status: {returncode}"
        if log_tail:
            full += "\n  log tail:\n    " + "\n    ".join(log_tail.rstrip().splitlines())
        super().__init__(full)


class CriuImageError(StateSyncError, ValueError):
    """A CRIU image file is malformed. ``path`` and ``offset`` locate the problem."""

    def __init__(self, msg: str, path=None, offset: Optional[int] = None):
        self.path = str(path) if path is not None else None
        self.offset = offset
        where = ""
        if path is not None:
            where = f"{path}"
            if offset is not None:
                where += f" at byte {offset}"
            where += ": "
        super().__init__(where + msg)


class StreamError(StateSyncError, ValueError):
    """A page stream is corrupt or inconsistent. ``offset`` and ``record`` locate it."""

    def __init__(self, msg: str, offset: Optional[int] = None, record: Optional[int] = None):
        self.offset = offset
        self.record = record
        where = []
        if offset is not None:
            where.append(f"byte {offset}")
        if record is not None:
            where.append(f"record {record}")
        super().__init__((f"stream {', '.join(where)}: " if where else "stream: ") + msg)


class MigrationError(StateSyncError):
    """A migration aborted. ``phase`` names where; the source keeps running."""

    def __init__(self, msg: str, phase: Optional[str] = None, report=None):
        self.phase = phase
        self.report = report
        super().__init__(f"[{phase}] {msg}" if phase else msg)


class KpiInputError(StateSyncError, ValueError):
    """A target or observation given to a scheduler is invalid. ``field`` names it
    (``"Observations.bandwidth_bytes_per_s"``)."""

    def __init__(self, field: str, msg: str):
        self.field = field
        super().__init__(f"{field}: {msg}")


class Infeasible(StateSyncError):
    """The targets cannot be met under the current model. Raised by a scheduler's
    ``plan``; never a silent fallback.

    ``field`` names the target that cannot be met (``"Targets.max_downtime_s"``),
    ``best_downtime_s`` / ``best_total_time_s`` are the best achievable values
    (each minimised on its own), and ``best`` is the plan the scheduler would run
    if the caller chooses to go on anyway (the Pareto choice for the objective).
    A scheduler that raised keeps ``best`` as its current plan, so a caller that
    catches this and proceeds gets consistent ``on_round`` decisions."""

    def __init__(self, field: str, msg: str, best_downtime_s: float, best_total_time_s: float,
                 best=None, pareto=()):
        self.field = field
        self.best_downtime_s = best_downtime_s
        self.best_total_time_s = best_total_time_s
        self.best = best
        self.pareto = tuple(pareto)
        super().__init__(
            f"{field}: {msg} (best achievable: downtime {best_downtime_s:.3f} s, "
            f"total time {best_total_time_s:.3f} s)")


class ProtocolError(StateSyncError):
    """The migration peer broke the wire protocol, the link failed or timed out, or a
    frame did not authenticate (:mod:`statesync.migration.protocol`). Not a ``ValueError``: a dead
    link is not bad input."""


class AuthenticationError(ProtocolError):
    """The peer does not hold the shared secret (or is not a statesync agent)."""


class SecretError(StateSyncError, ValueError):
    """The shared secret is missing, unreadable or too short. ``path`` names the
    secret file when one was given."""

    def __init__(self, msg: str, path=None):
        self.path = str(path) if path is not None else None
        super().__init__(msg)


class RedisError(StateSyncError):
    """redis-server answered with an error, or could not be reached
    (:mod:`statesync.testing.services`)."""


class TestbedError(StateSyncError):
    """The two-host harness could not be set up (not root, no ``ip``/``tc``, ...)
    (:mod:`statesync.testing.testbed`)."""


# --------------------------------------------------------------------------- operate (issue 14)


class MigrationCancelled(MigrationError):
    """The migration was cancelled (:meth:`statesync.Migration.cancel`, a cancelled
    task awaiting :func:`statesync.migrate_async`, Ctrl-C) before its commit; the
    source process runs on (``report.source_resumed``)."""


class UsageError(StateSyncError, ValueError):
    """An argument of a ``statesync`` command (or of an API call) is invalid: its
    value, a path it names, or an optional dependency it needs. Raised before
    anything touches a process. ``option`` names the argument (``--json``)."""

    def __init__(self, msg: str, option: Optional[str] = None):
        self.option = option
        super().__init__(f"{option}: {msg}" if option else msg)


class PrerequisiteMissing(StateSyncError):
    """Something the host must provide is missing or broken (CRIU, a kernel feature,
    root, a Python package); the message says what to install or enable."""


# --------------------------------------------------------------------------- containers (issue 12)


class ContainerError(StateSyncError):
    """A container runtime step failed (:mod:`statesync.containers`): runc or podman
    refused, a bundle or image directory is unusable. ``container`` names it ("" when
    none), ``cmd`` is the command that failed (may be empty), ``log`` the CRIU/runtime
    log file to read (may be None). One line: what, which container, which file."""

    def __init__(self, container: str, msg: str, cmd=None, log=None):
        self.container = container
        self.cmd = list(cmd) if cmd else []
        self.log = str(log) if log is not None else None
        super().__init__((f"container {container}: " if container else "") + msg)


class ContainerNotFound(ContainerError):
    """The runtime does not know the container (wrong name, wrong runc root)."""


class CheckpointArchiveError(ContainerError, ValueError):
    """A checkpoint archive (podman/CRI-O/checkpointctl layout) is malformed or lacks
    a member; ``path`` names the archive or member."""

    def __init__(self, msg: str, path=None, container: str = ""):
        self.path = str(path) if path is not None else None
        super().__init__(container, (f"{path}: " if path is not None else "") + msg)


class NetworkMoveError(StateSyncError):
    """Moving a service IP, replicating CRIU's network lock or announcing the IP
    failed (:mod:`statesync.containers.net`). ``netns`` names the namespace."""

    def __init__(self, netns: str, msg: str):
        self.netns = netns
        super().__init__(f"netns {netns}: {msg}" if netns else msg)


# --------------------------------------------------------------------------- handoff (issue 10)


class InDoubt(MigrationError):
    """The switch-over's outcome is unknown here: COMMIT was sent and the destination's
    answer never came. Both copies stay stopped and a durable record says so;
    ``statesync recover`` (or the supervisor, once the destination answers) resolves it."""


class DestinationBusy(MigrationError):
    """The destination agent is serving another migration; try again when it is done."""


class UnsafeDirectory(StateSyncError):
    """A directory the agent writes into or reads images from could be changed by
    another local user (wrong owner, group/other write, a symlink). ``path`` names it."""

    def __init__(self, msg: str, path=None):
        self.path = str(path) if path is not None else None
        super().__init__(msg)


__all__ = [
    "StateSyncError", "ProcessError", "NoSuchProcess", "AccessDenied", "ProcessGone",
    "AlreadyTraced",
    "TrackingError", "TrackerUnavailable", "InjectionFailed", "CriuError", "CriuImageError",
    "StreamError", "MigrationError", "KpiInputError", "Infeasible", "ProtocolError",
    "AuthenticationError", "SecretError", "RedisError", "TestbedError",
    "MigrationCancelled", "UsageError", "PrerequisiteMissing",
    "ContainerError", "ContainerNotFound", "CheckpointArchiveError", "NetworkMoveError",
    "InDoubt", "DestinationBusy", "UnsafeDirectory",
    "PostCopyLinkLost",
]


# ------------------------------------------------------------------- hybrid (issue 11 item 3)


class PostCopyLinkLost(MigrationError):
    """The link to the source failed while pages were still only there (post-copy or
    hybrid switch-over): the destination's copy cannot complete. The destination kills
    it; the source still holds its frozen, complete copy and resumes it once the
    destination confirms (or `statesync recover` does; docs/postcopy.md)."""

    def __init__(self, msg: str, phase: str = "post_switch", report=None):
        super().__init__(msg, phase, report)
