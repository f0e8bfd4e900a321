"""What encrypting the migration stream costs: Channel throughput, encrypted vs
authenticated-only framing.

Two processes (a sender and a receiver, one core each at most) move PAGES frames of
``--frame`` MiB through real ``statesync.migration.protocol.Channel`` objects over TCP:
on loopback, and with ``--testbed RATE`` also across the testbed's veth pair (two
network namespaces, tc-shaped; root only). For each suite it reports wall-clock
throughput and MB/s per core of each side (bytes / that process's CPU seconds), and the
ratio to the authenticated-only framing (``encrypt=False``: HMAC-SHA256 over header and
payload in clear, what every frame carried before encryption). Target (issue 15):
encrypted >= 0.9x the throughput of authenticated-only framing.

It also measures the bare primitives on one core (seal/open of one frame in memory),
which bounds what any framing on top can reach.

With ``--migrate RATES`` it also runs bench_migrate.py's redis case (~256 MB of process
state under a write load, iterative strategy) on the testbed at each rate, encrypted
and authenticated-only, and compares round-0 throughput, total time and downtime
(target: downtime within 1.1x). Until the agents take ``encryption=False`` /
``--no-encryption``, the authenticated-only runs get it by wrapping
``Channel.client``/``Channel.server`` (in this process, and in the destination agent
through a ``python -c`` shim): the benchmark's own switch, not a user option.

Run::

    .venv/bin/python benchmarks/bench_crypto.py                       # loopback (~30 s)
    .venv/bin/python benchmarks/bench_crypto.py --testbed 1gbit       # + veth at 1 Gbit (root)
    .venv/bin/python benchmarks/bench_crypto.py --frame 32 --mib 1024 --json out.json
    .venv/bin/python benchmarks/bench_crypto.py --skip-channel --migrate 1gbit,10gbit \
        --migrate-repeat 3                                            # redis (root, ~6 min)

Not collected by pytest (no test functions): it is a script with one question.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import multiprocessing as mp
import os
import resource
import socket
import sys
import time

from statesync.migration import protocol as wire

SECRET = b"statesync-benchmark-secret-0123456789"
SUITES = [("hmac-sha256", False, None), ("aes-256-gcm", True, None),
          ("chacha20-poly1305", True, "chacha20-poly1305")]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def primitives(frame: int, reps: int) -> dict:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
    data = os.urandom(frame)
    hdr = b"\0" * 13
    out = {}
    key = os.urandom(32)

    def timeit(fn):
        fn()
        t = time.process_time()
        for _ in range(reps):
            fn()
        return frame * reps / (time.process_time() - t) / 1e6

    out["hmac-sha256"] = timeit(lambda: hmac.new(key, data, hashlib.sha256).digest())
    for name, cls in (("aes-256-gcm", AESGCM), ("chacha20-poly1305", ChaCha20Poly1305)):
        a = cls(key)
        ct = a.encrypt(b"\0" * 12, data, hdr)
        buf = bytearray(frame + 16)
        out[name + " seal"] = timeit(lambda a=a: a.encrypt(b"\0" * 12, data, hdr))
        if hasattr(a, "encrypt_into"):
            out[name + " seal_into"] = timeit(
                lambda a=a, buf=buf: a.encrypt_into(b"\0" * 12, data, hdr, buf))
        out[name + " open"] = timeit(lambda a=a, ct=ct: a.decrypt(b"\0" * 12, ct, hdr))
    return out


# --------------------------------------------------------------------------- one transfer


def _receiver(sock: socket.socket, encrypt: bool, nframes: int, q) -> None:
    async def main():
        conn, _ = await asyncio.get_running_loop().sock_accept(sock)
        r, w = await asyncio.open_connection(sock=conn, limit=wire.MAX_FRAME + 1024)
        ch = await wire.Channel.server(r, w, SECRET, 30, encrypt=encrypt)
        c0 = _cpu()
        t0 = time.perf_counter()
        n = 0
        for _ in range(nframes):
            _, p = await ch.recv()
            n += len(p)
        dt = time.perf_counter() - t0
        cpu = _cpu() - c0
        await ch.send(wire.DONE)
        q.put({"bytes": n, "wall_s": dt, "cpu_s": cpu})
        ch.close()
    sock.setblocking(False)
    asyncio.run(main())


def _sender(make_sock, addr, encrypt: bool, cipher, frame: int, nframes: int, q) -> None:
    async def main():
        s = make_sock()
        s.connect(addr)
        r, w = await asyncio.open_connection(sock=s, limit=wire.MAX_FRAME + 1024)
        ch = await wire.Channel.client(r, w, SECRET, 30, encrypt=encrypt, cipher=cipher)
        payload = os.urandom(frame)
        c0 = _cpu()
        t0 = time.perf_counter()
        for _ in range(nframes):
            await ch.send(wire.PAGES, payload)
        await ch.expect(wire.DONE, timeout=60)
        q.put({"wall_s": time.perf_counter() - t0, "cpu_s": _cpu() - c0,
               "cipher": ch.cipher, "wire_bytes": ch.bytes_sent})
        ch.close()
    asyncio.run(main())


def transfer(listen_sock, make_sock, addr, encrypt, cipher, frame, nframes) -> dict:
    ctx = mp.get_context("fork")
    q_r, q_s = ctx.Queue(), ctx.Queue()
    pr = ctx.Process(target=_receiver, args=(listen_sock, encrypt, nframes, q_r))
    pr.start()
    ps = ctx.Process(target=_sender, args=(make_sock, addr, encrypt, cipher, frame, nframes, q_s))
    ps.start()
    rr, rs = q_r.get(timeout=600), q_s.get(timeout=600)
    pr.join(30)
    ps.join(30)
    mb = rr["bytes"] / 1e6
    return {"cipher": rs["cipher"], "MB": mb, "MB_s": mb / rr["wall_s"],
            "send_MB_s_per_core": mb / max(rs["cpu_s"], 1e-9),
            "recv_MB_s_per_core": mb / max(rr["cpu_s"], 1e-9),
            "send_cpu_s": rs["cpu_s"], "recv_cpu_s": rr["cpu_s"], "wall_s": rr["wall_s"]}


def run_link(name, listen_factory, make_sock, frame, nframes, repeat) -> list:
    rows = []
    for rep in range(repeat):
        for _suite, encrypt, cipher in SUITES:
            ls, addr = listen_factory()
            row = transfer(ls, make_sock, addr, encrypt, cipher, frame, nframes)
            ls.close()
            row.update(link=name, run=rep)
            rows.append(row)
    return rows


def summarize(rows) -> list:
    """Per link and suite: the median over runs, and ratios to hmac-sha256."""
    out = []
    for link in dict.fromkeys(r["link"] for r in rows):
        med = {}
        for suite, _, _ in SUITES:
            rs = sorted((r for r in rows if r["link"] == link and r["cipher"] == suite),
                        key=lambda r: r["MB_s"])
            m = rs[len(rs) // 2]
            med[suite] = m
        base = med["hmac-sha256"]
        for _suite, m in med.items():
            out.append({**m, "ratio_MB_s": m["MB_s"] / base["MB_s"],
                        "ratio_send_per_core":
                            m["send_MB_s_per_core"] / base["send_MB_s_per_core"],
                        "ratio_recv_per_core":
                            m["recv_MB_s_per_core"] / base["recv_MB_s_per_core"]})
    return out


# --------------------------------------------------------------------------- migrations

_DEST_SHIM = (
    "import sys\n"
    "from statesync.migration import protocol as w\n"
    "f = w.Channel.server.__func__\n"
    "async def server(cls, *a, **k):\n"
    "    k['encrypt'] = False\n"
    "    return await f(cls, *a, **k)\n"
    "w.Channel.server = classmethod(server)\n"
    "from statesync.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n")


def migrations(rates, redis_mb: int, repeat: int) -> list:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_migrate as bm

    orig_dest, orig_client = bm._dest, wire.Channel.client.__func__

    def dest_clear(tb, secret_file):
        port = tb.free_port("b")
        p = tb.popen("b", [sys.executable, "-c", _DEST_SHIM, "receive", "--listen",
                           f"{tb.addr_b}:{port}", "--images-dir", tb.dir_b, "--secret-file",
                           secret_file, "--io-timeout", "60"],
                     stdout=open(os.devnull, "w"),  # noqa: SIM115 (the child owns them)
                     stderr=open(os.path.join(tb.root, "dest.log"), "w"))  # noqa: SIM115
        tb.wait_port("b", port, proc=p)
        return p, port

    async def client_clear(cls, *a, **k):
        k["encrypt"] = False
        return await orig_client(cls, *a, **k)

    rows = []
    for rep_i in range(repeat):
        for rate in rates:
            for mode in ("hmac-sha256", "aes-256-gcm"):
                clear = mode == "hmac-sha256"
                bm._dest = dest_clear if clear else orig_dest
                wire.Channel.client = classmethod(client_clear if clear else orig_client)
                try:
                    r = bm.run_case("redis", rate, "iterative", redis_mb)
                finally:
                    bm._dest, wire.Channel.client = orig_dest, classmethod(orig_client)
                rounds = r["report"]["rounds"]
                r0 = rounds[0] if rounds else None
                row = {"rate": rate, "mode": mode, "run": rep_i, "state_mb": r["state_mb"],
                       "round0_MB_s": (r0["bytes_wire"] / r0["duration_s"] / 1e6) if r0 else None,
                       "total_s": r["total_s"], "downtime_s": r["downtime_s"],
                       "downtime_outside_s": r["downtime_outside_s"], "wire_mb": r["wire_mb"]}
                rows.append(row)
                print(f"  {rate:8s} {mode:12s} state {row['state_mb']:6.1f} MB  round 0 "
                      f"{row['round0_MB_s'] or 0:7.1f} MB/s  total {row['total_s']:6.2f} s  "
                      f"downtime {row['downtime_s'] * 1e3:7.1f} ms "
                      f"(outside {row['downtime_outside_s'] * 1e3:7.1f})", flush=True)
    for rate in rates:
        def med(mode, key, rate=rate):
            v = sorted(x[key] for x in rows if x["rate"] == rate and x["mode"] == mode)
            return v[len(v) // 2]
        print(f"redis @ {rate}: encrypted / authenticated-only: round-0 throughput "
              f"{med('aes-256-gcm', 'round0_MB_s') / med('hmac-sha256', 'round0_MB_s'):.2f}x, "
              f"total time "
              f"{med('aes-256-gcm', 'total_s') / med('hmac-sha256', 'total_s'):.2f}x, "
              f"downtime "
              f"{med('aes-256-gcm', 'downtime_s') / med('hmac-sha256', 'downtime_s'):.2f}x")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frame", type=float, default=8, help="frame payload, MiB (default 8)")
    ap.add_argument("--mib", type=int, default=512, help="MiB moved per transfer (default 512)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per suite; median reported")
    ap.add_argument("--testbed", metavar="RATE", help="also across the testbed veth at RATE "
                    "(e.g. 1gbit; root)")
    ap.add_argument("--testbed-mib", type=int, default=256, help="MiB per testbed transfer")
    ap.add_argument("--migrate", metavar="RATES", help="also migrate redis on the testbed at "
                    "these rates (comma-separated, e.g. 1gbit,10gbit; root)")
    ap.add_argument("--redis-mb", type=int, default=240, help="MB of redis values (--migrate)")
    ap.add_argument("--migrate-repeat", type=int, default=1,
                    help="migrations per rate and mode (--migrate); median reported")
    ap.add_argument("--skip-channel", action="store_true", help="only --migrate")
    ap.add_argument("--json", help="write all rows here")
    a = ap.parse_args(argv)
    frame = int(a.frame * (1 << 20))
    nframes = max(1, (a.mib << 20) // frame)

    print(f"cpu: {os.cpu_count()} cores; python {sys.version.split()[0]}; frame {a.frame:g} MiB")
    prim = primitives(frame, max(2, (256 << 20) // frame))
    print("primitives, one core, MB/s: " + ", ".join(f"{k} {v:.0f}" for k, v in prim.items()))

    def loopback():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        return s, s.getsockname()

    rows = [] if a.skip_channel else run_link("loopback", loopback, socket.socket, frame,
                                              nframes, a.repeat)
    if a.testbed and not a.skip_channel:
        from statesync.testing.testbed import Testbed, socket_in_netns
        with Testbed(a.testbed) as tb:
            def veth():
                s = tb.socket("b")
                s.bind((tb.addr_b, 0))
                s.listen(1)
                return s, s.getsockname()
            tnframes = max(1, (a.testbed_mib << 20) // frame)
            rows += run_link(f"veth {a.testbed}", veth, lambda: socket_in_netns(tb.ns_a),
                             frame, tnframes, a.repeat)
    summary = summarize(rows) if rows else []
    if summary:
        print(f"{'link':<14} {'suite':<18} {'MB/s':>8} {'x':>6} {'send MB/s/core':>15} "
              f"{'x':>6} {'recv MB/s/core':>15} {'x':>6}")
    for s in summary:
        print(f"{s['link']:<14} {s['cipher']:<18} {s['MB_s']:8.0f} {s['ratio_MB_s']:6.2f} "
              f"{s['send_MB_s_per_core']:15.0f} {s['ratio_send_per_core']:6.2f} "
              f"{s['recv_MB_s_per_core']:15.0f} {s['ratio_recv_per_core']:6.2f}")
    mig = []
    if a.migrate:
        print("redis migrations (iterative), encrypted vs authenticated-only:")
        mig = migrations(a.migrate.split(","), a.redis_mb, a.migrate_repeat)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"primitives": prim, "rows": rows, "summary": summary,
                       "migrations": mig}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
