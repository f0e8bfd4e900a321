"""A small runc driver: bundles, run, host pids, checkpoint with CRIU left stopped, restore.

runc 1.1 runs the ``criu`` found in PATH (statesync's CRIU >= 4, scripts/install-criu.sh).

- **Bundles** are generated here: ``runc spec`` then edited: not a terminal, a writable
  root, the network namespace given as a PATH (external: runc empties a netns it owns on
  checkpoint, and a restored container joins whatever lives at the path given in the
  destination bundle), and the annotation ``org.criu.config=BUNDLE/criu.conf``. runc hands
  that file to CRIU on every checkpoint and restore; :func:`checkpoint` writes CRIU options
  there for one call (``leave-stopped``, which runc has no flag for, ``tcp-established`` ...)
  and empties it afterwards. With ``overlay=True`` the root is an overlay mount of a shared
  read-only rootfs (lower) and the bundle's own ``upper`` directory, so the container's file
  system changes are exactly ``upper`` (:mod:`statesync.containers.rootfs`).
- **stdio** of a container is /dev/null (a host file as stdout makes CRIU fail the dump with
  ``Can't lookup mount``).
- **checkpoint** with ``leave_stopped=True`` is ``runc checkpoint --leave-running`` plus
  ``leave-stopped`` in the CRIU config: the tree stays frozen (``runc list`` still says
  running) until the caller kills it (commit) or resumes it. After ``tcp_established`` never
  resume with SIGCONT (the sockets stay in repair mode): kill and restore locally instead.
- **restore** from any image directory (a copy, a ``statesync criu incremental`` set with a
  ``parent`` chain, a flattened set): ``runc restore -d --image-path IMG -b BUNDLE NAME``.

Errors are :class:`~statesync.errors.ContainerError` (one line, with the log to read).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ..errors import ContainerError, ContainerNotFound

__all__ = ["DEFAULT_ROOT", "Bundle", "Container", "CheckpointResult", "RestoreResult",
           "find_runc", "make_bundle", "run", "state", "exists", "pids_of", "checkpoint",
           "restore", "kill", "delete", "resume", "criu_log_error", "seccomp_allows",
           "list_names", "unmount_under"]

#: runc state directory for containers statesync creates (podman's live in /run/runc).
DEFAULT_ROOT = "/run/statesync/runc"
CRIU_CONF_ANNOTATION = "org.criu.config"
_SEARCH_EXTRA = "/usr/local/sbin:/usr/sbin:/sbin"


def find_runc() -> str:
    """The runc binary ($STATESYNC_RUNC, else PATH, /usr/sbin, /sbin)."""
    env = os.environ.get("STATESYNC_RUNC")
    if env:
        return env
    p = shutil.which("runc", path=os.environ.get("PATH", "") + ":" + _SEARCH_EXTRA)
    if not p:
        raise ContainerError("", "runc not found (run scripts/setup-system.sh as root)")
    return p


def _criu_dir() -> Optional[str]:
    """Directory of the CRIU statesync uses, put first in runc's PATH (runc runs the
    ``criu`` it finds there)."""
    from ..criu import find_criu
    p = find_criu()
    p = p or shutil.which("criu", path="/usr/local/sbin:" + os.environ.get("PATH", ""))
    return os.path.dirname(p) if p else None


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    d = _criu_dir()
    path = env.get("PATH", "/usr/bin:/bin") + ":" + _SEARCH_EXTRA
    env["PATH"] = (d + ":" + path) if d else path
    return env


def _nsenter(netns: Optional[str]) -> List[str]:
    if not netns:
        return []
    path = netns if "/" in netns else f"/run/netns/{netns}"
    return ["nsenter", f"--net={path}", "--"]


def criu_log_error(log: Optional[str]) -> str:
    """The first ``Error`` line of a CRIU log that is not its FAILED summary (else its
    last line), stripped of CRIU's timestamp prefix; "" when unreadable."""
    if not log:
        return ""
    try:
        with open(log, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    # CRIU's first error is the cause; the last is its summary ("Dumping FAILED.")
    # (CRIU goes on after failing to raise its own RLIMIT_NOFILE without CAP_SYS_RESOURCE)
    errs = [ln for ln in lines if "Error" in ln and "FAILED" not in ln
            and "Can't setup RLIMIT_NOFILE" not in ln]
    errs = errs or [ln for ln in lines if "Error" in ln]
    line = (errs[0] if errs else (lines or [""])[-1]).strip()
    if line.startswith("(") and ")" in line:
        line = line.split(")", 1)[1].strip()
    return line


def _runtime_msg(stderr: str) -> str:
    """One line out of runc's logrus output (``msg="..."``), newlines folded."""
    text = stderr.strip()
    msgs = []
    for ln in text.splitlines():
        if 'msg="' in ln:
            m = ln.split('msg="', 1)[1]
            m = m.rsplit('"', 1)[0]
            msgs.append(m.replace("\\n", "; ").replace('\\"', '"'))
    out = msgs[-1] if msgs else (text.splitlines()[-1] if text else "")
    return out[:400]


def _run(cmd: Sequence[str], name: str, what: str, timeout: float = 60.0,
         log: Optional[str] = None, netns: Optional[str] = None,
         not_found_ok: bool = False, detached: bool = False) -> subprocess.CompletedProcess:
    cmd = list(cmd)
    runc_log = None
    if detached:
        # The container inherits runc's stdio: /dev/null, never our pipes (we would wait for
        # their EOF, and a host file as stdout fails a later dump). runc's own messages go
        # to a log file instead.
        fd, runc_log = tempfile.mkstemp(prefix="statesync-runc-", suffix=".log")
        os.close(fd)
        cmd[1:1] = ["--log", runc_log]
    cmd = _nsenter(netns) + cmd
    try:
        if detached:
            r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=timeout, stdin=subprocess.DEVNULL, env=_env(), text=True)
            assert runc_log is not None  # made above when detached
            with open(runc_log, errors="replace") as f:
                r.stdout, r.stderr = "", f.read()
        else:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                               stdin=subprocess.DEVNULL, env=_env())
    except subprocess.TimeoutExpired:
        raise ContainerError(name, f"{what} did not finish within {timeout:g} s"
                             + (f" (log: {log})" if log else ""), cmd, log) from None
    except FileNotFoundError as exc:
        raise ContainerError(name, f"{what}: {exc.filename} not found (run "
                             f"scripts/setup-system.sh as root)", cmd) from None
    finally:
        if runc_log:
            try:
                os.unlink(runc_log)
            except OSError:
                pass
    if r.returncode != 0:
        msg = _runtime_msg(r.stderr or r.stdout)
        if not_found_ok and ("does not exist" in msg or "not exist" in msg):
            raise ContainerNotFound(name, f"{what}: no such container ({msg})", cmd, log)
        crit = criu_log_error(log)
        detail = crit or msg or f"exit status {r.returncode}"
        raise ContainerError(name, f"{what} failed: {detail}"
                             + (f" (log: {log})" if log else ""), cmd, log)
    return r


# --------------------------------------------------------------------------- bundles


@dataclass
class Bundle:
    """An OCI bundle statesync generated. ``path`` (holds config.json), ``rootfs`` (the
    root the container sees), ``upper`` (the overlay's upper dir, None without overlay),
    ``lower`` (the read-only rootfs under the overlay), ``netns`` (the netns path in
    config.json, None for a private one), ``criu_conf`` (the annotated CRIU config)."""

    path: str
    rootfs: str
    lower: Optional[str] = None
    upper: Optional[str] = None
    netns: Optional[str] = None
    criu_conf: Optional[str] = None

    @property
    def config_path(self) -> str:
        return os.path.join(self.path, "config.json")

    def config(self) -> dict:
        with open(self.config_path) as f:
            return json.load(f)

    def mounted(self) -> bool:
        return self.upper is not None and os.path.ismount(self.rootfs)

    def mount(self) -> None:
        """(Re)mount the overlay root (no-op without overlay or when mounted)."""
        if self.upper is None or self.mounted():
            return
        work = os.path.join(self.path, "work")
        os.makedirs(work, exist_ok=True)
        os.makedirs(self.upper, exist_ok=True)
        os.makedirs(self.rootfs, exist_ok=True)
        opts = f"lowerdir={self.lower},upperdir={self.upper},workdir={work}"
        r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, self.rootfs],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise ContainerError("", f"bundle {self.path}: overlay mount of {self.lower} failed: "
                                 f"{r.stderr.strip()}")

    def unmount(self) -> None:
        if self.upper is not None and os.path.ismount(self.rootfs):
            subprocess.run(["umount", "-l", self.rootfs], capture_output=True)

    def remove(self) -> None:
        """Unmount and delete the bundle directory (the lower rootfs stays)."""
        self.unmount()
        shutil.rmtree(self.path, ignore_errors=True)


def make_bundle(path, rootfs, args: Sequence[str], *, netns: Optional[str] = None,
                overlay: bool = True, env: Optional[Dict[str, str]] = None, cwd: str = "/",
                hostname: Optional[str] = None, upper_from: Optional[str] = None,
                capabilities: Sequence[str] = (), nofile: int = 1024,
                annotations: Optional[Dict[str, str]] = None) -> Bundle:
    """Generate an OCI bundle in ``path`` (created) running ``args`` in ``rootfs``.

    ``netns``: a network namespace path (or a name under /run/netns) the container
    joins; None gives it a private one (which runc empties on checkpoint: a container
    that must keep a network across a migration needs an external one). ``overlay``:
    mount ``rootfs`` read-only under an overlay with the bundle's own upper dir (no copy;
    the rootfs diff is the upper dir); otherwise ``rootfs`` is used in place.
    ``upper_from``: a directory whose content seeds the upper dir (a destination
    bundle built from a source's rootfs changes). ``capabilities``: added to runc's
    default three (``CAP_`` prefix optional). ``nofile``: RLIMIT_NOFILE (must not exceed
    our own hard limit: root lacks CAP_SYS_RESOURCE here)."""
    path = os.path.abspath(os.fspath(path))
    rootfs = os.path.abspath(os.fspath(rootfs))
    if not os.path.isdir(rootfs):
        raise ContainerError("", f"bundle {path}: rootfs {rootfs} is not a directory "
                             f"(scripts/build-rootfs.sh builds one)")
    os.makedirs(path, exist_ok=True)
    cfg_path = os.path.join(path, "config.json")
    if os.path.exists(cfg_path):
        os.unlink(cfg_path)
    _run([find_runc(), "spec", "--bundle", path], "", f"runc spec in {path}")
    with open(cfg_path) as f:
        cfg = json.load(f)
    b = Bundle(path=path, rootfs=rootfs)
    if overlay:
        b.lower = rootfs
        b.upper = os.path.join(path, "upper")
        b.rootfs = os.path.join(path, "rootfs")
        if upper_from:
            if os.path.exists(b.upper):
                shutil.rmtree(b.upper)
            shutil.copytree(upper_from, b.upper, symlinks=True)
        b.mount()
    proc = cfg["process"]
    proc["terminal"] = False
    proc["args"] = list(args)
    proc["cwd"] = cwd
    if env:
        base = {e.split("=", 1)[0]: e for e in proc.get("env", [])}
        base.update({k: f"{k}={v}" for k, v in env.items()})
        proc["env"] = list(base.values())
    caps = proc.setdefault("capabilities", {})
    extra = ["CAP_" + c.upper().removeprefix("CAP_") for c in capabilities]
    for kind in ("bounding", "effective", "permitted", "ambient"):
        caps[kind] = sorted(set(caps.get(kind, [])) | set(extra))
    proc["rlimits"] = [{"type": "RLIMIT_NOFILE", "hard": int(nofile), "soft": int(nofile)}]
    cfg["root"] = {"path": b.rootfs, "readonly": False}
    if hostname:
        cfg["hostname"] = hostname
    nss = [ns for ns in cfg["linux"]["namespaces"] if ns["type"] != "network"]
    if netns:
        b.netns = netns if "/" in netns else f"/run/netns/{netns}"
        nss.append({"type": "network", "path": b.netns})
    else:
        nss.append({"type": "network"})
    cfg["linux"]["namespaces"] = nss
    b.criu_conf = os.path.join(path, "criu.conf")
    open(b.criu_conf, "w").close()
    ann = cfg.setdefault("annotations", {})
    ann[CRIU_CONF_ANNOTATION] = b.criu_conf
    ann.update(annotations or {})
    tmp = cfg_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=1)
    os.replace(tmp, cfg_path)
    return b


# --------------------------------------------------------------------------- containers


@dataclass
class Container:
    """A runc container: ``name`` under runc state directory ``root``."""

    name: str
    root: str = DEFAULT_ROOT

    def runc(self, *args: str) -> List[str]:
        return [find_runc(), "--root", self.root] + list(args)

    def __str__(self) -> str:
        return self.name


def _as_container(c, root: Optional[str] = None) -> Container:
    if isinstance(c, Container):
        return c
    return Container(str(c), root or DEFAULT_ROOT)


def run(bundle, name: str, root: str = DEFAULT_ROOT, timeout: float = 30.0) -> Container:
    """Create and start a container from ``bundle`` (a :class:`Bundle` or a directory),
    detached, stdio on /dev/null. Returns once its init runs."""
    bpath = bundle.path if isinstance(bundle, Bundle) else os.path.abspath(os.fspath(bundle))
    c = Container(name, root)
    os.makedirs(root, exist_ok=True)
    _run(c.runc("run", "-d", "-b", bpath, name), name, "runc run", timeout, detached=True)
    return c


def state(container, root: Optional[str] = None) -> dict:
    """``runc state``: id, pid (host pid of the init), status, bundle, annotations..."""
    c = _as_container(container, root)
    r = _run(c.runc("state", c.name), c.name, "runc state", 20.0, not_found_ok=True)
    return json.loads(r.stdout)


def list_names(root: str = DEFAULT_ROOT) -> List[str]:
    """Names of the containers runc knows under state directory ``root``."""
    try:
        return sorted(n for n in os.listdir(root)
                      if os.path.exists(os.path.join(root, n, "state.json")))
    except FileNotFoundError:
        return []


def unmount_under(path: str) -> int:
    """Lazily unmount every mount point at or below ``path`` (deepest first): the
    overlay roots of bundles a failed run left. Returns how many."""
    path = os.path.abspath(path)
    points = []
    with open("/proc/self/mountinfo") as f:
        for ln in f:
            mp = ln.split()[4].replace("\\040", " ")
            if mp == path or mp.startswith(path + "/"):
                points.append(mp)
    for mp in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)
    return len(points)


def exists(container, root: Optional[str] = None) -> bool:
    c = _as_container(container, root)
    return os.path.exists(os.path.join(c.root, c.name, "state.json"))


def _state_json(c: Container) -> dict:
    try:
        with open(os.path.join(c.root, c.name, "state.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ContainerNotFound(c.name, f"no such runc container under {c.root}") from None


def pids_of(container, root: Optional[str] = None) -> List[int]:
    """Host pids of every process of the container, its init first. Read from the
    container's cgroup (``cgroup.procs``, fast); ``runc ps`` when that is unreadable."""
    c = _as_container(container, root)
    st = _state_json(c)
    init = int(st.get("init_process_pid") or 0)
    pids: List[int] = []
    for key in ("pids", "freezer", "memory", "", "cpu"):
        p = (st.get("cgroup_paths") or {}).get(key)
        if not p:
            continue
        try:
            with open(os.path.join(p, "cgroup.procs")) as f:
                pids = [int(x) for x in f.read().split()]
            break
        except OSError:
            continue
    else:
        r = _run(c.runc("ps", "--format", "json", c.name), c.name, "runc ps", 20.0,
                 not_found_ok=True)
        pids = [int(x) for x in json.loads(r.stdout or "[]")]
    if init and init in pids:
        pids.remove(init)
        return [init] + sorted(pids)
    return sorted(pids)


def _bundle_of(c: Container) -> Optional[str]:
    st = _state_json(c)
    cfg = st.get("config") or {}
    for lbl in cfg.get("labels") or []:
        if lbl.startswith("bundle="):
            return lbl.split("=", 1)[1]
    return None


def _criu_conf_of(c: Container) -> Optional[str]:
    st = _state_json(c)
    for lbl in (st.get("config") or {}).get("labels") or []:
        if lbl.startswith(CRIU_CONF_ANNOTATION + "="):
            return lbl.split("=", 1)[1] or None
    return None


def _netns_of(c: Container) -> Optional[str]:
    st = _state_json(c)
    paths = st.get("namespace_paths") or {}
    return paths.get("NEWNET")


@dataclass
class CheckpointResult:
    """A finished checkpoint: the CRIU images in ``images_dir``; ``work_dir`` holds
    dump.log and stats-dump; ``stats`` from stats-dump (microseconds, pages);
    ``wall_time`` seconds; ``pids`` the host pids dumped (frozen when left stopped);
    ``leave_stopped``/``tcp_established`` as asked."""

    container: Container
    images_dir: str
    work_dir: str
    stats: dict
    wall_time: float
    pids: List[int]
    leave_stopped: bool
    tcp_established: bool
    log: str
    cmd: List[str] = field(default_factory=list)


def _criu_options(tcp_established: bool, leave_stopped: bool, network_lock: Optional[str],
                  extra: Sequence[str]) -> List[str]:
    lines = []
    if leave_stopped:
        lines.append("leave-stopped")
    if tcp_established:
        lines.append("tcp-established")
    if network_lock:
        lines.append(f"network-lock {network_lock}")
    lines += [str(x).removeprefix("--") for x in extra]
    return lines


class _CriuConf:
    """Write CRIU options into a container's annotated config file for one runc call."""

    def __init__(self, c: Container, conf: Optional[str], lines: List[str], what: str):
        self.c, self.conf, self.lines, self.what = c, conf, lines, what

    def __enter__(self):
        if not self.lines:
            return self
        if not self.conf:
            raise ContainerError(self.c.name, f"{self.what}: needs CRIU options "
                                 f"({', '.join(self.lines)}) but the container has no "
                                 f"'{CRIU_CONF_ANNOTATION}' annotation: create it from a "
                                 f"bundle made by statesync.containers.runc.make_bundle or "
                                 f"with --annotation {CRIU_CONF_ANNOTATION}=FILE")
        os.makedirs(os.path.dirname(self.conf) or ".", exist_ok=True)
        with open(self.conf, "w") as f:
            f.write("\n".join(self.lines) + "\n")
        return self

    def __exit__(self, *exc):
        if self.lines and self.conf:
            try:
                open(self.conf, "w").close()
            except OSError:
                pass


def _read_stats(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    from ..criu.images import read_stats
    try:
        return read_stats(path)
    except Exception:  # noqa: BLE001 - statistics are informative only
        return {}


def checkpoint(container, images_dir, *, leave_stopped: bool = True,
               tcp_established: bool = False, work_dir=None, leave_running: bool = False,
               ext_unix_sk: bool = False, shell_job: bool = False, file_locks: bool = False,
               network_lock: Optional[str] = None, criu_options: Sequence[str] = (),
               manage_cgroups_mode: Optional[str] = None, netns: Optional[str] = "auto",
               root: Optional[str] = None, timeout: float = 120.0) -> CheckpointResult:
    """Checkpoint ``container`` into ``images_dir`` (created) with runc + CRIU.

    ``leave_stopped`` (default): the dumped tree stays frozen afterwards (runc
    ``--leave-running`` plus CRIU ``leave-stopped`` through the container's
    ``org.criu.config`` file): kill it on commit, or kill + :func:`restore` locally to roll
    back (never SIGCONT after ``tcp_established``). ``leave_running``: resume it (a
    plain copy). Neither: runc kills the container, as ``runc checkpoint`` does.
    ``tcp_established``: dump established TCP connections (CRIU locks them with its
    network lock in ``netns``; see :func:`statesync.containers.net.replicate_network_lock`).
    ``network_lock``: CRIU's ``network-lock`` method ("iptables", "nftables", "skip").
    ``criu_options``: more CRIU config lines (``"ghost-limit 10M"``).
    ``netns``: the network namespace runc (and so CRIU) runs in: "auto" = the
    container's external netns when it has one (CRIU then installs its per-connection
    lock there), None = ours. ``work_dir`` (default ``images_dir``) receives dump.log and
    stats-dump. Raises ContainerNotFound, ContainerError (one line, with the log path)."""
    c = _as_container(container, root)
    images_dir = os.path.abspath(os.fspath(images_dir))
    work_dir = os.path.abspath(os.fspath(work_dir)) if work_dir else images_dir
    os.makedirs(images_dir, exist_ok=True)
    os.makedirs(work_dir, exist_ok=True)
    pids = pids_of(c)
    if netns == "auto":
        netns = _netns_of(c)
    cmd = c.runc("checkpoint", "--image-path", images_dir, "--work-path", work_dir)
    if leave_stopped or leave_running:
        cmd.append("--leave-running")
    if tcp_established:
        cmd.append("--tcp-established")
    if ext_unix_sk:
        cmd.append("--ext-unix-sk")
    if shell_job:
        cmd.append("--shell-job")
    if file_locks:
        cmd.append("--file-locks")
    if manage_cgroups_mode:
        cmd += ["--manage-cgroups-mode", manage_cgroups_mode]
    cmd.append(c.name)
    log = os.path.join(work_dir, "dump.log")
    lines = _criu_options(tcp_established, leave_stopped and not leave_running, network_lock,
                          criu_options)
    t0 = time.monotonic()
    with _CriuConf(c, _criu_conf_of(c), lines, "checkpoint"):
        _run(cmd, c.name, "runc checkpoint", timeout, log=log, netns=netns)
    wall = time.monotonic() - t0
    stats = _read_stats(os.path.join(work_dir, "stats-dump"))
    if work_dir != images_dir and os.path.exists(os.path.join(work_dir, "stats-dump")):
        shutil.copy2(os.path.join(work_dir, "stats-dump"), os.path.join(images_dir, "stats-dump"))
    return CheckpointResult(c, images_dir, work_dir, stats, wall, pids,
                            leave_stopped and not leave_running, tcp_established, log, cmd)


@dataclass
class RestoreResult:
    """A finished restore: the new ``container``, its init's host ``pid``, ``stats``
    from stats-restore (microseconds), ``wall_time`` seconds, ``log`` restore.log."""

    container: Container
    pid: int
    stats: dict
    wall_time: float
    log: str
    cmd: List[str] = field(default_factory=list)


def restore(images_dir, bundle, name: str, *, root: str = DEFAULT_ROOT,
            tcp_established: bool = False, work_dir=None, ext_unix_sk: bool = False,
            shell_job: bool = False, file_locks: bool = False, leave_stopped: bool = False,
            network_lock: Optional[str] = None, criu_options: Sequence[str] = (),
            manage_cgroups_mode: Optional[str] = None, netns: Optional[str] = "auto",
            timeout: float = 120.0) -> RestoreResult:
    """Restore container ``name`` from ``images_dir`` (any complete image set: a copy, an
    incremental set with its ``parent`` chain, a flattened set) into ``bundle`` (a
    :class:`Bundle` or a bundle directory; its rootfs must hold the files the images
    refer to, see :mod:`statesync.containers.rootfs`), detached.

    ``tcp_established``: restore the dumped connections (the service IP must already be
    in the destination netns, and CRIU's lock should be there too, or the kernel answers
    the peer's retransmissions with RST). ``leave_stopped``: keep the restored tree
    stopped (resume with :func:`resume`). ``netns``: where runc runs; "auto" = the
    bundle's external netns. ``work_dir`` (default: a ``restore-work`` directory in the
    bundle) receives restore.log and stats-restore. The image directory is not
    modified. Raises ContainerError."""
    images_dir = os.path.abspath(os.fspath(images_dir))
    if not os.path.exists(os.path.join(images_dir, "inventory.img")):
        raise ContainerError(name, f"restore: {images_dir} holds no CRIU image set "
                             f"(no inventory.img)")
    if isinstance(bundle, Bundle):
        bundle.mount()
        bpath, bnetns, conf = bundle.path, bundle.netns, bundle.criu_conf
    else:
        bpath = os.path.abspath(os.fspath(bundle))
        with open(os.path.join(bpath, "config.json")) as f:
            cfg = json.load(f)
        bnetns = next((ns.get("path") for ns in cfg["linux"]["namespaces"]
                       if ns["type"] == "network"), None)
        conf = (cfg.get("annotations") or {}).get(CRIU_CONF_ANNOTATION)
    if netns == "auto":
        netns = bnetns
    work_dir = (os.path.abspath(os.fspath(work_dir)) if work_dir
                else os.path.join(bpath, "restore-work"))
    os.makedirs(work_dir, exist_ok=True)
    os.makedirs(root, exist_ok=True)
    c = Container(name, root)
    cmd = c.runc("restore", "-d", "--image-path", images_dir, "--work-path", work_dir,
                 "-b", bpath)
    if tcp_established:
        cmd.append("--tcp-established")
    if ext_unix_sk:
        cmd.append("--ext-unix-sk")
    if shell_job:
        cmd.append("--shell-job")
    if file_locks:
        cmd.append("--file-locks")
    if manage_cgroups_mode:
        cmd += ["--manage-cgroups-mode", manage_cgroups_mode]
    cmd.append(name)
    log = os.path.join(work_dir, "restore.log")
    lines = _criu_options(False, leave_stopped, network_lock, criu_options)
    t0 = time.monotonic()
    with _CriuConf(c, conf, lines, "restore"):
        _run(cmd, name, "runc restore", timeout, log=log, netns=netns, detached=True)
    wall = time.monotonic() - t0
    st = _state_json(c)
    return RestoreResult(c, int(st.get("init_process_pid") or 0),
                         _read_stats(os.path.join(work_dir, "stats-restore")), wall, log, cmd)


def resume(container, root: Optional[str] = None) -> None:
    """SIGCONT every process of a container left stopped (not after a
    ``tcp_established`` dump: its sockets stay in repair mode; restore instead)."""
    for pid in pids_of(_as_container(container, root)):
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def kill(container, sig: int = signal.SIGKILL, root: Optional[str] = None,
         wait: float = 10.0) -> None:
    """Send ``sig`` to every process of the container (frozen ones included); with
    SIGKILL wait up to ``wait`` s until every one is dead (reaped or a zombie waiting
    for the host's init). A missing container is fine."""
    c = _as_container(container, root)
    try:
        pids = pids_of(c)
    except ContainerNotFound:
        return
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    if sig != signal.SIGKILL:
        return
    # Gone means dead: reaped, or a zombie. A container's init is reparented to the
    # host's init when runc exits, and some inits reap late (1.3 s here); a zombie holds
    # no memory, files or sockets, and its pid namespace is already dead.
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if all(_dead(p) for p in pids):
            return
        time.sleep(0.002)


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True
    except OSError:
        return True


def delete(container, root: Optional[str] = None) -> None:
    """Kill (SIGKILL) and delete the container; a missing one is fine."""
    c = _as_container(container, root)
    if not exists(c):
        return
    kill(c)
    try:
        _run(c.runc("delete", "--force", c.name), c.name, "runc delete", 30.0,
             not_found_ok=True)
    except ContainerNotFound:
        pass


# --------------------------------------------------------------------------- seccomp


def _spec_of(x) -> dict:
    if isinstance(x, dict):
        return x
    if isinstance(x, Bundle):
        return x.config()
    if isinstance(x, Container):
        st = _state_json(x)
        b = _bundle_of(x)
        if b and os.path.exists(os.path.join(b, "config.json")):
            with open(os.path.join(b, "config.json")) as f:
                return json.load(f)
        return {"linux": {"seccomp": (st.get("config") or {}).get("seccomp")}}
    p = os.fspath(x)
    if os.path.isdir(p):
        p = os.path.join(p, "config.json")
    with open(p) as f:
        return json.load(f)


_ALLOW = {"SCMP_ACT_ALLOW", "SCMP_ACT_LOG", "SCMP_ACT_TRACE", "SCMP_ACT_NOTIFY"}


def seccomp_allows(spec, syscall: str = "userfaultfd") -> bool:
    """Whether the container's seccomp filter (OCI spec ``linux.seccomp``: a spec
    dict, a bundle, a bundle dir, a config.json path or a :class:`Container`) lets
    ``syscall`` through. No filter: True. A rule naming the syscall decides (rules with
    argument conditions count as allowing: the tracker's call may match them);
    otherwise the default action. podman's default profile denies ``userfaultfd``:
    statesync then tracks the container by hashing (``--security-opt
    seccomp=unconfined`` or a profile allowing it lets uffd work)."""
    sc = (_spec_of(spec).get("linux") or {}).get("seccomp")
    if not sc:
        return True
    # runc's state.json spells actions as numbers; the OCI spec as SCMP_ACT_* names
    def allows(action) -> bool:
        if isinstance(action, str):
            return action.upper() in _ALLOW
        return action in (4, 5, 6, 7)  # runc configs: Allow, Trace, Log, Notify
    for rule in sc.get("syscalls") or []:
        names = rule.get("names") or ([rule["name"]] if rule.get("name") else [])
        if syscall in names:
            return allows(rule.get("action"))
    return allows(sc.get("defaultAction", sc.get("default_action")))
