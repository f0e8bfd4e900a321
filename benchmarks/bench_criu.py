"""CRIU image deltas: diff throughput, incremental set size, write_incremental vs CRIU.

Questions (issue 3):
- diff throughput (GB/s of the new dump's pages compared) on dumps of 256 MB and 1 GB
  processes; target >= 1.5 GB/s per core (diff is single-threaded);
- size of an incremental set vs CRIU's full dump at 0.1 %, 1 %, 10 % dirty pages;
  target at 1 %: <= 2 %;
- time of write_incremental vs CRIU's own full dump of the same process, one run.

A workload process (own pid namespace) of the given buffer size is dumped once (the
parent), then a growing random subset of its buffer pages is rewritten (0.1 %, then up
to 1 %, then up to 10 % of the buffer's pages, cumulative) and dumped again after each
step; each dump is turned into an incremental set against the parent. Everything is
measured side by side in one run on the same page-cache-warm files.

Run: ``make bench`` (pytest-benchmark), or for the table in the issue note:
``.venv/bin/python benchmarks/bench_criu.py --sizes 256M,1G``. Needs root and CRIU.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

FRACTIONS = (0.001, 0.01, 0.1)


def _mem_bytes(path):
    """Bytes of pages-*.img and pagemap-*.img (the memory part of a set)."""
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
               if n.startswith(("pages-", "pagemap-")))


def prepare(size: str, workdir: str, seed: int = 1) -> dict:
    """Spawn, dump the parent, then dirty + dump + write_incremental per fraction."""
    from statesync import criu
    from statesync.testing import workloads

    out = {"size": size, "runs": []}
    wl = workloads.spawn(size, 0, own_pidns=True, paused=True, fill="mixed", seed=seed)
    try:
        c = wl.client
        st = c.status()
        npages = st["npages"]
        full = criu.dump(wl.pid, os.path.join(workdir, "full"), leave_running=True)
        out["full_dump_s"] = full.wall_time
        out["full_frozen_s"] = full.stats.get("frozen_time", 0) / 1e6
        out["full_bytes"] = criu._dir_bytes(full.images_dir)
        out["full_mem_bytes"] = _mem_bytes(full.images_dir)
        out["full_pages"] = criu.ImageSet(full.images_dir).npages
        perm = np.random.default_rng(seed).permutation(npages)
        done = 0
        for f in FRACTIONS:
            upto = max(1, int(round(f * npages)))
            idx = perm[done:upto]
            for i in range(0, idx.size, 4096):
                c.write(idx[i:i + 4096].tolist())
            done = upto
            d = os.path.join(workdir, f"d{f}")
            r = criu.dump(wl.pid, d, leave_running=True)
            inc = os.path.join(workdir, f"inc{f}")
            t0 = time.perf_counter()
            w = criu.write_incremental(d, full.images_dir, inc)
            t_inc = time.perf_counter() - t0
            out["runs"].append({"fraction": f, "dirty_buffer_pages": upto, "dump_dir": d,
                                "dump_s": r.wall_time, "dump_bytes": criu._dir_bytes(d),
                                "inc_s": t_inc, "inc_bytes": w.nbytes,
                                "inc_pages": w.pages_written, "inc_dir": inc})
    finally:
        wl.kill()
    out["full_dir"] = os.path.join(workdir, "full")
    return out


def exact_sizes(full_dir: str, workdir: str, seed: int = 2) -> list:
    """Incremental size at exactly f of the dump's pages changed: a copy of the full dump
    with round(f * pages) random pages altered (write_image_set), then write_incremental
    against the original. Isolates the format's overhead from the interpreter's own
    background writes that a live process adds."""
    from statesync import criu

    full = criu.ImageSet(full_dir)
    addrs = full.addresses()
    full_bytes = criu._dir_bytes(full_dir)
    rng = np.random.default_rng(seed)
    out = []
    for f in FRACTIONS:
        k = max(1, int(round(f * addrs.size)))
        pick = np.sort(rng.choice(addrs.size, k, replace=False))
        pages = full.read(addrs[pick])
        pages[:, 0] ^= 0xFF
        new = os.path.join(workdir, f"exact{f}")
        criu.write_image_set(full_dir, new, addrs[pick], pages)
        w = criu.write_incremental(new, full_dir, os.path.join(workdir, f"exactinc{f}"))
        assert w.pages_written == k
        out.append({"fraction": f, "pages": k, "inc_bytes": w.nbytes, "full_bytes": full_bytes})
    return out


def time_diff(old: str, new: str, repeat: int = 5):
    """Best-of-repeat seconds of diff(old, new) from directories (parsing included),
    and the bytes of the new set's pages compared."""
    from statesync import criu

    best = float("inf")
    n = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        d = criu.diff(old, new)
        best = min(best, time.perf_counter() - t0)
        n = len(d)
    nbytes = criu.ImageSet(new).nbytes
    return best, nbytes, n


def report(res: dict) -> str:
    lines = [f"== process buffer {res['size']}: CRIU full dump {res['full_pages']} pages, "
             f"{res['full_bytes'] / 2**20:.1f} MiB, {res['full_dump_s'] * 1000:.0f} ms wall "
             f"({res['full_frozen_s'] * 1000:.0f} ms frozen)"]
    for r in res["runs"]:
        lines.append(
            f"  dirty {r['fraction'] * 100:5.1f}% of buffer: diff {r['diff_gbps']:.2f} GB/s "
            f"({r['diff_s'] * 1000:.0f} ms, {r['diff_pages']} pages differ = "
            f"{100 * r['diff_pages'] / res['full_pages']:.2f}% of the dump) | incremental "
            f"{r['inc_bytes'] / 2**20:.2f} MiB = {100 * r['inc_bytes'] / r['dump_bytes']:.2f}% of "
            f"CRIU's full dump ({r['dump_bytes'] / 2**20:.1f} MiB) | write_incremental "
            f"{r['inc_s'] * 1000:.0f} ms vs CRIU full dump {r['dump_s'] * 1000:.0f} ms "
            f"(ratio {r['inc_s'] / r['dump_s']:.2f})")
    for e in res.get("exact", []):
        lines.append(
            f"  exactly {e['fraction'] * 100:5.1f}% of the dump's pages changed "
            f"({e['pages']} pages): "
            f"incremental {e['inc_bytes'] / 2**20:.2f} MiB = "
            f"{100 * e['inc_bytes'] / e['full_bytes']:.2f}% of the full dump"
        )
    return "\n".join(lines)


def run(size: str, keep: bool = False) -> dict:
    workdir = tempfile.mkdtemp(prefix=f"statesync-bench-criu-{size}-", dir="/var/tmp")
    try:
        res = prepare(size, workdir)
        for r in res["runs"]:
            s, nbytes, n = time_diff(res["full_dir"], r["dump_dir"])
            r.update(diff_s=s, diff_gbps=nbytes / s / 1e9, diff_pages=n)
        res["exact"] = exact_sizes(res["full_dir"], workdir)
        return res
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- pytest-benchmark

try:
    import pytest
except ImportError:  # script use without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="module", params=["256M", "1G"])
    def prepared(request):
        from conftest import have_root, require
        from statesync import criu
        require(have_root(), "needs root")
        require(criu.check().ok, "needs a working CRIU (scripts/setup-system.sh installs it)")
        workdir = tempfile.mkdtemp(prefix="statesync-bench-criu-", dir="/var/tmp")
        try:
            yield prepare(request.param, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    @pytest.mark.parametrize("fraction", FRACTIONS)
    def test_diff_throughput(benchmark, prepared, fraction):
        from statesync import criu
        r = next(x for x in prepared["runs"] if x["fraction"] == fraction)
        d = benchmark.pedantic(criu.diff, args=(prepared["full_dir"], r["dump_dir"]), rounds=3)
        nbytes = criu.ImageSet(r["dump_dir"]).nbytes
        benchmark.extra_info.update(
            size=prepared["size"], dirty_pages=len(d), bytes_compared=nbytes,
            gb_per_s=nbytes / benchmark.stats.stats.min / 1e9)

    @pytest.mark.parametrize("fraction", FRACTIONS)
    def test_write_incremental_vs_criu_dump(benchmark, prepared, fraction, tmp_path):
        from statesync import criu
        r = next(x for x in prepared["runs"] if x["fraction"] == fraction)
        outs = iter(range(100))
        benchmark.pedantic(lambda: criu.write_incremental(
            r["dump_dir"], prepared["full_dir"], tmp_path / f"inc{next(outs)}"), rounds=3)
        benchmark.extra_info.update(
            size=prepared["size"], inc_bytes=r["inc_bytes"], full_dump_bytes=r["dump_bytes"],
            size_ratio=r["inc_bytes"] / r["dump_bytes"], criu_full_dump_s=r["dump_s"],
            time_ratio_vs_criu_dump=benchmark.stats.stats.min / r["dump_s"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="256M,1G", help="comma-separated workload buffer sizes")
    p.add_argument("--keep", action="store_true", help="keep the image sets (printed paths)")
    a = p.parse_args(argv)
    for size in a.sizes.split(","):
        print(report(run(size, a.keep)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
