"""`make demo`: live-migrate a running service between two "hosts" and print the report.

1. A few seconds of live dirty-page tracking of the workload generator (statesync's
   best tracker here next to what the generator says it wrote).
2. Two network namespaces joined by a 100 Mbit/s veth link (tc tbf); a destination
   agent (`statesync receive`) runs in one; the workload (writing pages, sending
   heartbeats) runs in the other; it is migrated iteratively while it writes, then a
   second one cold, for comparison. Each report is printed, with the downtime seen
   from outside (the largest gap between heartbeats) and a check that the restored
   process holds exactly the state the source had when it was frozen.

Needs root (namespaces, ptrace, CRIU); `make demo` installs what the system needs.
"""
import os
import subprocess
import sys
import time

from statesync import tracking

from statesync.testing import workloads
from statesync.testing.downtime import HeartbeatObserver
from statesync import migrate
from statesync.testing.testbed import Testbed

SECRET = os.urandom(32)
RATE = "100mbit"


def tracking_part() -> None:
    print("== live dirty-page tracking (3 s)")
    with workloads.spawn(size="64M", rate=5000, pattern="hotcold") as wl:
        c = wl.client
        with tracking.Tracker(wl.pid) as t:
            print(f"workload pid {wl.pid}, 64 MiB, 5000 page writes/s hot/cold, tracker {t.method}")
            tracking.live_table(t, interval=1.0, count=3, truth=c.take_written)


def write_secret(path: str, raw: bytes) -> str:
    """Write ``raw`` to the secret file (mode 0600: the agents refuse a file others can
    read) and return what the source agent is given: the same file, so both agents
    derive the key from the same bytes the same way, whatever bytes begin or end it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, raw)
    finally:
        os.close(fd)
    return "@" + path


def migrate_one(tb: Testbed, secret_file: str, strategy: str) -> None:
    port = tb.free_port("b")
    dest = tb.python("b", ["receive", "--listen", f"{tb.addr_b}:{port}", "--images-dir", tb.dir_b,
                           "--secret-file", secret_file],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tb.wait_port("b", port, proc=dest)
    hb = os.path.join(tb.root, f"hb-{strategy}.sock")
    with HeartbeatObserver(hb) as obs:
        wl = workloads.spawn(size="16M", rate=1500, pattern="hotcold", own_pidns=True,
                             netns=tb.ns_a, heartbeat=hb, heartbeat_interval=0.002,
                             control=f"@statesync-demo-{strategy}-{os.getpid()}")
        restored = None
        try:
            src = wl.client
            obs.wait_for_beats(10)
            frozen = {}

            def progress(ev):
                if ev["event"] == "plan":
                    print(
                        f"  plan: {ev['strategy']}, codec {ev['codec']}, {ev['state_pages']} pages "
                        f"of state, dirty rate {ev['dirty_rate_pages_per_s']:.0f} pages/s"
                    )
                elif ev["event"] == "round":
                    print(
                        f"  round {ev['round']}: {ev['pages']:6d} pages, "
                        f"{ev['bytes_wire'] / 1e6:6.2f} MB "
                        f"in {ev['duration_s']:5.2f} s, {ev['dirty_pages']:5d} dirty after, "
                        f"predicted downtime {ev['predicted_downtime_s'] * 1e3:5.0f} ms "
                        f"-> {ev['decision']}"
                    )
                elif ev["event"] == "phase":
                    if ev["phase"] == "dump":
                        # Pause writes at the freeze so the checksum can be compared.
                        src.pause()
                        frozen["sum"] = src.checksum()
                    print(f"  switch-over: {ev['phase']}")

            print(f"\n== {strategy} migration of workload pid {wl.pid} "
                  f"({tb.ns_a} -> {tb.ns_b}, {RATE})")
            t0 = time.monotonic()
            rep = migrate(wl.pid, f"{tb.addr_b}:{port}", strategy=strategy,
                          secret="@" + secret_file,
                          netns=tb.ns_a, link_rate=tb.rate_bps, progress=progress,
                          compression="none" if strategy == "cold" else "auto")
            restored = rep.restored_pid
            obs.wait_for_beats(10)
            gap = obs.max_gap(t0, time.monotonic())
            print(rep.table())
            print(f"  downtime seen from outside (heartbeat gap): {gap['gap_s'] * 1e3:.1f} ms")
            dst = workloads.WorkloadClient(wl.control, netns=tb.ns_b)
            same = dst.checksum() == frozen.get("sum")
            dst.resume()
            print(f"  restored pid {restored} in {tb.ns_b}: state identical to the source at "
                  f"freeze: {'yes' if same else 'NO'}; source pid {wl.pid} "
                  f"{'still exists' if wl.alive() else 'is gone'}")
            dest.wait(30)
        finally:
            wl.kill()
            if restored:
                try:
                    os.kill(restored, 9)
                except ProcessLookupError:
                    pass


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (network namespaces, ptrace, CRIU)", file=sys.stderr)
        return 2
    tracking_part()
    with Testbed(RATE) as tb:
        secret_file = os.path.join(tb.root, "secret")
        write_secret(secret_file, SECRET)
        migrate_one(tb, secret_file, "iterative")
        migrate_one(tb, secret_file, "cold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
