"""The two-host harness: namespaces joined by a shaped veth pair, always cleaned up."""
from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from conftest import find_program, have_root, require
from statesync.testing.testbed import NETNS_DIR, Testbed, parse_rate


def _prereqs():
    require(have_root(), "needs root (network namespaces)")
    for prog in ("ip", "tc", "nsenter"):
        require(find_program(prog), f"{prog} not installed (scripts/setup-system.sh)")


def test_parse_rate():
    assert parse_rate("100mbit") == 100_000_000
    assert parse_rate("1gbit") == 10**9
    assert parse_rate("10Mbit") == 10**7
    assert parse_rate("125mbps") == 10**9     # tc's bps unit is bytes/s
    for bad in ("fast", "-1mbit", "0"):
        with pytest.raises(ValueError):
            parse_rate(bad)


def _throughput(tb, nbytes):
    srv = tb.socket("b")
    srv.bind((tb.addr_b, 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    got = []

    def sink():
        c, _ = srv.accept()
        n = 0
        while True:
            d = c.recv(1 << 20)
            if not d:
                break
            n += len(d)
        got.append(n)
        c.close()

    th = threading.Thread(target=sink)
    th.start()
    cl = tb.socket("a")
    cl.connect((tb.addr_b, port))
    t0 = time.monotonic()
    cl.sendall(b"\0" * nbytes)
    cl.close()
    th.join(30)
    srv.close()
    return got[0], time.monotonic() - t0


def test_link_is_shaped_and_joins_only_the_two_sides():
    _prereqs()
    with Testbed("20mbit") as tb:
        n, dt = _throughput(tb, 2_500_000)            # 1 s at 20 Mbit/s
        assert n == 2_500_000
        rate = n * 8 / dt
        # tbf lets a bucket through at once; beyond that it holds the rate.
        assert 0.5 * 20e6 < rate < 1.3 * 20e6, rate
        # Each side has only its loopback and its end of the veth pair: no way out.
        for ns in (tb.ns_a, tb.ns_b):
            r = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True,
                               check=True)
            names = sorted(
                line.split(":")[1].strip().split("@")[0] for line in r.stdout.splitlines()
            )
            assert names == sorted(["lo", ns]), names
        # Each side has its own directory.
        assert os.path.isdir(tb.dir_a) and os.path.isdir(tb.dir_b) and tb.dir_a != tb.dir_b


def test_cleanup_after_failure_kills_processes_and_removes_namespaces():
    _prereqs()
    tb = Testbed("1gbit")
    with pytest.raises(RuntimeError):
        with tb:
            p = tb.popen("a", ["sleep", "600"])
            names = (tb.ns_a, tb.ns_b)
            root = tb.root
            raise RuntimeError("a test failed here")
    assert p.poll() is not None, "a process started in the testbed survived"
    for ns in names:
        assert not os.path.exists(os.path.join(NETNS_DIR, ns))
    assert not os.path.exists(root)


def test_link_drop_and_restore():
    _prereqs()
    with Testbed("100mbit") as tb:
        tb.set_link(False)
        s = tb.socket("a")
        s.settimeout(1.0)
        with pytest.raises(OSError):
            s.connect((tb.addr_b, 9))
        s.close()
        tb.set_link(True)
        n, _ = _throughput(tb, 100_000)
        assert n == 100_000
