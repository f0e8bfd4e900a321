"""`make demo`: the main job as it stands. Starts the workload generator and shows
what it writes (grows with the project: tracking, then migration)."""
import sys
import time

from statesync import workloads


def main() -> int:
    with workloads.spawn(size="64M", rate=5000) as wl:
        c = wl.client
        print(f"workload pid {wl.pid}, 64 MiB, 5000 pages/s")
        for _ in range(5):
            time.sleep(1.0)
            w = c.take_written()
            print(f"  {w.size:6d} pages written in the last second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
