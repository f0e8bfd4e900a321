"""Running CRIU: finding a usable binary, ``check``, ``dump``, ``restore``."""
from __future__ import annotations

import functools
import os
import re
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from statesync.criu import images as _img
from statesync.criu.images import PE_LAZY, PE_PARENT, PE_PRESENT, VMA_DTYPE  # noqa: F401  (re-exported)
from statesync.errors import CriuError, NoSuchProcess

__all__ = ["CriuInfo", "DumpResult", "RestoreResult", "find_criu", "check", "dump", "restore",
           "netns_of", "FEATURES", "MIN_VERSION"]

MIN_VERSION = (4, 0)
# Features probed with `criu check --feature NAME`, under the names we report.
FEATURES = {"mem_dirty_track": "mem_dirty_track", "lazy_pages": "uffd-noncoop",
            "uffd": "uffd", "pidfd_store": "pidfd_store", "timens": "timens",
            "clone3_set_tid": "clone3_set_tid", "network_lock_nftables": "network_lock_nftables"}
_SEARCH_EXTRA = ["/usr/local/sbin", "/usr/sbin", "/sbin"]


# --------------------------------------------------------------------------- finding CRIU


def _version_of(path: str):
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    m = re.search(r"Version:\s*(\S+)", out)
    if not m:
        return None, None
    nums = tuple(int(x) for x in re.findall(r"\d+", m.group(1))[:3])
    return m.group(1), nums


@functools.lru_cache(maxsize=8)
def _version_cached(path: str):
    """:func:`_version_of`, run once per binary (until ``check(refresh=True)``)."""
    return _version_of(path)


INSTALL_STAMP = "/var/lib/statesync/criu-ok"


def find_criu() -> Optional[str]:
    """Path of the CRIU binary statesync uses (see the module docstring), or None."""
    env = os.environ.get("STATESYNC_CRIU")
    if env:
        return env
    # The binary scripts/install-criu.sh probed last (it may shadow an older distribution
    # criu that comes first on a PATH without /usr/local/sbin).
    try:
        with open(INSTALL_STAMP) as f:
            stamped = f.read().split()[0]
        if os.access(stamped, os.X_OK):
            return stamped
    except (OSError, IndexError):
        pass
    return _find_criu_cached(os.environ.get("PATH", ""))


@functools.lru_cache(maxsize=4)
def _find_criu_cached(path_env: str) -> Optional[str]:
    dirs = [d for d in path_env.split(os.pathsep) if d] + _SEARCH_EXTRA
    seen, found = set(), []
    for d in dirs:
        p = os.path.join(d, "criu")
        if p in seen or not (os.path.isfile(p) and os.access(p, os.X_OK)):
            continue
        seen.add(p)
        found.append(p)
        _, ver = _version_cached(p)
        if ver and ver >= MIN_VERSION:
            return p
    return found[0] if found else None


@dataclass
class CriuInfo:
    """What :func:`check` found. ``ok`` is True when CRIU is >= 4.0 and ``criu check``
    passes; ``reasons`` says why not, and per feature why it is missing."""

    path: Optional[str]
    version: Optional[str]
    version_tuple: tuple
    ok: bool
    features: Dict[str, bool] = field(default_factory=dict)
    reasons: Dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"path": self.path, "version": self.version, "ok": self.ok,
                "features": dict(self.features), "reasons": dict(self.reasons)}


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@functools.lru_cache(maxsize=4)
def _check_cached(path: Optional[str]) -> CriuInfo:
    if not path:
        return CriuInfo(None, None, (), False, {}, {
            "criu": "no criu binary found (set STATESYNC_CRIU or run scripts/install-criu.sh)"})
    version, vt = _version_cached(path)
    info = CriuInfo(path, version, vt or (), False)
    if not version:
        info.reasons["criu"] = f"{path} --version did not report a version"
        return info
    if vt < MIN_VERSION:
        info.reasons["criu"] = (f"CRIU {version} at {path} is older than "
                                f"{'.'.join(map(str, MIN_VERSION))} (run scripts/install-criu.sh)")
    if os.geteuid() != 0:
        info.reasons.setdefault("criu", "criu check needs root")
        return info
    r = subprocess.run([path, "check"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        info.reasons.setdefault("criu", f"criu check failed: {_last_line(r.stdout + r.stderr)}")
    else:
        info.ok = vt >= MIN_VERSION
    for name, feat in FEATURES.items():
        r = subprocess.run([path, "check", "--feature", feat], capture_output=True, text=True,
                           timeout=60)
        info.features[name] = r.returncode == 0
        if r.returncode != 0:
            info.reasons[name] = _last_line(r.stdout + r.stderr) or f"exit status {r.returncode}"
    return info


def check(refresh: bool = False) -> CriuInfo:
    """Find CRIU and probe it (version, ``criu check``, features). Cached per binary;
    ``refresh=True`` probes again. Never raises for a missing/broken CRIU: look at
    ``ok`` and ``reasons``."""
    if refresh:
        _check_cached.cache_clear()
        _find_criu_cached.cache_clear()
        _version_cached.cache_clear()
    return _check_cached(find_criu())


def _criu_or_raise() -> str:
    """The CRIU binary for dump/restore: found and new enough. Only ``criu --version``
    (once per binary), not the full :func:`check` (about 0.5 s of ``criu check`` runs
    here): dump and restore sit on a migration's switch-over path. A CRIU that cannot
    work on this kernel fails the command itself, with its log tail."""
    from statesync.criu import kdat
    kdat.drop_if_stale()        # a kernel-feature cache of another boot (criu/kdat.py)
    path = find_criu()
    if not path:
        raise CriuError("no criu binary found (set STATESYNC_CRIU or run "
                        "scripts/install-criu.sh as root)")
    version, vt = _version_cached(path)
    if not vt or vt < MIN_VERSION:
        raise CriuError(f"{path}: CRIU {version or '(no version reported)'} is unusable, "
                        f"statesync needs >= {'.'.join(map(str, MIN_VERSION))} "
                        f"(run scripts/install-criu.sh as root)")
    return path


def netns_of(pid: int) -> Optional[str]:
    """``/proc/PID/ns/net`` when process pid lives in another network namespace than
    ours, else None: what :func:`dump` / :func:`restore` take as ``netns`` to run CRIU
    beside the process (CRIU then never tries to dump a network namespace)."""
    try:
        if os.stat(f"/proc/{int(pid)}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino:
            return None
    except OSError:
        return None
    return f"/proc/{int(pid)}/ns/net"


def _in_netns(netns: Optional[str]) -> List[str]:
    """Command prefix that runs a program in network namespace ``netns``: a path to a
    namespace file, or a name under /run/netns; nothing for None."""
    if not netns:
        return []
    path = netns if "/" in netns else f"/run/netns/{netns}"
    return ["nsenter", f"--net={path}", "--"]


# --------------------------------------------------------------------------- dump / restore


@dataclass
class DumpResult:
    """A finished ``criu dump``: ``stats`` from stats-dump (times in microseconds,
    counts in pages), ``wall_time`` in seconds as we measured it."""

    images_dir: str
    stats: dict
    wall_time: float
    cmd: List[str]


@dataclass
class RestoreResult:
    """A finished ``criu restore``: ``pid`` of the restored root task in our pid
    namespace, ``stats`` from stats-restore (microseconds), ``wall_time`` seconds."""

    pid: int
    images_dir: str
    stats: dict
    wall_time: float
    cmd: List[str]


def _log_tail(path: str, lines: int = 25) -> str:
    """The last ``lines`` error lines of a CRIU log (the last lines when it has no
    error line): what a CriuError carries. Reads at most the last 64 KiB."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 65536))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    all_lines = text.splitlines()
    errors = [ln for ln in all_lines if "Error" in ln or "error" in ln]
    return "\n".join((errors or all_lines)[-lines:])


def _run_criu(cmd: List[str], log: str, what: str, timeout: float,
              netns: Optional[str] = None, pass_fds: Sequence[int] = ()) -> float:
    """Run a CRIU command line (in network namespace ``netns`` when given); returns
    its wall time in seconds. Raises CriuError with the log tail of ``log``."""
    cmd = _in_netns(netns) + list(cmd)
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, pass_fds=tuple(pass_fds))
    except subprocess.TimeoutExpired:
        raise CriuError(f"criu {what} did not finish within {timeout:g} s", cmd, None,
                        _log_tail(log)) from None
    wall = time.monotonic() - t0
    if r.returncode != 0:
        tail = _log_tail(log) or (r.stdout + r.stderr)
        raise CriuError(f"criu {what} failed", cmd, r.returncode, tail)
    return wall


# CRIU's page-server request header (criu/page-xfer.c, struct page_server_iov:
# u32 cmd, then u64 nr_pages, vaddr, dst_id at natural alignment: 32 bytes) and the
# command that ends a session; the server answers it with an int32 status.
_PS_IOV = struct.Struct("<I4xQQQ")
_PS_IOV_CLOSE = 0x1023


def lazy_session() -> Tuple[socket.socket, socket.socket]:
    """A page-server session for ``criu dump --lazy-pages --ps-socket FD`` that ends
    as soon as CRIU serves it: ``(ours, theirs)``; pass ``theirs.fileno()`` to CRIU
    (and close it here once CRIU runs); PS_IOV_CLOSE is already queued on ``ours``, so
    CRIU's page server, which starts once every image is written, answers it and the
    dump finishes. :func:`lazy_session_ended` reads that answer."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.sendall(_PS_IOV.pack(_PS_IOV_CLOSE, 0, 0, 0))
    return ours, theirs


def lazy_session_ended(ours: socket.socket, timeout: float = 1.0) -> bool:
    """True when CRIU answered the session's end with status 0 (call after the dump
    exited). Closes ``ours``."""
    try:
        ours.settimeout(timeout)
        status = ours.recv(4)
    except OSError:
        status = b""
    finally:
        ours.close()
    return len(status) == 4 and struct.unpack("<i", status)[0] == 0


def dump(pid: int, images_dir, leave_running: bool = False, parent=None,
         track_mem: Optional[bool] = None, extra_args: Sequence[str] = (),
         timeout: float = 300.0, netns: Optional[str] = None,
         lazy_pages: bool = False) -> DumpResult:
    """``criu dump`` of process ``pid`` (and its children) into ``images_dir`` (created
    if missing). ``leave_running`` keeps it running afterwards (else CRIU kills it).
    ``parent`` is passed as ``--prev-images-dir`` (relative to images_dir); CRIU itself
    only accepts a pre-dump there and needs soft-dirty tracking (``track_mem``; None =
    on when a parent is given and the kernel supports it) — on kernels without
    soft-dirty use a plain dump and :func:`write_incremental`. ``extra_args`` go to
    CRIU as they are (``--leave-stopped``: keep the tree frozen after the dump, as a
    migration's switch-over does). ``netns`` runs CRIU in that network namespace
    (a path such as :func:`netns_of` returns, or a name under /run/netns): needed when
    the process lives in another one, so CRIU does not try to dump it. ``timeout`` in
    seconds. The log is ``images_dir/dump.log``. Raises NoSuchProcess, CriuError.

    ``lazy_pages``: ``criu dump --lazy-pages``: the pages of lazy-able VMAs (private
    anonymous, not the stack) are NOT written; the pagemap marks them ``PE_LAZY``
    and they stay in the (frozen, with ``--leave-stopped``) process. CRIU then serves
    them from a page server; here its socket is one end of a socket pair whose other
    end ends the session at once (PS_IOV_CLOSE), so the dump returns as soon as the
    other images are written. This is the freeze-time capture of a lazy switch-over:
    the pages travel by other means (the tracker's final dirty set, read from the
    frozen process)."""
    criu = _criu_or_raise()
    if not os.path.exists(f"/proc/{int(pid)}"):
        raise NoSuchProcess(int(pid), "no such process to dump")
    images_dir = os.path.abspath(os.fspath(images_dir))
    os.makedirs(images_dir, exist_ok=True)
    cmd = [criu, "dump", "-t", str(int(pid)), "-D", images_dir, "-o", "dump.log"]
    if leave_running:
        cmd.append("--leave-running")
    if parent is not None:
        cmd += [
            "--prev-images-dir",
            os.path.relpath(os.path.abspath(os.fspath(parent)), images_dir),
        ]
        if track_mem is None:
            track_mem = check().features.get("mem_dirty_track", False)
    if track_mem:
        cmd.append("--track-mem")
    cmd += list(extra_args)
    log = os.path.join(images_dir, "dump.log")
    if lazy_pages:
        ours, theirs = lazy_session()
        try:
            cmd += ["--lazy-pages", "--ps-socket", str(theirs.fileno())]
            wall = _run_criu(cmd, log, f"lazy dump of pid {int(pid)}", timeout, netns,
                             pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        if not lazy_session_ended(ours):
            raise CriuError(f"criu lazy dump of pid {int(pid)}: the page server did not "
                            f"confirm the end of its session", cmd, None, _log_tail(log))
    else:
        wall = _run_criu(cmd, log, f"dump of pid {int(pid)}", timeout, netns)
    stats = {}
    sp = os.path.join(images_dir, "stats-dump")
    if os.path.exists(sp):
        stats = _img.read_stats(sp)
    return DumpResult(images_dir, stats, wall, cmd)


def restore(images_dir, detach: bool = True, extra_args: Sequence[str] = (),
            timeout: float = 300.0, netns: Optional[str] = None) -> RestoreResult:
    """``criu restore`` from ``images_dir``. With ``detach`` (``-d``) CRIU returns once
    the tree runs; the restored root's pid (in our pid namespace) is read from a pid
    file. The original pids must be free, or the dumped root was the init of its own
    pid namespace (then CRIU makes a new one). ``netns``: run CRIU in that network
    namespace (as for :func:`dump`); the restored tree then lives there. Raises
    CriuError."""
    criu = _criu_or_raise()
    images_dir = os.path.abspath(os.fspath(images_dir))
    if not os.path.isdir(images_dir):
        raise CriuError(f"restore: {images_dir} is not a directory")
    pidfile = os.path.join(images_dir, f".restore-{os.getpid()}-{time.monotonic_ns()}.pid")
    cmd = [criu, "restore", "-D", images_dir, "-o", "restore.log", "--pidfile", pidfile]
    if detach:
        cmd.append("-d")
    cmd += list(extra_args)
    try:
        wall = _run_criu(cmd, os.path.join(images_dir, "restore.log"), "restore", timeout,
                         netns)
        try:
            with open(pidfile) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            pid = -1
    finally:
        try:
            os.unlink(pidfile)
        except OSError:
            pass
    stats = {}
    sp = os.path.join(images_dir, "stats-restore")
    if os.path.exists(sp):
        stats = _img.read_stats(sp)
    return RestoreResult(pid, images_dir, stats, wall, cmd)
