"""Containers as migration targets: runc and podman (``--runtime runc``) containers.

Building blocks the switch-over engine calls (docs/containers.md)::

    from statesync.containers import runc, podman, net, rootfs   # or the names below

    b = runc.make_bundle("bundle", rootfs_dir, ["redis-server", ...], netns="/run/netns/A")
    c = runc.run(b, "svc")                         # runc.Container(name, root)
    runc.pids_of(c)                                # host pids of every process of the container
    r = runc.checkpoint(c, "img", leave_stopped=True, tcp_established=True)
    ...                                            # copy img (or assemble it) at the destination
    c2 = runc.restore("img-copy", b2, "svc", tcp_established=True, netns="/run/netns/B")

    podman.container("name")             # a podman container's runc state (runc.Container)
    # for `podman container restore --import`:
    podman.write_archive("ckpt.tar", "img", podman.metadata("name"))
    podman.read_archive("ckpt.tar", "out")

    net.replicate_network_lock(src_netns, dst_netns, dump_log=...)   # before the IP appears at dst
    net.move_ip(ip, src=(ns_a, dev_a), dst=(ns_b, dev_b))            # + gratuitous ARP

Everything here drives real programs (runc, podman, CRIU, ip, iptables/nft) and needs root.
"""
from __future__ import annotations

from . import net, podman, probe, rootfs, runc
from .net import TcpHandoff, move_ip, network_lock_of, remove_network_lock, replicate_network_lock
from .podman import read_archive, write_archive
from .runc import Bundle, Container, checkpoint, make_bundle, pids_of, restore, seccomp_allows

__all__ = ["runc", "podman", "net", "rootfs", "probe", "Bundle", "Container", "resolve",
           "pids_of", "checkpoint", "restore", "make_bundle", "seccomp_allows",
           "write_archive", "read_archive", "replicate_network_lock", "remove_network_lock",
           "network_lock_of", "move_ip", "TcpHandoff"]


def resolve(target: str) -> Container:
    """A container named the way a command line names it: ``runc:NAME`` (statesync's
    runc root), ``runc:NAME@ROOT`` (another runc state directory) or ``podman:NAME``
    (a podman container under runc). Raises ContainerNotFound / ContainerError."""
    from ..errors import ContainerError, ContainerNotFound
    kind, _, rest = str(target).partition(":")
    if kind == "podman" and rest:
        return podman.container(rest)
    if kind == "runc" and rest:
        name, _, root = rest.partition("@")
        c = Container(name, root or runc.DEFAULT_ROOT)
        if not runc.exists(c):
            raise ContainerNotFound(name, f"no runc container under {c.root}")
        return c
    raise ContainerError("", f"not a container reference: {target!r} (use runc:NAME, "
                         f"runc:NAME@ROOT or podman:NAME)")
