"""A real third-party server: Debian's redis-server, unmodified, under a bounded
write load. The uffd tracker must report every page whose content the hash tracker
saw change over the same intervals, and redis must answer correctly afterwards."""
import hashlib
import os
import time

import numpy as np
import pytest

from conftest import have_root, require
from statesync import proc
from statesync.testing import services
from statesync.tracking import Tracker, tracking_methods


@pytest.fixture
def redis(tmp_path):
    require(services.redis_binary(), "redis-server not installed (scripts/setup-system.sh)")
    require(have_root(), "spawn_redis runs redis in its own pid namespace: needs root")
    srv = services.spawn_redis(str(tmp_path / "redis.sock"), maxmemory="512mb")
    yield srv
    srv.kill()


def _digest(client, n):
    h = hashlib.blake2b(digest_size=16)
    for lo in range(0, n, 1000):
        for v in client.pipeline([("GET", f"key:{i}") for i in range(lo, min(n, lo + 1000))]):
            h.update(v or b"<nil>")
    return h.hexdigest()


def test_uffd_misses_nothing_hash_sees_on_redis(redis):
    require(tracking_methods()["uffd"][0], f"uffd: {tracking_methods()['uffd'][1]}")
    c = redis.client
    nkeys = 20000
    services.load_keys(c, nkeys, value_size=1000)
    digest0 = _digest(c, nkeys)
    time.sleep(0.3)  # redis closes our last client connection asynchronously
    fds0 = sorted(os.listdir(f"/proc/{redis.pid}/fd"))

    uffd = Tracker(redis.pid, method="uffd")
    hashed = Tracker(redis.pid, method="hash")
    assert uffd.method == "uffd" and uffd.info["registered_vmas"] > 0
    writer = services.RedisWriter(c, keys=5000, rate=40, batch=50, prefix="w",
                                  max_seconds=20).start()
    U, H = [], []
    try:
        for _ in range(10):
            time.sleep(0.15)
            H.append(hashed.collect().pages)    # hash first: whatever it saw changed
            U.append(uffd.collect().pages)      # was written before uffd's collect
        writer.stop()
        H.append(hashed.collect().pages)
        U.append(uffd.collect().pages)
    finally:
        writer.stop()
        hashed.detach()
        uffd.detach()
    all_u = np.unique(np.concatenate(U))
    all_h = np.unique(np.concatenate(H))
    assert writer.writes > 1000 and writer.failures == 0
    assert all_h.size > 100
    missed = np.setdiff1d(all_h, all_u)
    assert missed.size == 0, f"uffd missed {missed.size} pages hashing saw change"
    # per round, too: a page hash saw change in round k was written by uffd's round k
    for k in range(len(H)):
        assert np.setdiff1d(H[k], np.concatenate(U[:k + 1])).size == 0

    # redis answers correctly after detach, nothing left behind
    assert c.command("PING") == "PONG"
    assert writer.verify() == 0
    assert _digest(c, nkeys) == digest0
    assert proc.status(redis.pid)["TracerPid"] == "0"
    deadline = time.monotonic() + 3
    while sorted(os.listdir(f"/proc/{redis.pid}/fd")) != fds0 and time.monotonic() < deadline:
        time.sleep(0.05)  # client connections of the checks above still closing
    assert sorted(os.listdir(f"/proc/{redis.pid}/fd")) == fds0
    vmas = [v for v in proc.read_maps(redis.pid) if v.writable and v.anonymous]
    for v in vmas:
        assert not proc.pagemap(redis.pid, v.start, v.end).uffd_wp.any()
