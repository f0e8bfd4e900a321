"""Containers through ``statesync.migrate`` and ``statesync receive``.

A runc container (redis-server, in host A's network namespace of a Testbed with a
ServiceLan: a client namespace on a bridge shared with both hosts, a service IP on a
macvlan) is migrated A -> B with pre-copy by the engine: runc checkpoint left stopped at
the switch-over, the images assembled at B, ``runc restore`` left stopped until COMMIT.
With ``tcp_established`` a client holding ONE connection keeps it; faults (restore
fails at B, the migration link drops at the switch-over) roll back to a local restore
on A that keeps the connection too. Real runc, CRIU, namespaces (root).
"""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from test_containers import _redis_args, _wait_redis, lan, rootfs  # noqa: F401 (fixtures)

from statesync.containers import net, probe, runc
from statesync.errors import MigrationError

SECRET = b"containers-migrate-test-secret-0123456789"


# --------------------------------------------------------------------------- pure parts


def test_criu_opts_are_checked_and_become_config_lines():
    from statesync.migration import target
    assert target.check_criu_opts(["--shell-job", "--ghost-limit=10M"]) == [
        "--shell-job", "--ghost-limit=10M"]
    for bad in (["shell-job"], ["-j"], ["--x y"]):
        with pytest.raises(ValueError, match="--name"):
            target.check_criu_opts(bad)
    assert target._criu_conf_lines(["--shell-job", "--ghost-limit=10M"]) == [
        "shell-job", "ghost-limit 10M"]


def test_network_lock_travels_as_json():
    from statesync.migration import target
    lock = net.NetworkLock(iptables=["-A INPUT -s 1.2.3.4 -j DROP"],
                           nft_tables=[("inet", "CRIU-1", "table inet CRIU-1 {}")],
                           chains={"v4": ["CRIU"]})
    import json
    back = target._lock_from_json(json.loads(json.dumps(target._lock_to_json(lock))))
    assert back == lock


def test_targets_refuse_contradictions_in_one_line():
    from statesync.migration import target, target_dest
    with pytest.raises(ValueError, match="not both"):
        target.source_target(1, "runc:x")
    with pytest.raises(ValueError, match="containers"):
        target.source_target(1, service_ip="10.0.0.1")
    with pytest.raises(ValueError, match="not both"):
        target.source_target("runc:x", "runc:y")
    with pytest.raises(MigrationError, match="upgrade statesync") as ei:
        target_dest.dest_target({"target": {"kind": "vm"}}, None, "/nonexistent", "s")
    assert "\n" not in str(ei.value)
    with pytest.raises(MigrationError, match="--rootfs"):
        target_dest.dest_target({"target": {"kind": "runc", "name": "x", "spec": {}}},
                                target_dest.DestOptions(), "/nonexistent", "s")
    d = target_dest.dest_target({"criu_opts": ["--file-locks"], "tcp_established": True},
                                None, "/nonexistent", "s")
    assert d.restore_args() == ["--tcp-established", "--file-locks"]


def test_cli_migrate_names_what_is_wrong_in_one_line(tmp_path):
    import sys
    env = dict(os.environ, STATESYNC_SECRET="0123456789abcdef0123456789")
    for args, rc, want in (
            ([], 2, "nothing to migrate"),
            (["runc:no-such-ctr@" + str(tmp_path)], 1, "no runc container under"),
            (["runc:x", "--criu-opt=shell-job"], 2, "--name or --name=value"),
            (["runc:x", "--pid", "1"], 2, "not both")):
        r = subprocess.run([sys.executable, "-m", "statesync", "migrate", *args, "--to",
                            "127.0.0.1:1"], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == rc, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and want in lines[0], (args, r.stderr)


# --------------------------------------------------------------------------- real runc


class _Dest:
    """``statesync receive`` in host B's namespace, restoring containers under their own
    runc root (both "hosts" share this machine's /run)."""

    def __init__(self, tb, rootfs_dir, tmp_path):
        self.tb = tb
        self.rootfs = rootfs_dir
        self.root = os.path.join(tb.root, "runc-b")
        self.secret = os.path.join(tb.root, "secret")
        fd = os.open(self.secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb") as f:
            f.write(SECRET)
        self.p = None
        self.port = None

    def start(self, name, env=None, io_timeout=5.0, netns=None):
        self.port = self.tb.free_port("b")
        e = dict(os.environ)
        e.update(env or {})
        self.p = self.tb.python("b", [
            "receive", "--listen", f"{self.tb.addr_b}:{self.port}", "--images-dir",
            self.tb.dir_b, "--secret-file", self.secret, "--io-timeout", str(io_timeout),
            "--rootfs", self.rootfs, "--container-root", self.root, "--container-name", name,
            "--no-preflight"] + (["--container-netns", netns] if netns else []),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
        self.tb.wait_port("b", self.port, proc=self.p)
        return self

    @property
    def addr(self):
        return f"{self.tb.addr_b}:{self.port}"

    def finish(self, timeout=30):
        out, err = self.p.communicate(timeout=timeout)
        return self.p.returncode, out, err

    def cleanup(self):
        for n in runc.list_names(self.root):
            runc.delete(runc.Container(n, self.root))


@pytest.fixture
def cbed(lan, rootfs, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("STATESYNC_STATE_DIR", str(tmp_path / "state"))
    tb, lan_, names, bundles = lan
    d = _Dest(tb, rootfs, tmp_path)
    try:
        yield tb, lan_, names, bundles, d
    finally:
        if d.p is not None:
            if d.p.poll() is None:
                d.p.kill()
            try:
                _, err = d.p.communicate(timeout=10)
                print("receive:", (err or "")[-3000:])
            except (ValueError, subprocess.TimeoutExpired):
                pass
        d.cleanup()


def _start_redis(tb, lan_, names, bundles, rootfs_dir, tag, keys=2000):
    lan_.place_service("a")
    b = runc.make_bundle(os.path.join(tb.dir_a, "bundle"), rootfs_dir,
                         _redis_args(lan_.service_ip), netns=tb.ns_a)
    bundles.append(b)
    c = runc.run(b, tag)
    names.append(c.name)
    mk = lambda: lan_.socket("client")  # noqa: E731
    _wait_redis(mk, lan_.service_ip, 6379)
    s = mk()
    s.connect((lan_.service_ip, 6379))
    rd = probe._Reader(s)
    for i in range(0, keys, 500):
        s.sendall(b"".join(probe.resp(["SET", f"k{j}", "v%d" % j * 20])
                           for j in range(i, min(keys, i + 500))))
        assert [rd.reply() for _ in range(min(500, keys - i))] == [b"OK"] * min(500, keys - i)
    s.close()
    with open(os.path.join(b.rootfs, "etc/debian_version"), "a") as f:
        f.write("changed-in-container\n")
    if os.path.exists(os.path.join(b.rootfs, "etc/issue")):
        os.unlink(os.path.join(b.rootfs, "etc/issue"))      # a whiteout in the upper dir
    return b, c, mk


def _migrate(tb, ref, d, **kw):
    import statesync
    kw.setdefault("io_timeout", 5.0)
    kw.setdefault("strategy", "iterative")
    kw.setdefault("max_rounds", 3)
    return statesync.migrate(ref, d.addr, secret=SECRET, netns=tb.ns_a, **kw)


def test_runc_container_migrates_through_migrate_with_precopy(cbed, rootfs):  # noqa: F811
    """`statesync.migrate("runc:NAME")` with iterative pre-copy: the container runs at B
    (restored by `statesync receive --rootfs`, in B's namespace), every key and the
    rootfs change there; the source container is gone; the report names the tracker."""
    tb, lan_, names, bundles, d = cbed
    tag = f"ssct{os.getpid()}m"
    b, c, mk = _start_redis(tb, lan_, names, bundles, rootfs, tag)
    src_pid = runc.pids_of(c)[0]
    import statesync
    with pytest.raises(ValueError, match="lazy switch-over"):
        statesync.Migration(f"runc:{c.name}", "127.0.0.1:1", strategy="hybrid", secret=SECRET)
    d.start(tag + "b")
    rep = _migrate(tb, f"runc:{c.name}", d, service_ip=f"{lan_.service_ip}/32")
    rc, out, err = d.finish()
    assert rc == 0, err[-2000:]
    assert rep.ok and rep.rounds and rep.switchover == "full"
    assert rep.tracker in ("uffd", "hash")
    assert not os.path.exists(f"/proc/{src_pid}") or runc._dead(src_pid)
    assert not runc.exists(c)
    restored = runc.Container(tag + "b", d.root)
    pid = runc.pids_of(restored)[0]
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{tb.ns_b}").st_ino
    s = mk()
    s.settimeout(5)
    s.connect((lan_.service_ip, 6379))
    got = probe.command(s, "MGET", *[f"k{j}" for j in range(2000)])
    s.close()
    assert got == [b"v%d" % j * 20 for j in range(2000)]
    st = runc.state(restored)
    with open(os.path.join(st["bundle"], "rootfs", "etc/debian_version")) as f:
        assert f.read().endswith("changed-in-container\n")
    assert not os.path.exists(os.path.join(st["bundle"], "rootfs", "etc/issue"))
    assert os.path.exists(os.path.join(rootfs, "etc/issue"))      # the lower is untouched
    print(f"\nrunc container via migrate: downtime {rep.downtime_s * 1e3:.0f} ms, "
          f"{len(rep.rounds)} rounds, tracker {rep.tracker}; phases "
          + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in rep.phases.items())
          + "; " + "; ".join(n for n in rep.notes if "steps" in n))


@pytest.mark.parametrize("network_lock", ["iptables", "nftables"])
def test_tcp_client_keeps_one_connection_through_migrate(cbed, rootfs, criu_ok,  # noqa: F811
                                                         network_lock):
    """A client in the client namespace holds ONE connection doing SET+GET every 5 ms
    while `statesync.migrate(..., tcp_established=True, service_ip=...)` moves the runc
    container A -> B with pre-copy, with CRIU's iptables rules or its nftables table as
    the lock: no reset, every acknowledged write present, gap measured from the client;
    no lock left on either host."""
    from conftest import find_program, require
    if network_lock == "nftables":
        require(criu_ok.features.get("network_lock_nftables"), "CRIU lacks network-lock nftables")
        require(find_program("nft"), "nft missing (scripts/setup-system.sh)")
    tb, lan_, names, bundles, d = cbed
    tag = f"ssct{os.getpid()}t"
    b, c, mk = _start_redis(tb, lan_, names, bundles, rootfs, tag)
    d.start(tag + "b")
    sess = probe.RedisSession(mk, lan_.service_ip, 6379, interval=0.005, timeout=10.0).start()
    try:
        time.sleep(0.3)
        before = len(sess.acked)
        assert before > 10 and sess.error is None
        rep = _migrate(tb, f"runc:{c.name}", d, tcp_established=True,
                       service_ip=f"{lan_.service_ip}/32", network_lock=network_lock)
        deadline = time.monotonic() + 10
        while len(sess.acked) < before + 100 and sess.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sess.stop()
    rc, out, err = d.finish()
    assert rc == 0, err[-2000:]
    assert sess.error is None, f"the client's connection broke: {sess.error!r}"
    assert len(sess.acked) >= before + 100
    assert sess.verify(mk()) == []
    assert not net.network_lock_of(tb.ns_a), rep.notes
    assert not net.network_lock_of(tb.ns_b), rep.notes
    pid = runc.pids_of(runc.Container(tag + "b", d.root))[0]
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{tb.ns_b}").st_ino
    print(f"\nrunc+tcp via migrate ({network_lock} lock): client gap "
          f"{sess.gap_s * 1e3:.0f} ms, engine downtime {rep.downtime_s * 1e3:.0f} ms, "
          f"{len(sess.acked)} writes acked, "
          f"{len(rep.rounds)} rounds ({rep.tracker}); phases "
          + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in rep.phases.items()))


def _assert_rolled_back(tb, lan_, c, sess, before, mk):
    deadline = time.monotonic() + 10
    while len(sess.acked) < before + 50 and sess.error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    sess.stop()
    assert sess.error is None, f"the client's connection broke: {sess.error!r}"
    assert len(sess.acked) >= before + 50
    assert sess.verify(mk()) == []
    pid = runc.pids_of(c)[0]        # restored on A under its own name
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{tb.ns_a}").st_ino
    assert not net.network_lock_of(tb.ns_a) and not net.network_lock_of(tb.ns_b)


def test_fault_destination_restore_fails_keeps_service_and_connection(cbed, rootfs):  # noqa: F811
    """The restore at B fails (after the lock and the IP reached B): B undoes its part,
    the source kills its frozen container and restores it locally from the dump: the
    service keeps running on A and the client's ONE connection survives."""
    tb, lan_, names, bundles, d = cbed
    tag = f"ssct{os.getpid()}f"
    b, c, mk = _start_redis(tb, lan_, names, bundles, rootfs, tag, keys=500)
    d.start(tag + "b", env={"STATESYNC_TEST_FAULT": "dest:restore:fail"})
    sess = probe.RedisSession(mk, lan_.service_ip, 6379, interval=0.005, timeout=10.0).start()
    try:
        time.sleep(0.3)
        before = len(sess.acked)
        with pytest.raises(MigrationError) as ei:
            _migrate(tb, f"runc:{c.name}", d, tcp_established=True,
                     service_ip=f"{lan_.service_ip}/32")
        assert ei.value.report.source_resumed
        assert "\n" not in str(ei.value).strip()
        _assert_rolled_back(tb, lan_, c, sess, before, mk)
    finally:
        sess.stop()
    d.finish()
    assert runc.list_names(d.root) == []
    print(f"\nrestore fails at B: client gap {sess.gap_s * 1e3:.0f} ms")


def test_fault_link_drops_at_switchover_keeps_service_and_connection(cbed, rootfs):  # noqa: F811
    """The migration link (the A-B veth) goes down right after the dump: the source
    aborts within its io_timeout and restores the container locally: the service runs
    on A and the client's ONE connection survives."""
    tb, lan_, names, bundles, d = cbed
    tag = f"ssct{os.getpid()}l"
    b, c, mk = _start_redis(tb, lan_, names, bundles, rootfs, tag, keys=500)
    d.start(tag + "b", io_timeout=2.0)
    sess = probe.RedisSession(mk, lan_.service_ip, 6379, interval=0.005, timeout=15.0).start()

    def on_event(ev):
        if ev.get("event") == "phase" and ev.get("phase") == "final transfer":
            tb.set_link(False)
    try:
        time.sleep(0.3)
        before = len(sess.acked)
        with pytest.raises(MigrationError) as ei:
            _migrate(tb, f"runc:{c.name}", d, tcp_established=True, io_timeout=2.0,
                     service_ip=f"{lan_.service_ip}/32", progress=on_event)
        assert ei.value.report.source_resumed
        tb.set_link(True)
        _assert_rolled_back(tb, lan_, c, sess, before, mk)
    finally:
        tb.set_link(True)
        sess.stop()
    print(f"\nlink drop at switch-over: client gap {sess.gap_s * 1e3:.0f} ms, failed in "
          f"{ei.value.phase}")



def test_criu_opts_reach_dump_and_restore(cbed, rootfs):  # noqa: F811
    """``criu_opts=["--file-locks"]`` goes to the source's dump AND, through BEGIN, to
    the destination's restore: a container holding a flock (CRIU refuses to dump it
    without the option) is migrated, and at B the restored process holds the lock."""
    tb, lan_, names, bundles, d = cbed
    tag = f"ssct{os.getpid()}k"
    b = runc.make_bundle(os.path.join(tb.dir_a, "bundle"), rootfs,
                         ["flock", "/lockfile", "sleep", "100000"], netns=tb.ns_a)
    bundles.append(b)
    c = runc.run(b, tag)
    names.append(c.name)
    deadline = time.monotonic() + 5
    while len(runc.pids_of(c)) < 2:
        assert time.monotonic() < deadline, "flock did not start its child"
        time.sleep(0.02)
    d.start(tag + "b")
    rep = _migrate(tb, f"runc:{c.name}", d, criu_opts=["--file-locks"], strategy="precopy")
    rc, _, err = d.finish()
    assert rc == 0 and rep.ok, err[-2000:]
    pids = set(runc.pids_of(runc.Container(tag + "b", d.root)))
    with open("/proc/locks") as f:
        holders = {int(ln.split()[4]) for ln in f if " FLOCK " in ln}
    assert pids & holders, (pids, holders)


def test_podman_container_migrates_with_precopy(cbed, rootfs):  # noqa: F811
    """``statesync.migrate("podman:NAME")`` with pre-copy (hash tracker: podman's
    seccomp profile denies userfaultfd, and the report says so): at the destination
    `podman container restore --import` of the archive statesync assembled, left
    stopped until COMMIT; `podman ps` shows it running there with every key."""
    from conftest import find_program, require
    from test_containers_podman import IMAGE, _exec, _fill, _wait
    require(find_program("podman"), "podman missing (scripts/setup-system.sh)")
    r = subprocess.run(["bash", os.path.join(os.path.dirname(__file__), "..", "scripts",
                                             "build-rootfs.sh"), "--podman", IMAGE],
                       capture_output=True, text=True, timeout=600)
    require(r.returncode == 0, f"build-rootfs.sh --podman failed: {r.stderr.strip()[-300:]}")
    from statesync.containers import podman
    tb, lan_, names, bundles, d = cbed
    name = f"ssct{os.getpid()}p"
    conf = os.path.join(tb.root, "criu.conf")
    open(conf, "w").close()
    r = subprocess.run(["podman", "run", "-d", *podman.PODMAN_RUN_ARGS, "--network",
                        f"ns:/run/netns/{tb.ns_a}", "--annotation", f"org.criu.config={conf}",
                        "--name", name, IMAGE, "redis-server", "--save", "", "--appendonly",
                        "no", "--protected-mode", "no"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    stopped_at_commit = []

    def on_event(ev):
        if ev.get("event") == "phase" and ev.get("phase") == "commit":
            pid = int(podman.inspect(name + "b")["State"]["Pid"])
            with open(f"/proc/{pid}/stat") as f:
                stopped_at_commit.append(f.read().rsplit(")", 1)[1].split()[0])
    try:
        _wait(lambda: _exec(name, "redis-cli", "ping") == "PONG")
        _fill(name, 2000)
        # file system changes: one file modified, one deleted
        assert subprocess.run(["podman", "exec", name, "sh", "-c",
                               "echo changed >> /etc/debian_version && rm /etc/issue"],
                              capture_output=True, timeout=30).returncode == 0
        d.start(name + "b", netns=f"/run/netns/{tb.ns_b}")
        rep = _migrate(tb, f"podman:{name}", d, progress=on_event)
        rc, _, err = d.finish()
        assert rc == 0 and rep.ok, err[-2000:]
        assert rep.tracker == "hash" and any("seccomp" in n for n in rep.notes), rep.notes
        assert stopped_at_commit == ["T"] or stopped_at_commit == ["t"], stopped_at_commit
        ps = subprocess.run(["podman", "ps", "--filter", "status=running", "--format",
                             "{{.Names}}"], capture_output=True, text=True, timeout=30).stdout
        assert name + "b" in ps.split(), ps
        assert name not in ps.split(), ps
        assert _exec(name + "b", "redis-cli", "get", "key1999") == "value1999"
        assert _exec(name + "b", "redis-cli", "dbsize") == "2000"
        assert _exec(name + "b", "tail", "-n", "1", "/etc/debian_version") == "changed"
        assert subprocess.run(["podman", "exec", name + "b", "test", "-e", "/etc/issue"],
                              capture_output=True, timeout=30).returncode == 1
        print(f"\npodman via migrate: downtime {rep.downtime_s * 1e3:.0f} ms, "
              f"{len(rep.rounds)} rounds ({rep.tracker})")
    finally:
        for n in (name, name + "b"):
            subprocess.run(["podman", "rm", "-f", "-t", "0", n], capture_output=True, timeout=60)


def test_iperf3_test_running_across_migrate(cbed, rootfs):  # noqa: F811
    """MOSE's first service through the engine: an iperf3 server in a runc container, a
    client in the client namespace with a test RUNNING (control + data connection)
    while `statesync.migrate(..., tcp_established=True, service_ip=...)` moves the
    container A -> B with pre-copy: the test finishes against B, every byte sent
    received."""
    import json
    from conftest import find_program, require
    tb, lan_, names, bundles, d = cbed
    require(find_program("iperf3"), "iperf3 missing on the host (scripts/setup-system.sh)")
    require(os.path.exists(os.path.join(rootfs, "usr/bin/iperf3")), "rootfs lacks iperf3")
    lan_.place_service("a")
    tag = f"ssci{os.getpid()}m"
    b = runc.make_bundle(os.path.join(tb.dir_a, "bundle"), rootfs,
                         ["iperf3", "-s", "-B", lan_.service_ip, "-p", "5201"], netns=tb.ns_a)
    bundles.append(b)
    c = runc.run(b, tag)
    names.append(c.name)
    deadline = time.monotonic() + 10
    ss = net.in_netns(tb.ns_a, ["ss", "-Hltn", "sport", "=", ":5201"])
    while "5201" not in subprocess.run(ss, capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline, "iperf3 server not listening"
        time.sleep(0.05)
    d.start(tag + "b")
    client = subprocess.Popen(net.in_netns(lan_.ns_client, [
        "iperf3", "-c", lan_.service_ip, "-p", "5201", "-t", "4", "-b", "40M", "-J",
        "--connect-timeout", "3000"]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        assert client.poll() is None, client.communicate()
        rep = _migrate(tb, f"runc:{c.name}", d, tcp_established=True,
                       service_ip=f"{lan_.service_ip}/32")
        out, err = client.communicate(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    rc, _, derr = d.finish()
    assert rc == 0 and rep.ok, derr[-2000:]
    assert client.returncode == 0, f"iperf3 client failed: {err.strip()[-300:]} {out[-300:]}"
    res = json.loads(out)
    assert "error" not in res, res.get("error")
    sent = res["end"]["sum_sent"]["bytes"]
    received = res["end"]["sum_received"]["bytes"]
    assert sent > 0 and received == sent, (sent, received)
    print(f"\niperf3 across migrate: {sent} bytes sent = received, engine downtime "
          f"{rep.downtime_s * 1e3:.0f} ms")


def test_source_agent_killed_after_final_supervisor_restores_container(cbed, rootfs):  # noqa: F811
    """`statesync migrate runc:NAME --tcp-established --service-ip IP` is SIGKILLed right
    after FINAL (the destination restores its stopped copy): the source's supervisor
    puts the service IP back, kills the frozen container and restores it from the dump
    here (never SIGCONT), and tells B to drop its copy: the service runs on A only and
    the client's ONE connection survives with every write."""
    tb, lan_, names, bundles, d = cbed
    tag = f"ssct{os.getpid()}s"
    b, c, mk = _start_redis(tb, lan_, names, bundles, rootfs, tag, keys=500)
    d.start(tag + "b")
    sess = probe.RedisSession(mk, lan_.service_ip, 6379, interval=0.005, timeout=15.0).start()
    env = dict(os.environ, STATESYNC_TEST_FAULT="source:after_final:kill")
    try:
        time.sleep(0.3)
        before = len(sess.acked)
        src = tb.python("a", ["migrate", f"runc:{c.name}", "--to", d.addr, "--secret-file",
                              d.secret, "--strategy", "iterative", "--io-timeout", "5",
                              "--calibration", "", "--quiet", "--tcp-established",
                              "--service-ip", f"{lan_.service_ip}/32"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        src.wait(60)
        assert src.returncode == -9, src.stderr.read().decode()[-2000:]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if runc.list_names(d.root) == [] and not net.network_lock_of(tb.ns_a) \
                    and runc.exists(c) and len(sess.acked) > before + 50:
                break
            time.sleep(0.1)
        _assert_rolled_back(tb, lan_, c, sess, before, mk)
        assert runc.list_names(d.root) == []
    finally:
        sess.stop()
    print(f"\nsource agent killed after FINAL: client gap {sess.gap_s * 1e3:.0f} ms")


def test_destination_agent_killed_in_restore_cleans_up_and_keeps_connection(
        cbed, rootfs):  # noqa: F811
    """The destination agent is SIGKILLed in its restore, after the lock copy and the
    service IP reached B: the source rolls back locally, B's supervisor takes the IP and
    the lock copy away and removes the bundle: the service runs on A only and the
    client's ONE connection survives. (Killed after RESTORED, the source has decided
    COMMIT: that is IN DOUBT, tests/test_handoff.py's ground.)"""
    tb, lan_, names, bundles, d = cbed
    tag = f"ssct{os.getpid()}d"
    b, c, mk = _start_redis(tb, lan_, names, bundles, rootfs, tag, keys=500)
    d.start(tag + "b", env={"STATESYNC_TEST_FAULT": "dest:restore:kill"})
    sess = probe.RedisSession(mk, lan_.service_ip, 6379, interval=0.005, timeout=15.0).start()
    try:
        time.sleep(0.3)
        before = len(sess.acked)
        with pytest.raises(MigrationError) as ei:
            _migrate(tb, f"runc:{c.name}", d, tcp_established=True,
                     service_ip=f"{lan_.service_ip}/32")
        assert ei.value.report.source_resumed
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if runc.list_names(d.root) == [] and not net.network_lock_of(tb.ns_b):
                break
            time.sleep(0.1)
        assert not subprocess.run(net.in_netns(tb.ns_b, ["ip", "link", "show", lan_.svc_dev]),
                                  capture_output=True).returncode == 0, "B kept the service IP"
        _assert_rolled_back(tb, lan_, c, sess, before, mk)
        assert runc.list_names(d.root) == []
    finally:
        sess.stop()
    print(f"\ndestination agent killed in its restore: client gap {sess.gap_s * 1e3:.0f} ms")


def test_bare_process_tcp_rollback_restores_locally_keeping_connection(cbed, rootfs):  # noqa: F811
    """A bare redis-server (own pid namespace, in host A's namespace, listening on A's
    LAN address) with ONE client connection is migrated with ``tcp_established=True``;
    B cannot restore it (A's address does not exist there): the source kills its frozen
    tree and restores it from the dump here (never SIGCONT): the connection survives."""
    from conftest import find_program, require
    from statesync.testing.services import _find_process
    require(find_program("redis-server"), "redis-server missing (scripts/setup-system.sh)")
    tb, lan_, names, bundles, d = cbed
    port = 6390
    p = subprocess.Popen(net.in_netns(tb.ns_a, [
        "unshare", "-p", "-f", "setsid", find_program("redis-server"),
        "--port", str(port), "--bind", lan_.host_a, "--save", "", "--appendonly", "no",
        "--protected-mode", "no", "--daemonize", "no", "--logfile", ""]),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    pid = None
    sess = None
    try:
        mk = lambda: lan_.socket("client")  # noqa: E731
        _wait_redis(mk, lan_.host_a, port)
        pid = _find_process(p.pid, "redis-server")
        assert pid
        d.start("unused")
        sess = probe.RedisSession(mk, lan_.host_a, port, interval=0.005, timeout=10.0).start()
        time.sleep(0.3)
        before = len(sess.acked)
        with pytest.raises(MigrationError) as ei:
            _migrate(tb, pid, d, tcp_established=True, switchover="full")
        rep = ei.value.report
        assert rep.source_resumed and any("rolled back" in n for n in rep.notes), rep.notes
        import re
        pid = int(re.search(r"as pid (\d+)", " ".join(rep.notes)).group(1))   # restored
        deadline = time.monotonic() + 10
        while len(sess.acked) < before + 50 and sess.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        sess.stop()
        assert sess.error is None, f"the client's connection broke: {sess.error!r}"
        assert len(sess.acked) >= before + 50
        assert sess.verify(mk()) == []
        print(f"\nbare process tcp rollback: client gap {sess.gap_s * 1e3:.0f} ms")
    finally:
        if sess is not None:
            sess.stop()
        if pid:
            from statesync.migration.supervisor import kill_tree
            kill_tree(pid)
        if p.poll() is None:
            os.killpg(p.pid, 9)
        p.wait()


def test_link_down_before_commit_resolved_commit_lifts_lock(cbed, rootfs,  # noqa: F811
                                                            monkeypatch):
    """The A-B link goes down after RESTORED, as the source decides COMMIT: COMMIT does
    not reach B in time, B holds its stopped, locked copy; the source, IN DOUBT, asks
    again once the link is back (RESOLVE commit): B resumes the container AND lifts its
    lock copy: the client's ONE connection goes on against B."""
    tb, lan_, names, bundles, d = cbed
    tag = f"ssct{os.getpid()}r"
    b, c, mk = _start_redis(tb, lan_, names, bundles, rootfs, tag, keys=500)
    marker = os.path.join(tb.root, "fault-marker")
    d.start(tag + "b", io_timeout=2.0)
    monkeypatch.setenv("STATESYNC_TEST_FAULT", "source:after_restored:hold")
    monkeypatch.setenv("STATESYNC_TEST_FAULT_FILE", marker)
    sess = probe.RedisSession(mk, lan_.service_ip, 6379, interval=0.005, timeout=20.0).start()
    box = {}

    def run():
        try:
            box["rep"] = _migrate(tb, f"runc:{c.name}", d, tcp_established=True,
                                  io_timeout=2.0, service_ip=f"{lan_.service_ip}/32")
        except BaseException as exc:  # noqa: BLE001 - checked below
            box["exc"] = exc
    import threading
    t = threading.Thread(target=run)
    try:
        time.sleep(0.3)
        before = len(sess.acked)
        t.start()
        deadline = time.monotonic() + 30
        while not os.path.exists(marker):
            assert time.monotonic() < deadline, "the source never got RESTORED"
            time.sleep(0.01)
        tb.set_link(False)
        os.unlink(marker)
        time.sleep(4.0)
        tb.set_link(True)
        t.join(60)
        assert "exc" not in box, box.get("exc")
        rc, _, err = d.finish(60)
        assert "resolved_after_reconnect" in err, err[-2000:]
        deadline = time.monotonic() + 10
        while len(sess.acked) < before + 100 and sess.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        sess.stop()
        assert sess.error is None, f"the client's connection broke: {sess.error!r}"
        assert len(sess.acked) >= before + 100
        assert sess.verify(mk()) == []
        assert not net.network_lock_of(tb.ns_b) and not net.network_lock_of(tb.ns_a)
        assert not runc.exists(c) and runc.list_names(d.root) == [tag + "b"]
    finally:
        tb.set_link(True)
        sess.stop()
        t.join(60)
    print(f"\nlink down before COMMIT, resolved commit: client gap {sess.gap_s * 1e3:.0f} ms")
