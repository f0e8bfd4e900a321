"""The page store (statesync.stream.store.PageStore): what growth and decoding into it cost.

Questions (issue 9, with issue 11's note that a doubling copy of a full destination
table took 0.69 s inside the downtime):
- growth: the worst single insert while a store grows to ``--mib`` MiB of pages in
  batches of 256 pages (a PAGES frame). The store appends chunks, so no insert copies
  what is held; the old doubling table (modelled here by ``_DoublingTable``, the
  algorithm of the former migration/pagetable.py) copies everything at each doubling;
- decode: one ``--mib`` MiB stream into a fresh store, the same stream again
  (overwrite in place), and the engine's path (one stream per 256-page batch through
  ``migration.codec.decode_pages``).

The machine is shared: compare the two columns, not absolutes.
Run: ``make bench`` or ``.venv/bin/python benchmarks/bench_store.py [--mib 256]``.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

PS = 4096
BATCH = 256


class _DoublingTable:
    """The growth of the former PageTable: one rows array, doubled and copied when full."""

    def __init__(self, width: int):
        self.rows = np.empty((1024, width), np.uint8)
        self.used = 0

    def append(self, values: np.ndarray) -> None:
        need = self.used + values.shape[0]
        cap = self.rows.shape[0]
        if need > cap:
            while cap < need:
                cap *= 2
            rows = np.empty((cap, self.rows.shape[1]), np.uint8)
            rows[:self.used] = self.rows[:self.used]
            self.rows = rows
        self.rows[self.used:need] = values
        self.used = need


def growth(mib: int) -> dict:
    from statesync.stream.store import PageStore
    n = (mib << 20) // PS
    batch = np.full((BATCH, PS), 7, np.uint8)
    worst = {"chunked": 0.0, "doubling": 0.0}
    store, old = PageStore(PS), _DoublingTable(PS)
    for i in range(0, n, BATCH):
        a = (np.arange(BATCH, dtype=np.uint64) + np.uint64(i)) * np.uint64(PS)
        t0 = time.perf_counter()
        store.put(a, batch)
        t1 = time.perf_counter()
        old.append(batch)
        t2 = time.perf_counter()
        worst["chunked"] = max(worst["chunked"], t1 - t0)
        worst["doubling"] = max(worst["doubling"], t2 - t1)
    return {"pages": n, "worst_insert_chunked_s": worst["chunked"],
            "worst_insert_doubling_s": worst["doubling"], "chunks": len(store._chunks)}


def decode(mib: int, reps: int = 3) -> dict:
    from statesync import stream as S
    from statesync.migration.codec import PageCodec, decode_pages
    from statesync.stream.store import PageStore
    n = (mib << 20) // PS
    rng = np.random.default_rng(1)
    addrs = np.arange(n, dtype=np.uint64) * np.uint64(PS) + np.uint64(1 << 30)
    pages = rng.integers(0, 4, (n, PS), dtype=np.uint8)
    data = S.encode(addrs, pages, compression=None, xor=False, dedup=False)
    codec = PageCodec(None)
    frames = [codec.encode(addrs[i:i + BATCH], pages[i:i + BATCH]) for i in range(0, n, BATCH)]

    def best(fn):
        out = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - t0)
        return out

    store = S.MemoryPageStore(PS)
    fresh = best(lambda: S.apply([data], S.MemoryPageStore(PS)))
    S.apply([data], store)
    again = best(lambda: S.apply([data], store))

    def engine():
        t = PageStore(PS)
        for f in frames:
            decode_pages(f, t)

    return {"fresh_s": fresh, "overwrite_s": again, "engine_batches_s": best(engine),
            "GB_s_fresh": n * PS / fresh / 1e9}


def test_store_growth_and_decode(benchmark):
    r = benchmark.pedantic(lambda: growth(256), rounds=1, iterations=1)
    benchmark.extra_info.update({k: round(v, 5) if isinstance(v, float) else v
                                 for k, v in {**r, **decode(64)}.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    a = ap.parse_args()
    g = growth(a.mib)
    print(f"growth to {a.mib} MiB in {BATCH}-page inserts: worst insert "
          f"{g['worst_insert_chunked_s'] * 1e3:.1f} ms chunked ({g['chunks']} chunks) vs "
          f"{g['worst_insert_doubling_s'] * 1e3:.1f} ms with a doubling copy")
    d = decode(min(a.mib, 128))
    print(f"decode {min(a.mib, 128)} MiB: fresh store {d['fresh_s'] * 1e3:.0f} ms "
          f"({d['GB_s_fresh']:.2f} GB/s), overwrite {d['overwrite_s'] * 1e3:.0f} ms, "
          f"engine path ({BATCH}-page streams) {d['engine_batches_s'] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
