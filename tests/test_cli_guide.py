"""docs/operating.md followed on the testbed's two namespaces ("host A" = ns a,
"host B" = ns b): preflight on both hosts and the comparison, a receiver as the
guide's unit runs it, a redis holding data migrated with `statesync migrate`, and
redis answering with the same data at B."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from conftest import have_root, require
from statesync import tracking

ENV = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(tracking.__file__)))
SECRET = b"statesync-guide-secret-0123456789ab"


def test_two_host_guide_moves_redis(criu_ok, tmp_path):
    require(have_root(), "needs root")
    from statesync.testing import services
    from statesync.testing.testbed import Testbed
    require(services.redis_binary(), "redis-server not installed (scripts/setup-system.sh)")

    def ss(tb, side, *args, timeout=120):
        return subprocess.run(tb.wrap(side, [sys.executable, "-m", "statesync", *map(str, args)]),
                              capture_output=True, text=True, timeout=timeout, env=ENV)

    with Testbed("1gbit") as tb:
        # 1. preflight on both hosts, then compare them
        a_json = tmp_path / "a.json"
        r = ss(tb, "a", "check", "--json", a_json)
        assert r.returncode == 0, r.stderr
        r = ss(tb, "b", "check", "--compare", a_json, "--images-dir", tb.dir_b)
        assert r.returncode == 0 and "versions and CPU match" in r.stdout, r.stdout + r.stderr
        # 2. the secret on both hosts, the receiver as the unit runs it
        secret = os.path.join(tb.root, "secret")
        with open(os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(SECRET)
        port = tb.free_port("b")
        images = os.path.join(tb.dir_b, "images")            # created by the receiver
        rx = tb.python("b", ["receive", "--forever", "--listen", f"0.0.0.0:{port}",
                             "--images-dir", images, "--secret-file", secret],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        tb.wait_port("b", port, proc=rx)
        # 3. redis at A with data in it
        sock = os.path.join(tb.root, "redis.sock")
        srv = services.spawn_redis(sock, netns=tb.ns_a)
        restored = None
        try:
            c = srv.client
            c.pipeline([("SET", f"k{i}", f"value-{i}" * 20) for i in range(2000)])
            r = ss(tb, "a", "check", "--pid", srv.pid)
            assert r.returncode == 0, r.stdout + r.stderr
            # 4. migrate it
            out = tmp_path / "report.json"
            r = ss(tb, "a", "migrate", "--pid", srv.pid, "--to", f"{tb.addr_b}:{port}",
                   "--secret-file", secret, "--max-downtime", "2", "--link-rate", "1gbit",
                   "--json", out, "--calibration", "")
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
            rep = json.loads(out.read_text())
            restored = rep["restored_pid"]
            assert rep["ok"] and restored and rep["kpi"]["max_downtime_s"]["met"] is not None
            # 5. the clients find it (same socket path here): same data, new process
            deadline = time.monotonic() + 10
            while True:
                try:
                    got = c.command("GET", "k1999")
                    break
                except OSError:
                    assert time.monotonic() < deadline, "redis does not answer at B"
                    time.sleep(0.05)
            assert got == ("value-1999" * 20).encode()
            assert c.command("DBSIZE") == 2000
            assert not os.path.exists(f"/proc/{srv.pid}") or \
                open(f"/proc/{srv.pid}/stat").read().rsplit(")", 1)[1].split()[0] in "ZX"
        finally:
            srv.kill()
            if restored:
                try:
                    os.kill(restored, 9)
                except ProcessLookupError:
                    pass
