"""Containers through statesync's engine: downtime against a bare process and podman's own path.

Back to back, in one run, with the same redis-server (``--keys`` keys of ``--value``
bytes, a writer adding keys during the pre-copy), between the testbed's two
namespaces (statesync.testing.testbed, link shaped at ``--rate``) and, for TCP, a
client namespace on a LAN bridge shared with both (statesync.containers.net.ServiceLan):

- ``bare``: redis-server as a bare process (its own pid namespace, UNIX socket),
  ``statesync.migrate(pid)`` iterative: the engine's downtime;
- ``runc``: the same redis-server in a runc container, ``statesync.migrate("runc:NAME")``
  iterative, no TCP client;
- ``runc-tcp``: as ``runc`` with one TCP client on the service IP doing SET+GET every
  5 ms through the migration (``tcp_established=True, service_ip=...``): the engine's
  downtime and the longest gap the client saw;
- ``podman-ss``: a podman container (``--runtime runc``), ``statesync.migrate("podman:NAME")``
  iterative (hash tracker: podman's seccomp profile denies userfaultfd);
- ``podman-export``: the same podman container moved by podman itself:
  ``podman container checkpoint --export`` + copy to B's directory + ``podman container
  restore --import``; downtime = from the checkpoint's start to the restore's end (the
  container runs in neither place in between).

Ratios printed: runc-tcp / bare (target <= 1.2), runc-tcp client gap / engine downtime,
podman-ss / podman-export (target <= 0.25). Root; runc, podman, CRIU and the test rootfs
(scripts/build-rootfs.sh --podman) installed. Run::

    .venv/bin/python benchmarks/bench_containers.py [--keys 20000] [--rate 1gbit] [--json F]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "src"))

from statesync import migrate  # noqa: E402
from statesync.containers import net, podman, probe, runc  # noqa: E402
from statesync.testing.testbed import Testbed  # noqa: E402

SECRET = b"statesync-benchmark-secret-0123456789"
IMAGE = "localhost/statesync-test:1"


def _rootfs() -> str:
    r = subprocess.run(["bash", os.path.join(REPO, "scripts", "build-rootfs.sh"), "--podman",
                        IMAGE], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        sys.exit(f"bench_containers: scripts/build-rootfs.sh failed: {r.stderr.strip()[-300:]}")
    return r.stdout.strip().splitlines()[-1]


class Receiver:
    def __init__(self, tb: Testbed, rootfs: str, name: str, netns: bool = False):
        self.secret = os.path.join(tb.root, "secret")
        if not os.path.exists(self.secret):
            fd = os.open(self.secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "wb") as f:
                f.write(SECRET)
        self.root = os.path.join(tb.root, "runc-b")
        self.port = tb.free_port("b")
        args = ["receive", "--listen", f"{tb.addr_b}:{self.port}", "--images-dir", tb.dir_b,
                "--secret-file", self.secret, "--rootfs", rootfs, "--container-root",
                self.root, "--container-name", name, "--no-preflight"]
        if netns:
            args += ["--container-netns", f"/run/netns/{tb.ns_b}"]
        self.p = tb.python("b", args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
        tb.wait_port("b", self.port, proc=self.p)
        self.addr = f"{tb.addr_b}:{self.port}"

    def done(self):
        _, err = self.p.communicate(timeout=60)
        if self.p.returncode != 0:
            raise RuntimeError(f"receive failed: {err[-1500:]}")
        for n in runc.list_names(self.root):
            runc.delete(runc.Container(n, self.root))


def _fill_tcp(mk, ip, keys, value):
    s = mk()
    s.settimeout(10)
    s.connect((ip, 6379))
    rd = probe._Reader(s)
    v = "v" * value
    for i in range(0, keys, 1000):
        n = min(1000, keys - i)
        s.sendall(b"".join(probe.resp(["SET", f"k{j}", v]) for j in range(i, i + n)))
        for _ in range(n):
            rd.reply()
    s.close()


def _writer(mk, ip, stop):
    """Keeps writing during pre-copy (about 200 SETs/s): the rounds have dirty pages."""
    s = mk()
    s.settimeout(10)
    s.connect((ip, 6379))
    i = 0
    try:
        while not stop.is_set():
            probe.command(s, "SET", f"w{i % 5000}", "x" * 200)
            i += 1
            time.sleep(0.005)
    except OSError:
        pass
    finally:
        s.close()


def run_bare(tb, rootfs, keys, value):
    from statesync.testing.services import RedisClient, spawn_redis
    path = os.path.join(tb.dir_a, "redis.sock")
    srv = spawn_redis(path, netns=tb.ns_a)
    try:
        c = RedisClient(path)
        v = "v" * value
        for i in range(keys):
            c.command("SET", f"k{i}", v)
        rcv = Receiver(tb, rootfs, "unused")
        rep = migrate(srv.pid, rcv.addr, strategy="iterative", secret=SECRET, netns=tb.ns_a,
                      io_timeout=10.0, max_rounds=4, switchover="full")
        rcv.done()
        restored = rep.restored_pid
        if restored:
            os.kill(restored, 9)
        return {"downtime_s": rep.downtime_s, "phases": rep.phases, "rounds": len(rep.rounds)}
    finally:
        srv.kill() if hasattr(srv, "kill") else None


def run_runc(tb, lan, rootfs, keys, value, tcp: bool, tag: str):
    lan.place_service("a")
    b = runc.make_bundle(os.path.join(tb.dir_a, f"bundle-{tag}"), rootfs,
                         ["redis-server", "--port", "6379", "--bind", lan.service_ip, "--save", "",
                          "--appendonly", "no", "--protected-mode", "no"], netns=tb.ns_a)
    c = runc.run(b, f"ssbench{os.getpid()}{tag}")
    mk = lambda: lan.socket("client")  # noqa: E731
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                s = mk()
                s.settimeout(1)
                s.connect((lan.service_ip, 6379))
                s.close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        _fill_tcp(mk, lan.service_ip, keys, value)
        rcv = Receiver(tb, rootfs, c.name + "b")
        sess = probe.RedisSession(mk, lan.service_ip, 6379, interval=0.005).start() if tcp \
            else None
        stop = threading.Event()
        w = threading.Thread(target=_writer, args=(mk, lan.service_ip, stop), daemon=True)
        if not tcp:
            w.start()

        def on_event(ev):      # the writer stops at the freeze (its connection is not kept)
            if ev.get("event") == "phase" and ev.get("phase") == "dump":
                stop.set()
                w.join(2) if w.is_alive() else None
        rep = migrate(f"runc:{c.name}", rcv.addr, strategy="iterative", secret=SECRET,
                      netns=tb.ns_a, io_timeout=10.0, max_rounds=4, tcp_established=tcp,
                      service_ip=f"{lan.service_ip}/32", progress=on_event)
        gap = None
        if sess is not None:
            time.sleep(1.0)
            sess.stop()
            if sess.error is not None:
                raise RuntimeError(f"client connection broke: {sess.error!r}")
            gap = sess.gap_s
        rcv.done()
        lan.place_service("a") if False else None
        return {"downtime_s": rep.downtime_s, "client_gap_s": gap, "phases": rep.phases,
                "rounds": len(rep.rounds), "tracker": rep.tracker}
    finally:
        runc.delete(c)
        b.remove()
        net.remove_service_ip(tb.ns_b, lan.svc_dev)
        net.remove_service_ip(tb.ns_a, lan.svc_dev)


def _podman_run(tb, name, conf):
    r = subprocess.run(["podman", "run", "-d", *podman.PODMAN_RUN_ARGS, "--network",
                        f"ns:/run/netns/{tb.ns_a}", "--annotation", f"org.criu.config={conf}",
                        "--name", name, IMAGE, "redis-server", "--save", "", "--appendonly",
                        "no", "--protected-mode", "no"], capture_output=True, text=True,
                       timeout=60)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)


def _podman_fill(name, keys, value):
    v = "v" * value
    script = "".join(f"SET k{i} {v}\n" for i in range(keys))
    subprocess.run(["podman", "exec", "-i", name, "redis-cli"], input=script,
                   capture_output=True, text=True, timeout=300, check=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        r = subprocess.run(["podman", "exec", name, "redis-cli", "dbsize"], capture_output=True,
                           text=True, timeout=30)
        if r.stdout.strip() == str(keys):
            return
        time.sleep(0.2)
    raise RuntimeError("podman redis did not take the keys")


def _podman_rm(*names):
    for n in names:
        subprocess.run(["podman", "rm", "-f", "-t", "0", n], capture_output=True, timeout=60)


def run_podman_ss(tb, rootfs, keys, value):
    name = f"ssbench{os.getpid()}p"
    conf = os.path.join(tb.root, "criu.conf")
    open(conf, "w").close()
    _podman_run(tb, name, conf)
    try:
        _podman_fill(name, keys, value)
        rcv = Receiver(tb, rootfs, name + "b", netns=True)
        rep = migrate(f"podman:{name}", rcv.addr, strategy="iterative", secret=SECRET,
                      netns=tb.ns_a, io_timeout=20.0, max_rounds=4)
        rcv.done()
        return {"downtime_s": rep.downtime_s, "phases": rep.phases, "rounds": len(rep.rounds),
                "tracker": rep.tracker}
    finally:
        _podman_rm(name, name + "b")


def run_podman_export(tb, keys, value):
    name = f"ssbench{os.getpid()}e"
    conf = os.path.join(tb.root, "criu-e.conf")
    open(conf, "w").close()
    _podman_run(tb, name, conf)
    try:
        _podman_fill(name, keys, value)
        arch_a = os.path.join(tb.dir_a, "export.tar")
        arch_b = os.path.join(tb.dir_b, "export.tar")
        t0 = time.monotonic()
        subprocess.run(["podman", "container", "checkpoint", "--export", arch_a,
                        "--compress", "none", name], capture_output=True, text=True,
                       timeout=300, check=True)
        t1 = time.monotonic()
        shutil.copyfile(arch_a, arch_b)     # the same machine: a copy stands for the link
        t2 = time.monotonic()
        subprocess.run(["podman", "container", "restore", "--import", arch_b, "--name",
                        name + "b"], capture_output=True, text=True, timeout=300, check=True)
        t3 = time.monotonic()
        size = os.path.getsize(arch_a)
        return {"downtime_s": t3 - t0, "checkpoint_s": t1 - t0, "copy_s": t2 - t1,
                "restore_s": t3 - t2, "archive_bytes": size}
    finally:
        _podman_rm(name, name + "b")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=20000)
    ap.add_argument("--value", type=int, default=512)
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip", default="", help="comma-separated cases to skip")
    a = ap.parse_args(argv)
    os.environ.setdefault("STATESYNC_STATE_DIR", "/run/statesync-bench-state")
    rootfs = _rootfs()
    skip = set(filter(None, a.skip.split(",")))
    out = {"keys": a.keys, "value_bytes": a.value, "rate": a.rate}
    with Testbed(a.rate) as tb, net.ServiceLan(tb.ns_a, tb.ns_b) as lan:
        try:
            for case, fn in (("bare", lambda: run_bare(tb, rootfs, a.keys, a.value)),
                             ("runc", lambda: run_runc(tb, lan, rootfs, a.keys, a.value, False,
                                                       "r")),
                             ("runc-tcp", lambda: run_runc(tb, lan, rootfs, a.keys, a.value,
                                                           True, "t")),
                             ("podman-ss", lambda: run_podman_ss(tb, rootfs, a.keys, a.value)),
                             ("podman-export", lambda: run_podman_export(tb, a.keys, a.value))):
                if case in skip:
                    continue
                t0 = time.monotonic()
                out[case] = fn()
                res = out[case]
                print(f"{case:14s} downtime {res['downtime_s'] * 1e3:7.0f} ms"
                      + (f", client gap {res['client_gap_s'] * 1e3:.0f} ms"
                         if res.get("client_gap_s") is not None else "")
                      + (f", {res['rounds']} rounds ({res.get('tracker', '')})"
                         if "rounds" in res else "")
                      + f"  [{time.monotonic() - t0:.1f} s]", flush=True)
        finally:
            runc.unmount_under(tb.root)
    ratios = {}
    if "bare" in out and "runc-tcp" in out:
        ratios["runc_tcp_vs_bare"] = out["runc-tcp"]["downtime_s"] / out["bare"]["downtime_s"]
        ratios["runc_vs_bare"] = out["runc"]["downtime_s"] / out["bare"]["downtime_s"] \
            if "runc" in out else None
    if "runc-tcp" in out:
        ratios["client_gap_vs_downtime"] = (out["runc-tcp"]["client_gap_s"]
                                            / out["runc-tcp"]["downtime_s"])
    if "podman-ss" in out and "podman-export" in out:
        ratios["podman_ss_vs_export"] = (out["podman-ss"]["downtime_s"]
                                         / out["podman-export"]["downtime_s"])
    out["ratios"] = ratios
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items() if v is not None)
          + "  (targets: runc_tcp_vs_bare <= 1.2, podman_ss_vs_export <= 0.25)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
