"""Builds the stream benchmark corpus: memory of real processes, read twice.

For each of three real processes (a Python service holding a dict of records,
redis-server with data on a private UNIX socket, a numpy-heavy process) it reads
every present page of every readable mapping with statesync.proc.read_pages
(process_vm_readv), lets the process write (the service updates 2% of its
records, redis overwrites 3% of its keys and bumps counters, numpy updates 1% of
its array elements, scattered), and reads the same pages again.

Output: one ``<name>.npz`` per process in the corpus directory with ``addrs``
(uint64), ``v1`` and ``v2`` ((n, 4096) uint8) and the pages that were readable
both times. The corpus is generated, not committed (tens of MB per process).

    python benchmarks/stream_corpus.py [DIR] [--scale 1.0]

Default DIR: $STATESYNC_STREAM_CORPUS or /var/tmp/statesync-stream-corpus.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

DEFAULT_DIR = os.environ.get("STATESYNC_STREAM_CORPUS", "/var/tmp/statesync-stream-corpus")
NAMES = ("pyservice", "redis", "numpy")

PY_SERVICE = r"""
import json, random, sys
rng = random.Random(7)
words = [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(3, 10)))
         for _ in range(5000)]
N = int(sys.argv[1])
db = {}
for i in range(N):
    db[f"user:{i}"] = {"id": i, "name": ' '.join(rng.choice(words) for _ in range(2)),
                       "tags": [rng.choice(words) for _ in range(rng.randint(0, 5))],
                       "score": rng.random() * 100, "visits": rng.randint(0, 1000),
                       "bio": ' '.join(rng.choice(words) for _ in range(rng.randint(5, 30)))}
cache = [json.dumps(db[f"user:{i}"]) for i in range(0, N, 3)]
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "mutate":
        for i in rng.sample(range(N), N // 50):
            r = db[f"user:{i}"]
            r["visits"] += 1
            r["score"] = rng.random() * 100
        print("ok", flush=True)
"""

NUMPY_PROC = r"""
import sys
import numpy as np
scale = float(sys.argv[1])
rng = np.random.default_rng(3)
n = int(2_000_000 * scale)
prices = rng.normal(100.0, 5.0, n)                 # float64 samples
counts = np.zeros(n, dtype=np.int32)               # mostly zero counters
counts[rng.choice(n, n // 20, replace=False)] = rng.integers(1, 50, n // 20)
ids = np.arange(n, dtype=np.int64)                 # structured integers
img = (np.add.outer(np.arange(1024), np.arange(1024)) % 256).astype(np.uint8)  # image-like
sparse = np.zeros((int(4096 * scale), 1024), dtype=np.float32)  # touched, mostly zero
sparse[::7, :16] = 1.5
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "mutate":
        k = n // 100
        idx = rng.choice(n, k, replace=False)
        prices[idx] += 0.25
        counts[idx[: k // 2]] += 1
        print("ok", flush=True)
"""


def _wait_line(p, want, timeout=120):
    t0 = time.time()
    line = p.stdout.readline()
    if line.strip() != want:
        raise RuntimeError(f"process said {line!r}, expected {want!r} "
                           f"after {time.time() - t0:.1f}s")


def _snapshot(pid, addrs=None):
    from statesync import proc
    if addrs is None:
        vmas = [v for v in proc.read_maps(pid) if v.readable and not v.special]
        addrs = proc.present_pages(pid, vmas, swapped=False)
    pages, ok = proc.read_pages(pid, addrs)
    return addrs, pages, ok


def _two_versions(pid, mutate):
    addrs, v1, ok1 = _snapshot(pid)
    mutate()
    _, v2, ok2 = _snapshot(pid, addrs)
    ok = ok1 & ok2
    return {"addrs": addrs[ok], "v1": v1[ok], "v2": v2[ok]}


def _python_proc(code, arg):
    return subprocess.Popen([sys.executable, "-c", code, str(arg)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def _capture_python(code, arg):
    """Two versions of a helper Python process that says "ready", then mutates its
    state on "mutate" and answers "ok"."""
    p = _python_proc(code, arg)
    try:
        _wait_line(p, "ready")

        def mutate():
            p.stdin.write("mutate\n")
            p.stdin.flush()
            _wait_line(p, "ok")
        return _two_versions(p.pid, mutate)
    finally:
        p.kill()
        p.wait()


def capture_pyservice(scale):
    return _capture_python(PY_SERVICE, int(60000 * scale))


def capture_numpy(scale):
    return _capture_python(NUMPY_PROC, scale)


def _resp(*args):
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _redis_pipeline(sock_path, commands):
    """Send commands pipelined, read one reply line per command (simple replies only)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(60)
    s.connect(sock_path)
    f = s.makefile("rb")
    try:
        for i in range(0, len(commands), 1000):
            batch = commands[i:i + 1000]
            s.sendall(b"".join(batch))
            for _ in batch:
                line = f.readline()
                if line[:1] == b"-":
                    raise RuntimeError(f"redis error: {line!r}")
    finally:
        f.close()
        s.close()


def capture_redis(scale):
    exe = shutil.which("redis-server")
    if not exe:
        raise RuntimeError("redis-server not installed (scripts/setup-system.sh installs it)")
    d = tempfile.mkdtemp(prefix="ssstream-redis-")
    sock = os.path.join(d, "redis.sock")
    p = subprocess.Popen([exe, "--port", "0", "--unixsocket", sock, "--save", "",
                          "--appendonly", "no", "--dir", d, "--daemonize", "no"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("redis-server did not create its socket")
        rng = np.random.default_rng(11)
        n = int(150000 * scale)
        words = [b"alpha", b"beta", b"gamma", b"delta", b"session", b"token", b"cart",
                 b"item", b"price", b"user", b"region", b"eu-west", b"status", b"active"]
        cmds = []
        for i in range(n):
            kind = i % 4
            if kind == 0:
                val = b" ".join(words[j] for j in rng.integers(0, len(words), 12))
                cmds.append(_resp("SET", f"doc:{i}", val))
            elif kind == 1:
                cmds.append(_resp("SET", f"counter:{i}", int(rng.integers(0, 10 ** 6))))
            elif kind == 2:
                cmds.append(_resp("HSET", f"user:{i}", "name", f"user{i}", "email",
                                  f"user{i}@example.org", "visits", int(rng.integers(0, 999))))
            else:
                cmds.append(_resp("SET", f"blob:{i}", rng.bytes(64)))
        _redis_pipeline(sock, cmds)

        def mutate():
            idx = rng.choice(n, n * 3 // 100, replace=False)
            m = []
            for i in idx.tolist():
                if i % 4 == 1:
                    m.append(_resp("INCR", f"counter:{i}"))
                elif i % 4 == 2:
                    m.append(_resp("HINCRBY", f"user:{i}", "visits", 1))
                else:
                    m.append(_resp("SETRANGE", f"doc:{i - i % 4}", 3, b"X"))
            _redis_pipeline(sock, m)
        return _two_versions(p.pid, mutate)
    finally:
        p.kill()
        p.wait()
        shutil.rmtree(d, ignore_errors=True)


CAPTURE = {"pyservice": capture_pyservice, "redis": capture_redis, "numpy": capture_numpy}


def build(outdir=DEFAULT_DIR, scale=1.0, names=NAMES):
    os.makedirs(outdir, exist_ok=True)
    for name in names:
        data = CAPTURE[name](scale)
        tmp = os.path.join(outdir, f".{name}.npz.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **data)
        os.replace(tmp, os.path.join(outdir, f"{name}.npz"))


def load(outdir=DEFAULT_DIR, build_missing=True, scale=1.0):
    """{name: {"addrs", "v1", "v2"}}; builds the corpus first if a file is missing."""
    missing = [n for n in NAMES if not os.path.exists(os.path.join(outdir, f"{n}.npz"))]
    if missing and build_missing:
        build(outdir, scale, missing)
    out = {}
    for n in NAMES:
        with np.load(os.path.join(outdir, f"{n}.npz")) as z:
            out[n] = {k: z[k] for k in ("addrs", "v1", "v2")}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", nargs="?", default=DEFAULT_DIR)
    ap.add_argument("--scale", type=float, default=1.0)
    args = ap.parse_args(argv)
    build(args.dir, args.scale)
    for name, d in load(args.dir, build_missing=False).items():
        changed = np.any(d["v1"] != d["v2"], axis=1)
        zero = ~np.any(d["v1"], axis=1)
        print(f"{name:10s} pages {len(d['addrs']):7d} ({d['v1'].nbytes / 2**20:6.1f} MiB)  "
              f"zero {zero.mean():5.1%}  changed in v2 {int(changed.sum()):6d}")


if __name__ == "__main__":
    main()
