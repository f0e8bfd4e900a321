"""The live migration engine, for real: two network namespaces joined by a shaped veth
pair, a destination agent running in one, the source agent's connection and CRIU in
the other, real workloads (own pid namespace) and real CRIU dumps and restores.

What the tests prove:
- every strategy moves a workload that keeps writing, and the restored process's own
  checksum equals the source's at the freeze (no page lost or stale);
- downtime measured from outside (heartbeats) agrees with the engine's report;
- each injected fault (receiver dies, link drops, bytes corrupted in flight, restore
  fails, dump fails) aborts the migration, the source runs on with its checksum
  unchanged, and the destination keeps no process and no image set;
- agents refuse peers without the shared secret.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import find_program, have_root, require
from migration_bed import MigrationBed

from statesync import migrate
from statesync.migration import protocol as wire
from statesync.migration.codec import PageCodec
from statesync.errors import MigrationError
from statesync.migration.pagetable import PageTable

SECRET = b"statesync-test-secret-0123456789"


# --------------------------------------------------------------------------- units


def test_pagetable_put_get_overwrite():
    t = PageTable(4, np.uint8, capacity=2)
    t.put(np.array([0x3000, 0x1000], np.uint64), np.array([[3] * 4, [1] * 4], np.uint8))
    t.put(np.array([0x2000, 0x3000], np.uint64), np.array([[2] * 4, [9] * 4], np.uint8))
    assert len(t) == 3
    assert t.take(np.array([0x1000, 0x2000, 0x3000], np.uint64))[:, 0].tolist() == [1, 2, 9]
    with pytest.raises(KeyError, match="0x4000"):
        t.take(np.array([0x4000], np.uint64))


@pytest.mark.parametrize("compression,xor", [(None, False), ("lz4", False), ("lz4", True)])
def test_page_streams_round_trip_and_reject_corruption(compression, xor):
    from statesync.errors import StreamError
    from statesync.migration.codec import decode_pages

    c = PageCodec(compression, xor=xor)
    addrs = np.arange(6, dtype=np.uint64) * np.uint64(4096) + np.uint64(1 << 30)
    pages = np.random.default_rng(1).integers(0, 4, size=(6, 4096), dtype=np.uint8)
    pages[2] = 0
    table = PageTable(4096)
    assert decode_pages(c.encode(addrs, pages), table) == 6
    assert np.array_equal(table.take(addrs), pages)
    # A second version against what the receiver holds (XOR / unchanged pages).
    new = pages.copy()
    new[1, 100:140] ^= 0xFF
    assert decode_pages(c.encode(addrs, new, pages, np.ones(6, bool)), table) == 6
    assert np.array_equal(table.take(addrs), new)
    frame = bytearray(c.encode(addrs, pages))
    frame[len(frame) // 2] ^= 0x01
    with pytest.raises(StreamError):
        decode_pages(bytes(frame), table)
    assert np.array_equal(table.take(addrs), new), "a corrupt stream changed the pages"


def test_page_stream_decode_fuzz():
    from hypothesis import given, settings, strategies as st
    from statesync.errors import StreamError
    from statesync.migration.codec import decode_pages

    good = PageCodec("lz4").encode(np.array([4096, 8192], np.uint64),
                                   np.full((2, 4096), 7, np.uint8))

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300), st.integers(0, len(good) - 1), st.integers(1, 255))
    def fuzz(junk, pos, flip):
        t = PageTable(4096)
        for data in (junk, good[:pos], good[:pos] + bytes([good[pos] ^ flip]) + good[pos + 1:]):
            try:
                decode_pages(data, t)
            except StreamError:
                pass
        assert len(t) in (0, 2)

    fuzz()


def test_criu_costs_learn_a_line_and_round_trip(tmp_path):
    from statesync.planning.costs import CriuCosts
    from statesync.migration.report import Report

    c = CriuCosts()
    for mib, dump, restore in ((25, 0.05, 0.09), (250, 0.30, 0.40), (25, 0.05, 0.09)):
        r = Report(pid=1, dest="x", strategy="cold", ok=True, state_pages=int(mib * 256),
                   phases={"dump": dump, "final_diff": 0.0, "assemble": 0.0, "restore": restore})
        c.observe(r)
    assert c.dump_s_per_mib == pytest.approx(0.25 / 225) and c.restore_fixed_s == pytest.approx(
        0.09 - 25 * 0.31 / 225)
    path = str(tmp_path / "sub" / "costs.json")
    c.save(path)
    d = CriuCosts.load(path)
    assert d.samples == c.samples and d.restore_s_per_mib == c.restore_s_per_mib
    assert CriuCosts.load(str(tmp_path / "none.json")).samples == []
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="delete it"):
        CriuCosts.load(str(tmp_path / "bad.json"))


async def _pair(server_secret, client_secret):
    got = {}

    async def handle(r, w):
        try:
            ch = await wire.Channel.server(r, w, server_secret, 5)
            got["server"] = await ch.recv()
        except wire.ProtocolError as exc:
            got["server_error"] = exc
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        ch = await wire.Channel.client(r, w, client_secret, 5)
        await ch.send(wire.PAGES, b"memory")
        await asyncio.sleep(0.1)
    except wire.ProtocolError as exc:
        got["client_error"] = exc
    w.close()
    srv.close()
    await srv.wait_closed()
    return got


def test_mutual_authentication():
    ok = asyncio.run(_pair(SECRET, SECRET))
    assert ok["server"] == (wire.PAGES, b"memory")
    bad = asyncio.run(_pair(SECRET, b"x" * 32))
    # The server refuses the client; the client never got to send memory.
    assert isinstance(bad["server_error"], wire.AuthenticationError)
    assert "server" not in bad and isinstance(bad["client_error"], wire.ProtocolError)
    with pytest.raises(ValueError, match="too short"):
        wire.load_secret("short")


def test_public_namespace_migrate_is_a_function_and_submodules_resolve():
    # A fresh interpreter: the CLI imports the engine module first, which used to
    # rebind statesync.migrate to a module object.
    code = """
import inspect, types, statesync
from statesync import cli
cli.build_parser()
import statesync.migration
from statesync.migration.codec import PageCodec
assert inspect.isfunction(statesync.migrate), statesync.migrate
assert statesync.migrate is statesync.migration.migrate
assert statesync.serve_destination is statesync.migration.serve_destination
for m in ("proc", "tracking", "criu", "stream", "planning", "migration", "testing", "cli",
          "scheduler", "kpi", "sim"):
    assert isinstance(getattr(statesync, m), types.ModuleType), m
assert statesync.Report is statesync.migration.report.Report
assert inspect.signature(statesync.migrate).return_annotation in ("Report", statesync.Report)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_secret_errors_name_the_file_and_what_to_do(tmp_path):
    from statesync import SecretError, StateSyncError
    missing = tmp_path / "nope.key"
    with pytest.raises(SecretError, match="nope.key: cannot read it.*head -c 32") as ei:
        wire.load_secret(f"@{missing}")
    assert ei.value.path == str(missing) and isinstance(ei.value, StateSyncError)
    short = tmp_path / "short.key"
    short.write_bytes(b"abc\n")
    with pytest.raises(SecretError, match=r"short.key: shared secret too short \(3 bytes"):
        wire.load_secret(f"file:{short}")
    with pytest.raises(SecretError, match="required"):
        wire.load_secret(None)
    good = tmp_path / "good.key"
    good.write_bytes(b"  " + b"k" * 20 + b"\n")
    assert wire.load_secret(f"@{good}") == b"k" * 20


def test_protocol_errors_live_in_errors_and_are_reexported():
    import statesync
    from statesync import errors
    from statesync.testing import services
    from statesync.testing import testbed
    assert wire.ProtocolError is errors.ProtocolError is statesync.ProtocolError
    assert wire.AuthenticationError is errors.AuthenticationError
    assert services.RedisError is errors.RedisError and testbed.TestbedError is errors.TestbedError
    for name in ("ProtocolError", "AuthenticationError", "SecretError", "RedisError",
                 "TestbedError"):
        assert name in errors.__all__ and issubclass(getattr(errors, name), errors.StateSyncError)
    # every exception class in errors is public and reachable as statesync.NAME
    classes = {n for n, v in vars(errors).items()
               if isinstance(v, type) and issubclass(v, errors.StateSyncError)}
    assert classes == set(errors.__all__)
    assert all(getattr(statesync, n) is getattr(errors, n) for n in classes)


# --------------------------------------------------------------------------- real migrations


def _prereqs():
    require(have_root(), "needs root (namespaces, ptrace, CRIU)")
    for prog in ("ip", "tc", "nsenter", "unshare"):
        require(find_program(prog), f"{prog} not installed (scripts/setup-system.sh)")


class Bed(MigrationBed):
    """A testbed plus a destination agent and a workload in the source namespace."""

    control_prefix = "ssm-test"

    def __init__(self, tb, tmp):
        super().__init__(tb, SECRET)
        self.hb_path = os.path.join(tb.root, "hb.sock")

    def spawn(self, size="6M", rate=300.0, **kw):
        return super().spawn(size=size, rate=rate, heartbeat=self.hb_path,
                             heartbeat_interval=0.002, **kw)


@pytest.fixture
def bed(request, tmp_path, criu_ok, monkeypatch):
    _prereqs()
    # Durable handoff records of both agents (docs/migrate.md), private to the test.
    monkeypatch.setenv("STATESYNC_STATE_DIR", str(tmp_path / "state"))
    from statesync.testing.testbed import Testbed
    rate = getattr(request, "param", "1gbit")
    with Testbed(rate) as tb:
        b = Bed(tb, tmp_path)
        try:
            yield b
        finally:
            b.close()


def _pause_at_dump(client, box):
    """Progress hook: at the switch-over, stop the workload's writes and record its
    checksum: the restored copy must report exactly this."""
    def hook(ev):
        if ev.get("event") == "phase" and ev.get("phase") == "dump" and "sum" not in box:
            client.pause()
            box["sum"] = client.checksum()
    return hook


# (strategy, codec, tracker): every strategy, each codec, both trackers.
STRATEGY_CASES = [
    ("cold", None, None),
    ("precopy", None, "uffd"),
    ("iterative", None, "uffd"),
    ("iterative", None, "hash"),
    ("iterative", "lz4", "uffd"),
    ("iterative", "lz4+xor", "uffd"),
]


def _codec_kw(compression, tracker):
    kw = {"compression": "lz4", "xor": True} if compression == "lz4+xor" else \
        {"compression": compression}
    if tracker:
        kw["tracker"] = tracker
    return kw


@pytest.mark.parametrize("strategy,compression,tracker", STRATEGY_CASES)
def test_migrate_workload_every_strategy(bed, strategy, compression, tracker):
    from statesync.testing.downtime import HeartbeatObserver

    bed.start_dest()
    with HeartbeatObserver(bed.hb_path) as obs:
        bed.spawn(size="6M", rate=400)
        assert obs.wait_for_beats(5)
        src = bed.client("a")
        box = {}
        t0 = time.monotonic()
        rep = bed.migrate(strategy=strategy, progress=_pause_at_dump(src, box),
                          **_codec_kw(compression, tracker))
        bed.restored.append(rep.restored_pid)
        assert obs.wait_for_beats(5), "restored workload sends no heartbeats"
        gap = obs.max_gap(t0, time.monotonic())
    assert rep.ok and rep.restored_pid
    assert rep.tracker == (tracker or "")
    # The source copy is gone; the restored copy answers in the destination namespace.
    assert bed.python_procs_with_control() == [rep.restored_pid]
    dst = bed.client("b")
    assert dst.checksum() == box["sum"], "restored memory differs from the source at freeze"
    dst.resume()
    seq0 = dst.status()["seq"]
    time.sleep(0.1)
    assert dst.status()["seq"] > seq0, "restored workload does not run"
    # Round structure per strategy.
    if strategy == "cold":
        assert rep.rounds == [] and rep.final_pages == rep.state_pages
    else:
        assert rep.rounds[0].pages > 0.8 * rep.state_pages
        assert rep.final_pages < rep.state_pages / 4
    if strategy == "precopy":
        assert len(rep.rounds) == 1
    # Outside measurement agrees with the engine (the observer sees the real gap).
    assert gap["gap_s"] == pytest.approx(rep.downtime_s, abs=0.05 + 0.25 * rep.downtime_s)
    assert bed.dest.wait(10) == 0
    assert os.listdir(bed.tb.dir_b) == []   # image set removed after the commit


def _assert_aborted_cleanly(bed, exc_info, sum_before, dest_finishes=True):
    rep = exc_info.value.report
    assert rep is not None and not rep.ok and rep.source_resumed
    src = bed.client("a")
    assert src.checksum() == sum_before, "the source's state changed"
    src.resume()
    s0 = src.status()["seq"]
    time.sleep(0.1)
    assert src.status()["seq"] > s0, "the source does not run after the abort"
    assert bed.python_procs_with_control() == [bed.wl.pid], "a restored copy is left running"
    if dest_finishes:
        # The agent (one migration per run) ends after cleaning up.
        assert bed.dest.wait(15) == 1
    leftovers = os.listdir(bed.tb.dir_b)
    assert leftovers == [], f"destination left {leftovers}"
    return rep


def _expect_abort(bed, strategy, phase, obstacle=None, **kw):
    """Migrate the (paused) workload with ``obstacle`` (a context manager: a socket, a
    proxy, a link drop) in place; the migration must abort in ``phase`` (a name, a
    tuple of names, or None for any) and leave everything as it was
    (:func:`_assert_aborted_cleanly`). Returns the report."""
    before = bed.client("a").checksum()
    with obstacle if obstacle is not None else contextlib.nullcontext():
        with pytest.raises(MigrationError) as ei:
            bed.migrate(strategy=strategy, **kw)
    if phase is not None:
        assert ei.value.phase in ((phase,) if isinstance(phase, str) else phase)
    return _assert_aborted_cleanly(bed, ei, before)


@pytest.mark.parametrize("bed", ["100mbit"], indirect=True)
def test_fault_receiver_dies(bed):
    bed.start_dest()
    bed.spawn(size="16M", paused=True)
    src = bed.client("a")
    before = src.checksum()
    threading.Timer(0.6, lambda: os.killpg(bed.dest.pid, 9)).start()
    with pytest.raises(MigrationError) as ei:
        bed.migrate(strategy="iterative")
    bed.dest.wait(10)
    # A SIGKILLed agent cannot clean up: what it left is hidden (".incoming-") and
    # never a complete set; the next agent started on the directory removes it.
    assert all(n.startswith(".incoming-") for n in os.listdir(bed.tb.dir_b))
    bed.start_dest()
    _assert_aborted_cleanly(bed, ei, before, dest_finishes=False)


@pytest.mark.parametrize("bed", ["100mbit"], indirect=True)
def test_fault_link_drops(bed):
    bed.start_dest(io_timeout=2.0)
    bed.spawn(size="16M", paused=True)

    @contextlib.contextmanager
    def link_drops_after(delay):
        threading.Timer(delay, lambda: bed.tb.set_link(False)).start()
        try:
            yield
        finally:
            bed.tb.set_link(True)

    _expect_abort(bed, "iterative", ("precopy", "switchover"), link_drops_after(0.6),
                  io_timeout=2.0)


def _corrupting_proxy(tb, listen_port, target_port, flip_at):
    """A TCP relay in the destination namespace that flips one bit of the source's
    stream at byte ``flip_at``."""
    lsock = tb.socket("b")
    lsock.bind((tb.addr_b, listen_port))
    lsock.listen(1)

    def pump(a, b, flip):
        n = 0
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                if flip is not None and n <= flip < n + len(data):
                    data = bytearray(data)
                    data[flip - n] ^= 0x10
                    data = bytes(data)
                n += len(data)
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def run():
        c, _ = lsock.accept()
        u = tb.socket("b")
        u.connect((tb.addr_b, target_port))
        threading.Thread(target=pump, args=(c, u, flip_at), daemon=True).start()
        threading.Thread(target=pump, args=(u, c, None), daemon=True).start()

    threading.Thread(target=run, daemon=True).start()
    return lsock


def test_fault_bytes_corrupted_in_flight(bed):
    bed.start_dest()
    bed.spawn(size="6M", paused=True)
    pport = bed.tb.free_port("b")
    _expect_abort(bed, "iterative", None,
                  _corrupting_proxy(bed.tb, pport, bed.port, flip_at=3 << 20), port=pport)
    err = bed.dest.stderr.read().decode()
    assert "failed authentication" in err


def test_fault_destination_restore_fails(bed):
    bed.start_dest()
    bed.spawn(size="6M", paused=True)
    # Someone in the destination namespace already holds the workload's abstract
    # socket name: CRIU cannot bind it again, so the real restore fails.
    squatter = bed.tb.socket("b", socket.AF_UNIX, socket.SOCK_STREAM)
    squatter.bind("\0" + bed.wl.control[1:])
    squatter.listen(1)
    _expect_abort(bed, "iterative", "restore", squatter)


def test_fault_source_dump_fails(bed):
    bed.start_dest()
    bed.spawn(size="6M", paused=True)
    # A connection from outside the process tree to the workload's control socket:
    # CRIU refuses to dump half of a stream connection, so the real dump fails.
    held = bed.tb.socket("a", socket.AF_UNIX, socket.SOCK_STREAM)
    held.connect("\0" + bed.wl.control[1:])
    _expect_abort(bed, "precopy", "dump", held)


def test_lazy_dump_failing_once_is_retried_lazily(bed, tmp_path):
    """A lazy dump that fails after CRIU seized the tree (here its post-dump action
    script fails, the first time only) leaves the tree as CRIU found it: stopped by the
    engine, the final collect still exact. The engine dumps lazily once more instead of
    falling back to a full switch-over (which writes every page inside the freeze),
    and says so; the restored state is the state at the freeze."""
    from statesync.migration.switchover import lazy_unavailable
    require(lazy_unavailable() is None, f"lazy switch-over: {lazy_unavailable()}")
    bed.start_dest()
    bed.spawn(size="6M", rate=400)
    mark = tmp_path / "failed-once"
    script = tmp_path / "fail-once.sh"
    script.write_text('#!/bin/sh\n[ "$CRTOOLS_SCRIPT_ACTION" = post-dump ] || exit 0\n'
                      f'[ -e {mark} ] && exit 0\ntouch {mark}\nexit 1\n')
    script.chmod(0o755)
    src, box = bed.client("a"), {}
    rep = bed.migrate(strategy="iterative", switchover="lazy", tracker="uffd",
                      criu_args=["--action-script", str(script)],
                      progress=_pause_at_dump(src, box))
    bed.restored.append(rep.restored_pid)
    assert mark.exists(), "the action script never ran"
    assert rep.ok and rep.switchover == "lazy", rep.notes
    assert any("lazy dump failed once, retried" in n for n in rep.notes), rep.notes
    assert bed.python_procs_with_control() == [rep.restored_pid]
    assert bed.client("b").checksum() == box["sum"], "restored memory differs from the freeze"


def test_destination_refuses_wrong_secret(bed):
    bed.start_dest()
    bed.spawn(size="2M", paused=True)
    with pytest.raises(MigrationError) as ei:
        migrate(bed.wl.pid, f"{bed.tb.addr_b}:{bed.port}", secret=b"w" * 32,
                netns=bed.tb.ns_a, io_timeout=5)
    assert ei.value.phase == "authenticate"
    assert bed.wl.alive() and bed.python_procs_with_control() == [bed.wl.pid]
    assert bed.dest.poll() is None  # still serving: a bad peer does not end it


# --------------------------------------------------------------------------- third-party service


@pytest.mark.parametrize("strategy,compression,tracker", STRATEGY_CASES)
def test_migrate_redis_under_write_load(bed, strategy, compression, tracker):
    """Debian's redis-server with data, written to while it moves: every key is there
    afterwards, no acknowledged write is lost, and it answers on the same socket path."""
    from statesync.testing.downtime import RequestProber
    from statesync.testing.services import (RedisWriter, load_keys, redis_binary, spawn_redis,
                                            value_for)

    require(redis_binary(), "redis-server not installed (scripts/setup-system.sh)")
    bed.start_dest()
    path = os.path.join(bed.tb.root, "redis.sock")
    srv = spawn_redis(path, netns=bed.tb.ns_a)
    try:
        c = srv.client
        load_keys(c, 20000, value_size=500)                 # ~10 MB of data
        writer = RedisWriter(c, keys=2000, rate=100, batch=20).start()
        prober = RequestProber(lambda: c.command("GET", "key:7"), interval=0.005).start()
        time.sleep(0.3)
        t0 = time.monotonic()
        try:
            rep = bed.migrate(srv.pid, strategy=strategy, **_codec_kw(compression, tracker))
        finally:
            time.sleep(0.3)
            prober.stop()
            writer.stop()
        bed.restored.append(rep.restored_pid)
        assert rep.ok and rep.restored_pid and _gone(srv.pid)
        assert c.command("PING") == "PONG"
        assert c.command("DBSIZE") >= 20000
        sample = list(range(0, 20000, 97))
        got = c.pipeline([("GET", f"key:{i}") for i in sample])
        assert got == [value_for(i, 500) for i in sample]
        assert writer.writes > 0 and writer.verify() == 0, "an acknowledged write was lost"
        gap = prober.max_gap(t0, time.monotonic())
        # The client saw the service stop no longer than the engine's downtime plus
        # the time to notice (its request interval and a reconnect).
        assert gap["gap_s"] < rep.downtime_s + 0.5
        assert bed.dest.wait(10) == 0
    finally:
        srv.kill()


def _gone(pid):
    from statesync import proc
    return proc.state(pid) in (None, "Z", "X")


def test_cli_agents_one_in_each_namespace(bed):
    """`statesync receive` in the destination namespace, `statesync migrate` in the
    source namespace: progress per round, the report, JSON and Prometheus files."""
    bed.start_dest()
    bed.spawn(size="6M", rate=300)
    out = os.path.join(bed.tb.root, "report.json")
    prom = os.path.join(bed.tb.root, "metrics.prom")
    costs = os.path.join(bed.tb.root, "costs.json")
    src = bed.tb.python("a", ["migrate", "--pid", str(bed.wl.pid), "--to",
                              f"{bed.tb.addr_b}:{bed.port}", "--secret-file", bed.secret_file,
                              "--strategy", "iterative", "--json", out, "--metrics-file", prom,
                              "--link-rate", str(bed.tb.rate_bps), "--calibration", costs],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    so, se = src.communicate(timeout=120)
    text = so.decode()
    assert src.returncode == 0, se.decode()[-2000:]
    assert "round   0:" in text and "downtime" in text and ": OK" in text
    import json
    from statesync.migration.report import Report
    rep = Report.from_dict(json.load(open(out)))
    bed.restored.append(rep.restored_pid)
    assert rep.ok and rep.rounds and rep.downtime_s > 0
    assert abs(sum(v for k, v in rep.phases.items() if k != "freeze") - rep.downtime_s) < 0.02
    metrics = open(prom).read()
    assert "statesync_migration_downtime_seconds" in metrics
    assert any(ln.startswith("statesync_migration_phase_seconds{") and 'phase="restore"' in ln
               for ln in metrics.splitlines())
    assert bed.dest.wait(10) == 0
    assert bed.client("b").status()["pid"] == rep.restored_pid
    # The host's CRIU costs learned from this migration.
    from statesync.planning.costs import CriuCosts
    learned = CriuCosts.load(costs)
    assert len(learned.samples) == 1 and learned.samples[0][0] == pytest.approx(
        rep.state_pages * 4096 / 2**20)


# ------------------------------------------------------------------ iperf3 (the paper's case)


def _iperf3_client(bed, side, host, port):
    """One short iperf3 run (4 MiB; this iperf3 reads ``-t 0.5`` as "forever") from
    ``side`` against host:port; its JSON result."""
    import json
    r = subprocess.run(bed.tb.wrap(side, ["iperf3", "-c", host, "-p", str(port), "-n", "4M",
                                          "-J"]),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout[-500:] + r.stderr[-500:]
    return json.loads(r.stdout)


def test_migrate_iperf3_server_keeps_serving_from_the_destination(bed):
    """Debian's iperf3 server (a TCP listener; the MOSE paper's first service) moves
    from host a to host b between tests and serves the next client there."""
    from statesync import proc

    require(find_program("iperf3"), "iperf3 not installed (scripts/setup-system.sh)")
    bed.start_dest()
    port = bed.tb.free_port("a")
    # Listens on the wildcard address, so the restored socket binds on host b too.
    srv = bed.tb.popen("a", ["unshare", "-p", "-f", "setsid", "iperf3", "-s", "-p", str(port)],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, start_new_session=True)
    pid = None
    try:
        # Wait for the listener without connecting: iperf3 serves one test at a time,
        # and a bare probe connection would occupy it.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ss = subprocess.run(bed.tb.wrap("a", ["ss", "-Hltn", f"sport = :{port}"]),
                                capture_output=True, text=True, timeout=10)
            if ss.stdout.strip():
                break
            time.sleep(0.05)
        pid = proc.descendants(srv.pid)[-1]
        before = _iperf3_client(bed, "a", bed.tb.addr_a, port)
        assert before["end"]["sum_received"]["bytes"] > 0
        # The server closes its side of the finished test's connections on its own
        # schedule; CRIU cannot dump a connection whose peer is outside the tree.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            est = subprocess.run(bed.tb.wrap("a", ["ss", "-Htn", "state", "established",
                                                   f"( sport = :{port} )"]),
                                 capture_output=True, text=True, timeout=10)
            if not est.stdout.strip():
                break
            time.sleep(0.02)
        assert not est.stdout.strip(), est.stdout
        rep = bed.migrate(pid, strategy="iterative", compression="lz4", tracker="uffd")
        bed.restored.append(rep.restored_pid)
        assert rep.ok and rep.restored_pid and _gone(pid)
        after = _iperf3_client(bed, "b", bed.tb.addr_b, port)
        assert after["end"]["sum_received"]["bytes"] > 0
        assert bed.dest.wait(10) == 0
    finally:
        proc.kill_tree([pid], srv, timeout=20)
