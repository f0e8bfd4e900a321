"""Shared test prerequisites and fixtures.

A test that needs something the machine lacks (root, CRIU, a kernel feature, a
Debian service) calls :func:`require`. Off CI that skips with the reason; with
``CI`` set it fails, so a green CI always means the real thing ran.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

IN_CI = bool(os.environ.get("CI"))


def require(condition, reason: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing on CI: {reason}", pytrace=False)
    pytest.skip(reason)


def have_root() -> bool:
    return os.geteuid() == 0


def find_program(name: str):
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


@pytest.fixture
def root():
    require(have_root(), "needs root")


@pytest.fixture
def spawn_workload():
    """Factory: ``spawn_workload(size=..., rate=..., **kw)``; every workload it starts
    is killed at teardown."""
    from statesync.testing import workloads

    started = []

    def _spawn(*args, **kw):
        wl = workloads.spawn(*args, **kw)
        started.append(wl)
        return wl

    yield _spawn
    for wl in started:
        wl.kill()


def run(cmd, **kw):
    kw.setdefault("check", True)
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 120)
    return subprocess.run(cmd, **kw)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def criu_ok():
    """A working CRIU >= 4 and root, or skip (fail on CI). Returns criu.check()'s info."""
    from statesync import criu
    require(have_root(), "CRIU dump/restore needs root")
    info = criu.check()
    require(info.ok, f"needs a working CRIU >= 4: {info.reasons.get('criu')}")
    return info


def pid_gone(pid):
    """Reaped, or a zombie whose threads have all exited (its files are closed)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            zombie = f.read().split(") ")[-1].startswith("Z")
        return zombie and len(os.listdir(f"/proc/{pid}/task")) <= 1
    except OSError:
        return True


@pytest.fixture
def reap():
    """Restored pids to SIGKILL at teardown; waits until they are gone, so the next
    restore of the same images can bind the workload's control socket again."""
    import signal
    import time
    pids = []
    yield pids
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + 10
        while not pid_gone(p) and time.monotonic() < deadline:
            time.sleep(0.01)
