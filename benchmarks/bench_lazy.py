"""Lazy restore with statesync's own lazy-pages daemon vs a full `criu restore`.

Questions (issue 11, destination side):
- time for the daemon to fill N MiB of lazy pages (UFFDIO_COPY in runs of `chunk`
  pages, from the page store already at the destination) vs a plain memcpy of the
  same bytes (into fresh memory, i.e. with page faults, and into memory already
  touched);
- restore-to-running (`criu restore -d` returning with the tree running) with
  --lazy-pages vs a full restore of the same dump; plus the fault service times
  while the fill runs.

A workload process (own pid namespace, random fill so every page is dumped) is
dumped once; write_lazy_image_set makes the lazy restore set. Each round restores
fully, then lazily, checking the workload's checksum each time (after the fill).

Run: ``make bench`` (pytest-benchmark, 64 MiB), or for the numbers in the issue note:
``.venv/bin/python benchmarks/bench_lazy.py --size 256M --rounds 3``. Needs root, CRIU.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

import numpy as np


def _kill(pid, control=None):
    """SIGKILL a restored tree and wait until it is really gone: its pid reaped or a
    zombie whose threads are all gone, and its control socket name released (the
    next restore of the same images binds it again)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    name = "@" + control[1:] if control and control.startswith("@") else None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().split(") ")[-1].startswith("Z")
            gone = zombie and len(os.listdir(f"/proc/{pid}/task")) <= 1
        except OSError:
            gone = True
        if gone and name:
            with open("/proc/net/unix") as f:
                gone = not any(line.rstrip().endswith(name) for line in f)
        if gone:
            return
        time.sleep(0.01)


def prepare(size: str, workdir: str, seed: int = 1) -> dict:
    from statesync import criu
    from statesync.migration import lazy
    from statesync.testing import workloads

    wl = workloads.spawn(size, 0, own_pidns=True, paused=True, fill="random", seed=seed)
    try:
        checksum = wl.client.checksum()
        d = criu.dump(wl.pid, os.path.join(workdir, "full"))
    finally:
        wl.kill()
    res = lazy.write_lazy_image_set(os.path.join(workdir, "full"), os.path.join(workdir, "lazy"))
    return {"control": wl.control, "checksum": checksum, "dump_s": d.wall_time,
            "full": os.path.join(workdir, "full"), "lazy": os.path.join(workdir, "lazy"),
            "lazy_pages": sum(res.lazy_pages.values()),
            "stored_pages": sum(res.stored_pages.values())}


def memcpy_times(nbytes: int, repeat: int = 3) -> dict:
    """memcpy of nbytes: into fresh memory (numpy's allocation: may get transparent
    huge pages), into fresh memory with 4 KiB pages only (MADV_NOHUGEPAGE: what a
    UFFDIO_COPY fill gives the restored process), and into memory already touched."""
    import mmap
    src = np.random.default_rng(0).integers(0, 256, size=nbytes, dtype=np.uint8)
    fresh, fresh4k, warm = [], [], []
    dst_warm = np.ones(nbytes, dtype=np.uint8)
    for _ in range(repeat):
        m = mmap.mmap(-1, nbytes)
        try:
            m.madvise(mmap.MADV_NOHUGEPAGE)
        except (AttributeError, OSError):
            pass
        dst4 = np.frombuffer(m, dtype=np.uint8)
        t0 = time.perf_counter()
        np.copyto(dst4, src)
        fresh4k.append(time.perf_counter() - t0)
        del dst4
        m.close()
        dst = np.empty(nbytes, dtype=np.uint8)   # a fresh mmap: the copy takes the faults
        t0 = time.perf_counter()
        np.copyto(dst, src)
        fresh.append(time.perf_counter() - t0)
        del dst
        t0 = time.perf_counter()
        np.copyto(dst_warm, src)
        warm.append(time.perf_counter() - t0)
    return {"memcpy_fresh_s": min(fresh), "memcpy_fresh4k_s": min(fresh4k),
            "memcpy_warm_s": min(warm)}


def full_restore(p: dict) -> dict:
    from statesync import criu
    from statesync.testing import workloads
    r = criu.restore(p["full"])
    try:
        c = workloads.WorkloadClient(p["control"])
        c.wait_ready(30)
        ok = c.checksum() == p["checksum"]
    finally:
        _kill(r.pid, p["control"])
    return {"restore_s": r.wall_time, "criu_restore_time_s": r.stats.get("restore_time", 0) / 1e6,
            "ok": ok}


def lazy_round(p: dict, chunk: int = 256) -> dict:
    from statesync import criu
    from statesync.migration import lazy
    from statesync.testing import workloads
    full = criu.ImageSet(p["full"])
    t_setup = time.monotonic()
    d = lazy.LazyPagesDaemon(p["lazy"], full, chunk=chunk)   # reads the pagemaps, maps the store
    d.start()
    t0 = time.monotonic()
    try:
        r = criu.restore(p["lazy"], extra_args=["--lazy-pages"])
    except BaseException:
        d.close()
        raise
    t_run = time.monotonic()
    try:
        st = d.wait(120)
        t_filled = time.monotonic()
        c = workloads.WorkloadClient(p["control"])
        c.wait_ready(30)
        ok = c.checksum() == p["checksum"]
    finally:
        _kill(r.pid, p["control"])
    return {"restore_s": r.wall_time, "to_running_s": t_run - t0, "to_filled_s": t_filled - t0,
            "setup_s": t0 - t_setup,
            "criu_restore_time_s": r.stats.get("restore_time", 0) / 1e6,
            "fill_s": st.fill_s, "faults": st.faults, "fault_copied": st.fault_copied,
            "prefetch_copied": st.prefetch_copied, "ioctls": st.prefetch_ioctls,
            "p50_us": st.fault_p50_ns / 1e3, "p99_us": st.fault_p99_ns / 1e3,
            "max_us": st.fault_max_ns / 1e3, "ok": ok}


def run(size: str, rounds: int = 3, chunks=(256,), keep: bool = False) -> dict:
    work = tempfile.mkdtemp(prefix="bench-lazy-")
    try:
        p = prepare(size, work)
        nbytes = p["lazy_pages"] * 4096
        out = {"size": size, "lazy_mib": nbytes / 2**20, "stored_pages": p["stored_pages"],
               **memcpy_times(nbytes)}
        out["full"] = [full_restore(p) for _ in range(rounds)]
        out["lazy"] = {ch: [lazy_round(p, ch) for _ in range(rounds)] for ch in chunks}
        return out
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def report(res: dict) -> str:
    med = statistics.median
    mib = res["lazy_mib"]
    lines = [f"workload {res['size']}: {mib:.0f} MiB lazy, {res['stored_pages']} pages "
             f"restored by CRIU itself",
             f"memcpy of {mib:.0f} MiB: into fresh memory {res['memcpy_fresh_s'] * 1e3:.1f} ms "
             f"({mib / 1024 / res['memcpy_fresh_s']:.2f} GiB/s), into fresh 4 KiB pages "
             f"{res['memcpy_fresh4k_s'] * 1e3:.1f} ms "
             f"({mib / 1024 / res['memcpy_fresh4k_s']:.2f} GiB/s), into touched memory "
             f"{res['memcpy_warm_s'] * 1e3:.1f} ms"]
    f = res["full"]
    lines.append(
        f"full criu restore: restore-to-running {med([x['restore_s'] for x in f]) * 1e3:.0f}"
        f" ms (min {min(x['restore_s'] for x in f) * 1e3:.0f}), CRIU restore_time "
        f"{med([x['criu_restore_time_s'] for x in f]) * 1e3:.0f} ms, checksum ok: "
        f"{all(x['ok'] for x in f)}"
    )
    for ch, rs in res["lazy"].items():
        fill = med([x["fill_s"] for x in rs])
        lines.append(
            f"lazy (chunk {ch}): daemon setup (before the restore) "
            f"{med([x['setup_s'] for x in rs]) * 1e3:.0f} ms, "
            f"restore-to-running {med([x['restore_s'] for x in rs]) * 1e3:.0f} ms"
            f" (min {min(x['restore_s'] for x in rs) * 1e3:.0f}), fill {fill * 1e3:.1f} ms "
            f"({mib / 1024 / fill:.2f} GiB/s, {fill / res['memcpy_fresh4k_s']:.2f}x memcpy into "
            f"fresh 4 KiB pages), "
            f"CRIU restore_time {med([x['criu_restore_time_s'] for x in rs]) * 1e3:.0f} ms, "
            f"restore start -> filled {med([x['to_filled_s'] for x in rs]) * 1e3:.0f} ms; "
            f"faults {med([x['faults'] for x in rs]):.0f} (p50 {med([x['p50_us'] for x in rs]):.0f}"
            f" us, p99 {med([x['p99_us'] for x in rs]):.0f} us, max "
            f"{max(x['max_us'] for x in rs):.0f} us), ioctls {med([x['ioctls'] for x in rs]):.0f}, "
            f"checksum ok: {all(x['ok'] for x in rs)}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- pytest-benchmark

try:
    import pytest
except ImportError:  # run as a script without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="module")
    def prepared(tmp_path_factory):
        from conftest import have_root, require
        from statesync import _core, criu
        require(have_root(), "needs root")
        require(criu.check().ok, "needs a working CRIU (scripts/setup-system.sh installs it)")
        try:
            _core.lazy_uffd_probe()
        except OSError as exc:
            require(False, f"userfaultfd with non-cooperative events: {exc}")
        return prepare("64M", str(tmp_path_factory.mktemp("bench-lazy")))

    def test_lazy_restore_fill(benchmark, prepared):
        r = benchmark.pedantic(lazy_round, args=(prepared,), rounds=3)
        benchmark.extra_info.update(fill_ms=r["fill_s"] * 1e3, restore_ms=r["restore_s"] * 1e3,
                                    p99_us=r["p99_us"])
        assert r["ok"]

    def test_full_restore(benchmark, prepared):
        r = benchmark.pedantic(full_restore, args=(prepared,), rounds=3)
        benchmark.extra_info.update(restore_ms=r["restore_s"] * 1e3)
        assert r["ok"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="256M")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunks", default="256", help="comma-separated chunk sizes (pages)")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)
    res = run(a.size, a.rounds, tuple(int(x) for x in a.chunks.split(",")), a.keep)
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
