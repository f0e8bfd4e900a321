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
:class:`~statesync.migration.target_dest.DestOptions` (``statesync receive --rootfs DIR ...``).
This module is the source side and what both sides share; the destination side is
:mod:`statesync.migration.target_dest`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from typing import Any, Dict, List, Optional, Sequence

from statesync.errors import ContainerError

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


__all__ = ["PidTarget", "ContainerTarget", "source_target", "resume_source",
           "check_criu_opts", "TARGET_FILE", "ROOTFS_TAR", "KINDS"]
