"""The destination half of a migration target (:mod:`statesync.migration.target` has the
table of what differs between a process tree and a container): how the set received
for a pid, a runc or a podman container is restored (stopped until COMMIT), resumed
at COMMIT and settled by the supervisor when the agent died."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from statesync.errors import ContainerError, MigrationError, StateSyncError

# Image files the source writes into its dump directory next to CRIU's images (they
# travel with the set like any image; CRIU and runc ignore them).

from statesync.migration.target import (
    KINDS, ROOTFS_TAR, TARGET_FILE, _criu_conf_lines, _lock_from_json, _runc_running,
    check_criu_opts,
)


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


__all__ = ["DestOptions", "dest_record_info", "settle_dest_target", "PidDest", "RuncDest",
           "PodmanDest", "dest_target"]
