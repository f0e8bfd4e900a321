"""`statesync track` and `statesync track-methods` as a user runs them."""
import os
import signal
import subprocess
import sys
import time

from conftest import require
from statesync import proc, tracking

ENV = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(tracking.__file__)))


def test_track_prints_a_row_per_interval(spawn_workload):
    wl = spawn_workload(size="8M", rate=3000)
    r = subprocess.run([sys.executable, "-m", "statesync", "track", "--pid", str(wl.pid),
                        "--interval", "0.2", "--count", "4"],
                       capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"tracking pid {wl.pid} with method")
    rows = [ln.split() for ln in lines[2:]]
    assert len(rows) == 4
    method = rows[0][-1]
    assert method in tracking.METHODS
    assert all(int(r_[1]) > 100 for r_ in rows)          # ~600 writes per interval
    assert "detached" in r.stderr
    assert wl.alive()


def test_ctrl_c_detaches_cleanly(spawn_workload):
    require(tracking.tracking_methods()["uffd"][0], "uffd tracking unavailable")
    wl = spawn_workload(size="8M", rate=3000)
    time.sleep(0.3)  # the spawn's last control connection closes
    fds = sorted(os.listdir(f"/proc/{wl.pid}/fd"))
    p = subprocess.Popen([sys.executable, "-m", "statesync", "track", "--pid", str(wl.pid),
                          "--method", "uffd", "--interval", "0.2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        for _ in range(3):
            line = p.stdout.readline()
        assert line.split()[-1] == "uffd"
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
        assert p.returncode == 0 and "detached" in err
    finally:
        p.kill()
        p.wait()
    st = wl.client.status()
    pm = proc.pagemap(wl.pid, st["addr"], st["addr"] + st["size"])
    assert not pm.uffd_wp.any()                        # write protection all gone
    time.sleep(0.3)
    assert sorted(os.listdir(f"/proc/{wl.pid}/fd")) == fds
    assert proc.status(wl.pid)["TracerPid"] == "0"


def test_track_of_a_missing_pid_is_a_clear_error():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    r = subprocess.run([sys.executable, "-m", "statesync", "track", "--pid", str(p.pid),
                        "--count", "1"], capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 1
    assert f"pid {p.pid}" in r.stderr and "no such process" in r.stderr


def test_track_methods_lists_all_three():
    r = subprocess.run([sys.executable, "-m", "statesync", "track-methods"],
                       capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 0
    names = [ln.split()[0] for ln in r.stdout.splitlines()]
    assert names == ["uffd", "softdirty", "hash"]
