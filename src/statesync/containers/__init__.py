"""Containers as migration targets: runc and podman (``--runtime runc``) containers.

Building blocks the switch-over engine calls (docs/containers.md)::

    from statesync.containers import runc, podman, net, rootfs

    b = runc.make_bundle("bundle", rootfs_dir, ["redis-server", ...], netns="/run/netns/A")
    c = runc.run(b, "svc")                         # runc.Container(name, root)
    runc.pids_of(c)                                # host pids of every process of the container
    r = runc.checkpoint(c, "img", leave_stopped=True, tcp_established=True)
    ...                                            # copy img (or assemble it) at the destination
    c2 = runc.restore("img-copy", b2, "svc", tcp_established=True, netns="/run/netns/B")

    podman.container("name")                       # a podman container's runc state (runc.Container)
    podman.write_archive("ckpt.tar", "img", podman.metadata("name"))   # for `podman container restore --import`
    podman.read_archive("ckpt.tar", "out")

    net.replicate_network_lock(src_netns, dst_netns, dump_log=...)   # before the IP appears at dst
    net.move_ip(ip, src=(ns_a, dev_a), dst=(ns_b, dev_b))            # + gratuitous ARP

Everything here drives real programs (runc, podman, CRIU, ip, iptables/nft) and needs root.
"""
from __future__ import annotations

__all__ = ["runc", "podman", "net", "rootfs"]
