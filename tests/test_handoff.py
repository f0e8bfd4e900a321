"""Exactly-once switch-over (docs/migrate.md, issue 10), for real: two network
namespaces, real CRIU, the agents as the `statesync` command, faults injected at each
phase boundary with STATESYNC_TEST_FAULT (statesync.migration.common.fault).

After every fault: exactly one copy of the workload runs (none left stopped), with
the checksum it had at the freeze; nothing of the dump is left in /dev/shm; the
destination keeps no image set of an aborted session.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from conftest import find_program, have_root, require
from statesync import proc

SECRET = b"statesync-handoff-secret-0123456"
IO = 2.0       # io_timeout of both agents: budget = IO + 4 s, resolve window = 3 * IO


def _prereqs():
    require(have_root(), "needs root (namespaces, ptrace, CRIU)")
    for prog in ("ip", "tc", "nsenter", "unshare", "setpriv"):
        require(find_program(prog), f"{prog} not installed (scripts/setup-system.sh)")


class Bed:
    def __init__(self, tb, tmp):
        self.tb = tb
        self.tmp = str(tmp)
        self.state = os.path.join(self.tmp, "state")
        self.secret_file = os.path.join(tb.root, "secret")
        fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, SECRET)
        os.close(fd)
        self.marker = os.path.join(self.tmp, "fault-marker")
        self.port = tb.free_port("b")
        self.dest = None
        self.src = None
        self.wl = None
        self.extra = []

    def env(self, fault=None):
        env = dict(os.environ, STATESYNC_STATE_DIR=self.state,
                   STATESYNC_TEST_FAULT_FILE=self.marker)
        env.pop("STATESYNC_TEST_FAULT", None)
        if fault:
            env["STATESYNC_TEST_FAULT"] = fault
        return env

    def start_dest(self, fault=None, **kw):
        self.dest = self.tb.python("b", ["receive", "--listen", f"{self.tb.addr_b}:{self.port}",
                                         "--images-dir", self.tb.dir_b, "--secret-file",
                                         self.secret_file, "--io-timeout", str(IO)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env=self.env(fault), **kw)
        self.tb.wait_port("b", self.port, proc=self.dest)
        return self.dest

    def spawn(self, **kw):
        from statesync.testing import workloads
        kw.setdefault("paused", True)
        self.wl = workloads.spawn(size=kw.pop("size", "4M"), rate=kw.pop("rate", 200.0),
                                  own_pidns=True, netns=self.tb.ns_a,
                                  control=f"@ssh-test-{os.getpid()}-{time.monotonic_ns()}", **kw)
        self.sum0 = self.client("a").checksum()
        return self.wl

    def start_source(self, fault=None, strategy="iterative", pid=None, switchover="auto"):
        self.src = self.tb.python("a", ["migrate", "--pid", str(pid or self.wl.pid), "--to",
                                        f"{self.tb.addr_b}:{self.port}", "--secret-file",
                                        self.secret_file, "--strategy", strategy,
                                        "--switchover", switchover,
                                        "--io-timeout", str(IO), "--calibration", "",
                                        "--quiet"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=self.env(fault))
        return self.src

    def wait_marker(self, timeout=60):
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.marker):
            assert time.monotonic() < deadline, "the fault point was never reached"
            assert self.src is None or self.src.poll() is None or os.path.exists(self.marker), \
                self.src.stderr.read().decode()[-2000:]
            time.sleep(0.01)

    def release(self):
        os.unlink(self.marker)

    def client(self, side):
        from statesync.testing.workloads import WorkloadClient
        return WorkloadClient(self.wl.control, netns=self.tb.ns(side))

    def copies(self):
        """(pid, side, state) of every process of the workload (our control name)."""
        from statesync.testing.workloads import copies
        out = []
        ns_b = os.stat(f"/run/netns/{self.tb.ns_b}").st_ino
        for pid in copies(self.wl.control):
            try:
                ino = os.stat(f"/proc/{pid}/ns/net").st_ino
            except OSError:
                continue
            st = proc.state(pid)
            if st not in (None, "Z", "X"):
                out.append((pid, "b" if ino == ns_b else "a", st))
        return out

    def wait_one_copy(self, timeout=40.0):
        """Wait until exactly one copy runs and none is stopped; return its side."""
        deadline = time.monotonic() + timeout
        while True:
            c = self.copies()
            if len(c) == 1 and c[0][2] not in ("T", "t"):
                return c[0][1]
            assert time.monotonic() < deadline, f"copies after the fault: {c}"
            time.sleep(0.1)

    def dumps_left(self):
        return [n for n in os.listdir("/dev/shm") if n.startswith("statesync-dump-")
                and self.src is not None and f"-a{self.src.pid}-" in n
                or n.startswith("statesync-dump-a") and f"-{self.wl.pid}-" in n]

    def close(self):
        for p in (self.src, self.dest, *self.extra):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        for pid, _, _ in (self.copies() if self.wl else []):
            proc.kill_tree([pid])
        if self.wl:
            self.wl.kill()
        _kill_supervisors(self.state)


def _kill_supervisors(state_dir):
    """Supervisors that a test left (ours only: their argv names our state dir)."""
    from statesync.testing.workloads import processes_with
    for pid in processes_with(state_dir.encode(), contains=b"supervisor"):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def bed(tmp_path, criu_ok, monkeypatch):
    _prereqs()
    from statesync.testing.testbed import Testbed
    monkeypatch.setenv("STATESYNC_STATE_DIR", str(tmp_path / "state"))
    with Testbed("1gbit") as tb:
        b = Bed(tb, tmp_path)
        try:
            yield b
        finally:
            b.close()


def _finish(bed, expect_side=None, timeout=40.0):
    side = bed.wait_one_copy(timeout)
    if expect_side:
        assert side == expect_side, f"the service runs on {side}, expected {expect_side}"
    c = bed.client(side)
    assert c.checksum() == bed.sum0, "the surviving copy's state differs from the freeze"
    c.resume()
    s0 = c.status()["seq"]
    deadline = time.monotonic() + 3
    while c.status()["seq"] == s0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.status()["seq"] > s0, "the surviving copy does not run"
    # The supervisors finish their work: no dump left, no stopped copy, no image set
    # of a session that is over.
    deadline = time.monotonic() + 20
    while bed.dumps_left() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert bed.dumps_left() == []
    return side


# --------------------------------------------------------------------------- agent deaths


# (fault point, where the service must end up)
SOURCE_KILLS = [
    ("source:round0", "a"),
    ("source:dump", "a"),
    ("source:frozen", "a"),
    ("source:final_transfer", "a"),
    ("source:after_final", "a"),
    ("source:after_restored", "a"),
    ("source:after_commit", "b"),
]


@pytest.mark.parametrize("point,side", SOURCE_KILLS)
def test_source_agent_killed(bed, point, side):
    bed.start_dest()
    bed.spawn()
    src = bed.start_source(f"{point}:kill")
    src.wait(60)
    assert src.returncode == -signal.SIGKILL, src.stderr.read().decode()[-2000:]
    _finish(bed, side)
    if side == "a":
        # The destination dropped whatever it had; its agent (one migration) ended.
        assert bed.dest.wait(30) in (0, 1)
        assert [n for n in os.listdir(bed.tb.dir_b)] == []


def test_source_agent_killed_in_a_later_round(bed):
    bed.start_dest()
    bed.spawn(paused=False, rate=2000.0, size="8M")
    src = bed.start_source("source:round1:kill")
    src.wait(60)
    side = bed.wait_one_copy()
    assert side == "a" or src.returncode == 0


# (fault point, switch-over, where the service ends up). A lazy restore killed with its
# agent after COMMIT but before its lazy-pages daemon placed every page cannot run (the
# missing pages would read as zeros): the supervisor drops it and the source, which
# keeps its frozen copy until RESUMED (sent after the fill), resumes. After the fill
# (dest:after_resumed) the restored copy is complete and runs.
DEST_KILLS = [
    ("dest:restore", "lazy", "a"),
    ("dest:after_restored", "lazy", "a"),
    ("dest:commit_received", "lazy", "a"),
    ("dest:after_resumed", "lazy", "b"),
    ("dest:restore", "full", "a"),
    ("dest:commit_received", "full", "b"),
    ("dest:after_resumed", "full", "b"),
]


@pytest.mark.parametrize("point,switchover,side", DEST_KILLS)
def test_destination_agent_killed(bed, point, switchover, side):
    bed.start_dest(f"{point}:kill")
    bed.spawn()
    src = bed.start_source(switchover=switchover)
    bed.dest.wait(60)
    assert bed.dest.returncode == -signal.SIGKILL
    # A restarted destination agent (systemd would) answers the source's RESOLVE from
    # the records its dead predecessor's supervisor left.
    time.sleep(0.3)
    bed.start_dest()
    src.wait(60)
    _finish(bed, side)
    if side == "a":
        assert src.returncode != 0


# --------------------------------------------------------------------------- link faults


# (fault point, where the service must end up: None = either, decided by timing, link
# down for seconds). A short cut: TCP retransmits and the switch-over may complete; a
# cut longer than the switch-over budget (IO + 4 s) before the commit: the source
# resumes and tells the destination once the link is back.
LINK_CUTS = [
    ("source:frozen", None, 1.0),
    ("source:after_final", None, 2.5),
    ("source:after_final", "a", 8.0),
    ("source:after_commit", "b", 2.5),
    ("dest:after_restored", None, 2.5),
]


@pytest.mark.parametrize("point,side,down_s", LINK_CUTS)
def test_link_down_at_boundary(bed, point, side, down_s):
    fault = f"{point}:hold"
    bed.start_dest(fault if point.startswith("dest:") else None)
    bed.spawn()
    src = bed.start_source(None if point.startswith("dest:") else fault)
    bed.wait_marker()
    bed.tb.set_link(False)
    bed.release()
    time.sleep(down_s)
    bed.tb.set_link(True)
    src.wait(90)
    got = _finish(bed, side, timeout=60)
    assert (src.returncode == 0) == (got == "b"), src.stderr.read().decode()[-2000:]


# --------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_sighup_at_switchover_resume_the_source(bed, sig):
    bed.start_dest()
    bed.spawn()
    src = bed.start_source("source:frozen:hold")
    bed.wait_marker()
    # The agent holds the tree frozen: the signal arrives during the switch-over.
    os.kill(src.pid, sig)
    time.sleep(0.2)
    bed.release()
    src.wait(60)
    err = src.stderr.read().decode()
    assert src.returncode != 0
    assert f"interrupted by {signal.Signals(sig).name}" in err and "source runs on" in err, err
    assert "Traceback" not in err
    _finish(bed, "a")


def test_hung_source_agent_is_aborted_by_its_supervisor_at_the_deadline(bed):
    """The agent does not die but hangs (SIGSTOP) with the tree frozen: its own
    timeouts cannot fire. Its supervisor sees the record past the switch-over budget,
    aborts it under the records lock and resumes the tree. When the agent is let go
    again it finds the switch-over aborted: it does not commit, tells the destination
    to drop its copy and exits non-zero."""
    from statesync.migration import records
    bed.start_dest()
    bed.spawn()
    src = bed.start_source("source:frozen:hold")
    bed.wait_marker()
    t_frozen = time.monotonic()
    os.kill(src.pid, signal.SIGSTOP)
    try:
        # budget = IO + 4 x the downtime target, plus the supervisor's grace
        deadline = time.monotonic() + 40
        while True:
            a = [st for _, side, st in bed.copies() if side == "a"]
            if a and a[0] not in ("T", "t"):
                break
            assert time.monotonic() < deadline, f"the tree stays frozen: {bed.copies()}"
            time.sleep(0.1)
        held = time.monotonic() - t_frozen
        assert held >= IO, f"resumed after {held:.1f} s, before the budget ran out"
        assert [r["state"] for r in records.all_records(bed.state, "source")] == ["aborted"]
        assert src.poll() is None, "the agent should still be stopped"
    finally:
        os.kill(src.pid, signal.SIGCONT)
    bed.release()
    src.wait(60)
    err = src.stderr.read().decode()
    assert src.returncode != 0, err
    assert "Traceback" not in err, err
    assert "budget" in err, err
    _finish(bed, "a")


def test_forking_target_aborted_after_dump_leaves_nothing_stopped(bed):
    """A target that forks all the time: the abort resumes the whole tree as CRIU
    froze it, children forked after any earlier listing included."""
    bed.start_dest()
    code = ("import os, time\n"
            "kids = []\n"
            "while True:\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        time.sleep(0.5); os._exit(0)\n"
            "    try:\n"
            "        while os.waitpid(-1, os.WNOHANG)[0] > 0: pass\n"
            "    except ChildProcessError: pass\n"
            "    time.sleep(0.005)\n")
    target = bed.tb.popen("a", ["unshare", "-p", "-f", "setsid", sys.executable, "-c", code],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    bed.extra.append(target)
    time.sleep(1.0)
    root = proc.descendants(target.pid)[0]
    src = bed.start_source("source:frozen:fail", strategy="cold", pid=root)
    src.wait(60)
    assert src.returncode != 0
    time.sleep(0.2)
    tree = [root] + proc.descendants(root)
    stopped = [p for p in tree if proc.state(p) in ("T", "t")]
    assert len(tree) > 20 and stopped == [], f"{len(stopped)} of {len(tree)} left stopped"
    proc.kill_tree([root], target)


# --------------------------------------------------------------------------- hardening


@pytest.fixture
def request_cleanup():
    todo = []
    yield todo
    for f in todo:
        f()


def test_images_dir_of_another_user_is_refused(request_cleanup):
    """The swap attack: `nobody` pre-creates the images dir (or it is world-writable);
    the agent refuses it and writes nothing, saying how to fix it."""
    import pwd
    from statesync.errors import UnsafeDirectory
    from statesync.migration.destination import DestinationServer
    require(have_root(), "needs root (chown to nobody)")
    import pathlib
    import shutil
    import tempfile
    nobody = pwd.getpwnam("nobody").pw_uid
    # Where nobody can reach (pytest's tmp_path is private to root).
    tmp_path = pathlib.Path(tempfile.mkdtemp(prefix="ssh-swap-", dir="/dev/shm"))
    tmp_path.chmod(0o755)
    request_cleanup.append(lambda: shutil.rmtree(tmp_path, ignore_errors=True))
    d = tmp_path / "images"
    d.mkdir()
    os.chown(d, nobody, nobody)
    victim = tmp_path / "victim"
    victim.write_text("root's file")
    # As nobody: prepare a symlink that would make root overwrite the victim.
    r = subprocess.run(["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups",
                        "ln", "-s", str(victim), str(d / "inventory.img")])
    assert r.returncode == 0
    sec = tmp_path / "secret"
    sec.write_bytes(SECRET)
    sec.chmod(0o600)
    os.environ["STATESYNC_STATE_DIR"] = str(tmp_path / "state")
    try:
        with pytest.raises(UnsafeDirectory, match=r"owned by uid .*chown"):
            asyncio.run(DestinationServer("127.0.0.1:0", str(d), f"@{sec}").start())
        os.chown(d, 0, 0)
        d.chmod(0o777)
        with pytest.raises(UnsafeDirectory, match=r"writable by group/others.*chmod 700"):
            asyncio.run(DestinationServer("127.0.0.1:0", str(d), f"@{sec}").start())
    finally:
        os.environ.pop("STATESYNC_STATE_DIR", None)
    assert victim.read_text() == "root's file"


def test_image_files_are_opened_without_following_symlinks(tmp_path):
    """Inside the incoming set, a planted symlink is not followed (O_NOFOLLOW, dir fd)."""
    from statesync.migration.destination import _DestinationSession
    victim = tmp_path / "victim"
    victim.write_text("keep")
    inc = tmp_path / "inc"
    inc.mkdir(mode=0o700)
    os.symlink(victim, inc / "core-1.img")
    s = _DestinationSession.__new__(_DestinationSession)
    s.tmp_fd = os.open(inc, os.O_RDONLY | os.O_DIRECTORY)
    s.image_names = {}
    name = b"core-1.img"
    with pytest.raises(OSError):
        s._write_image_piece(struct.pack("!H", len(name)) + name + struct.pack("!Q", 0) + b"x")
    os.close(s.tmp_fd)
    assert victim.read_text() == "keep"


def test_secret_file_readable_by_others_is_refused(tmp_path):
    from statesync.errors import SecretError
    from statesync.migration.common import load_secret_checked
    f = tmp_path / "secret"
    f.write_bytes(SECRET)
    f.chmod(0o644)
    with pytest.raises(SecretError, match=r"mode 0644.*chmod 600"):
        load_secret_checked(f"@{f}")
    f.chmod(0o600)
    assert load_secret_checked(f"@{f}")


def test_demo_secret_with_whitespace_bytes_gives_one_key(tmp_path):
    """scripts/demo.py writes random bytes to the secret file; both agents must derive
    the key from that file the same way, whatever bytes begin or end it."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    try:
        import demo
    finally:
        sys.path.pop(0)
    from statesync.cli.migrate import _secret_arg
    for raw in (b" \n\t" + b"k" * 29 + b"\n ", b"\x0b" + os.urandom(30) + b"\r"):
        path = str(tmp_path / "secret")
        source_secret = demo.write_secret(path, raw)
        cli_key = _secret_arg(type("A", (), {"secret_file": path})())
        from statesync.migration import protocol as wire
        assert wire.load_secret(source_secret) == cli_key


def test_preauth_idle_connections_and_reset_peers_do_not_block_a_migration(bed):
    """300 idle unauthenticated connections (more than the agent's fd limit here) and
    peers that reset the connection: one log line each at most, no traceback, and a
    real migration right after succeeds."""
    import resource
    from statesync import migrate
    bed.start_dest(preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
    bed.spawn()
    idle = []
    for _ in range(300):
        s = bed.tb.socket("a")
        s.connect((bed.tb.addr_b, bed.port))
        idle.append(s)
    for _ in range(3):
        s = bed.tb.socket("a")
        s.connect((bed.tb.addr_b, bed.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    time.sleep(0.3)
    try:
        rep = migrate(bed.wl.pid, f"{bed.tb.addr_b}:{bed.port}", secret=SECRET,
                      netns=bed.tb.ns_a, io_timeout=IO, strategy="cold")
    except Exception:
        bed.dest.kill()
        print(bed.dest.stderr.read().decode()[-5000:])
        raise
    assert rep.ok
    assert bed.dest.wait(30) == 0
    for s in idle:
        s.close()
    err = bed.dest.stderr.read().decode()
    assert "Traceback" not in err, err[-3000:]
    assert bed.wait_one_copy() == "b"


def test_second_source_gets_destination_busy(bed):
    from statesync import migrate
    from statesync.errors import DestinationBusy
    from statesync.migration import protocol as wire
    bed.start_dest()
    bed.spawn()

    async def occupy():
        sock = bed.tb.socket("a")
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (bed.tb.addr_b, bed.port))
        r, w = await asyncio.open_connection(sock=sock)
        ch = await wire.Channel.client(r, w, SECRET, 5)
        await ch.send_json(wire.BEGIN, {"pid": 1, "page_size": 4096, "session": "occupier"})
        await ch.expect(wire.READY)
        return ch

    loop = asyncio.new_event_loop()
    try:
        ch = loop.run_until_complete(occupy())
        with pytest.raises(DestinationBusy, match="busy"):
            migrate(bed.wl.pid, f"{bed.tb.addr_b}:{bed.port}", secret=SECRET,
                    netns=bed.tb.ns_a, io_timeout=IO, strategy="cold")
        ch.close()
    finally:
        loop.close()
    assert bed.wait_one_copy() == "a"


def test_recover_resolves_an_in_doubt_source(bed):
    """The link goes down between RESTORED and COMMIT: COMMIT never arrives, RESUMED
    never comes back; neither the agent nor its supervisor can reach the destination
    within their windows: the record says IN_DOUBT and the tree stays stopped.
    `statesync recover` (link back, destination agent restarted) asks the destination
    and settles it."""
    bed.start_dest()
    bed.spawn()
    src = bed.start_source("source:after_restored:hold")
    bed.wait_marker()
    bed.tb.set_link(False)
    bed.release()
    src.wait(60)
    # The agent and then its supervisor give up: both copies stopped, records on disk.
    from statesync.migration import records
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rs = records.all_records(bed.state, "source")
        if rs and rs[0]["state"] == "in_doubt" and not any(
                records.alive(r.get("supervisor_pid")) for r in rs):
            break
        time.sleep(0.2)
    assert [r["state"] for r in records.all_records(bed.state, "source")] == ["in_doubt"]
    assert [st for _, side, st in bed.copies() if side == "a"] in (["T"], ["t"]), bed.copies()
    bed.tb.set_link(True)
    bed.dest.wait(60)
    bed.start_dest()        # the destination host's agent, restarted (systemd would)
    r = subprocess.run(bed.tb.wrap("a", [sys.executable, "-m", "statesync", "recover",
                                         "--secret-file", bed.secret_file, "--window", "20"]),
                       capture_output=True, text=True, timeout=60, env=bed.env())
    assert r.returncode == 0, r.stdout + r.stderr
    side = _finish(bed)
    assert ("killed the stopped source copy" in r.stdout) == (side == "b"), r.stdout
    assert records.all_records(bed.state, "source") == []
    json.dumps(r.stdout)


def test_image_parsers_refuse_special_files(tmp_path):
    """A FIFO, /dev/zero or a directory where an image file belongs: one-line
    CriuImageError at once (fstat of the opened fd), never a hang, an unbounded read
    or a raw OSError."""
    fifo = tmp_path / "pagemap-1.img"
    os.mkfifo(fifo)
    zero = tmp_path / "pages-1.img"
    os.symlink("/dev/zero", zero)
    d = tmp_path / "mm-1.img"
    d.mkdir()
    code = f"""
from statesync.criu import images, imageset
from statesync.errors import CriuImageError
cases = [lambda: images.Pagemap({str(fifo)!r}, 4096), lambda: images.Pagemap({str(zero)!r}, 4096),
         lambda: images.ImageFile({str(d)!r}, images.MM_MAGIC),
         lambda: imageset._map_pages({str(fifo)!r}, 4096),
         lambda: imageset._map_pages({str(zero)!r}, 4096)]
for c in cases:
    try:
        c()
    except CriuImageError as e:
        assert "not a regular image file" in str(e) and "\\n" not in str(e), e
    else:
        raise SystemExit("accepted a special file")
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_destination_sweep_settles_dead_agents_records_and_expires_old_outcomes(tmp_path):
    """At start, a destination agent settles records whose agent and supervisor are
    dead (an unconfirmed restore is dropped with its image set) and forgets final
    outcomes older than a week; a recent outcome stays to answer the source."""
    from statesync.migration import records
    from statesync.migration.destination import DestinationServer
    base = str(tmp_path / "state")
    images = tmp_path / "images"
    images.mkdir(mode=0o700)
    stale_set = images / "migrated-999999-1-abc"
    stale_set.mkdir()
    dead = {"agent_pid": 999999, "supervisor_pid": 999998}
    records.write(records.record_path(base, "dest", "s1"),
                  dict(dead, session="s1", state="receiving", final_dir=str(stale_set)))
    records.write(records.record_path(base, "dest", "s2"), dict(dead, session="s2",
                                                                 state="aborted"))
    old = records.record_path(base, "dest", "s3")
    records.write(old, dict(dead, session="s3", state="resumed"))
    data = records.read(old)
    data["updated"] = time.time() - 8 * 86400
    with open(old, "w") as f:
        json.dump(data, f)
    sec = tmp_path / "secret"
    sec.write_bytes(SECRET)
    sec.chmod(0o600)
    srv = DestinationServer("127.0.0.1:0", str(images), f"@{sec}", state_dir=base,
                            log=lambda m: None)
    srv.sweep_stale()
    states = {r["session"]: r["state"] for r in records.all_records(base, "dest")}
    assert states == {"s1": "aborted", "s2": "aborted"}
    assert not stale_set.exists()
