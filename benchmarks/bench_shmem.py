"""Shared memory and process trees in pre-copy: downtime and bytes sent during the
freeze, statesync now (MemorySource(tree=True, shmem=True), the default) against the
root-only pre-copy it had before (tree=False, shmem=False: shared memory and
children travel whole inside the freeze), and against the same buffer MAP_PRIVATE.

A Python process (tests/test_memsource.py's _MIG_SHM, set up by its mig_shm_bed)
holds an N-page buffer, MAP_SHARED anonymous or MAP_PRIVATE, optionally with forked
children holding 1 MiB of private memory each; 20 pages are written after round 0.
One iterative migration per case over the 1 Gbit testbed link, uffd tracker; one run
each (compare ratios).

    .venv/bin/python benchmarks/bench_shmem.py [--mb 32,512] [--children 3]
"""
import argparse
import os
import pathlib
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def one(kind, npages, children, before):
    import test_memsource as T
    from statesync.migration import memsource, source
    orig = source.MemorySource
    if before:
        # the root-only pre-copy statesync had before (the switch-over's call asks
        # for tree and shmem: override it)
        source.MemorySource = lambda pid, **kw: memsource.MemorySource(pid)  # type: ignore
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-shmem-"))
    try:
        with T.mig_shm_bed(tmp, npages, kind, children, io_timeout=60.0) as (bed, pid, req):

            def hook(ev):
                if ev.get("event") == "round" and ev.get("round") == 0:
                    req("w 10 30")
            rep = bed.migrate(pid, strategy="iterative", max_rounds=3, tracker="uffd",
                              progress=hook, io_timeout=60.0)
            bed.restored.append(rep.restored_pid)
            return rep
    finally:
        source.MemorySource = orig


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", default="32,512")
    ap.add_argument("--children", type=int, default=3)
    a = ap.parse_args()
    print(f"{'case':34s} {'downtime ms':>11} {'state pg':>9} {'round0 pg':>9} "
          f"{'final pg':>8} {'freeze MB':>9}")
    cases = []
    for mb in [int(x) for x in a.mb.split(",")]:
        n = mb * 256
        cases += [(f"{mb} MB private", "private", n, 0, False),
                  (f"{mb} MB shared, before", "shared", n, 0, True),
                  (f"{mb} MB shared, now", "shared", n, 0, False)]
    if a.children:
        cases += [(f"32 MB shared + {a.children} children, before", "shared", 8192,
                   a.children, True),
                  (f"32 MB shared + {a.children} children, now", "shared", 8192,
                   a.children, False)]
    for name, kind, n, ch, before in cases:
        rep = one(kind, n, ch, before)
        freeze = (rep.final_bytes_wire + rep.images_bytes) / 1e6
        print(f"{name:34s} {rep.downtime_s * 1e3:11.0f} {rep.state_pages:9d} "
              f"{rep.rounds[0].pages if rep.rounds else 0:9d} {rep.final_pages:8d} "
              f"{freeze:9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
