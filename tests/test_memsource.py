"""memsource.dumpable_pages: which pages round 0 sends (what CRIU would dump)."""
import mmap
import os
import tracemalloc

import numpy as np
import pytest

from statesync import NoSuchProcess
from statesync._consts import PAGE_SIZE
from statesync.migration.memsource import dumpable_pages

PS = PAGE_SIZE
_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux value; Python < 3.12 lacks it


def _addr(m) -> int:
    import ctypes
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def test_huge_reservation_costs_memory_by_pages_found_not_by_size():
    # 16 GiB of reserved address space with 3 touched pages: the old code read the
    # whole VMA's pagemap at once (8 bytes a page = 32 MiB here, 2 GiB for 1 TiB).
    size = 16 << 30
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE)
    try:
        base = _addr(m)
        for i in (0, 12345, size // PS - 1):
            m[i * PS] = 1
        tracemalloc.start()
        try:
            got = dumpable_pages(os.getpid())
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        mine = got[(got >= base) & (got < base + size)]
        assert mine.tolist() == [base, base + 12345 * PS, base + size - PS]
        assert np.all(np.diff(got.astype(np.int64)) > 0)
        assert peak < 8 << 20, peak
    finally:
        m.close()


def test_file_pages_are_left_out_until_written(tmp_path):
    p = tmp_path / "data"
    p.write_bytes(os.urandom(8 * PS))
    with open(p, "rb+") as f:
        m = mmap.mmap(f.fileno(), 8 * PS, flags=mmap.MAP_PRIVATE)
    try:
        base = _addr(m)
        assert sum(m[i * PS] for i in range(8)) >= 0   # fault in page-cache pages
        m[5 * PS] = m[5 * PS] ^ 0xFF                    # copy-on-write: now anonymous
        got = dumpable_pages(os.getpid())
        mine = got[(got >= base) & (got < base + 8 * PS)]
        assert mine.tolist() == [base + 5 * PS]
    finally:
        m.close()


def test_no_fd_leak_and_missing_process_is_no_such_process():
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        dumpable_pages(os.getpid())
    assert len(os.listdir("/proc/self/fd")) == before
    with pytest.raises(NoSuchProcess) as ei:
        dumpable_pages(2 ** 22 + 1)
    assert ei.value.pid == 2 ** 22 + 1
