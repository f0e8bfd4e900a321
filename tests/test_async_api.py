"""statesync embedded in an asyncio program: migrate_async / Migration inside a running
event loop, progress as an async iterator, cancel() at every phase leaving the source
running and the destination empty, migrate() from a thread while a loop runs, and the
clear error of migrate() called inside a running loop.

Real migrations on the two-host testbed (as tests/test_migrate.py): a destination
agent (``statesync receive --forever``) in namespace B, a workload in its own pid
namespace in A, real CRIU.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import time

import pytest
from conftest import find_program, have_root, require
from migration_bed import MigrationBed

from statesync import Migration, MigrationCancelled, migrate, migrate_async

SECRET = b"statesync-async-test-secret-0123"


def _prereqs():
    require(have_root(), "needs root (namespaces, ptrace, CRIU)")
    for prog in ("ip", "tc", "nsenter", "unshare"):
        require(find_program(prog), f"{prog} not installed (scripts/setup-system.sh)")


class _Bed(MigrationBed):
    control_prefix = "ssa-test"

    def __init__(self, tb):
        super().__init__(tb, SECRET)
        self.start_dest(extra=("--forever",), stdout=subprocess.DEVNULL)

    def spawn(self):
        return super().spawn(size="4M", rate=300.0)

    def kw(self, **kw):
        kw.setdefault("io_timeout", 5.0)
        kw.setdefault("secret", SECRET)
        kw.setdefault("netns", self.tb.ns_a)
        return kw

    def assert_source_runs_alone(self):
        from statesync.testing.workloads import WorkloadClient
        c = WorkloadClient(self.wl.control, netns=self.tb.ns_a)
        s0 = c.status()["seq"]
        time.sleep(0.1)
        assert c.status()["seq"] > s0, "the source does not run after the cancel"
        assert self.python_procs_with_control() == [self.wl.pid], "a restored copy is left"
        deadline = time.monotonic() + 10
        while os.listdir(self.tb.dir_b) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.listdir(self.tb.dir_b) == [], "the destination kept an image set"


@pytest.fixture(scope="module")
def bed(criu_ok):
    _prereqs()
    from statesync.testing.testbed import Testbed
    with Testbed("1gbit") as tb:
        b = _Bed(tb)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def workload(bed):
    wl = bed.spawn()
    yield wl
    wl.kill()


def test_blocking_migrate_inside_a_running_loop_says_use_migrate_async():
    async def main():
        with pytest.raises(RuntimeError, match="migrate_async"):
            migrate(os.getpid(), "127.0.0.1:1", secret=SECRET)
    asyncio.run(main())


def test_migration_in_a_running_loop_with_progress_iterator(bed, workload):
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        seen_cb = []
        m = Migration(workload.pid, bed.addr, "iterative", progress=seen_cb.append,
                      **bed.kw(tracker="uffd"))
        m.start()
        events = [ev async for ev in m]
        rep = await m
        t.cancel()
        return m, rep, events, seen_cb, ticks

    m, rep, events, seen_cb, ticks = asyncio.run(main())
    bed.restored.append(rep.restored_pid)
    assert rep.ok and rep.restored_pid and m.done() and m.phase == "done"
    kinds = [e["event"] for e in events]
    assert kinds[0] == "plan" and kinds[-1] == "done" and "round" in kinds
    assert "transfer" in kinds
    assert [e["phase"] for e in events if e["event"] == "phase"] == [
        "dump", "final transfer", "restore", "commit"]
    assert seen_cb == events, "the callback form sees the same events"
    assert ticks > 5, "the event loop was blocked during the migration"
    assert m.cancel() is False, "cancel after the end must be refused"


def test_migrate_from_a_thread_while_a_loop_runs(bed, workload):
    async def main():
        return await asyncio.to_thread(migrate, workload.pid, bed.addr, "cold",
                                       **bed.kw())
    rep = asyncio.run(main())
    bed.restored.append(rep.restored_pid)
    assert rep.ok and rep.restored_pid
    # no link rate given, no live round: the report says what the prediction assumed
    assert any("100 Mbit/s" in n for n in rep.notes), rep.notes
    assert rep.migration_id and rep.kpi["max_downtime_s"]["met"] in (True, False)


@pytest.mark.parametrize("strategy,at", [
    ("iterative", "start"),          # cancel() before start(): aborts at once
    ("iterative", "plan"),           # during round 0
    ("iterative", "transfer"),       # in the middle of a round's transfer
    ("iterative", "round"),          # between live rounds
    ("cold", "dump"),                # while criu dump freezes the process
    ("cold", "final transfer"),      # the process is frozen, its pages on the way
    ("iterative", "restore"),        # the destination is restoring it
])
def test_cancel_at_each_phase_leaves_the_source_running(bed, workload, strategy, at):
    async def main():
        m = Migration(workload.pid, bed.addr, strategy, **bed.kw(tracker="uffd")
                      if strategy != "cold" else bed.kw())
        if at == "start":
            assert m.cancel() is True
        m.start()
        async for ev in m:
            key = ev.get("phase") if ev["event"] == "phase" else ev["event"]
            if key == at:
                assert m.cancel() is True
                break
        with pytest.raises(MigrationCancelled) as ei:
            await m
        return ei.value

    err = asyncio.run(main())
    assert err.report is not None and not err.report.ok
    assert err.report.source_resumed is not False
    bed.assert_source_runs_alone()


def test_cancel_after_commit_is_refused_and_the_migration_completes(bed, workload):
    async def main():
        box = {}

        def hook(ev):
            if ev.get("phase") == "commit":
                box["refused"] = not m.cancel()
        m = Migration(workload.pid, bed.addr, "cold", progress=hook, **bed.kw())
        rep = await m
        return rep, box

    rep, box = asyncio.run(main())
    bed.restored.append(rep.restored_pid)
    assert rep.ok and box["refused"]


def test_cancelling_the_awaiting_task_aborts_safely(bed, workload):
    async def main():
        task = asyncio.create_task(migrate_async(workload.pid, bed.addr, "iterative",
                                                 **bed.kw(tracker="uffd")))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    bed.assert_source_runs_alone()


def test_abort_if_predicted_downtime_never_freezes(bed, workload):
    from statesync import MigrationError
    from statesync.planning.kpi import Targets

    events = []
    with pytest.raises(MigrationError, match="abort_if=predicted_downtime") as ei:
        migrate(workload.pid, bed.addr, "cold", targets=Targets(max_downtime_s=1e-4),
                abort_if="predicted_downtime", progress=events.append, **bed.kw())
    assert ei.value.report.source_resumed
    assert "final transfer" not in [e.get("phase") for e in events]
    bed.assert_source_runs_alone()
