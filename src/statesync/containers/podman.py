"""podman containers (``--runtime runc``): their runc state, and checkpoint archives.

A podman container run with ``--runtime runc`` is a runc container under runc's default
root (/run/runc) named by the container's full ID, with its bundle in podman's
``userdata`` directory: :func:`container` returns it as a :class:`runc.Container`, so
:func:`statesync.containers.runc.checkpoint` / :func:`~statesync.containers.runc.pids_of`
work on it unchanged. ``leave_stopped`` needs the container created with
``--annotation org.criu.config=FILE`` (runc reads CRIU options from that file; without the
annotation runc falls back to the host-wide /etc/criu/runc.conf, which statesync does not
touch).

**Checkpoint archives** (the layout ``podman container checkpoint --export`` writes and
``podman container restore --import`` reads; CRI-O and checkpointctl use the same names):

====================== ===================================================================
``config.dump``        podman's container configuration (libpod ContainerConfig, JSON),
                       with ``newNetworks`` = the container's networks (short-ID alias
                       dropped: the restored container gets a new ID)
``spec.dump``          the OCI runtime spec (the bundle's config.json)
``network.status``     per network: interface, IP/prefix, gateway, MAC (the restore reuses
                       them unless ``--name`` is given)
``checkpoint/``        CRIU's image set plus runc's ``descriptors.json`` (stdio)
``stats-dump``         CRIU's dump statistics
``rootfs-diff.tar``    the container's root file system changes (uncompressed tar)
``deleted.files``      JSON list of paths the container deleted
``devshm-checkpoint.tar`` content of the container's /dev/shm
``artifacts/``         (empty here)
====================== ===================================================================

podman reads ``config.dump``/``spec.dump`` to re-create the container (pulling its image
when missing), untars the rest into the new bundle, checks ``checkpoint/inventory.img``,
applies ``rootfs-diff.tar`` then removes ``deleted.files`` over the new container's root,
and runs ``runc restore --image-path BUNDLE/checkpoint``. The archive may be uncompressed,
gzip or zstd (podman detects it); :func:`write_archive` writes it uncompressed.

:func:`metadata` reads the first three from podman's own state (its bbolt database for
podman <= 4.x, or its SQLite database) and the bundle; :func:`write_archive` assembles an
archive from any image directory (a runc checkpoint, a copy, a ``statesync criu
incremental`` chain, which it flattens); :func:`read_archive` unpacks one.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from ..errors import CheckpointArchiveError, ContainerError, ContainerNotFound
from . import rootfs as _rootfs
from . import runc as _runc

__all__ = ["PodmanMetadata", "ArchiveContents", "find_podman", "inspect", "container",
           "metadata", "write_archive", "read_archive", "restore_archive", "RUNC_ROOT",
           "PODMAN_RUN_ARGS", "netns_runtime", "NETNS_RUNTIME"]

#: runc's default state directory: where podman's runc containers live (root podman).
RUNC_ROOT = "/run/runc"
#: what `podman run` needs on this kind of machine (FIELD-NOTES): runc (crun lacks CRIU),
#: limits root may set without CAP_SYS_RESOURCE.
PODMAN_RUN_ARGS = [
    "--runtime",
    "runc",
    "--ulimit",
    "nofile=4096:4096",
    "--ulimit",
    "nproc=4096:4096",
]
_MEMBERS = ("config.dump", "spec.dump", "network.status", "stats-dump", "rootfs-diff.tar",
            "deleted.files", "devshm-checkpoint.tar")


def find_podman() -> str:
    p = os.environ.get("STATESYNC_PODMAN") or shutil.which(
        "podman", path=os.environ.get("PATH", "") + ":/usr/bin:/usr/local/bin")
    if not p:
        raise ContainerError("", "podman not found (run scripts/setup-system.sh as root)")
    return p


def _podman(args: Sequence[str], name: str, what: str, timeout: float = 120.0,
            not_found_ok: bool = False) -> subprocess.CompletedProcess:
    cmd = [find_podman()] + list(args)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ContainerError(name, f"{what} did not finish within {timeout:g} s", cmd) from None
    if r.returncode != 0:
        err = (r.stderr or r.stdout).strip().splitlines()
        msg = err[-1] if err else f"exit status {r.returncode}"
        if msg.startswith("Error: "):
            msg = msg[7:]
        if not_found_ok and (
            "no such container" in msg.lower() or "no container with" in msg.lower()
        ):
            raise ContainerNotFound(name, f"{what}: {msg}", cmd)
        raise ContainerError(name, f"{what} failed: {msg[:400]}", cmd)
    return r


def inspect(name: str) -> dict:
    """``podman container inspect NAME`` (the first object)."""
    r = _podman(["container", "inspect", name], name, "podman inspect", 30.0, not_found_ok=True)
    data = json.loads(r.stdout)
    if not data:
        raise ContainerNotFound(name, "podman inspect returned nothing")
    return data[0]


def container(name: str) -> _runc.Container:
    """The runc container behind podman container ``name`` (runc runtime only)."""
    info = inspect(name)
    rt = info.get("OCIRuntime") or ""
    if os.path.basename(rt) != "runc":
        raise ContainerError(name, f"runs under OCI runtime {rt!r}: statesync checkpoints "
                             f"through runc (podman run --runtime runc)")
    return _runc.Container(info["Id"], RUNC_ROOT)


# --------------------------------------------------------------------------- runtime wrapper

#: where :func:`netns_runtime` puts its runc wrapper (a runtime file, not part of the tree)
NETNS_RUNTIME = "/run/statesync/bin/runc"

_WRAPPER = """#!{python}
# Written by statesync (statesync.containers.podman.netns_runtime): podman runs its OCI
# runtime in the host's root network namespace; CRIU then re-creates a restored
# container's inet sockets there, and binding one to the service IP fails ("Can't bind
# inet socket back"). This runs `runc restore` inside the network namespace named in the
# bundle's config.json, the way statesync's own runc driver does; anything else is runc.
import json, os, sys
real = {runc!r}
args = sys.argv[1:]
if "restore" in args:
    bundle = None
    for i, a in enumerate(args):
        if a in ("--bundle", "-b") and i + 1 < len(args):
            bundle = args[i + 1]
        elif a.startswith("--bundle="):
            bundle = a.split("=", 1)[1]
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            cfg = json.load(f)
        ns = next((n.get("path") for n in cfg["linux"]["namespaces"]
                   if n.get("type") == "network"), None)
    except (OSError, TypeError, ValueError, KeyError):
        ns = None
    if ns:
        os.execvp("nsenter", ["nsenter", "--net=" + ns, "--", real] + args)
os.execv(real, [real] + args)
"""


def netns_runtime(path: str = NETNS_RUNTIME) -> str:
    """Install (if missing or stale) the runc wrapper that ``podman container restore
    --import`` must use for a ``--tcp-established`` restore of a container living in a
    network namespace given by path (``--network ns:PATH``): it runs ``runc restore``
    inside that namespace. Pass the returned path as ``runtime=`` to
    :func:`write_archive` and :func:`restore_archive`. Returns the path."""
    import sys
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    text = _WRAPPER.format(python=python, runc=_runc.find_runc())
    try:
        with open(path) as f:
            if f.read() == text:
                return path
    except OSError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- metadata


@dataclass
class PodmanMetadata:
    """What an archive needs besides CRIU's images, read from podman's state:
    ``config`` (config.dump), ``spec`` (spec.dump), ``network_status``; and where the
    container's files are: ``upper`` / ``lowers`` (overlay), ``shm_dir``, ``bundle``."""

    id: str
    name: str
    config: dict
    spec: dict
    network_status: Optional[dict] = None
    upper: Optional[str] = None
    lowers: List[str] = field(default_factory=list)
    shm_dir: Optional[str] = None
    bundle: Optional[str] = None


def _from_bolt(path: str, cid: str):
    from ._bolt import BoltDB
    with BoltDB(path) as db:
        ctrs = db.root.bucket("ctr")
        b = ctrs.bucket(cid) if ctrs else None
        if b is None:
            raise ContainerNotFound(cid[:12], f"not in podman's database {path}")
        cfg = json.loads(b.get("config") or b"{}")
        st = json.loads(b.get("state") or b"{}")
        nets = {}
        nb = b.bucket("networks")
        if nb is not None:
            nets = {k.decode(): json.loads(v) for k, v in nb.items() if isinstance(v, bytes)}
    return cfg, st, nets


def _from_sqlite(path: str, cid: str):
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        row = con.execute("SELECT JSON FROM ContainerConfig WHERE ID=?", (cid,)).fetchone()
        if row is None:
            raise ContainerNotFound(cid[:12], f"not in podman's database {path}")
        cfg = json.loads(row[0])
        srow = con.execute("SELECT JSON FROM ContainerState WHERE ID=?", (cid,)).fetchone()
        st = json.loads(srow[0]) if srow else {}
    finally:
        con.close()
    nets = cfg.pop("networks", None) or {}
    return cfg, st, nets


def metadata(name: str, graph_root: Optional[str] = None) -> PodmanMetadata:
    """Read config.dump / spec.dump / network.status content for podman container
    ``name`` from podman's database (bbolt ``libpod/bolt_state.db`` or SQLite
    ``db.sql`` under the storage graph root) and its bundle. Read-only."""
    info = inspect(name)
    cid = info["Id"]
    root = graph_root or (info.get("GraphDriver") or {}).get("Data", {}).get("GraphRoot") \
        or "/var/lib/containers/storage"
    bolt = os.path.join(root, "libpod", "bolt_state.db")
    sql = os.path.join(root, "db.sql")
    if os.path.exists(sql) and not os.path.exists(bolt):
        cfg, st, nets = _from_sqlite(sql, cid)
    elif os.path.exists(bolt):
        cfg, st, nets = _from_bolt(bolt, cid)
    else:
        raise ContainerError(name, f"podman's database not found under {root} "
                             f"(neither libpod/bolt_state.db nor db.sql)")
    # podman's export: the networks from the database, without the short-ID alias
    new_nets = {}
    for net_name, opts in nets.items():
        opts = dict(opts)
        aliases = [a for a in opts.get("aliases") or [] if a != cid[:12]]
        if aliases:
            opts["aliases"] = aliases
        else:
            opts.pop("aliases", None)
        new_nets[net_name] = opts
    if new_nets:
        cfg["newNetworks"] = new_nets
    bundle = info.get("StaticDir") or os.path.dirname(st.get("configPath", "")) or None
    spec_path = st.get("configPath") or (os.path.join(bundle, "config.json") if bundle else None)
    if not spec_path or not os.path.exists(spec_path):
        raise ContainerError(name, f"bundle config.json not found ({spec_path}); is it running?")
    with open(spec_path) as f:
        spec = json.load(f)
    gd = (info.get("GraphDriver") or {}).get("Data") or {}
    lowers = [p for p in (gd.get("LowerDir") or "").split(":") if p]
    return PodmanMetadata(id=cid, name=info.get("Name") or name, config=cfg, spec=spec,
                          network_status=st.get("networkStatus"), upper=gd.get("UpperDir"),
                          lowers=lowers, shm_dir=cfg.get("ShmDir"), bundle=bundle)


# --------------------------------------------------------------------------- archives


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes, mode: int = 0o600) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mode = mode
    ti.mtime = int(time.time())
    tf.addfile(ti, io.BytesIO(data))


def _add_dir(tf: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE
    ti.mode = mode
    ti.mtime = int(time.time())
    tf.addfile(ti)


def _flat_images(images_dir: str, tmp: str) -> str:
    """``images_dir`` itself when self-contained, else a flattened copy in ``tmp``."""
    if not os.path.lexists(os.path.join(images_dir, "parent")):
        return images_dir
    from .. import criu as _criu
    out = os.path.join(tmp, "flat")
    _criu.flatten(images_dir, out)
    return out


def _with_netns(spec: dict, path: str) -> dict:
    """A copy of OCI spec ``spec`` whose network namespace is the one at ``path``."""
    spec = json.loads(json.dumps(spec))
    # runc refuses net.* sysctls when it runs in the container's network namespace (it
    # then looks like the host's): they were applied to that namespace already.
    sysctl = (spec.get("linux") or {}).get("sysctl") or {}
    for k in [k for k in sysctl if k.startswith("net.")]:
        del sysctl[k]
    nss = (spec.get("linux") or {}).get("namespaces") or []
    for ns in nss:
        if ns.get("type") == "network":
            ns["path"] = path
            break
    else:
        nss.append({"type": "network", "path": path})
        spec.setdefault("linux", {})["namespaces"] = nss
    return spec


def write_archive(out_path, images_dir, meta: PodmanMetadata, *, stats_dump=None,
                  upper: Optional[str] = "auto", shm_dir: Optional[str] = "auto",
                  descriptors: Optional[Sequence[str]] = None,
                  netns: Optional[str] = None, runtime: Optional[str] = None) -> str:
    """Write a checkpoint archive (uncompressed tar) at ``out_path`` that
    ``podman container restore --import`` accepts.

    ``images_dir``: a CRIU image set of the container (a runc checkpoint, a copy, an
    image set statesync assembled; one with a ``parent`` chain is flattened first).
    ``meta``: :func:`metadata` of the container. ``upper``: its overlay upper dir
    ("auto": ``meta.upper``; None: no rootfs changes), written as ``rootfs-diff.tar``
    with EVERY added or modified file (podman 4.3.1 drops modified files whose path
    does not exist on the host) and ``deleted.files``. ``shm_dir`` likewise for /dev/shm.
    ``stats_dump``: CRIU's stats-dump (default: the one in images_dir, if any).
    ``descriptors``: runc's stdio descriptors when the image dir lacks
    descriptors.json. ``netns``: retarget the container to the network namespace at
    this path (a container run with ``--network ns:PATH``; the destination host's
    namespace holding the service IP), in spec.dump and config.dump's spec (net.*
    sysctls dropped: runc refuses them there, and that namespace has them already).
    ``runtime``: the OCI runtime recorded in config.dump (podman restores only with
    the same one): :func:`netns_runtime`'s wrapper for a ``tcp_established`` restore.
    Atomic: written beside out_path, renamed. Returns out_path."""
    out_path = os.path.abspath(os.fspath(out_path))
    images_dir = os.path.abspath(os.fspath(images_dir))
    if not os.path.exists(os.path.join(images_dir, "inventory.img")):
        raise CheckpointArchiveError("no CRIU image set here (no inventory.img)", images_dir,
                                     meta.name)
    upper = meta.upper if upper == "auto" else upper
    shm_dir = meta.shm_dir if shm_dir == "auto" else shm_dir
    d = os.path.dirname(out_path) or "."
    tmpdir = tempfile.mkdtemp(prefix=".statesync-archive-", dir=d)
    try:
        imgs = _flat_images(images_dir, tmpdir)
        tmp_tar = os.path.join(tmpdir, "archive.tar")
        with tarfile.open(tmp_tar, "w", format=tarfile.PAX_FORMAT) as tf:
            _add_dir(tf, "artifacts")
            config, spec = meta.config, meta.spec
            if runtime:
                config = dict(config)
                config["runtime"] = runtime
            if netns:
                path = netns if "/" in netns else f"/run/netns/{netns}"
                spec = _with_netns(spec, path)
                config = dict(config)
                if isinstance(config.get("spec"), dict):
                    config["spec"] = _with_netns(config["spec"], path)
            _add_bytes(tf, "config.dump", json.dumps(config, indent=2).encode())
            _add_bytes(tf, "spec.dump", json.dumps(spec, indent=2).encode())
            # podman writes it always ("null" for a container without podman networks)
            _add_bytes(tf, "network.status", json.dumps(meta.network_status, indent=2).encode())
            sd = stats_dump or os.path.join(images_dir, "stats-dump")
            if os.path.exists(sd):
                tf.add(sd, arcname="stats-dump", recursive=False)
            _add_dir(tf, "checkpoint", 0o700)
            names = sorted(os.listdir(imgs))
            for n in names:
                p = os.path.join(imgs, n)
                if n in ("parent", "stats-dump") or n.endswith(".log") or not os.path.isfile(p):
                    continue
                tf.add(p, arcname=f"checkpoint/{n}", recursive=False)
            if "descriptors.json" not in names:
                if descriptors is None:
                    raise CheckpointArchiveError(
                        "image set lacks runc's descriptors.json (pass descriptors=)",
                        imgs,
                        meta.name,
                    )
                _add_bytes(
                    tf, "checkpoint/descriptors.json", json.dumps(list(descriptors)).encode()
                )
            if upper:
                diff = os.path.join(tmpdir, "rootfs-diff.tar")
                ch = _rootfs.write_diff_tar(upper, diff, meta.lowers)
                if ch.changed:
                    tf.add(diff, arcname="rootfs-diff.tar", recursive=False)
                if ch.deleted:
                    _add_bytes(tf, "deleted.files", json.dumps(ch.deleted).encode())
            if shm_dir and os.path.isdir(shm_dir):
                shm_tar = os.path.join(tmpdir, "devshm.tar")
                with tarfile.open(shm_tar, "w") as st:
                    for n in sorted(os.listdir(shm_dir)):
                        st.add(os.path.join(shm_dir, n), arcname=n)
                tf.add(shm_tar, arcname="devshm-checkpoint.tar", recursive=False)
        os.chmod(tmp_tar, 0o600)
        os.replace(tmp_tar, out_path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return out_path


@dataclass
class ArchiveContents:
    """An unpacked archive: ``config``/``spec``/``network_status`` (parsed JSON),
    ``checkpoint_dir`` (CRIU images + descriptors.json), ``rootfs_diff`` (path or None),
    ``deleted`` (paths), ``stats_dump`` (path or None), ``dir`` (where it was unpacked)."""

    dir: str
    config: dict
    spec: dict
    network_status: Optional[dict]
    checkpoint_dir: str
    rootfs_diff: Optional[str]
    deleted: List[str]
    stats_dump: Optional[str]
    descriptors: List[str]


def read_archive(path, out_dir) -> ArchiveContents:
    """Unpack checkpoint archive ``path`` (tar, gzip or zstd; podman's, CRI-O's or
    ours) into ``out_dir`` and parse it. Raises CheckpointArchiveError when a required
    member (config.dump, spec.dump, checkpoint/inventory.img) is missing or a member
    would land outside out_dir."""
    path = os.path.abspath(os.fspath(path))
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"\x28\xb5\x2f\xfd":
        try:
            import zstandard
        except ImportError:
            raise CheckpointArchiveError(
                "zstd-compressed: needs the zstandard module", path
            ) from None
        with open(path, "rb") as f:
            data = zstandard.ZstdDecompressor().stream_reader(f).read()
        fileobj = io.BytesIO(data)
        tf = tarfile.open(fileobj=fileobj, mode="r:")
    else:
        try:
            tf = tarfile.open(path, "r:*")
        except tarfile.TarError as exc:
            raise CheckpointArchiveError(f"not a tar archive ({exc})", path) from None
    with tf:
        members = tf.getmembers()
        for m in members:
            name = m.name[2:] if m.name.startswith("./") else m.name
            if (
                name.startswith("/")
                or ".." in name.split("/")
                or m.issym()
                or m.islnk()
                or m.isdev()
            ):
                if m.name in (".", "./"):
                    continue
                raise CheckpointArchiveError(f"member {m.name!r} is not a plain file or directory "
                                             f"inside the archive", path)
        for m in members:
            if m.name in (".", "./"):
                continue
            tf.extract(m, out_dir, set_attrs=False)

    def need(name: str) -> str:
        p = os.path.join(out_dir, name)
        if not os.path.exists(p):
            raise CheckpointArchiveError(f"no {name} in the archive", path)
        return p

    def load(name: str):
        p = need(name)
        try:
            with open(p) as f:
                return json.load(f)
        except ValueError as exc:
            raise CheckpointArchiveError(f"{name} is not JSON ({exc})", path) from None

    config, spec = load("config.dump"), load("spec.dump")
    need("checkpoint/inventory.img")
    ns = load("network.status") if os.path.exists(os.path.join(out_dir, "network.status")) else None
    desc_p = os.path.join(out_dir, "checkpoint", "descriptors.json")
    desc = json.load(open(desc_p)) if os.path.exists(desc_p) else []
    opt = lambda n: os.path.join(out_dir, n) if os.path.exists(os.path.join(out_dir, n)) else None  # noqa: E731
    return ArchiveContents(out_dir, config, spec, ns, os.path.join(out_dir, "checkpoint"),
                           opt("rootfs-diff.tar"),
                           _rootfs.read_deleted(opt("deleted.files")), opt("stats-dump"), desc)


def restore_archive(archive, name: Optional[str] = None, *, tcp_established: bool = False,
                    runtime: Optional[str] = None, extra_args: Sequence[str] = (),
                    timeout: float = 180.0) -> str:
    """``podman [--runtime RUNTIME] container restore --import ARCHIVE [--name NAME]``;
    returns the new container's ID. podman 4.3.1 refuses ``--tcp-established``
    together with ``--name``. ``runtime`` must be the one config.dump records."""
    args = (["--runtime", runtime] if runtime else []) + [
        "container", "restore", "--import", os.fspath(archive)]
    if name:
        args += ["--name", name]
    if tcp_established:
        args.append("--tcp-established")
    args += list(extra_args)
    r = _podman(args, name or "", "podman container restore --import", timeout)
    out = r.stdout.strip().splitlines()
    return out[-1] if out else ""
