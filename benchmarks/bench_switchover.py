"""Switch-over side by side: statesync's modes against CRIU's own, on one case and link.

Back to back, in one run, on the same workload and the same shaped link between the
testbed's two namespaces (statesync.testing.testbed):

- ``ss-iterative``: statesync iterative pre-copy with the full switch-over (a full
  dump, content diff, complete image set, full ``criu restore``: ``switchover="full"``);
- ``ss-lazy``: statesync iterative pre-copy with the lazy switch-over (freeze-time
  work in the final dirty set; the destination restores lazily from the pages it
  already holds: ``migrate(..., switchover="lazy")``);
- ``ss-hybrid``: statesync hybrid (``strategy="hybrid"``): at most three pre-copy
  rounds, then the lazy switch-over leaves what is still dirty at the source; the
  destination fetches it on demand (a fault waits for its page) while the source
  pushes the rest in the background (post-copy; docs/postcopy.md);
- ``criu-postcopy``: CRIU's post-copy: ``criu dump --lazy-pages`` at the source (its
  page server holds the pages), the images copied over the link, ``criu lazy-pages
  --page-server`` + ``criu restore --lazy-pages`` at the destination;
- ``criu-cold``: ``criu dump --page-server`` into ``criu page-server`` at the
  destination, the other images copied over the link, ``criu restore``.

Cases: ``small`` (25 MB workload, 200 pages/s), ``hot`` (64 MB workload rewriting 20,000
pages/s = 122% of its pages per second: pre-copy cannot converge at 1 Gbit/s,
r = dirty rate / bandwidth = 0.66), ``redis`` (~256 MB under writes), ``redis2g``
(~2 GB under writes).

Downtime is measured from outside: the workload generator's heartbeats (every 2 ms)
or, for redis, a client in its own thread issuing ``GET`` of random keys every 10 ms
(the largest gap between two successful requests). After the switch the same client
gives the request latency p99 and how long it stays above 2x the pre-migration p99
(CRIU post-copy's degraded period). CRIU's images are copied over the link with a
tar stream between the namespaces, so every mode pays the link for what it moves.

Run as root::

    .venv/bin/python benchmarks/bench_switchover.py                        # small + redis, 1gbit
    .venv/bin/python benchmarks/bench_switchover.py --cases redis --rates 1gbit,100mbit
    .venv/bin/python benchmarks/bench_switchover.py --cases hot \
        --modes ss-iterative,ss-hybrid,criu-postcopy
    .venv/bin/python benchmarks/bench_switchover.py --json out.json

``fs.pipe-max-size`` is raised to 4 MiB for the run (CRIU's lazy page server fails
without it here: no CAP_SYS_RESOURCE) and put back afterwards.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import subprocess
import sys
import tarfile
import threading
import time
from typing import Callable, List, Optional

import numpy as np

from statesync import criu, migrate
from statesync.testing import workloads
from statesync.testing.downtime import HeartbeatObserver
from statesync.testing.services import RedisWriter, spawn_redis
from statesync.testing.testbed import Testbed

SECRET = b"statesync-benchmark-secret-0123456789"
MODES = ("ss-iterative", "ss-lazy", "ss-hybrid", "criu-postcopy", "criu-cold")
HOT_MB, HOT_RATE = 64, 20000.0      # the high-dirty-rate case: 122% of its pages per second


class LatencyProber:
    """Calls ``request()`` every ``interval`` s in a thread; keeps (start, end) of every
    success. ``gap(t0, t1)``: the largest gap between successive successes."""

    def __init__(self, request: Callable[[], object], interval: float = 0.01,
                 max_seconds: float = 600.0):
        self.request, self.interval, self.max_seconds = request, interval, max_seconds
        self.ok: List[tuple] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "LatencyProber":
        self._t.start()
        return self

    def _run(self) -> None:
        end = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < end:
            t0 = time.monotonic()
            try:
                self.request()
                self.ok.append((t0, time.monotonic()))
            except Exception:
                pass
            rest = self.interval - (time.monotonic() - t0)
            if rest > 0:
                self._stop.wait(rest)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(10)

    def gap(self, t0: float, t1: float) -> float:
        ends = np.array([e for _, e in self.ok])
        i = max(0, int(np.searchsorted(ends, t0)) - 1)
        j = int(np.searchsorted(ends, t1, side="right")) + 1
        e = ends[i:j]
        return float(np.diff(e).max()) if e.size > 1 else float("nan")

    def p99(self, t0: float, t1: float) -> float:
        lat = [e - s for s, e in self.ok if t0 <= s < t1]
        return float(np.percentile(lat, 99)) if lat else float("nan")

    def degraded(self, t_resume: float, limit_s: float, window: float = 0.25) -> float:
        """Seconds after ``t_resume`` until a ``window`` with p99 below ``limit_s`` holds."""
        t = t_resume
        last = max((s for s, _ in self.ok), default=t_resume)
        while t < last:
            if self.p99(t, t + window) <= limit_s:
                return t - t_resume
            t += window / 2
        return float("nan")


# --------------------------------------------------------------------------- helpers


def _criu_bin() -> str:
    path = criu.find_criu()
    if not path:
        raise SystemExit("CRIU not found: run scripts/install-criu.sh as root")
    return path


def _criu(tb: Testbed, side: str, args: List[str], log_dir: str, status: bool = False):
    """Start ``criu ARGS`` in a side; with ``status`` returns (popen, fd) where fd gets
    one byte when CRIU's server is ready (``--status-fd``)."""
    cmd = [_criu_bin()] + args
    if not status:
        return tb.popen(side, cmd, stdout=subprocess.DEVNULL,
                        stderr=open(os.path.join(log_dir, f"{args[0]}.err"), "w")), None
    r, w = os.pipe()
    p = tb.popen(side, cmd + ["--status-fd", str(w)], pass_fds=(w,), stdout=subprocess.DEVNULL,
                 stderr=open(os.path.join(log_dir, f"{args[0]}.err"), "w"))
    os.close(w)
    return p, r


def _wait_status(fd: int, p: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    import select
    rl, _, _ = select.select([fd], [], [], timeout)
    got = os.read(fd, 1) if rl else b""
    os.close(fd)
    if got != b"\0":
        raise RuntimeError(f"{what} not ready (rc {p.poll()})")


def _copy_over_link(tb: Testbed, src: str, dst: str) -> int:
    """Send directory ``src`` (side a) to ``dst`` (side b) as a tar stream over the link."""
    os.makedirs(dst, exist_ok=True)
    port = tb.free_port("b")
    ls = tb.socket("b")
    ls.bind((tb.addr_b, port))
    ls.listen(1)
    got = {}

    def receive():
        c, _ = ls.accept()
        with c, c.makefile("rb") as f, tarfile.open(fileobj=f, mode="r|") as t:
            t.extractall(dst, filter="fully_trusted") if sys.version_info >= (3, 12) \
                else t.extractall(dst)
        got["ok"] = True

    th = threading.Thread(target=receive)
    th.start()
    s = tb.socket("a")
    s.connect((tb.addr_b, port))
    n = 0
    with s, s.makefile("wb") as f, tarfile.open(fileobj=f, mode="w|") as t:
        for name in sorted(os.listdir(src)):
            if name.endswith(".log"):
                continue
            t.add(os.path.join(src, name), arcname=name)
            n += os.path.getsize(os.path.join(src, name))
    th.join(120)
    ls.close()
    if not got:
        raise RuntimeError("image copy over the link failed")
    return n


def _kill(pid: Optional[int]) -> None:
    if pid:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def _restored_pid(tb: Testbed, pidfile: str) -> Optional[int]:
    try:
        return int(open(pidfile).read().strip())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- modes


def run_statesync(tb, pid, port, lazy: bool, link_bps, strategy: str = "iterative") -> dict:
    kw = dict(strategy=strategy, secret=SECRET, netns=tb.ns_a, io_timeout=60,
              link_rate=link_bps)
    if "switchover" in inspect.signature(migrate).parameters:
        kw["switchover"] = "lazy" if lazy else "full"
    elif lazy:
        return {"skipped": "this statesync has no lazy switch-over"}
    t0 = time.monotonic()
    rep = migrate(pid, f"{tb.addr_b}:{port}", **kw)
    ps = getattr(rep, "post_switch", None) or {}
    post = float(ps.get("push_s") or ps.get("fill_s", 0.0))
    return {"engine_downtime_s": rep.downtime_s, "t0": t0, "restored_pid": rep.restored_pid,
            "total_s": rep.total_s,
            "phases": rep.phases, "state_mb": rep.state_pages * 4096 / 1e6,
            "final_pages": rep.final_pages, "post_switch_s": post,
            "switchover": getattr(rep, "switchover", ""), "rounds": len(rep.rounds),
            "notes": list(rep.notes),
            "round_detail": [(r.pages, round(r.duration_s, 3), r.dirty_pages_after)
                             for r in rep.rounds],
            "remote_pages": ps.get("remote_pages", 0.0),
            "remote_faults": ps.get("remote_faults", 0.0),
            "remote_fault_p50_ms": ps.get("remote_fault_p50_ns", 0.0) / 1e6,
            "remote_fault_p99_ms": ps.get("remote_fault_p99_ns", 0.0) / 1e6}


def run_criu_postcopy(tb, pid, log_dir) -> dict:
    da, db = os.path.join(log_dir, "pc-a"), os.path.join(log_dir, "pc-b")
    os.makedirs(da)
    port = tb.free_port("a")
    t0 = time.monotonic()
    dump, st = _criu(tb, "a", ["dump", "-t", str(pid), "-D", da, "-o", "dump.log",
                               "--lazy-pages", "--address", tb.addr_a, "--port", str(port)],
                     log_dir, status=True)
    _wait_status(st, dump, "criu dump --lazy-pages page server")
    t_dumped = time.monotonic()
    _copy_over_link(tb, da, db)
    t_copied = time.monotonic()
    lp, st2 = _criu(tb, "b", ["lazy-pages", "--page-server", "--address", tb.addr_a, "--port",
                              str(port), "-D", db, "-o", "lazy-pages.log"], log_dir, status=True)
    _wait_status(st2, lp, "criu lazy-pages")
    pidfile = os.path.join(db, "restored.pid")
    r = subprocess.run(tb.wrap("b", [_criu_bin(), "restore", "-D", db, "-o", "restore.log", "-d",
                                     "--lazy-pages", "--pidfile", pidfile]),
                       capture_output=True, text=True, timeout=120)
    t_restored = time.monotonic()
    if r.returncode != 0:
        raise RuntimeError(f"criu restore --lazy-pages failed: {r.stderr[-500:]}")
    lp.wait(300)
    t_filled = time.monotonic()
    dump.wait(60)
    return {"t0": t0, "restored_pid": _restored_pid(tb, pidfile),
            "phases": {"lazy_dump": t_dumped - t0, "image_copy": t_copied - t_dumped,
                       "lazy_daemon_start_and_restore": t_restored - t_copied},
            "post_switch_s": t_filled - t_restored}


def run_criu_cold(tb, pid, log_dir) -> dict:
    da, db = os.path.join(log_dir, "cold-a"), os.path.join(log_dir, "cold-b")
    os.makedirs(da)
    os.makedirs(db)
    port = tb.free_port("b")
    ps, st = _criu(tb, "b", ["page-server", "-D", db, "-o", "ps.log", "--address", tb.addr_b,
                             "--port", str(port)], log_dir, status=True)
    _wait_status(st, ps, "criu page-server")
    t1 = time.monotonic()
    r = subprocess.run(tb.wrap("a", [_criu_bin(), "dump", "-t", str(pid), "-D", da, "-o",
                                     "dump.log", "--page-server", "--address", tb.addr_b,
                                     "--port", str(port)]),
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"criu dump --page-server failed: {r.stderr[-500:]}")
    t_dumped = time.monotonic()
    ps.wait(60)
    _copy_over_link(tb, da, db)
    t_copied = time.monotonic()
    pidfile = os.path.join(db, "restored.pid")
    r = subprocess.run(tb.wrap("b", [_criu_bin(), "restore", "-D", db, "-o", "restore.log", "-d",
                                     "--pidfile", pidfile]),
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"criu restore failed: {r.stderr[-500:]}")
    t_restored = time.monotonic()
    return {"t0": t1, "restored_pid": _restored_pid(tb, pidfile),
            "phases": {"dump_to_page_server": t_dumped - t1, "image_copy": t_copied - t_dumped,
                       "restore": t_restored - t_copied}, "post_switch_s": 0.0}


# --------------------------------------------------------------------------- cases


def _beat_stats(times, t_pre: float, gap: dict) -> dict:
    """Post-switch service of the heartbeat workload: p99 of the intervals between
    beats in the second after the resume (the end of the largest gap) against the
    second before the migration, and how long the intervals stay above 2x that p99
    (a 0.25 s window whose p99 is below it ends the degraded period)."""
    t = np.asarray(times)
    pre = np.diff(t[(t >= t_pre - 1.0) & (t < t_pre)])
    if pre.size < 10 or gap.get("gap_start") is None:
        return {}
    t_resume = gap["gap_start"] + gap["gap_s"]
    base = float(np.percentile(pre, 99))

    def p99(a, b):
        d = np.diff(t[(t >= a) & (t < b)])
        return float(np.percentile(d, 99)) if d.size > 3 else float("nan")

    w, x, degraded = 0.25, t_resume, float("nan")
    while x < t[-1] - w:
        if p99(x, x + w) <= 2 * base:
            degraded = x - t_resume
            break
        x += w / 2
    return {"pre_p99_s": base, "post_p99_s": p99(t_resume, t_resume + 1.0),
            "degraded_s": degraded}



def _dest(tb, secret_file):
    port = tb.free_port("b")
    p = tb.python("b", ["receive", "--listen", f"{tb.addr_b}:{port}", "--images-dir", tb.dir_b,
                        "--secret-file", secret_file, "--io-timeout", "60"],
                  stdout=open(os.devnull, "w"), stderr=open(os.path.join(tb.root, "dest.log"), "w"))
    tb.wait_port("b", port, proc=p)
    return p, port


def _run_mode(tb, mode, pid, log_dir):
    if mode.startswith("ss-"):
        sf = os.path.join(tb.root, "secret")
        with open(sf, "wb") as f:
            f.write(SECRET)
        os.chmod(sf, 0o600)
        dest, port = _dest(tb, sf)
        try:
            if mode == "ss-hybrid":
                return run_statesync(tb, pid, port, True, tb.rate_bps, strategy="hybrid")
            return run_statesync(tb, pid, port, mode == "ss-lazy", tb.rate_bps)
        finally:
            try:
                dest.wait(30)
            except subprocess.TimeoutExpired:
                dest.kill()
    if mode == "criu-postcopy":
        return run_criu_postcopy(tb, pid, log_dir)
    return run_criu_cold(tb, pid, log_dir)


def run_case(case: str, rate: str, mode: str, redis_mb: int, small_mb: int) -> dict:
    with Testbed(rate) as tb:
        log_dir = os.path.join(tb.root, "logs")
        os.makedirs(log_dir)
        out: dict = {"case": case, "rate": rate, "mode": mode}
        if case in ("small", "hot"):
            hb = os.path.join(tb.root, "hb.sock")
            size, wrate = (f"{small_mb}M", 200) if case == "small" else (f"{HOT_MB}M", HOT_RATE)
            with HeartbeatObserver(hb) as obs:
                wl = workloads.spawn(size=size, rate=wrate, own_pidns=True,
                                     netns=tb.ns_a, heartbeat=hb, heartbeat_interval=0.002,
                                     control=f"@ssm-sw-{os.getpid()}-{time.monotonic_ns()}")
                try:
                    obs.wait_for_beats(20)
                    time.sleep(1.0)
                    t_pre = time.monotonic()
                    res = _run_mode(tb, mode, wl.pid, log_dir)
                    if "skipped" not in res:
                        obs.wait_for_beats(20)
                        time.sleep(1.5)
                        gap = obs.max_gap(res["t0"], time.monotonic())
                        res["downtime_outside_s"] = gap["gap_s"]
                        res["gap_at_s"] = (gap["gap_start"] or res["t0"]) - res["t0"]
                        res.update(_beat_stats(obs.times, t_pre, gap))
                        c = workloads.WorkloadClient(wl.control, netns=tb.ns_b)
                        res["serving_after"] = bool(c.status())
                finally:
                    _kill(wl.pid)
                    wl.kill()
        else:
            if case == "redis2g":
                redis_mb = 1900                     # ~2 GB of state
            path = os.path.join(tb.root, "redis.sock")
            srv = spawn_redis(path, netns=tb.ns_a,
                              **({"maxmemory": "4gb"} if case == "redis2g" else {}))
            try:
                c = srv.client
                from bench_migrate import _load_redis  # noqa: E402 (benchmarks/ is on sys.path)
                n = _load_redis(c, redis_mb << 20)
                writer = RedisWriter(c, keys=50000, rate=20, batch=200, prefix="w").start()
                rnd = random.Random(3)
                prober = LatencyProber(lambda: c.command("GET", f"data:{rnd.randrange(n)}"),
                                       interval=0.01).start()
                time.sleep(1.5)
                t_pre = time.monotonic()
                base_p99 = prober.p99(t_pre - 1.4, t_pre)
                try:
                    res = _run_mode(tb, mode, srv.pid, log_dir)
                finally:
                    time.sleep(3.0)
                    prober.stop()
                    writer.stop()
                if "skipped" not in res:
                    t_end = time.monotonic()
                    res["downtime_outside_s"] = prober.gap(res["t0"], t_end)
                    # the switch: where the outside gap is; afterwards the degraded period
                    ends = np.array([e for _, e in prober.ok])
                    after = ends[ends > res["t0"]]
                    gaps = np.diff(after) if after.size > 1 else np.zeros(0)
                    t_resume = float(after[int(np.argmax(gaps)) + 1]) if gaps.size else t_end
                    res["pre_p99_s"] = base_p99
                    res["post_p99_s"] = prober.p99(t_resume, t_resume + 1.0)
                    res["degraded_s"] = prober.degraded(t_resume, 2 * base_p99)
                    res["lost_writes"] = writer.verify()
            finally:
                srv.kill()
        out.update(res)
        _kill(res.get("restored_pid"))
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="small,redis")
    ap.add_argument("--rates", default="1gbit")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--redis-mb", type=int, default=240, help="MB of values (~256 MB of state)")
    ap.add_argument("--small-mb", type=int, default=25)
    ap.add_argument("--json", help="write all results here")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces, CRIU)", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    pipe_max = open("/proc/sys/fs/pipe-max-size").read().strip()
    with open("/proc/sys/fs/pipe-max-size", "w") as f:
        f.write(str(4 << 20))
    results = []
    try:
        for case in a.cases.split(","):
            for rate in a.rates.split(","):
                for mode in a.modes.split(","):
                    try:
                        r = run_case(case, rate, mode, a.redis_mb, a.small_mb)
                    except Exception as exc:  # one failing mode must not hide the others
                        r = {"case": case, "rate": rate, "mode": mode, "error": str(exc)[-300:]}
                    results.append(r)
                    if "skipped" in r or "error" in r:
                        print(f"{case:6s} {rate:8s} {mode:14s} {r.get('skipped') or r['error']}",
                              flush=True)
                        continue
                    extra = ""
                    if "post_p99_s" in r:
                        extra = (f"  p99 pre {r['pre_p99_s'] * 1e3:6.2f} ms post "
                                 f"{r['post_p99_s'] * 1e3:7.2f} ms, degraded "
                                 f"{r['degraded_s']:.2f} s, lost writes "
                                 f"{r.get('lost_writes', '-')}")
                    if "gap_at_s" in r and "total_s" in r:
                        extra += (f"  gap at {r['gap_at_s']:.2f} s of {r['total_s']:.2f} s, "
                                  f"engine downtime {r['engine_downtime_s'] * 1e3:.0f} ms")
                    if r.get("notes"):
                        extra += "  notes: " + "; ".join(r["notes"])[:300]
                    if r.get("remote_pages"):
                        extra += (f"  post-copy {int(r['remote_pages'])} pages, "
                                  f"{int(r['remote_faults'])} remote faults (p50 "
                                  f"{r['remote_fault_p50_ms']:.1f} ms, p99 "
                                  f"{r['remote_fault_p99_ms']:.1f} ms), rounds {r['rounds']} "
                                  f"(pages, s, dirty after: {r['round_detail']})")
                    print(f"{case:6s} {rate:8s} {mode:14s} downtime (outside) "
                          f"{r['downtime_outside_s'] * 1e3:8.1f} ms  post-switch "
                          f"{r['post_switch_s']:6.2f} s{extra}  phases "
                          + " ".join(f"{k}={v * 1e3:.0f}" for k, v in r["phases"].items()
                                     if isinstance(v, (int, float))), flush=True)
    finally:
        with open("/proc/sys/fs/pipe-max-size", "w") as f:
            f.write(pipe_max)
    print()
    by = {(r["case"], r["rate"], r["mode"]): r for r in results if "downtime_outside_s" in r}
    for case in a.cases.split(","):
        for rate in a.rates.split(","):
            base = by.get((case, rate, "criu-postcopy"))
            if not base:
                continue
            for mode in ("ss-iterative", "ss-lazy", "ss-hybrid", "criu-cold"):
                r = by.get((case, rate, mode))
                if r:
                    print(f"{case} @ {rate}: {mode} / criu-postcopy downtime "
                          f"{r['downtime_outside_s'] / base['downtime_outside_s']:.2f}")
    for case in a.cases.split(","):
        for rate in a.rates.split(","):
            it, hy = by.get((case, rate, "ss-iterative")), by.get((case, rate, "ss-hybrid"))
            if it and hy:
                print(f"{case} @ {rate}: ss-hybrid / ss-iterative downtime "
                      f"{hy['downtime_outside_s'] / it['downtime_outside_s']:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
