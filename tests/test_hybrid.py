"""Hybrid and post-copy switch-over (issue 11 item 3, docs/postcopy.md), for real: the
testbed's two namespaces, real CRIU, the agents as the `statesync` command.

- hybrid on a workload that rewrites more than 60% of its pages per second: the
  destination's memory after the post-copy is exactly the frozen source's (every word
  that differs was written after the resume: the workload's fresh sequence numbers),
  and the report counts remote faults;
- a link cut during post-copy: the destination cannot complete its copy and kills it;
  the source, which kept its frozen complete copy, resumes it (exactly one copy runs,
  with the state of the freeze), or, with the destination unreachable, leaves a record
  that `statesync recover` settles the same way.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import require
from statesync import proc
from test_handoff import IO, Bed, _finish, _kill_supervisors, _prereqs  # noqa: F401

TOP = np.uint64(1 << 63)


def _lazy_ok():
    from statesync.migration.switchover import lazy_unavailable
    why = lazy_unavailable()
    require(why is None, f"post-copy needs the lazy switch-over: {why}")


@pytest.fixture
def hbed(tmp_path, criu_ok, monkeypatch):
    _prereqs()
    _lazy_ok()
    from statesync.testing.testbed import Testbed
    monkeypatch.setenv("STATESYNC_STATE_DIR", str(tmp_path / "state"))
    with Testbed("1gbit") as tb:
        b = Bed(tb, tmp_path)
        try:
            yield b
        finally:
            b.close()


def _start_dest(bed, forever=False, fault=None):
    args = ["receive", "--listen", f"{bed.tb.addr_b}:{bed.port}", "--images-dir",
            bed.tb.dir_b, "--secret-file", bed.secret_file, "--io-timeout", str(IO)]
    bed.dest = bed.tb.python("b", args + (["--forever"] if forever else []),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=bed.env(fault))
    bed.tb.wait_port("b", bed.port, proc=bed.dest)
    return bed.dest


def _start_source(bed, strategy, fault=None, extra=()):
    report = os.path.join(bed.tmp, "report.json")
    bed.src = bed.tb.python("a", ["migrate", "--pid", str(bed.wl.pid), "--to",
                                  f"{bed.tb.addr_b}:{bed.port}", "--secret-file",
                                  bed.secret_file, "--strategy", strategy,
                                  "--io-timeout", str(IO), "--calibration", "",
                                  "--json", report, "--quiet", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=bed.env(fault))
    return bed.src, report


def _read_mem(pid: int, addr: int, size: int) -> np.ndarray:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(addr)
        data = f.read(size)
    assert len(data) == size
    return np.frombuffer(data, dtype=np.uint64)


def test_hybrid_high_dirty_rate_exact_state(hbed):
    """16 MiB workload rewriting 150% of its pages per second, strategy hybrid."""
    bed = hbed
    _start_dest(bed)
    bed.spawn(size="16M", rate=6000.0, paused=False)
    st = bed.client("a").status()
    addr, size = st["addr"], st["size"]
    metrics = os.path.join(bed.tmp, "metrics.prom")
    src, report = _start_source(bed, "hybrid", "source:after_final:hold",
                                ["--metrics-file", metrics])
    bed.wait_marker(90)
    # The tree is frozen, its final dirty set went out, the rest stays here: the
    # reference is the frozen source's memory.
    ref = _read_mem(bed.wl.pid, addr, size)
    bed.release()
    out, err = src.communicate(timeout=120)
    assert src.returncode == 0, err.decode()[-3000:]
    rep = json.load(open(report))
    assert rep["strategy"] == "hybrid" and rep["switchover"] == "lazy", rep
    ps = rep["post_switch"]
    assert ps.get("postcopy") == 1.0 and ps["remote_pages"] > 0, ps
    # the workload writes at once after the resume: some of it waited for the source
    assert ps["remote_faults"] > 0, ps
    assert ps["remote_fault_p99_ns"] > 0
    prom = open(metrics).read()
    assert 'statesync_migration_post_switch_faults{' in prom and 'served="remote"' in prom
    assert "statesync_migration_post_switch_fault_latency_seconds{" in prom
    side = bed.wait_one_copy(30)
    assert side == "b"
    c = bed.client("b")
    c.pause()
    (pid,) = [p for p, s, _ in bed.copies() if s == "b"]
    got = _read_mem(pid, addr, size)
    diff = np.flatnonzero(got != ref)
    # every differing word is a write after the resume: a fresh sequence number (top
    # bit set, larger than any before the freeze) in the slot it selects
    before = ref[(ref & TOP) != 0] & ~TOP
    last = int(before.max()) if before.size else 0
    w = got[diff]
    assert ((w & TOP) != 0).all(), f"{int(((w & TOP) == 0).sum())} words hold no fresh write"
    seqs = w & ~TOP
    assert (seqs > np.uint64(last)).all(), "a page holds content older than the freeze"
    assert ((seqs % np.uint64(512)) == (diff % 512).astype(np.uint64)).all()
    c.resume()
    assert rep["downtime_s"] > 0


def test_link_cut_during_postcopy_resumes_the_source(hbed):
    """The link goes down after the first pushed batch, for longer than io_timeout:
    the destination kills its incomplete copy, the source (its copy frozen and
    complete) resumes it once the destination says so after the link is back."""
    bed = hbed
    _start_dest(bed, forever=True)
    bed.spawn(size="16M", rate=200.0)      # paused: the state at the freeze is sum0
    src, report = _start_source(bed, "postcopy", "source:postcopy:hold")
    bed.wait_marker(90)
    bed.tb.set_link(False)
    bed.release()
    time.sleep(IO + 2.0)                    # the destination gives up on the pages
    bed.tb.set_link(True)
    out, err = src.communicate(timeout=120)
    assert src.returncode != 0
    side = _finish(bed, "a", timeout=60)
    assert side == "a"
    rep = json.load(open(report))
    assert rep["source_resumed"] is True, rep
    assert "post" in (rep.get("error") or "") or rep.get("failed_phase"), rep


def test_link_cut_during_postcopy_in_doubt_then_recover(hbed):
    """The destination agent ends with the session and the link stays down past the
    source's resolve window: the source keeps its frozen copy and an IN_DOUBT record;
    `statesync recover` (link back, destination agent restarted) resumes it."""
    from statesync.migration import records
    bed = hbed
    _start_dest(bed)
    bed.spawn(size="8M", rate=200.0)
    src, report = _start_source(bed, "postcopy", "source:postcopy:hold")
    bed.wait_marker(90)
    bed.tb.set_link(False)
    bed.release()
    src.wait(90)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rs = records.all_records(bed.state, "source")
        if rs and rs[0]["state"] == "in_doubt" and not any(
                records.alive(r.get("supervisor_pid")) for r in rs):
            break
        time.sleep(0.2)
    rs = records.all_records(bed.state, "source")
    assert [r["state"] for r in rs] == ["in_doubt"], rs
    assert rs[0].get("postcopy") is True and rs[0].get("remote_pages", 0) > 0
    # the destination killed its copy: only the frozen source copy is left
    assert [(s, st) for _, s, st in bed.copies()] in ([("a", "T")], [("a", "t")]), bed.copies()
    bed.tb.set_link(True)
    bed.dest.wait(60)
    _start_dest(bed)
    r = subprocess.run(bed.tb.wrap("a", [sys.executable, "-m", "statesync", "recover",
                                         "--secret-file", bed.secret_file, "--window", "20"]),
                       capture_output=True, text=True, timeout=60, env=bed.env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert _finish(bed, "a") == "a"
    assert records.all_records(bed.state, "source") == []
    assert proc.state(bed.wl.pid) not in (None, "T", "t")


def test_scheduler_chooses_hybrid_when_precopy_diverges():
    """The adaptive scheduler plans hybrid from the model when the writer outruns the
    link (r = dirty rate / bandwidth >= 0.65, the MOSE object-tracking case) and
    pre-copy otherwise; hybrid=False keeps it out."""
    from statesync.planning import kpi, scheduler

    def plan(rate, **kw):
        obs = kpi.Observations(state_bytes=256 << 20, dirty_rate_pages_per_s=rate,
                               dirty_rate_window_s=0.1, bandwidth_bytes_per_s=125e6,
                               dump_fixed_s=0.05, dump_s_per_mib=0.0, restore_fixed_s=0.05,
                               restore_s_per_mib=0.001, rtt_s=0.001)
        s = scheduler.get("adaptive", **kw)
        try:
            return s.plan(obs, kpi.Targets(max_downtime_s=1.0))
        except Exception as exc:  # Infeasible: its best plan runs
            return exc.best

    assert plan(200.0).strategy == "precopy"
    slow = 0.6 * 125e6 / 4096           # r = 0.6: still pre-copy
    assert plan(slow).strategy == "precopy"
    fast = 0.7 * 125e6 / 4096           # r = 0.7: hybrid
    p = plan(fast)
    assert p.strategy == "hybrid" and p.rounds == scheduler.HYBRID_MAX_ROUNDS, p
    assert "r = 0.70" in p.reason and p.predicted_downtime_s < 0.2
    assert plan(fast, hybrid=False).strategy == "precopy"


def test_postcopy_wire_kinds_are_new():
    from statesync.migration import protocol as wire
    kinds = [wire.PC_REMOTE, wire.PC_REQUEST, wire.PC_PAGES, wire.PC_ACK]
    assert len(set(kinds)) == 4 and min(kinds) > wire.FILLED
    assert all(k in wire.NAMES for k in kinds)


def test_postcopy_without_precopy_brings_the_exact_state(hbed):
    """strategy postcopy: no pre-copy round, every lazy page travels after the resume
    (requested or pushed); the restored workload's checksum is the one at the freeze."""
    bed = hbed
    _start_dest(bed)
    bed.spawn(size="8M", rate=200.0)        # paused: its checksum is the state
    src, report = _start_source(bed, "postcopy")
    out, err = src.communicate(timeout=120)
    assert src.returncode == 0, err.decode()[-3000:]
    rep = json.load(open(report))
    assert rep["rounds"] == [] and rep["strategy"] == "postcopy", rep
    ps = rep["post_switch"]
    assert ps["postcopy"] == 1.0 and ps["remote_pages"] >= 2048, ps   # the 8 MiB buffer

    assert _finish(bed, "b") == "b"


def _wait_records_settled(bed, side, states, timeout=60.0):
    from statesync.migration import records
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rs = records.all_records(bed.state, side)
        if all(r["state"] in states for r in rs) and not any(
                records.alive(r.get("supervisor_pid")) and r["state"] not in states for r in rs):
            return rs
        time.sleep(0.2)
    return records.all_records(bed.state, side)


def test_source_agent_killed_during_postcopy_supervisor_resumes_the_source(hbed):
    """SIGKILL of the source agent after its first pushed batch: nobody pushes any
    more, the destination's watchdog kills its incomplete copy (RESOLVE answers
    pending until then, aborted after), and the source's supervisor resumes the
    frozen, complete copy."""
    bed = hbed
    _start_dest(bed, forever=True)
    bed.spawn(size="8M", rate=200.0)
    src, _ = _start_source(bed, "postcopy", "source:postcopy:kill")
    src.wait(90)
    assert src.returncode != 0
    assert _finish(bed, "a", timeout=60) == "a"


def test_destination_agent_killed_during_postcopy(hbed):
    """SIGKILL of the destination agent after the resume, post-copy running: its
    daemon dies with it (the copy's missing pages would read as zeros), its supervisor
    kills that copy; the source cannot reach the destination and stays frozen (IN
    DOUBT) until `statesync recover`, with the destination agent back, resumes it."""
    from statesync.migration import records
    bed = hbed
    _start_dest(bed, fault="dest:postcopy:kill")
    bed.spawn(size="8M", rate=200.0)
    src, _ = _start_source(bed, "postcopy")
    out, err = src.communicate(timeout=90)
    assert src.returncode != 0
    rs = _wait_records_settled(bed, "source", ("in_doubt",))
    assert [r["state"] for r in rs] == ["in_doubt"], rs
    # the destination's supervisor killed the incomplete copy: only the frozen source
    deadline = time.monotonic() + 30
    while [s for _, s, _ in bed.copies()] != ["a"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [(s, st) for _, s, st in bed.copies()] in ([("a", "T")], [("a", "t")]), bed.copies()
    _start_dest(bed)
    r = subprocess.run(bed.tb.wrap("a", [sys.executable, "-m", "statesync", "recover",
                                         "--secret-file", bed.secret_file, "--window", "20"]),
                       capture_output=True, text=True, timeout=60, env=bed.env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert _finish(bed, "a") == "a"
    assert records.all_records(bed.state, "source") == []
