"""The strategy benchmark behind ``statesync bench``: on one process, side by side in
one run, each dirty-page tracker, each page codec and each migration strategy.

- **trackers** (``uffd``, ``softdirty``, ``hash``): attach to the live target, collect
  ``rounds`` times ``interval`` seconds apart; report attach time, dirty pages per
  second seen, mean collect time, detach time (or why the method is unavailable).
- **codecs** (``none``, ``lz4``, ``lz4+xor``, each with zero-page elision; ``dedup``
  on and off for lz4): encode the target's present pages as the engine does (round 0),
  and for ``lz4+xor`` the pages it rewrote during one interval against their
  previous contents (what a later round sends); report the wire/raw ratio and the
  encode rate in MB/s.
- **strategies** (``cold``, ``precopy``, ``iterative``): on the built-in workload,
  real migrations across the two-host testbed (:mod:`statesync.testing.testbed`,
  shaped to ``link``), a fresh copy of the workload for each: downtime, total time
  and bytes on the wire as the engine reports them. On a process the user names
  (``pid``) the strategies are *predicted* by the scheduler's cost model from the
  measured state size, dirty rate and codec, because a real migration would move
  that process away; its trackers and codecs are measured for real.

:func:`run` returns a JSON-ready dict; :func:`format_table` and :func:`plot` render it.
Needs root for trackers on other processes and for the testbed.
"""
from __future__ import annotations

import math
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from statesync._consts import PAGE_SIZE

TRACKERS = ("uffd", "softdirty", "hash")
CODECS = ("none", "lz4", "lz4-nodedup", "lz4+xor")
STRATEGIES = ("cold", "precopy", "iterative")
_SECRET = b"statesync-bench-secret-0123456789ab"


# --------------------------------------------------------------------------- trackers


def bench_trackers(pid: int, methods: Sequence[str] = TRACKERS, rounds: int = 3,
                   interval: float = 0.5) -> List[dict]:
    from statesync.errors import StateSyncError
    from statesync.tracking import Tracker, tracking_methods
    avail = tracking_methods(pid)
    rows = []
    for m in methods:
        ok, why = avail.get(m, (False, "unknown method"))
        row: Dict[str, object] = {"tracker": m, "available": bool(ok), "reason": why}
        if not ok:
            rows.append(row)
            continue
        try:
            t0 = time.perf_counter()
            t = Tracker(pid, method=m)
            attach = time.perf_counter() - t0
            try:
                t.collect()
                pages, collect = [], []
                last = time.monotonic()
                for _ in range(rounds):
                    time.sleep(max(0.0, last + interval - time.monotonic()))
                    d = t.collect()
                    now = time.monotonic()
                    pages.append(len(d) / max(now - last, 1e-9))
                    last = now
                    collect.append(t.last_collect_s)
            finally:
                t0 = time.perf_counter()
                t.detach()
                detach = time.perf_counter() - t0
            row.update(attach_s=attach, detach_s=detach,
                       dirty_pages_per_s=float(np.mean(pages)),
                       collect_s=float(np.mean(collect)))
        except StateSyncError as exc:
            row.update(available=False, reason=str(exc).splitlines()[0])
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- codecs


def _read_state(pid: int, max_pages: int):
    from statesync import proc
    addrs = proc.present_pages(pid)
    if addrs.size > max_pages:
        addrs = addrs[np.linspace(0, addrs.size - 1, max_pages).astype(np.int64)]
        addrs = np.unique(addrs)
    pages, ok = proc.read_pages(pid, addrs)
    return addrs[ok], np.ascontiguousarray(pages[ok])


def bench_codecs(pid: int, codecs: Sequence[str] = CODECS, interval: float = 0.5,
                 max_pages: int = 65536) -> List[dict]:
    """Encode the target's pages (at most ``max_pages``, sampled evenly) with each
    codec; ``lz4+xor`` encodes the pages that changed over ``interval`` against their
    earlier contents."""
    from statesync.migration.codec import PageCodec
    addrs, pages = _read_state(pid, max_pages)
    time.sleep(interval)
    from statesync import proc
    again, ok = proc.read_pages(pid, addrs)
    changed = ok & (again != pages).any(axis=1)
    rows = []
    for name in codecs:
        if name == "lz4+xor":
            codec = PageCodec("lz4", xor=True)
            a, p = addrs[changed], np.ascontiguousarray(again[changed])
            prev, mask = pages[changed], np.ones(a.size, dtype=bool)
        else:
            codec = PageCodec(None if name == "none" else "lz4",
                              dedup=False if name == "lz4-nodedup" else None)
            a, p, prev, mask = addrs, pages, None, None
        if a.size == 0:
            rows.append({"codec": name, "pages": 0, "raw_bytes": 0, "wire_bytes": 0,
                         "ratio": math.nan, "encode_mb_per_s": math.nan,
                         "note": "no page changed during the interval" if name == "lz4+xor"
                         else "no pages"})
            continue
        t0 = time.perf_counter()
        wire = 0
        for i in range(0, a.size, 1024):
            sl = slice(i, i + 1024)
            wire += len(codec.encode(a[sl], p[sl], None if prev is None else prev[sl],
                                     None if mask is None else mask[sl]))
        dt = max(time.perf_counter() - t0, 1e-9)
        raw = int(a.size) * PAGE_SIZE
        rows.append({"codec": name, "pages": int(a.size), "raw_bytes": raw, "wire_bytes": wire,
                     "ratio": wire / raw, "encode_mb_per_s": raw / dt / 1e6,
                     "zero_pages": int((~p.any(axis=1)).sum()),
                     "note": "re-sent pages against their previous copy" if name == "lz4+xor"
                     else "round 0: every present page"})
    return rows


# --------------------------------------------------------------------------- strategies


def _predict(pid: int, strategies: Sequence[str], link_bps: float, tracker_rows, codec_rows,
             max_downtime_s: float) -> List[dict]:
    """The scheduler's cost model for each strategy, from what was measured."""
    from statesync.errors import Infeasible
    from statesync.planning import kpi, scheduler
    from statesync.planning.costs import CriuCosts
    from statesync import proc
    n = int(proc.present_pages(pid).size)
    rates = [r["dirty_pages_per_s"] for r in tracker_rows if r.get("dirty_pages_per_s")]
    rate = float(rates[0]) if rates else 0.0
    c = CriuCosts()
    lz4 = next((r for r in codec_rows if r["codec"] == "lz4" and r.get("pages")), None)
    codecs: tuple = ()
    if lz4 and lz4["ratio"] == lz4["ratio"]:
        codecs = (kpi.Codec("lz4", 1 / max(lz4["ratio"], 1e-6), lz4["encode_mb_per_s"] * 1e6,
                            lz4["encode_mb_per_s"] * 4e6),)
    obs = kpi.Observations(
        state_bytes=max(1, n) * PAGE_SIZE, dirty_rate_pages_per_s=rate, dirty_rate_window_s=1.0,
        bandwidth_bytes_per_s=link_bps / 8,
        dump_fixed_s=c.dump_fixed_s + c.dump_s_per_mib * n * PAGE_SIZE / (1 << 20),
        dump_s_per_mib=0.0, restore_fixed_s=c.restore_fixed_s,
        restore_s_per_mib=c.restore_s_per_mib, rtt_s=0.001, codecs=codecs)
    model = kpi.CostModel(obs)
    rows = []
    for s in strategies:
        row: Dict[str, object] = {"strategy": s, "measured": False, "state_pages": n}
        if s == "cold":
            down = model.downtime(n, "none", obs.bandwidth_bytes_per_s)
            row.update(downtime_s=down, total_s=down, wire_bytes=n * PAGE_SIZE, rounds=0)
        elif s == "iterative":
            try:
                plan = scheduler.get("adaptive").plan(
                    obs, kpi.Targets(max_downtime_s=max_downtime_s))
            except Infeasible as exc:
                plan = exc.best
            row.update(downtime_s=plan.predicted_downtime_s, total_s=plan.predicted_total_time_s,
                       wire_bytes=int(plan.predicted_wire_bytes), rounds=int(plan.rounds),
                       reason=plan.reason, plan=plan.strategy)
        else:
            # one live round of every page; what was written meanwhile goes frozen
            t = n * PAGE_SIZE / obs.bandwidth_bytes_per_s
            left = min(float(n), rate * t)
            down = model.downtime(int(left), "none", obs.bandwidth_bytes_per_s)
            row.update(downtime_s=down, total_s=t + down,
                       wire_bytes=int((n + left) * PAGE_SIZE), rounds=1)
        rows.append(row)
    return rows


def bench_strategies_testbed(strategies: Sequence[str], link: str, size: str, rate: float,
                             tracker: str = "auto", io_timeout: float = 60.0) -> List[dict]:
    """Real migrations of a fresh built-in workload per strategy across the testbed."""
    import subprocess

    from statesync.errors import MigrationError
    from statesync.migration.api import migrate
    from statesync.testing import workloads
    from statesync.testing.testbed import Testbed
    rows = []
    with Testbed(link) as tb:
        sf = os.path.join(str(tb.root), "secret")
        with open(os.open(sf, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(_SECRET)
        port = tb.free_port("b")
        dest = tb.python("b", ["receive", "--listen", f"{tb.addr_b}:{port}", "--images-dir",
                               tb.dir_b, "--secret-file", sf, "--io-timeout", str(io_timeout),
                               "--forever"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tb.wait_port("b", port, proc=dest)
        for s in strategies:
            wl = workloads.spawn(size=size, rate=rate, own_pidns=True, netns=tb.ns_a,
                                 control=f"@ssbench-{os.getpid()}-{time.monotonic_ns()}")
            restored = None
            try:
                rep = migrate(wl.pid, f"{tb.addr_b}:{port}", s, secret=_SECRET, netns=tb.ns_a,
                              io_timeout=io_timeout, link_rate=tb.rate_bps,
                              tracker=tracker if s != "cold" else "auto")
                restored = rep.restored_pid
                rows.append({"strategy": s, "measured": True, "ok": True,
                             "state_pages": rep.state_pages, "rounds": len(rep.rounds),
                             "downtime_s": rep.downtime_s,
                             "predicted_downtime_s": rep.predicted_downtime_s,
                             "total_s": rep.total_s, "wire_bytes": rep.bytes_wire_total,
                             "final_pages": rep.final_pages, "codec": rep.codec,
                             "tracker": rep.tracker})
            except MigrationError as exc:
                rows.append({"strategy": s, "measured": True, "ok": False,
                             "error": str(exc).splitlines()[0]})
            finally:
                wl.kill()
                if restored:
                    try:
                        os.kill(restored, 9)
                    except ProcessLookupError:
                        pass
    return rows


# --------------------------------------------------------------------------- the run


def run(pid: Optional[int] = None, *, size: str = "16M", rate: float = 2000.0,
        link: str = "1gbit", trackers: Sequence[str] = TRACKERS,
        codecs: Sequence[str] = CODECS, strategies: Sequence[str] = STRATEGIES,
        rounds: int = 3, interval: float = 0.5, max_downtime_s: float = 1.0,
        progress=None) -> dict:
    """The whole benchmark. ``pid``: the user's process (trackers and codecs measured
    on it, strategies predicted), or None: the built-in workload (``size`` bytes,
    ``rate`` page writes/s) for everything, strategies migrated for real on the
    testbed at ``link``."""
    from statesync import __version__
    from statesync.testing import workloads
    from statesync.testing.testbed import parse_rate
    say = progress or (lambda msg: None)
    link_bps = float(parse_rate(link))
    result: Dict[str, object] = {"statesync": __version__, "started_at": time.time(),
                                 "target": {"pid": pid, "workload": None if pid else
                                            {"size": size, "rate_pages_per_s": rate}},
                                 "link_bps": link_bps}
    wl = None
    try:
        if pid is None:
            wl = workloads.spawn(size=size, rate=rate,
                                 control=f"@ssbench-{os.getpid()}-{time.monotonic_ns()}")
            target = wl.pid
        else:
            target = pid
        say(f"trackers on pid {target}: {', '.join(trackers)}")
        result["trackers"] = bench_trackers(target, trackers, rounds, interval)
        say(f"codecs on pid {target}: {', '.join(codecs)}")
        result["codecs"] = bench_codecs(target, codecs, interval)
        if pid is not None:
            say("strategies: predicted by the cost model (a real migration would move the "
                "process)")
            result["strategies"] = _predict(pid, strategies, link_bps, result["trackers"],
                                            result["codecs"], max_downtime_s)
    finally:
        if wl is not None:
            wl.kill()
    if pid is None:
        say(f"strategies: real migrations on the testbed at {link}: {', '.join(strategies)}")
        result["strategies"] = bench_strategies_testbed(strategies, link, size, rate)
    return result


# --------------------------------------------------------------------------- output


def _f(v, scale=1.0, fmt="{:.1f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt.format(v * scale)


def format_table(res: dict) -> str:
    lines = ["trackers", f"  {'tracker':10s} {'attach ms':>10s} {'collect ms':>11s} "
             f"{'dirty pages/s':>14s} {'detach ms':>10s}  note"]
    for r in res.get("trackers", []):
        if not r["available"]:
            lines.append(f"  {r['tracker']:10s} {'-':>10s} {'-':>11s} {'-':>14s} {'-':>10s}  "
                         f"unavailable: {r['reason']}")
            continue
        lines.append(f"  {r['tracker']:10s} {_f(r['attach_s'], 1e3):>10s} "
                     f"{_f(r['collect_s'], 1e3, '{:.2f}'):>11s} "
                     f"{_f(r['dirty_pages_per_s'], 1, '{:.0f}'):>14s} "
                     f"{_f(r['detach_s'], 1e3):>10s}")
    lines += ["codecs", f"  {'codec':12s} {'pages':>8s} {'raw MB':>8s} {'wire MB':>8s} "
              f"{'wire/raw':>9s} {'MB/s':>8s}  note"]
    for r in res.get("codecs", []):
        lines.append(f"  {r['codec']:12s} {r['pages']:8d} {_f(r['raw_bytes'], 1e-6):>8s} "
                     f"{_f(r['wire_bytes'], 1e-6, '{:.2f}'):>8s} "
                     f"{_f(r['ratio'], 1, '{:.3f}'):>9s} "
                     f"{_f(r['encode_mb_per_s'], 1, '{:.0f}'):>8s}"
                     f"  {r.get('note', '')}")
    lines += [f"strategies (link {res['link_bps'] / 1e6:g} Mbit/s)",
              f"  {'strategy':10s} {'how':9s} {'rounds':>6s} {'downtime ms':>12s} "
              f"{'total s':>8s} {'wire MB':>8s}  note"]
    for r in res.get("strategies", []):
        how = "measured" if r.get("measured") else "predicted"
        if r.get("ok") is False:
            lines.append(f"  {r['strategy']:10s} {how:9s} failed: {r.get('error')}")
            continue
        note = ""
        if r.get("measured") and r.get("predicted_downtime_s") is not None:
            note = f"predicted {_f(r['predicted_downtime_s'], 1e3)} ms"
        lines.append(f"  {r['strategy']:10s} {how:9s} {r.get('rounds', 0):6d} "
                     f"{_f(r.get('downtime_s'), 1e3):>12s} {_f(r.get('total_s'), 1, '{:.2f}'):>8s} "
                     f"{_f(r.get('wire_bytes'), 1e-6):>8s}  {note}")
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    """Three panels: collect cost per tracker, wire/raw per codec, downtime and total
    time per strategy. Needs matplotlib (the ``plot`` extra)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    tr = [r for r in res.get("trackers", []) if r["available"]]
    axes[0].bar([r["tracker"] for r in tr], [r["collect_s"] * 1e3 for r in tr])
    axes[0].set_ylabel("collect (ms)")
    axes[0].set_title("trackers: cost of one collect")
    co = [r for r in res.get("codecs", []) if r.get("pages")]
    axes[1].bar([r["codec"] for r in co], [r["ratio"] for r in co])
    axes[1].set_ylabel("wire bytes / raw bytes")
    axes[1].set_title("codecs")
    st = [r for r in res.get("strategies", []) if r.get("ok", True)]
    x = np.arange(len(st))
    axes[2].bar(x - 0.2, [r["downtime_s"] for r in st], 0.4, label="downtime (s)")
    axes[2].bar(x + 0.2, [r["total_s"] for r in st], 0.4, label="total (s)")
    axes[2].set_xticks(x, [f"{r['strategy']}\n({'measured' if r.get('measured') else 'predicted'})"
                           for r in st])
    axes[2].set_yscale("log")
    axes[2].legend()
    axes[2].set_title("strategies")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
