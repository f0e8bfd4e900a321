"""`statesync bench` as a user of the installed package runs it: on the built-in
workload (real migrations across the testbed) and on a process the user names
(trackers and codecs measured, strategies predicted): the table, the JSON, the plot."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import have_root, require
from statesync import tracking

ENV = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(tracking.__file__)))


def _bench(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "statesync", "bench", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=ENV)


def test_bench_on_the_workload_gives_table_json_and_plot(tmp_path, criu_ok):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    r = _bench("--size", "2M", "--rate", "300", "--rounds", "2", "--interval", "0.2",
               "--json", out, "--plot", png)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for section in ("trackers", "codecs", "strategies"):
        assert section in r.stdout
    res = json.loads(out.read_text())
    assert [t["tracker"] for t in res["trackers"]] == ["uffd", "softdirty", "hash"]
    assert any(t["available"] and t["collect_s"] > 0 for t in res["trackers"])
    codecs = {c["codec"]: c for c in res["codecs"]}
    assert set(codecs) == {"none", "lz4", "lz4-nodedup", "lz4+xor"}
    assert codecs["lz4"]["wire_bytes"] < codecs["none"]["wire_bytes"]
    strat = {s["strategy"]: s for s in res["strategies"]}
    assert set(strat) == {"cold", "precopy", "iterative"}
    for s in strat.values():
        assert s["measured"] and s["ok"] and s["downtime_s"] > 0, s
    assert strat["cold"]["rounds"] == 0 and strat["precopy"]["rounds"] == 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_on_a_named_pid_predicts_strategies(spawn_workload):
    require(have_root(), "needs root (trackers on another process)")
    wl = spawn_workload(size="2M", rate=300)
    r = _bench("--pid", wl.pid, "--trackers", "uffd,hash", "--codecs", "none,lz4",
               "--rounds", "1", "--interval", "0.2", "--link", "10mbit", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["target"]["pid"] == wl.pid and res["link_bps"] == 10e6
    assert [s["measured"] for s in res["strategies"]] == [False, False, False]
    cold = res["strategies"][0]
    # the cold prediction follows the link: the state over 10 Mbit/s at least
    assert cold["downtime_s"] >= cold["state_pages"] * 4096 * 8 / 10e6
    assert wl.alive(), "the benchmark moved or killed the user's process"


def test_bench_usage_errors():
    r = _bench("--trackers", "uffd,nope")
    assert r.returncode == 2 and "--trackers" in r.stderr and "nope" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _bench("--link", "fast")
    assert r.returncode == 2 and "--link" in r.stderr
