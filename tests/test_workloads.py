"""The workload generator: what it reports it wrote is what it wrote."""
import numpy as np

from statesync.testing import workloads


def test_parse_size():
    assert workloads.parse_size("64M") == 64 << 20
    assert workloads.parse_size("1G") == 1 << 30
    assert workloads.parse_size("4096") == 4096
    assert workloads.parse_size("2KiB") == 2048


def test_workload_reports_exact_writes_and_checksum_changes(spawn_workload):
    wl = spawn_workload(size="4M", rate=0, paused=True)
    c = wl.client
    st = c.status()
    assert st["pid"] == wl.pid and st["npages"] == (4 << 20) // 4096
    assert c.take_written().size == 0
    before = c.checksum()
    c.write([0, 5, 5, 1023])
    got = c.take_written()
    base = st["addr"]
    assert got.tolist() == [base, base + 5 * 4096, base + 1023 * 4096]
    assert c.checksum() != before
    assert c.take_written().size == 0


def test_workload_rate_writes_and_new_mappings(spawn_workload):
    wl = spawn_workload(size="2M", rate=2000)
    c = wl.client
    addr = c.map("1M")
    import time
    time.sleep(0.3)
    c.pause()
    w = c.take_written()
    assert 100 < w.size <= 768
    assert np.all(np.diff(w.astype(np.int64)) > 0)
    st = c.status()
    assert [addr, 1 << 20] in st["mappings"]


def test_every_write_changes_page_content_even_on_low_entropy_fill(spawn_workload):
    """Early sequence numbers are small; they must still differ from fill values."""
    from statesync import proc
    wl = spawn_workload(size="1M", rate=0, paused=True, fill="mixed", seed=3)
    c = wl.client
    st = c.status()
    addrs = np.uint64(st["addr"]) + np.arange(st["npages"], dtype=np.uint64) * np.uint64(4096)
    before, ok = proc.read_pages(wl.pid, addrs)
    assert ok.all()
    c.write(range(st["npages"]))
    after, ok = proc.read_pages(wl.pid, addrs)
    assert ok.all()
    assert (before != after).any(axis=1).all()
