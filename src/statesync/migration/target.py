"""What a migration moves: a process tree (``pid``), a runc container or a podman
container (``--runtime runc``), and how each is dumped, restored, resumed and rolled back.

The engine (source.py, switchover.py, destination.py) stays the same for all three: it
pre-copies the tree under the target's host pid (a container is its init's tree), diffs
and streams the final dump, assembles the image set at the destination and runs the
exactly-once handoff (docs/migrate.md: RESTORED stopped -> COMMIT -> RESUMED). It asks the
target, through a few hooks, for what differs:

=================  =======================================  =====================================
step               process tree (:class:`PidTarget`)         container (:class:`ContainerTarget`)
=================  =======================================  =====================================
dump (source)      ``criu dump --leave-stopped`` (the        ``runc checkpoint`` with CRIU left
                   engine's own)                             stopped (``leave-stopped`` through the
                                                             container's ``org.criu.config`` file)
after the dump     --                                        rootfs changes (overlay upper dir)
                                                             and, with ``tcp_established``, CRIU's
                                                             network lock written as image files
                                                             that travel with the set; the service
                                                             IP leaves the source
restore (dest)     ``criu restore --leave-stopped``          lock replicated, THEN the IP added
                   (+ ``criu_opts``)                         (gratuitous ARP), ``runc restore``
                                                             left stopped in a bundle made from
                                                             ``rootfs`` (podman: an archive and
                                                             ``podman container restore --import``);
                                                             the lock is put back until COMMIT
resume (COMMIT)    SIGCONT                                   lock lifted, SIGCONT
commit (source)    kill the frozen tree                      ``runc delete`` / ``podman rm``, the
                                                             source's lock leftovers removed
rollback (source)  SIGCONT                                   without TCP: SIGCONT; after a
                                                             ``tcp_established`` dump: IP back,
                                                             kill + local ``runc restore`` from the
                                                             same dump (SIGCONT would reset the
                                                             connections: sockets in repair mode)
=================  =======================================  =====================================

The source describes its target in BEGIN (``target``: kind, name, spec; ``criu_opts``;
``tcp_established``); the destination builds its half from that and from
:class:`DestOptions` (``statesync receive --rootfs DIR ...``).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import stat
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from statesync.errors import ContainerError, MigrationError, StateSyncError

# Image files the source writes into its dump directory next to CRIU's images (they
# travel with the set like any image; CRIU and runc ignore them).
TARGET_FILE = "statesync-target.json"
ROOTFS_TAR = "statesync-rootfs.tar"
KINDS = ("pid", "runc", "podman")


def _criu_conf_lines(opts: Sequence[str]) -> List[str]:
    """CRIU command-line options (``--shell-job``, ``--ghost-limit=10M``) as lines of a
    CRIU config file (``shell-job``, ``ghost-limit 10M``), for runc's org.criu.config."""
    out = []
    for o in opts:
        o = str(o).strip().removeprefix("--")
        if "=" in o:
            k, v = o.split("=", 1)
            o = f"{k} {v}"
        if o:
            out.append(o)
    return out


def check_criu_opts(opts: Sequence[str]) -> List[str]:
    """``criu_opts`` as given (each one ``--option`` or ``--option=value``); ValueError
    for anything else (a bare word, a short option CRIU's config files cannot hold)."""
    out = []
    for o in opts or ():
        s = str(o).strip()
        if not re.fullmatch(r"--[a-z0-9][a-z0-9-]*(=\S+)?", s):
            raise ValueError(f"criu option {o!r}: give long options as --name or "
                             f"--name=value (e.g. --shell-job, --ghost-limit=10M)")
        out.append(s)
    return out


def _lock_to_json(lock) -> Optional[dict]:
    if lock is None:
        return None
    return {"iptables": list(lock.iptables), "ip6tables": list(lock.ip6tables),
            "nft_tables": [list(t) for t in lock.nft_tables],
            "chains": {k: list(v) for k, v in lock.chains.items()}}


def _lock_from_json(d: Optional[dict]):
    from statesync.containers.net import NetworkLock
    if not d:
        return None
    return NetworkLock(iptables=list(d.get("iptables") or []),
                       ip6tables=list(d.get("ip6tables") or []),
                       nft_tables=[(str(t[0]), str(t[1]), str(t[2]))
                                   for t in d.get("nft_tables") or []],
                       chains={k: list(v) for k, v in (d.get("chains") or {}).items()})


# --------------------------------------------------------------------------- source side


class PidTarget:
    """A process and its children, found by host ``pid`` (the engine's own path).

    ``criu_opts``: CRIU options for the dump AND the restore (``["--shell-job"]``);
    ``tcp_established``: dump and restore established TCP connections (no IP move for
    a bare process: its address must be reachable at the destination already)."""

    kind = "pid"

    def __init__(self, pid: int, *, criu_opts: Sequence[str] = (),
                 tcp_established: bool = False):
        self.pid = int(pid)
        self.criu_opts = check_criu_opts(criu_opts)
        self.tcp_established = bool(tcp_established)
        self.dumped = False          # the dump finished (the tree is frozen by it)
        self.frozen_at = 0.0         # monotonic time we froze the tree ourselves (0: CRIU did)
        self.dump_dir: Optional[str] = None
        self._netns_fd: Optional[int] = None
        self.dump_steps: Dict[str, float] = {}
        self.notes: List[str] = []   # for the report

    @property
    def label(self) -> str:
        return f"pid {self.pid}"

    def begin_fields(self) -> Dict[str, Any]:
        """What BEGIN carries for the destination's half."""
        return {"target": {"kind": self.kind}, "criu_opts": list(self.criu_opts),
                "tcp_established": self.tcp_established}

    def record_info(self) -> Dict[str, Any]:
        """What the source's handoff record keeps for its supervisor (:func:`resume_source`)."""
        return {"kind": self.kind}

    def dump_args(self) -> List[str]:
        """Extra arguments of the engine's own ``criu dump``."""
        return (["--tcp-established"] if self.tcp_established else []) + list(self.criu_opts)

    def tracker_method(self, asked: str) -> str:
        return asked

    def lazy_problem(self) -> Optional[str]:
        return None

    async def dump(self, agent, tmp: str) -> bool:
        """Dump through the runtime; False: the engine runs its own ``criu dump``."""
        return False

    def dump_done(self, agent, tmp: str, netns: Optional[str]) -> None:
        """The engine's own dump of ``tmp`` finished (the tree is stopped by it). With
        ``tcp_established`` keep what a local restore needs: the dump directory and the
        process's network namespace (an fd: its /proc path dies with the tree)."""
        self.dumped = True
        self.dump_dir = tmp
        if self.tcp_established and netns and self._netns_fd is None:
            try:
                self._netns_fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._netns_fd = None

    def keeps_dump(self, agent) -> bool:
        """Whether the dump directory must outlive the switch-over (a rollback
        restores from it)."""
        return self.tcp_established and self.dumped and not agent.committed

    def rollback(self, agent) -> bool:
        """Undo a dump after a failure before COMMIT; False: the caller resumes the
        frozen tree with SIGCONT (right when no TCP connection was dumped). After a
        ``tcp_established`` dump: kill the frozen tree and ``criu restore
        --tcp-established`` it here from the same dump (its sockets are in repair
        mode: SIGCONT would reset the connections)."""
        if not (self.tcp_established and self.dumped and self.dump_dir):
            return False
        from statesync.migration import records
        from statesync.migration.common import criu_result, criu_spawn
        from statesync.migration.supervisor import kill_tree
        tmp, fd = self.dump_dir, self._netns_fd
        try:
            kill_tree(agent.pid, agent.pid_start)
            pidfile = os.path.join(tmp, "rollback.pid")
            args = ["restore", "-D", tmp, "-o", "rollback.log", "--pidfile", pidfile, "-d",
                    "--tcp-established"] + list(self.criu_opts)
            netns = f"/proc/{os.getpid()}/fd/{fd}" if fd is not None else None
            p = criu_spawn(args, netns, pdeathsig=False)
            p.wait(120)
            criu_result(p, os.path.join(tmp, "rollback.log"), f"local restore of pid {self.pid}")
            with open(pidfile) as f:
                pid = int(f.read().strip())
            agent.pid = self.pid = pid
            agent.pid_start = records.start_time(pid)
            agent.report.notes.append(f"rolled back: pid tree killed and restored on this host "
                                      f"from its dump as pid {pid} (TCP connections kept)")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if fd is not None:
                os.close(fd)
                self._netns_fd = None
        self.dumped = False
        return True

    def drop_source(self, agent) -> None:
        """At commit: the destination runs the service; remove the frozen source copy."""
        from statesync.migration.supervisor import kill_tree
        kill_tree(agent.pid, agent.pid_start)


class ContainerTarget(PidTarget):
    """A runc container (``runc:NAME[@ROOT]``) or a podman container under runc
    (``podman:NAME``), migrated from its init's host pid.

    ``tcp_established``: its TCP connections survive the move; ``service_ip``
    (``A.B.C.D[/len]``) on interface ``service_dev`` (a macvlan with its own MAC, see
    docs/containers.md) moves with it: the source's network lock is replicated at the
    destination before the IP appears there. ``network_lock``: CRIU's lock method
    (``iptables`` default, ``nftables``)."""

    def __init__(self, ref: str, *, criu_opts: Sequence[str] = (),
                 tcp_established: bool = False, service_ip: Optional[str] = None,
                 service_dev: str = "svc0", network_lock: Optional[str] = None):
        from statesync.containers import resolve, runc
        self.ref = str(ref)
        self.container = resolve(self.ref)
        self.kind = self.ref.partition(":")[0]
        pids = runc.pids_of(self.container)
        if not pids:
            raise ContainerError(self.container.name, "has no running process (runc state: "
                                 "stopped?): start it before migrating it")
        super().__init__(pids[0], criu_opts=criu_opts, tcp_established=tcp_established)
        if self.kind == "podman" and tcp_established:
            raise ValueError(f"{self.ref}: tcp_established through statesync.migrate is done "
                             f"for runc containers only; for podman see docs/containers.md "
                             f"(runc.checkpoint + podman.write_archive by hand)")
        self.service_ip = service_ip
        self.service_dev = service_dev
        self.network_lock = network_lock
        st = runc._state_json(self.container)
        self.bundle = runc._bundle_of(self.container)
        self.netns = runc._netns_of(self.container)
        if self.tcp_established and not self.netns:
            raise ContainerError(self.container.name, "joins a private network namespace, "
                                 "which runc empties on checkpoint: TCP connections need an "
                                 "external one (a netns path in config.json)")
        self.spec: dict = {}
        if self.bundle and os.path.exists(os.path.join(self.bundle, "config.json")):
            with open(os.path.join(self.bundle, "config.json")) as f:
                self.spec = json.load(f)
        # The netns by the path in config.json (runc's state names /proc/INIT/ns/net,
        # which dies with the frozen copy at commit or rollback).
        for ns in (self.spec.get("linux") or {}).get("namespaces") or []:
            if ns.get("type") == "network" and ns.get("path"):
                self.netns = ns["path"]
        self.upper = os.path.join(self.bundle, "upper") if self.bundle else None
        self.lowers: List[str] = []
        self.meta = None
        if self.kind == "podman":
            from statesync.containers import podman
            self.meta = podman.metadata(self.ref.partition(":")[2])
            self.upper, self.lowers = self.meta.upper, list(self.meta.lowers)
        else:
            self.lowers = self._overlay_lowers(st)
        if self.upper and not os.path.isdir(self.upper):
            self.upper = None
        # cgroup v1 freezer of the container (None elsewhere: CRIU freezes as it likes)
        fz = (st.get("cgroup_paths") or {}).get("freezer")
        self.freezer = fz if fz and os.path.exists(os.path.join(fz, "freezer.state")) else None
        self.uffd_ok = runc.seccomp_allows(self.spec or self.container, "userfaultfd")
        # The service interface as it is now (not in the freeze): its MAC and lower link.
        self.mac = self.lower = None
        if self.service_ip:
            self.mac, self.lower = _service_if(self.netns, self.service_dev)
        self.lock: Any = None       # CRIU's network lock (containers.net.NetworkLock)
        self.ip_removed = False

    def _overlay_lowers(self, st: dict) -> List[str]:
        """The overlay root's lower dirs, read from the mount table (statesync's bundles:
        ``lowerdir=ROOTFS``), for whiteouts of opaque directories."""
        root = (self.spec.get("root") or {}).get("path")
        if not root:
            return []
        if not os.path.isabs(root) and self.bundle:
            root = os.path.join(self.bundle, root)
        try:
            with open("/proc/self/mountinfo") as f:
                for ln in f:
                    parts = ln.split()
                    if parts[4] == root and " - overlay " in ln:
                        m = re.search(r"lowerdir=([^,\s]+)", ln)
                        return m.group(1).split(":") if m else []
        except OSError:
            pass
        return []

    @property
    def label(self) -> str:
        return f"{self.kind} container {self.ref.partition(':')[2]} (init pid {self.pid})"

    def begin_fields(self) -> Dict[str, Any]:
        d = super().begin_fields()
        t: Dict[str, Any] = {"kind": self.kind, "name": self.container.name, "spec": self.spec}
        if self.meta is not None:
            t.update(name=self.meta.name, podman_config=self.meta.config,
                     podman_spec=self.meta.spec, network_status=self.meta.network_status)
        d["target"] = t
        d["network_lock"] = self.network_lock
        return d

    def dump_args(self) -> List[str]:
        return []

    def record_info(self) -> Dict[str, Any]:
        svc = ({"ip": self.service_ip, "dev": self.service_dev, "mac": self.mac,
                "lower": self.lower} if self.service_ip else None)
        return {"kind": self.kind, "name": self.container.name, "root": self.container.root,
                "bundle": self.bundle, "netns": self.netns, "freezer": self.freezer,
                "tcp": self.tcp_established, "service": svc, "network_lock": self.network_lock,
                "criu_opts": list(self.criu_opts)}

    def tracker_method(self, asked: str) -> str:
        """uffd only where the container's seccomp filter allows userfaultfd (podman's
        default profile denies it): else hash. The report says why."""
        if self.uffd_ok:
            self.notes.append(f"{self.label}: its seccomp filter lets userfaultfd through "
                              f"(uffd tracking possible; Report.tracker says which ran)")
            return asked
        self.notes.append(f"{self.label}: its seccomp filter denies userfaultfd: tracked by "
                          f"hashing")
        if asked == "uffd":
            raise ValueError(f"{self.label}: tracker='uffd' impossible, its seccomp filter "
                             f"denies userfaultfd; use tracker='auto' or 'hash'")
        return "hash" if asked == "auto" else asked

    def lazy_problem(self) -> Optional[str]:
        return "containers are dumped through runc (no lazy dump)"

    async def dump(self, agent, tmp: str) -> bool:
        from statesync.containers import runc
        from statesync.migration.common import fault
        self.dump_dir = tmp
        agent.frozen = True     # from here the tree may be stopped: an abort resumes it
        fault("source:dump")
        # Frozen by us first: CRIU then skips its cgroup-v1 freezer loop, whose first
        # look comes 100 ms after it wrote FROZEN (criu/seize.c), and leaves the
        # cgroup frozen, so we thaw it after the dump: the tree then stops on the
        # SIGSTOP CRIU left pending (leave-stopped), as when CRIU thaws it itself.
        self.frozen_at = time.monotonic()
        freezer = await agent._in_thread(_freeze, self.freezer)
        if not freezer:
            self.frozen_at = 0.0
        steps = self.dump_steps = {"freeze": time.monotonic() - self.frozen_at}
        t0 = time.monotonic()
        try:
            r = await agent._in_thread(
                runc.checkpoint, self.container, tmp, leave_stopped=True,
                tcp_established=self.tcp_established, network_lock=self.network_lock,
                criu_options=_criu_conf_lines(self.criu_opts), timeout=300.0)
        except BaseException:
            if freezer:     # CRIU resumed the tree; the abort resumes it too
                _thaw(freezer, None)
            raise
        steps["runc_checkpoint"] = time.monotonic() - t0
        if r.stats.get("frozen_time"):
            steps["criu_frozen_time"] = r.stats["frozen_time"] / 1e6
        t0 = time.monotonic()
        if freezer:
            await agent._in_thread(_thaw, freezer, self.container)
        steps["thaw"] = time.monotonic() - t0
        self.dumped = True
        t0 = time.monotonic()
        await agent._in_thread(self._after_dump, tmp, r.log)
        steps["after_dump"] = time.monotonic() - t0
        agent.report.notes.append("container dump steps (ms): " + ", ".join(
            f"{k} {v * 1e3:.0f}" for k, v in steps.items()))
        return True

    def _after_dump(self, tmp: str, dump_log: str) -> None:
        """In the freeze, after the dump: the rootfs changes and the network lock as
        image files; the service IP leaves the source (the destination adds it after
        replicating the lock)."""
        from statesync.containers import net, rootfs
        info: Dict[str, Any] = {"deleted": []}
        if self.upper:
            ch = rootfs.write_diff_tar(self.upper, os.path.join(tmp, ROOTFS_TAR), self.lowers)
            info["deleted"] = ch.deleted
        if self.tcp_established:
            self.lock = net.lock_from_dump_log(dump_log, self.netns)
            info["lock"] = _lock_to_json(self.lock)
        if self.service_ip:
            info["service"] = {"ip": self.service_ip, "dev": self.service_dev,
                               "mac": self.mac, "lower": self.lower}
        with open(os.path.join(tmp, TARGET_FILE), "w") as f:
            json.dump(info, f)
        if self.service_ip:
            self.ip_removed = net.remove_service_ip(self.netns, self.service_dev)

    def keeps_dump(self, agent) -> bool:
        return self.tcp_established and self.dumped and not agent.committed

    def rollback(self, agent) -> bool:
        """After a ``tcp_established`` dump: IP back at the source, kill the frozen
        tree, restore it locally from the same dump (its unlock lifts CRIU's lock).
        Without TCP: False (SIGCONT resumes it, as runc.resume does)."""
        from statesync.containers import net, runc
        from statesync.migration import records
        if self.ip_removed:
            net.add_service_ip(self.netns, self.service_ip or "", self.lower or "",
                               dev=self.service_dev, mac=self.mac)
            self.ip_removed = False
            announce_for_a_while(self.netns, self.service_dev, self.service_ip or "")
        if not (self.tcp_established and self.dumped):
            return False
        tmp = self.dump_dir
        try:
            runc.delete(self.container)
            if not tmp or not self.bundle:
                raise ContainerError(self.container.name, "rollback: no dump or bundle to "
                                     "restore from")
            rr = runc.restore(tmp, self.bundle, self.container.name, root=self.container.root,
                              tcp_established=True, network_lock=self.network_lock,
                              criu_options=_criu_conf_lines(self.criu_opts),
                              work_dir=tmp + "-rollback", timeout=120.0)
            agent.pid = self.pid = rr.pid
            agent.pid_start = records.start_time(rr.pid)
            agent.report.notes.append(f"rolled back: {self.label} killed and restored on "
                                      f"this host from its dump (TCP connections kept)")
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.rmtree(tmp + "-rollback", ignore_errors=True)
        self.dumped = False
        return True

    def drop_source(self, agent) -> None:
        from statesync.containers import net, runc
        if self.kind == "podman":
            super().drop_source(agent)
            from statesync.containers import podman
            try:
                podman._podman(["rm", "-f", self.ref.partition(":")[2]], self.container.name,
                               "podman rm", 60.0)
            except ContainerError as exc:
                agent.report.notes.append(f"source container left behind: {exc}")
        else:
            runc.delete(self.container)
        if self.lock:
            try:
                net.remove_network_lock(self.netns, self.lock)
            except Exception as exc:  # noqa: BLE001 - the migration is done; say what is left
                agent.report.notes.append(f"CRIU's network lock left at the source: {exc}")


def announce_for_a_while(netns: Optional[str], dev: str, ip: str, count: int = 20) -> None:
    """Gratuitous ARPs from ``dev`` once a second for ``count`` seconds, from a detached
    ``arping -U`` (it outlives us). After a rollback the destination may still hold the
    service IP (and the switch its MAC's port) until its own cleanup ran; only a frame
    from here sent after that moves the switch's entry back."""
    import subprocess
    from statesync.containers import net
    addr = ip.split("/", 1)[0]
    arping = shutil.which("arping", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if not arping:
        net.announce(netns, dev, addr)
        return
    try:
        subprocess.Popen(net.in_netns(netns, [arping, "-q", "-U", "-I", dev, "-c", str(count),
                                              addr]),
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        net.announce(netns, dev, addr)


def _runc_running(verb: str, name: str) -> List[int]:
    """pids of ``runc ... VERB ... NAME`` processes still running."""
    from statesync import proc
    return proc.find_by_cmdline(lambda a: os.path.basename(a[0]) == "runc" and verb in a
                                and name in a)


def resume_source(r: Dict[str, Any], log=None) -> int:
    """The supervisor's (and ``statesync recover``'s) resume of a source copy whose
    agent is gone, for the record ``r``: a process tree gets SIGCONT
    (supervisor.resume_tree). A container also gets its freezer thawed and its
    service IP back, and after a complete ``tcp_established`` dump it is killed and
    restored here from the dump (SIGCONT would reset its connections). Returns the
    number of processes resumed (1 for a restored container)."""
    from statesync.migration.supervisor import resume_tree
    t = r.get("target") or {}
    root, start = r.get("pid"), r.get("pid_start")
    if t.get("kind") not in ("runc", "podman"):
        return resume_tree(root, start)
    from statesync.containers import net, runc
    say = log or (lambda m: None)
    name = str(t.get("name") or "")
    deadline = time.monotonic() + 120
    while name and _runc_running("checkpoint", name) and time.monotonic() < deadline:
        time.sleep(0.05)        # a checkpoint the agent started finishes first
    fz = t.get("freezer")
    if fz and os.path.exists(os.path.join(fz, "freezer.state")):
        _thaw(fz, None)
    svc, netns = t.get("service"), t.get("netns")
    if svc:
        try:
            _service_if(netns, svc.get("dev") or "svc0")
        except Exception:  # noqa: BLE001 - absent: put it back
            try:
                net.add_service_ip(netns, svc["ip"], svc.get("lower") or "",
                                   dev=svc.get("dev") or "svc0", mac=svc.get("mac"))
                announce_for_a_while(netns, svc.get("dev") or "svc0", svc["ip"])
                say(f"service IP {svc['ip']} back on {svc.get('dev')}")
            except Exception as exc:  # noqa: BLE001
                say(f"could not put the service IP {svc.get('ip')} back: {exc}")
    dump = str(r.get("dump_dir") or "")
    log_path = os.path.join(dump, "dump.log") if dump else ""
    complete = False
    if t.get("tcp") and dump and os.path.exists(os.path.join(dump, "inventory.img")):
        try:
            with open(log_path, errors="replace") as f:
                complete = "Dumping finished successfully" in f.read()
        except OSError:
            complete = False
    if not complete or not t.get("bundle"):
        return resume_tree(root, start)
    c = runc.Container(name, str(t.get("root") or runc.DEFAULT_ROOT))
    try:
        runc.delete(c)
        runc.restore(dump, t["bundle"], name, root=c.root, tcp_established=True,
                     network_lock=t.get("network_lock"),
                     criu_options=_criu_conf_lines(t.get("criu_opts") or []),
                     work_dir=dump + "-rollback", timeout=120.0)
    except ContainerError as exc:
        say(f"local restore of container {name} from {dump} failed: {exc}")
        return 0
    finally:
        shutil.rmtree(dump + "-rollback", ignore_errors=True)
    say(f"container {name} restored here from its dump (TCP connections kept)")
    return 1


def _freezer_state(path: str) -> str:
    with open(os.path.join(path, "freezer.state")) as f:
        return f.read().strip()


def _freeze(path: Optional[str], timeout: float = 5.0) -> Optional[str]:
    """Freeze the cgroup-v1 freezer at ``path`` and wait (polling every 0.5 ms, at most
    ``timeout`` s) until FROZEN; returns the path, None when there is none or it did
    not freeze in time (thawed again: CRIU then freezes it itself)."""
    if not path:
        return None
    try:
        with open(os.path.join(path, "freezer.state"), "w") as f:
            f.write("FROZEN")
        deadline = time.monotonic() + timeout
        while _freezer_state(path) != "FROZEN":
            if time.monotonic() > deadline:
                _thaw(path, None)
                return None
            time.sleep(0.0005)
    except OSError:
        return None
    return path


def _thaw(path: str, container) -> None:
    """Thaw the freezer; after a left-stopped dump wait (bounded) until the tree is
    stopped by CRIU's pending SIGSTOP, and SIGSTOP it ourselves if it is not."""
    try:
        with open(os.path.join(path, "freezer.state"), "w") as f:
            f.write("THAWED")
    except OSError:
        return
    if container is None:
        return
    from statesync import proc
    from statesync.containers import runc
    try:
        pids = runc.pids_of(container)
    except ContainerError:
        return
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        if all((proc.state(p) or "T") in ("T", "t", "Z", "X") for p in pids):
            return
        time.sleep(0.0005)
    for p in pids:      # never let the dumped copy run on
        try:
            os.kill(p, signal.SIGSTOP)
        except ProcessLookupError:
            pass


def _service_if(netns: Optional[str], dev: str):
    """(MAC, lower link) of service interface ``dev`` in ``netns``."""
    from statesync.containers import net
    r = net._run(netns, ["ip", "-o", "link", "show", dev], f"ip link show {dev}")
    m = re.search(r"^\d+:\s+" + re.escape(dev) + r"@([^:\s]+):", r.stdout)
    mac = re.search(r"link/ether ([0-9a-f:]{17})", r.stdout)
    if not m or not mac:
        from statesync.errors import NetworkMoveError
        raise NetworkMoveError(netns or "", f"{dev} is not a macvlan with a MAC address "
                               f"(see docs/containers.md: the service IP's interface)")
    lower = m.group(1)
    if lower.startswith("if"):      # "svc0@if12": the lower lives in another namespace
        lower = ""
    return mac.group(1), lower


def source_target(pid, container: Optional[str] = None, *, criu_opts: Sequence[str] = (),
                  tcp_established: bool = False, service_ip: Optional[str] = None,
                  service_dev: str = "svc0", network_lock: Optional[str] = None) -> PidTarget:
    """The target ``migrate(pid | container=...)`` names: a pid, or ``runc:NAME[@ROOT]`` /
    ``podman:NAME`` (also given as ``pid``). Raises ContainerNotFound/ContainerError
    (one line), ValueError for contradicting arguments."""
    if container is None and isinstance(pid, str) and ":" in pid:
        container, pid = pid, None
    if container is not None:
        if pid is not None:
            raise ValueError("give a pid or a container, not both")
        return ContainerTarget(container, criu_opts=criu_opts, tcp_established=tcp_established,
                               service_ip=service_ip, service_dev=service_dev,
                               network_lock=network_lock)
    if pid is None:
        raise ValueError("nothing to migrate: give a pid or container='runc:NAME'")
    if service_ip:
        raise ValueError("service_ip is for containers (container='runc:NAME')")
    return PidTarget(int(pid), criu_opts=criu_opts, tcp_established=tcp_established)


# --------------------------------------------------------------------------- destination side


@dataclass
class DestOptions:
    """The destination's half of a container migration (``serve_destination(...)``,
    ``statesync receive``): ``rootfs`` the container's read-only root file system here
    (the lower dir of the restored container's overlay; the source's changes are
    replayed above it); ``runc_root`` runc's state directory for restored containers;
    ``name`` the restored container's name (default: the source's); ``netns`` the
    network namespace it joins (path or name under /run/netns; default: the agent's
    own); ``service_lower`` the LAN interface the service IP's macvlan sits on (default:
    the source's name for it)."""

    rootfs: Optional[str] = None
    runc_root: Optional[str] = None
    name: Optional[str] = None
    netns: Optional[str] = None
    service_lower: Optional[str] = None


class PidDest:
    """The destination's half for a process tree: the engine's own ``criu restore``,
    with the source's ``criu_opts`` (and ``--tcp-established``)."""

    kind = "pid"

    def __init__(self, begin: dict, options: DestOptions, base_dir: str, session: str):
        self.begin = begin
        self.options = options
        try:
            self.criu_opts = check_criu_opts(begin.get("criu_opts") or [])
        except ValueError as exc:
            raise MigrationError(f"source sent unusable CRIU options: {exc}", "begin") from None
        self.tcp_established = bool(begin.get("tcp_established"))

    def restore_args(self) -> List[str]:
        return (["--tcp-established"] if self.tcp_established else []) + list(self.criu_opts)

    async def restore(self, sess, final_dir: str) -> bool:
        """Restore through the runtime, left stopped; False: the engine's criu restore."""
        return False

    def before_resume(self, sess) -> None:
        """At COMMIT, just before the restored tree gets SIGCONT."""

    def drop(self, sess) -> None:
        """After a failure or an abort before COMMIT (the tree is already killed)."""

    def after_resolved_commit(self, sess) -> None:
        """The source's RESOLVE said commit after the link broke: the server resumed the
        copy (DestinationServer._apply); what :meth:`before_resume` does comes now."""
        try:
            self.before_resume(sess)
        except Exception as exc:  # noqa: BLE001 - the copy runs; say what is left
            sess.log(f"session {sess.session}: after the resolved commit: {exc}")


class RuncDest(PidDest):
    """A runc container restored left stopped into a bundle made here from the
    source's spec, ``options.rootfs`` (lower) and the source's rootfs changes."""

    kind = "runc"

    def __init__(self, begin: dict, options: DestOptions, base_dir: str, session: str):
        super().__init__(begin, options, base_dir, session)
        from statesync.containers import runc
        t = begin.get("target") or {}
        self.src_name = str(t.get("name") or "")
        self.name = options.name or self.src_name
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", self.name):
            raise MigrationError(f"refusing container name {self.name!r}", "begin")
        self.root = options.runc_root or runc.DEFAULT_ROOT
        self.network_lock = begin.get("network_lock")
        self.netns = self._netns_path(options.netns)
        self.lock = None
        self.info: Dict[str, Any] = {}
        self.service: Optional[dict] = None
        self.ip_added = False
        self.restored = False
        self.bundle = None
        if self.kind == "runc":
            if not options.rootfs:
                raise MigrationError(f"the source migrates runc container {self.src_name}: this "
                                     f"destination needs its root file system (statesync "
                                     f"receive --rootfs DIR, serve_destination(rootfs=...))",
                                     "begin")
            if runc.exists(runc.Container(self.name, self.root)):
                raise MigrationError(f"a runc container {self.name} exists here already (root "
                                     f"{self.root}): remove it, or name the restored one "
                                     f"(--container-name)", "begin")
            self.bundle = _bundle_from_spec(os.path.join(base_dir, f"bundle-{session}"),
                                            t.get("spec") or {}, options.rootfs, self.netns)

    @staticmethod
    def _netns_path(netns: Optional[str]) -> str:
        """The netns path given, else ours: by its /run/netns name when it has one (a
        path that outlives this agent, for its supervisor), else /proc/PID/ns/net."""
        if netns:
            return netns if "/" in netns else f"/run/netns/{netns}"
        try:
            ino = os.stat("/proc/self/ns/net").st_ino
            for n in sorted(os.listdir("/run/netns")):
                if os.stat(os.path.join("/run/netns", n)).st_ino == ino:
                    return os.path.join("/run/netns", n)
        except OSError:
            pass
        return f"/proc/{os.getpid()}/ns/net"

    def _network_in(self, final_dir: str) -> None:
        """Before the restore: the source's lock here, THEN the service IP (announced)."""
        from statesync.containers import net
        try:
            with open(os.path.join(final_dir, TARGET_FILE)) as f:
                info = json.load(f)
        except FileNotFoundError:
            info = {}
        self.info = info
        self.lock = _lock_from_json(info.get("lock"))
        if self.lock:
            net.replicate_network_lock(None, self.netns, self.lock)
        svc = info.get("service")
        if svc:
            self.service = svc
            lower = self.options.service_lower or svc.get("lower")
            if not lower:
                raise MigrationError("the service IP's LAN interface here is unknown: pass "
                                     "--service-lower IFACE", "restore")
            net.add_service_ip(self.netns, svc["ip"], lower, dev=svc.get("dev") or "svc0",
                               mac=svc.get("mac"))
            self.ip_added = True

    def _network_out(self) -> None:
        """Undo :meth:`_network_in` (a failed or aborted restore): IP and lock copy go."""
        from statesync.containers import net
        if self.ip_added and self.service:
            net.remove_service_ip(self.netns, self.service.get("dev") or "svc0")
            self.ip_added = False
        if self.lock:
            try:
                net.remove_network_lock(self.netns, self.lock)
            except Exception:  # noqa: BLE001 - best effort on the failure path
                pass

    async def restore(self, sess, final_dir: str) -> bool:
        from statesync.migration import records
        from statesync.migration.common import fault
        steps: Dict[str, float] = {}
        sess.result["restore_steps_s"] = steps      # logged with the session's result
        try:
            t0 = time.monotonic()
            await asyncio.to_thread(self._network_in, final_dir)
            steps["network_in"] = time.monotonic() - t0
            fault("dest:restore")
            pid = await asyncio.to_thread(self._restore, final_dir, steps)
            if self.lock:
                # Until COMMIT the copy must not talk: CRIU's unlock lifted the lock, so
                # it goes back (else this kernel ACKs the client's data into a copy that
                # an abort discards).
                from statesync.containers import net
                t0 = time.monotonic()
                await asyncio.to_thread(net.replicate_network_lock, None, self.netns, self.lock)
                steps["relock"] = time.monotonic() - t0
        except BaseException as exc:
            await asyncio.to_thread(self._network_out)
            if isinstance(exc, StateSyncError) and not isinstance(exc, MigrationError):
                raise MigrationError(str(exc), "restore") from exc
            raise
        sess.restored_pid = pid
        sess.restored_start = records.start_time(pid)
        return True

    def _restore(self, final_dir: str, steps: Dict[str, float]) -> int:
        from statesync.containers import rootfs, runc
        assert self.bundle is not None
        t0 = time.monotonic()
        self.bundle.mount()
        tar = os.path.join(final_dir, ROOTFS_TAR)
        if os.path.exists(tar):     # the source's file system changes, replayed over ours
            rootfs.apply_diff_tar(tar, self.bundle.rootfs, self.info.get("deleted") or [])
        steps["rootfs"] = time.monotonic() - t0
        self.restored = True
        rr = runc.restore(final_dir, self.bundle, self.name, root=self.root,
                          tcp_established=self.tcp_established, leave_stopped=True,
                          network_lock=self.network_lock,
                          criu_options=_criu_conf_lines(self.criu_opts),
                          work_dir=os.path.join(self.bundle.path, "restore-work"),
                          timeout=300.0)
        steps["runc_restore"] = rr.wall_time
        if rr.stats.get("restore_time"):
            steps["criu_restore_time"] = rr.stats["restore_time"] / 1e6
        stats = os.path.join(os.path.dirname(rr.log), "stats-restore")
        if os.path.exists(stats):       # the engine reports CRIU's restore statistics
            shutil.copyfile(stats, os.path.join(final_dir, "stats-restore"))
        if not rr.pid:
            raise ContainerError(self.name, f"runc restore left no init pid (log {rr.log})")
        return rr.pid

    def before_resume(self, sess) -> None:
        """Lift the lock we put back after the restore: the rules as we inserted them
        (one iptables-restore per family; no listing), CRIU's nft tables by name."""
        if self.lock:
            _lift_lock(self.netns, self.lock)

    def drop(self, sess) -> None:
        from statesync.containers import runc
        self._network_out()
        if self.restored:
            try:
                runc.delete(runc.Container(self.name, self.root))
            except ContainerError:
                pass
        if self.bundle is not None:
            self.bundle.remove()


class PodmanDest(RuncDest):
    """A podman container: the assembled images become a checkpoint archive
    (``podman.write_archive``) restored with ``podman container restore --import``; a
    CRIU config with ``leave-stopped`` named in its spec keeps it stopped until COMMIT."""

    kind = "podman"

    async def restore(self, sess, final_dir: str) -> bool:
        from statesync.migration import records
        from statesync.migration.common import fault
        try:
            fault("dest:restore")
            pid = await asyncio.to_thread(self._restore_podman, final_dir)
        except StateSyncError as exc:
            if isinstance(exc, MigrationError):
                raise
            raise MigrationError(str(exc), "restore") from exc
        sess.restored_pid = pid
        sess.restored_start = records.start_time(pid)
        return True

    def _restore_podman(self, final_dir: str) -> int:
        import tarfile
        import tempfile

        from statesync.containers import podman
        t = self.begin.get("target") or {}
        work = tempfile.mkdtemp(prefix="podman-", dir=os.path.dirname(final_dir))
        self.work = work
        conf = os.path.join(work, "criu.conf")
        with open(conf, "w") as f:
            f.write("\n".join(["leave-stopped"] + _criu_conf_lines(self.criu_opts)) + "\n")
        spec = json.loads(json.dumps(t.get("podman_spec") or {}))
        spec.setdefault("annotations", {})["org.criu.config"] = conf
        config = json.loads(json.dumps(t.get("podman_config") or {}))
        if isinstance(config.get("spec"), dict):
            config["spec"].setdefault("annotations", {})["org.criu.config"] = conf
        upper = None
        tar = os.path.join(final_dir, ROOTFS_TAR)
        deleted = []
        try:
            with open(os.path.join(final_dir, TARGET_FILE)) as f:
                deleted = list(json.load(f).get("deleted") or [])
        except (OSError, ValueError):
            pass
        if os.path.exists(tar) or deleted:
            upper = os.path.join(work, "upper")
            os.makedirs(upper)
            if os.path.exists(tar):
                with tarfile.open(tar) as tf:
                    tf.extractall(upper, filter="tar")  # member names checked by the filter
            for d in deleted:   # whiteouts again: write_archive turns them into deleted.files
                rel = os.path.normpath(str(d)).lstrip("/")
                if not rel or rel.startswith(".."):
                    continue
                p = os.path.join(upper, rel)
                os.makedirs(os.path.dirname(p), exist_ok=True)
                if not os.path.lexists(p):
                    os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
        meta = podman.PodmanMetadata(id=str(config.get("id") or ""), name=self.name,
                                     config=config, spec=spec,
                                     network_status=t.get("network_status"))
        arch = podman.write_archive(os.path.join(work, "ckpt.tar"), final_dir, meta,
                                    upper=upper, shm_dir=None,
                                    netns=self.options.netns and self.netns)
        self.restored = True
        cid = podman.restore_archive(arch, name=self.name)
        self.cid = cid or self.name
        pid = int(podman.inspect(self.cid).get("State", {}).get("Pid") or 0)
        if not pid:
            raise ContainerError(self.name, "podman container restore --import left no "
                                 "running init (podman inspect: State.Pid 0)")
        return pid

    def drop(self, sess) -> None:
        from statesync.containers import podman
        if self.restored:
            try:
                podman._podman(["rm", "-f", getattr(self, "cid", self.name)], self.name,
                               "podman rm", 60.0)
            except ContainerError:
                pass
        w = getattr(self, "work", None)
        if w:
            shutil.rmtree(w, ignore_errors=True)


def _lift_lock(netns: Optional[str], lock) -> None:
    """Remove the lock rules :func:`statesync.containers.net.replicate_network_lock`
    installed in ``netns`` (spelled as installed, so no listing is needed)."""
    from statesync.containers import net
    for _fam, rules, chains, prog in (("v4", lock.iptables, lock.chains.get("v4", []),
                                      "iptables-restore"),
                                     ("v6", lock.ip6tables, lock.chains.get("v6", []),
                                      "ip6tables-restore")):
        if rules or chains:
            net._run(netns, [prog, "-w", "--noflush"], f"{prog} (unlock)",
                     input=net._iptables_restore_input(chains, rules, delete=True))
    for fam, name, _ in lock.nft_tables:
        net._run(netns, ["nft", "delete", "table", fam, name], f"nft delete table {fam} {name}")


def _bundle_from_spec(path: str, spec: dict, rootfs_dir: str, netns: str):
    """A destination bundle in ``path``: the source's OCI spec with its root on an
    overlay of ``rootfs_dir`` (read-only lower) and a fresh upper dir, its network
    namespace the path ``netns``, its CRIU config file ``path/criu.conf``."""
    from statesync.containers import runc
    if not spec.get("process") or not spec.get("linux"):
        raise MigrationError("the source sent no usable OCI spec for its container", "begin")
    if not os.path.isdir(rootfs_dir):
        raise MigrationError(f"--rootfs {rootfs_dir} is not a directory", "begin")
    os.makedirs(path, mode=0o700, exist_ok=True)
    b = runc.Bundle(path=path, rootfs=os.path.join(path, "rootfs"),
                    lower=os.path.abspath(rootfs_dir), upper=os.path.join(path, "upper"),
                    netns=netns, criu_conf=os.path.join(path, "criu.conf"))
    cfg = json.loads(json.dumps(spec))
    cfg["root"] = {"path": b.rootfs, "readonly": False}
    nss = [ns for ns in cfg["linux"].get("namespaces", []) if ns.get("type") != "network"]
    nss.append({"type": "network", "path": netns})
    cfg["linux"]["namespaces"] = nss
    cfg.setdefault("annotations", {})[runc.CRIU_CONF_ANNOTATION] = b.criu_conf
    open(os.path.join(path, "criu.conf"), "w").close()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    b.mount()
    return b


def dest_record_info(begin: dict, options: Optional[DestOptions], base_dir: str,
                     session: str) -> Dict[str, Any]:
    """What the destination's handoff record keeps for its supervisor
    (:func:`settle_dest_target`): where a container would be restored."""
    t = begin.get("target") or {}
    kind = str(t.get("kind") or "pid")
    if kind not in ("runc", "podman"):
        return {"kind": kind}
    from statesync.containers import runc
    o = options or DestOptions()
    return {"kind": kind, "name": o.name or str(t.get("name") or ""),
            "root": o.runc_root or runc.DEFAULT_ROOT,
            "netns": RuncDest._netns_path(o.netns),
            "bundle": os.path.join(base_dir, f"bundle-{session}") if kind == "runc" else None}


def settle_dest_target(r: Dict[str, Any], log=None, committed: bool = False) -> None:
    """The destination supervisor's cleanup of an unconfirmed container whose agent is
    gone (record ``r``, before COMMIT): wait for a ``runc restore`` still running, then
    the service IP and the lock copy go, the restored container is deleted and its
    bundle removed. ``committed`` (COMMIT was received, the copy is resumed next): only
    the lock copy is lifted. A process tree: nothing."""
    t = r.get("target") or {}
    if t.get("kind") not in ("runc", "podman"):
        return
    from statesync.containers import net, runc
    say = log or (lambda m: None)
    name, netns = str(t.get("name") or ""), t.get("netns")
    if netns and not os.path.exists(netns):
        netns = None        # the agent's /proc path: we (its supervisor) share its netns
    deadline = time.monotonic() + 120
    while name and _runc_running("restore", name) and time.monotonic() < deadline:
        time.sleep(0.05)
    info: Dict[str, Any] = {}
    for d in (r.get("final_dir"), r.get("tmp_dir")):
        p = os.path.join(d, TARGET_FILE) if d else ""
        if p and os.path.exists(p):
            try:
                with open(p) as f:
                    info = json.load(f)
            except (OSError, ValueError):
                pass
            break
    if committed:
        lock = _lock_from_json(info.get("lock"))
        if lock:
            try:
                _lift_lock(netns, lock)
            except Exception as exc:  # noqa: BLE001
                say(f"could not lift the network lock of container {name}: {exc}")
        return
    svc = info.get("service")
    if svc:
        if net.remove_service_ip(netns, svc.get("dev") or "svc0"):
            say(f"removed the service IP {svc.get('ip')} of the unconfirmed container {name}")
    lock = _lock_from_json(info.get("lock"))
    if lock:
        try:
            net.remove_network_lock(netns, lock)
        except Exception:  # noqa: BLE001 - best effort
            pass
    try:
        if t.get("kind") == "runc":
            runc.delete(runc.Container(name, str(t.get("root") or runc.DEFAULT_ROOT)))
        else:
            from statesync.containers import podman
            podman._podman(["rm", "-f", name], name, "podman rm", 60.0)
    except ContainerError as exc:
        say(f"could not remove the unconfirmed container {name}: {exc}")
    if t.get("bundle"):
        runc.Bundle(path=t["bundle"], rootfs=os.path.join(t["bundle"], "rootfs"),
                    upper=os.path.join(t["bundle"], "upper")).remove()


def dest_target(begin: dict, options: Optional[DestOptions], base_dir: str,
                session: str) -> PidDest:
    """The destination's half for the target BEGIN describes."""
    kind = str((begin.get("target") or {}).get("kind") or "pid")
    if kind not in KINDS:
        raise MigrationError(f"the source migrates a {kind!r}, which this destination cannot "
                             f"restore (it knows {', '.join(KINDS)}): upgrade statesync here",
                             "begin")
    cls = {"pid": PidDest, "runc": RuncDest, "podman": PodmanDest}[kind]
    return cls(begin, options or DestOptions(), base_dir, session)


__all__ = ["PidTarget", "ContainerTarget", "source_target", "resume_source", "DestOptions",
           "dest_record_info", "settle_dest_target",
           "PidDest", "RuncDest", "PodmanDest", "dest_target", "check_criu_opts", "TARGET_FILE",
           "ROOTFS_TAR", "KINDS"]
