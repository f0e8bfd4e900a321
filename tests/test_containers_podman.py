"""podman containers (--runtime runc): checkpoint through runc, archives podman imports,
and the overlay rootfs diff. Real podman, runc, CRIU, overlayfs (root)."""
from __future__ import annotations

import os
import subprocess
import tarfile
import time

import pytest

from conftest import find_program, have_root, require

from statesync.containers import podman, rootfs, runc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = "localhost/statesync-test:1"


# --------------------------------------------------------------------------- overlay diff


@pytest.fixture
def overlay(tmp_path):
    require(have_root(), "overlay mounts need root")
    lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    (lower / "etc").mkdir()
    (lower / "etc" / "keep").write_text("lower\n")
    (lower / "etc" / "modify").write_text("lower\n")
    (lower / "etc" / "gone").write_text("lower\n")
    (lower / "data").mkdir()
    (lower / "data" / "old1").write_text("1")
    (lower / "data" / "old2").write_text("2")
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)],
                       capture_output=True, text=True)
    require(r.returncode == 0, f"overlay mount failed: {r.stderr.strip()}")
    try:
        yield lower, upper, merged
    finally:
        subprocess.run(["umount", "-l", str(merged)], capture_output=True)


def _tree(root):
    out = {}
    for dp, dns, fns in os.walk(root):
        for n in fns:
            p = os.path.join(dp, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
        for n in dns:
            out[os.path.relpath(os.path.join(dp, n), root) + "/"] = None
    return out


def test_rootfs_diff_carries_modified_new_deleted_and_opaque(overlay, tmp_path):
    lower, upper, merged = overlay
    with open(merged / "etc" / "modify", "a") as f:
        f.write("changed\n")
    (merged / "etc" / "new").write_text("new\n")
    os.unlink(merged / "etc" / "gone")
    subprocess.run(["rm", "-rf", str(merged / "data")], check=True)
    (merged / "data").mkdir()           # an opaque directory: old1/old2 hidden
    (merged / "data" / "fresh").write_text("f")
    ch = rootfs.changes(str(upper), [str(lower)])
    assert "etc/modify" in ch.changed and "etc/new" in ch.changed
    assert "/etc/gone" in ch.deleted and "data" in ch.opaque
    assert {"/data/old1", "/data/old2"} <= set(ch.deleted)
    tar = tmp_path / "rootfs-diff.tar"
    ch2 = rootfs.write_diff_tar(str(upper), str(tar), [str(lower)])
    with tarfile.open(tar) as tf:
        names = set(tf.getnames())
    assert {"etc/modify", "etc/new", "data/fresh"} <= names and "etc/gone" not in names
    # replayed onto a copy of the image, the way podman's restore does: the merged view
    dest = tmp_path / "dest"
    subprocess.run(["cp", "-a", str(lower), str(dest)], check=True)
    rootfs.apply_diff_tar(str(tar), str(dest), ch2.deleted)
    assert _tree(dest) == _tree(merged)


# --------------------------------------------------------------------------- real podman


@pytest.fixture(scope="module")
def image(criu_ok):
    require(have_root(), "podman checkpoints need root")
    for prog in ("podman", "runc"):
        require(find_program(prog), f"{prog} missing (scripts/setup-system.sh installs it as root)")
    r = subprocess.run(
        ["bash", os.path.join(REPO, "scripts", "build-rootfs.sh"), "--podman", IMAGE],
        capture_output=True,
        text=True,
        timeout=600,
    )
    require(
        r.returncode == 0, f"scripts/build-rootfs.sh --podman failed: {r.stderr.strip()[-300:]}"
    )
    return IMAGE


@pytest.fixture
def ctr(image, tmp_path):
    """A redis-server podman container (runc, the CRIU config annotation) in a network
    namespace this test made (``--network ns:PATH``: no podman bridge, no host firewall
    rules); removed after, with the namespace."""
    tag = f"ssct{os.getpid()}x{time.monotonic_ns() % 10**6}"
    name, netns = tag, tag + "n"
    subprocess.run(["ip", "netns", "add", netns], check=True, capture_output=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True, capture_output=True)
    conf = tmp_path / "criu.conf"
    conf.write_text("")
    try:
        r = subprocess.run(["podman", "run", "-d", *podman.PODMAN_RUN_ARGS,
                            "--network", f"ns:/run/netns/{netns}",
                            "--annotation", f"org.criu.config={conf}", "--name", name, image,
                            "redis-server", "--save", "", "--appendonly", "no",
                            "--protected-mode", "no"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        _wait(lambda: _exec(name, "redis-cli", "ping") == "PONG")
        yield name
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True, timeout=60)
        subprocess.run(["ip", "netns", "delete", netns], capture_output=True)


def _exec(name, *cmd):
    r = subprocess.run(["podman", "exec", name, *cmd], capture_output=True, text=True, timeout=30)
    return r.stdout.strip()


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _fill(name, n=2000):
    script = "".join(f"SET key{i} value{i}\n" for i in range(n))
    r = subprocess.run(["podman", "exec", "-i", name, "redis-cli"], input=script,
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.count("OK") == n


def test_podman_metadata_matches_podmans_own_export(ctr, tmp_path):
    """config.dump / spec.dump / network.status read from podman's database and bundle
    equal what `podman container checkpoint --export` writes for the same container."""
    meta = podman.metadata(ctr)
    exp = tmp_path / "podman-export.tar.zst"
    r = subprocess.run(
        ["podman", "container", "checkpoint", "--leave-running", "--export", str(exp), ctr],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    theirs = podman.read_archive(exp, tmp_path / "theirs")
    assert meta.spec == theirs.spec
    assert meta.network_status == theirs.network_status
    assert meta.config == theirs.config
    # podman's default seccomp profile denies userfaultfd: such a container is tracked by hashing
    assert not runc.seccomp_allows(meta.spec, "userfaultfd")
    assert runc.seccomp_allows(meta.spec, "read")
    assert not runc.seccomp_allows(podman.container(ctr), "userfaultfd")
    from statesync.tracking import Tracker
    with Tracker(runc.pids_of(podman.container(ctr))[0], method="auto") as t:
        assert t.method == "hash"


def test_podman_restore_import_accepts_archive_statesync_assembled(ctr, tmp_path):
    """redis-server in podman: a first runc checkpoint (left running), a final one left
    stopped, the final set written as an incremental set against the first
    (statesync.criu.write_incremental) and assembled into an archive (flattened on the
    way) with statesync's rootfs diff; the original removed; `podman container restore
    --import` brings it back running, with its keys and every file change, including a
    modified file the image already had (podman 4.3.1's own export drops it)."""
    from statesync import criu
    _fill(ctr)
    c = podman.container(ctr)
    assert runc.pids_of(c)
    meta = podman.metadata(ctr)
    first = runc.checkpoint(c, tmp_path / "img1", leave_running=True, leave_stopped=False)
    _exec(ctr, "redis-cli", "set", "late", "after-first-checkpoint")
    _exec(
        ctr,
        "sh",
        "-c",
        "echo changed-in-container >> /etc/apt/sources.list; echo new > /root/new;"
        " rm /etc/issue.net",
    )
    pids = runc.pids_of(c)
    final = runc.checkpoint(c, tmp_path / "img2", leave_stopped=True)
    assert final.leave_stopped and final.pids == pids
    inc = criu.write_incremental(final.images_dir, first.images_dir, tmp_path / "inc")
    assert os.path.islink(tmp_path / "inc" / "parent") and inc.pages_in_parent > 0
    arch = podman.write_archive(tmp_path / "ckpt.tar", tmp_path / "inc", meta,
                                stats_dump=os.path.join(final.work_dir, "stats-dump"))
    ours = podman.read_archive(arch, tmp_path / "ours")
    assert not os.path.exists(os.path.join(ours.checkpoint_dir, "parent"))
    assert ours.config["name"] == ctr and "/etc/issue.net" in ours.deleted
    with tarfile.open(ours.rootfs_diff) as tf:
        assert "etc/apt/sources.list" in tf.getnames()

    subprocess.run(
        ["podman", "rm", "-f", "-t", "0", ctr], capture_output=True, timeout=60, check=True
    )
    podman.restore_archive(arch)
    ps = subprocess.run(
        ["podman", "ps", "--filter", f"name=^{ctr}$", "--format", "{{.Names}} {{.Status}}"],
        capture_output=True,
        text=True,
    ).stdout
    assert ps.startswith(ctr + " Up"), ps
    assert _exec(ctr, "redis-cli", "get", "key1999") == "value1999"
    assert _exec(ctr, "redis-cli", "get", "late") == "after-first-checkpoint"
    assert _exec(ctr, "redis-cli", "dbsize") == "2001"
    assert _exec(ctr, "tail", "-n1", "/etc/apt/sources.list") == "changed-in-container"
    assert _exec(ctr, "cat", "/root/new") == "new"
    assert _exec(ctr, "sh", "-c", "test -e /etc/issue.net && echo there || echo gone") == "gone"


def test_read_archive_rejects_escaping_members(tmp_path):
    import io
    p = tmp_path / "bad.tar"
    with tarfile.open(p, "w") as tf:
        ti = tarfile.TarInfo("../evil")
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"x"))
    from statesync.errors import CheckpointArchiveError
    with pytest.raises(CheckpointArchiveError, match="evil"):
        podman.read_archive(p, tmp_path / "out")
    with tarfile.open(p, "w") as tf:
        ti = tarfile.TarInfo("spec.dump")
        ti.size = 2
        tf.addfile(ti, io.BytesIO(b"{}"))
    with pytest.raises(CheckpointArchiveError, match="config.dump"):
        podman.read_archive(p, tmp_path / "out2")


def test_podman_tcp_client_survives_archive_restore_in_other_host_netns(image, tmp_path):
    """A podman container in host A's network namespace (``--network ns:PATH``) serving
    redis on the service IP, a client in the client namespace on ONE connection: runc
    checkpoint (tcp, left stopped), lock then IP to B (TcpHandoff), an archive retargeted
    to B's namespace, the source removed, ``podman container restore --import
    --tcp-established`` through statesync's netns runtime wrapper: no reset, every
    acknowledged write there, the container now in B."""
    from statesync.containers import net, probe
    from statesync.testing.testbed import Testbed
    require(find_program("iptables-save"), "iptables missing (scripts/setup-system.sh)")
    with Testbed(rate="1gbit") as tb, net.ServiceLan(tb.ns_a, tb.ns_b) as lan:
        lan.place_service("a")
        name = f"ssct{os.getpid()}t{time.monotonic_ns() % 10**6}"
        conf = tmp_path / "criu.conf"
        conf.write_text("")
        runtime = podman.netns_runtime()
        r = subprocess.run(["podman", "run", "-d", *podman.PODMAN_RUN_ARGS,
                            "--network", f"ns:/run/netns/{tb.ns_a}",
                            "--annotation", f"org.criu.config={conf}", "--name", name, image,
                            "redis-server", "--bind", lan.service_ip, "--save", "",
                            "--appendonly", "no", "--protected-mode", "no"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        sess = None
        try:
            mk = lambda: lan.socket("client")  # noqa: E731
            _wait(lambda: _exec(name, "redis-cli", "-h", lan.service_ip, "ping") == "PONG")
            sess = probe.RedisSession(mk, lan.service_ip, 6379, interval=0.005).start()
            time.sleep(0.3)
            before = len(sess.acked)
            c = podman.container(name)
            meta = podman.metadata(name)
            t0 = time.monotonic()
            ck = runc.checkpoint(c, tmp_path / "img", leave_stopped=True, tcp_established=True)
            h = net.TcpHandoff(f"{lan.service_ip}/32", (tb.ns_a, lan.dev), (tb.ns_b, lan.dev),
                               dev=lan.svc_dev, mac=lan.svc_mac)
            lock = h.prepare_destination(dump_log=ck.log)
            arch = podman.write_archive(tmp_path / "ckpt.tar", ck.images_dir, meta,
                                        netns=tb.ns_b, runtime=runtime)
            subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True,
                           timeout=60, check=True)
            podman.restore_archive(arch, tcp_established=True, runtime=runtime)
            total = time.monotonic() - t0
            pid = runc.pids_of(podman.container(name))[0]
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{tb.ns_b}").st_ino
            assert not net.network_lock_of(tb.ns_b)
            assert h.commit() == lock.rules
            deadline = time.monotonic() + 10
            while (len(sess.acked) < before + 50 and sess.error is None
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            sess.stop()
            assert sess.error is None, f"the client's connection broke: {sess.error!r}"
            assert len(sess.acked) >= before + 50
            assert sess.verify(mk()) == []
        finally:
            if sess is not None:
                sess.stop()
            subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True, timeout=60)
        print(f"\npodman archive + tcp: client gap {sess.gap_s * 1000:.0f} ms, dump to running "
              f"at B {total * 1000:.0f} ms (podman rm + restore --import included)")
