"""Constants, address parsing and CRIU helpers both migration agents use."""
from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from statesync import proc
from statesync._consts import PAGE_SIZE
from statesync.criu import images as _criu_images
from statesync.errors import StateSyncError

STRATEGIES = ("auto", "cold", "precopy", "iterative", "postcopy", "hybrid")
DEFAULT_PORT = 7411
BATCH_PAGES = 1024             # pages per read/encode batch (4 MiB)
MAX_BATCH_PAGES = 8192         # largest batch a destination accepts in one frame
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")


# --------------------------------------------------------------------------- CRIU


# A client connecting to a UNIX socket of the frozen tree from outside makes the dump
# fail (CRIU cannot dump half of a stream connection, nor an in-flight connection whose
# peer it cannot see); the next attempt usually finds no such connection.
_TRANSIENT_DUMP_ERRORS = ("Can't dump half of stream unix connection", "unix: Unix socket")


def _read_stats(path: str) -> Dict[str, int]:
    """CRIU's stats-dump / stats-restore (times in microseconds); {} if unreadable:
    the stats are informative, never a reason to fail a migration."""
    try:
        return {k: int(v) for k, v in _criu_images.read_stats(path).items()}
    except (StateSyncError, OSError, ValueError):
        return {}


def _present_pages_of(pagemap_path: str) -> Tuple[int, np.ndarray]:
    """(pages_id, addresses of the PE_PRESENT pages in pages-file order) of a
    pagemap image, decoded and validated by statesync.criu's reader (C)."""
    pm = _criu_images.Pagemap(pagemap_path, PAGE_SIZE)
    sel = (pm.flags & _criu_images.PE_PRESENT) != 0
    v, n = pm.vaddr[sel], pm.nr_pages[sel].astype(np.int64)
    total = int(n.sum())
    first = np.repeat(v, n)
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
    return int(pm.pages_id), first + within.astype(np.uint64) * np.uint64(PAGE_SIZE)


def _signal_all(pids, sig: int) -> None:
    """Send ``sig`` to each pid in order; pids already gone are skipped."""
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def _ns_pid(pid: int) -> int:
    """pid as the innermost pid namespace sees it (CRIU names image files by it)."""
    nspid = proc.status(pid).get("NSpid")
    return int(nspid.split()[-1]) if nspid else pid


def _parse_hostport(text: str, default_host: str = "127.0.0.1") -> Tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep:
        host, port = text, str(DEFAULT_PORT)
    host = host.strip("[]") or default_host
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"not HOST:PORT: {text!r}") from None
    if not 0 <= p < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return host, p


# --------------------------------------------------------------------------- CRIU processes


def criu_spawn(args: List[str], netns: Optional[str], pdeathsig: bool,
               pass_fds: Sequence[int] = ()) -> subprocess.Popen:
    """Start ``criu ARGS`` (in network namespace ``netns``) without waiting. It runs in
    its own session, so a terminal's SIGINT/SIGHUP reaches only the agent, which then
    aborts in order. ``pdeathsig``: CRIU gets SIGKILL when the calling thread's process
    dies (``setpriv --pdeathsig``). The agents pass False for dump and restore: killed
    inside its parasite a dump can leave the target crashed, and a restore killed
    while it holds the restored tasks lets them run unrecorded; the supervisor waits
    for either to end instead (docs/migrate.md, "Agent death"). Call it from
    the event loop's thread: the death signal is bound to the thread that forks."""
    from statesync.criu import driver
    criu = driver._criu_or_raise()
    pre: List[str] = []
    if pdeathsig and shutil.which("setpriv"):
        pre = [shutil.which("setpriv") or "setpriv", "--pdeathsig", "KILL", "--"]
    cmd = pre + driver._in_netns(netns) + [criu] + list(args)
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                            pass_fds=tuple(pass_fds))


def criu_result(p: subprocess.Popen, log: str, what: str) -> None:
    """Raise CriuError with the log's tail when the finished CRIU ``p`` failed."""
    from statesync.criu import driver
    from statesync.errors import CriuError
    if p.returncode != 0:
        raise CriuError(f"criu {what} failed", list(p.args), p.returncode,  # type: ignore[arg-type]
                        driver._log_tail(log))


# --------------------------------------------------------------------------- test faults


def fault(point: str) -> None:
    """Test-only fault injection at a named phase boundary of a real migration.

    ``STATESYNC_TEST_FAULT="POINT:ACTION[,POINT:ACTION...]"``; ACTION ``kill`` = SIGKILL
    this agent right here, ``fail`` = raise MigrationError (an ordinary abort),
    ``hold`` = create the file ``$STATESYNC_TEST_FAULT_FILE``
    (holding POINT) and wait, blocking, until the test deletes it (at most 60 s), so a
    test can take the link down or signal the agent at exactly this point. Points
    (docs/migrate.md): source:round0, source:round1, source:dump, source:frozen,
    source:final_transfer, source:after_final, source:after_restored,
    source:after_commit, source:postcopy (first pushed batch); dest:restore,
    dest:after_restored, dest:commit_received, dest:after_resumed, dest:postcopy
    (resumed, post-copy running). Unset (always, outside tests): a dictionary lookup."""
    spec = os.environ.get("STATESYNC_TEST_FAULT")
    if not spec:
        return
    for item in spec.split(","):
        p, _, action = item.rpartition(":")
        if p != point:
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(5)
        elif action == "fail":
            from statesync.errors import MigrationError
            raise MigrationError(f"injected test fault at {point}", point.partition(":")[2])
        elif action == "hold":
            marker = os.environ.get("STATESYNC_TEST_FAULT_FILE", "")
            if not marker:
                return
            with open(marker, "w") as f:
                f.write(point)
            deadline = time.monotonic() + 60
            while os.path.exists(marker) and time.monotonic() < deadline:
                time.sleep(0.01)


# --------------------------------------------------------------------------- local safety checks


def check_secret_file(secret) -> None:
    """Refuse a secret file (``"@PATH"``/``"file:PATH"``) that group or others can read or
    write: SecretError with the chmod to run. Other forms of ``secret`` pass."""
    from statesync.errors import SecretError
    if not isinstance(secret, str):
        return
    for prefix in ("@", "file:"):
        if secret.startswith(prefix):
            path = secret[len(prefix):]
            try:
                st = os.stat(path)
            except OSError:
                return          # load_secret says what is wrong with a missing file
            if st.st_mode & 0o077:
                raise SecretError(f"secret file {path} is accessible to group/others "
                                  f"(mode {stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}`",
                                  path)
            return


def load_secret_checked(secret) -> bytes:
    """:func:`protocol.load_secret` after :func:`check_secret_file`."""
    from statesync.migration import protocol as wire
    check_secret_file(secret)
    return wire.load_secret(secret)


def check_private_dir(path: str, what: str = "--images-dir") -> int:
    """Create ``path`` (0700) if missing; refuse one that is a symlink, not a directory,
    not owned by this agent's uid, or writable by group/others (another local user
    could swap what is inside). Returns an O_DIRECTORY fd of it (caller closes)."""
    from statesync.errors import UnsafeDirectory
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    uid = os.geteuid()
    problem = ""
    if st.st_uid != uid:
        problem = f"is owned by uid {st.st_uid}, not by this agent's uid {uid}"
    elif st.st_mode & 0o022:
        problem = f"is writable by group/others (mode {stat.S_IMODE(st.st_mode):04o})"
    if problem:
        os.close(fd)
        raise UnsafeDirectory(f"{what} {path} {problem}: another user could swap the files "
                              f"in it; run `chown {uid} {path} && chmod 700 {path}` if you "
                              f"trust its contents, or use a new directory", path)
    return fd


def sweep_dump_dirs(base: Optional[str] = None) -> List[str]:
    """Remove ``statesync-dump-a<AGENT>-<PID>-*`` directories whose agent is dead (old
    ``statesync-dump-<PID>-*`` ones whose target is gone too). Returns their names."""
    base = base or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    removed: List[str] = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        m = re.fullmatch(r"statesync-dump-a(\d+)-\d+-\w+", name)
        owner = int(m.group(1)) if m else None
        if owner is None:
            m = re.fullmatch(r"statesync-dump-(\d+)-\w+", name)
            owner = int(m.group(1)) if m else None
        if owner is None or owner == os.getpid() or proc.state(owner) not in (None, "Z", "X"):
            continue
        shutil.rmtree(os.path.join(base, name), ignore_errors=True)
        removed.append(name)
    return removed
