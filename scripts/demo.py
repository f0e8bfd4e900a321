"""`make demo`: the main job as it stands. Starts the workload generator and shows a
live table of the pages it writes, as statesync's best tracker here sees them,
next to what the generator itself says it wrote (the "missed" column must stay 0)."""
import sys

from statesync import tracking, workloads


def main() -> int:
    print("tracking methods here:")
    for name, (ok, why) in tracking.tracking_methods().items():
        print(f"  {name:10s} {'yes' if ok else 'no ':3s}  {why}")
    with workloads.spawn(size="64M", rate=5000, pattern="hotcold") as wl:
        c = wl.client
        st = c.status()
        print(f"\nworkload pid {wl.pid}: {st['size'] >> 20} MiB buffer, 5000 page writes/s, hot/cold")
        with tracking.Tracker(wl.pid) as t:
            tracking.live_table(t, interval=1.0, count=6, truth=c.take_written)
            print(f"\ndetached; the workload keeps running: checksum {c.checksum()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
