"""Durable handoff records: one small JSON file per migration session and side.

A record says, at every instant of a switch-over, who owns the service (see the state
machine in docs/migrate.md). It is written before the step it announces (write a
temporary file beside it, fsync, rename, fsync the directory), so after a crash of the
agent, of its supervisor or of the host, whoever reads it next (the supervisor, a
restarted agent, ``statesync recover``) knows what may have happened and what must not.

Records live in ``STATE_DIR/source/SESSION.json`` and ``STATE_DIR/dest/SESSION.json``;
``STATE_DIR`` is the ``state_dir`` argument, else ``$STATESYNC_STATE_DIR``, else
``/var/lib/statesync``. Transitions that two processes may race for (the agent
committing, its supervisor aborting at the switch-over deadline) take an exclusive
``flock`` on the side's directory (:func:`transition`).
"""
from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import os
import time
from typing import Dict, Iterator, List, Optional

DEFAULT_STATE_DIR = "/var/lib/statesync"


class SourceState(str, enum.Enum):
    """The source side of a session. Only FROZEN..COMMITTING hold a stopped tree."""
    PRECOPY = "precopy"          # connected, rounds while the process runs
    FREEZING = "freezing"        # criu dump --leave-stopped running
    FROZEN = "frozen"            # tree stopped, final transfer / waiting for PREPARED
    COMMITTING = "committing"    # decision: commit (COMMIT sent or about to be)
    IN_DOUBT = "in_doubt"        # COMMIT sent, no answer: both copies stay stopped
    COMMITTED = "committed"      # destination confirmed it resumed; our copy killed
    ABORTED = "aborted"          # our copy resumed; the destination must drop its copy


class DestState(str, enum.Enum):
    """The destination side of a session. Only PREPARED holds a stopped restored tree."""
    RECEIVING = "receiving"      # pages and images arrive into .incoming-*
    RESTORING = "restoring"      # criu restore --leave-stopped running
    PREPARED = "prepared"        # restored tree stopped; RESTORED sent; waiting for COMMIT
    COMMITTED = "committed"      # COMMIT received: resume (SIGCONT) is ours to do
    RESUMED = "resumed"          # restored tree runs; RESUMED sent (the source may not know)
    ABORTED = "aborted"          # restored tree killed / nothing restored


FINAL_SOURCE = {SourceState.COMMITTED, SourceState.ABORTED}
FINAL_DEST = {DestState.RESUMED, DestState.ABORTED}


def state_dir(explicit: Optional[str] = None) -> str:
    return explicit or os.environ.get("STATESYNC_STATE_DIR") or DEFAULT_STATE_DIR


def side_dir(base: str, side: str) -> str:
    d = os.path.join(base, side)
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def record_path(base: str, side: str, session: str) -> str:
    return os.path.join(side_dir(base, side), f"{session}.json")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(path: str, data: Dict) -> Dict:
    """Replace the record at ``path`` durably (temp file, fsync, rename, fsync dir)."""
    data = dict(data)
    data["updated"] = time.time()
    d = os.path.dirname(path)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600)
    try:
        os.write(fd, json.dumps(data, sort_keys=True).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    _fsync_dir(d)
    return data


def read(path: str) -> Optional[Dict]:
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read() or b"null")
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def remove(path: str) -> None:
    try:
        os.unlink(path)
        _fsync_dir(os.path.dirname(path))
    except FileNotFoundError:
        pass


def all_records(base: str, side: str) -> List[Dict]:
    d = os.path.join(base, side)
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        if n.endswith(".json") and not n.startswith("."):
            r = read(os.path.join(d, n))
            if r is not None:
                r["_path"] = os.path.join(d, n)
                out.append(r)
    return out


@contextlib.contextmanager
def locked(base: str, side: str) -> Iterator[None]:
    """Exclusive lock over the side's records (held for a read-decide-write)."""
    fd = os.open(side_dir(base, side), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def transition(path: str, base: str, side: str, new_state: str, expect=None,
               **fields) -> Optional[Dict]:
    """Move the record at ``path`` to ``new_state`` (plus ``fields``) under the lock,
    only if its current state is one of ``expect`` (any when None). Returns the new
    record, or None when the current state was not expected (someone else decided)."""
    with locked(base, side):
        cur = read(path) or {}
        allowed = {str(getattr(s, "value", s)) for s in expect or ()}
        if expect is not None and cur.get("state") not in allowed:
            return None
        cur.update(fields)
        cur["state"] = str(getattr(new_state, "value", new_state))
        hist = list(cur.get("history", []))
        hist.append([round(time.time(), 3), cur["state"], os.getpid()])
        cur["history"] = hist[-32:]
        return write(path, cur)


# --------------------------------------------------------------------------- process identity


def start_time(pid: Optional[int]) -> Optional[int]:
    """Field 22 of /proc/PID/stat (start time in clock ticks): with the pid, it names
    one process for good (pids are reused)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rfind(b")") + 2:].split()
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def same_process(pid: Optional[int], start: Optional[int]) -> bool:
    """Is ``pid`` still the process that had start time ``start``?"""
    if not pid:
        return False
    st = start_time(pid)
    if st is None:
        return False
    if _proc_state(pid) in ("Z", "X"):
        return False
    return start is None or st == start


def _proc_state(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:][:1].decode() or None


def alive(pid: Optional[int], start: Optional[int] = None) -> bool:
    return same_process(pid, start)
