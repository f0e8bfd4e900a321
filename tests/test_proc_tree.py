"""proc.state / proc.descendants / proc.kill_tree on real process trees."""
import os
import signal
import subprocess
import time

from conftest import find_program, have_root, require
from statesync import proc


def _wait(pred, timeout=10.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.01)
    return False


def test_state_of_running_stopped_zombie_and_missing():
    assert proc.state(os.getpid()) == "R"
    p = subprocess.Popen(["sleep", "30"])
    try:
        assert _wait(lambda: proc.state(p.pid) == "S")
        os.kill(p.pid, signal.SIGSTOP)
        assert _wait(lambda: proc.state(p.pid) == "T")
        os.kill(p.pid, signal.SIGKILL)
        assert _wait(lambda: proc.state(p.pid) == "Z")   # not reaped yet
        assert not proc.exists(p.pid)
    finally:
        p.kill()
        p.wait()
    assert proc.state(p.pid) is None and not proc.exists(p.pid)


def test_descendants_lists_grandchildren_parents_first_and_kill_tree_ends_them():
    # sh -> (sh -> sleep) and sleep: a grandchild through a subshell.
    p = subprocess.Popen(["sh", "-c", "(sleep 30; :) & sleep 30 & wait"])
    try:
        assert _wait(lambda: len(proc.descendants(p.pid)) == 3)
        kids = proc.descendants(p.pid)
        assert p.pid not in kids
        sub = [k for k in kids if proc.descendants(k)]
        assert len(sub) == 1 and kids.index(sub[0]) < kids.index(proc.descendants(sub[0])[0])
        proc.kill_tree([], p)
        assert p.returncode is not None
        assert _wait(lambda: not any(proc.exists(k) for k in kids))
    finally:
        p.kill()
        p.wait()
    assert proc.descendants(p.pid) == []


def test_kill_tree_ends_a_pid_namespace_init_that_ignores_sigterm():
    require(have_root(), "needs root (unshare -p)")
    require(find_program("unshare"), "unshare not installed (util-linux)")
    p = subprocess.Popen(["unshare", "-p", "-f", "setsid", "sh", "-c",
                          "trap '' TERM; sleep 30 & wait"], start_new_session=True)
    try:
        assert _wait(lambda: len(proc.descendants(p.pid)) >= 2)
        init = proc.descendants(p.pid)[0]
        os.kill(init, signal.SIGTERM)
        time.sleep(0.05)
        assert proc.exists(init)
        proc.kill_tree([init, 0, None], p)
        assert p.returncode is not None and not proc.exists(init)
    finally:
        p.kill()
        p.wait()
