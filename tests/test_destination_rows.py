"""The destination writes a pages file straight from its page store (_write_rows): in
the store's slot order or any other, across the store's chunk boundaries, the file
holds exactly the rows asked for (runs are cut at chunk starts so nothing is copied)."""
import os

import numpy as np

from statesync.migration.destination import _write_rows
from statesync.stream.store import PageStore


def _store(n, width=64):
    st = PageStore(width, np.uint8)
    rng = np.random.default_rng(3)
    addrs = np.arange(n, dtype=np.uint64) * np.uint64(4096) + np.uint64(0x10000)
    rows = rng.integers(0, 255, (n, width), dtype=np.uint8)
    for i in range(0, n, 333):                 # many puts: several chunks
        st.put(addrs[i:i + 333], rows[i:i + 333])
    return st, addrs, rows


def test_pages_file_is_exact_across_chunks_in_any_order(tmp_path):
    st, addrs, rows = _store(60000)
    starts = [s for s, _ in st.pieces()]
    assert len(starts) > 1, "the test needs a store of several chunks"
    rng = np.random.default_rng(5)
    order = np.concatenate([np.arange(0, 30000), rng.permutation(np.arange(30000, 60000))])
    want = addrs[order]
    slots, found = st.lookup(want)
    assert found.all()
    path = tmp_path / "pages.img"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _write_rows(fd, st.rows, slots, starts)
    finally:
        os.close(fd)
    got = np.fromfile(path, dtype=np.uint8).reshape(-1, rows.shape[1])
    assert np.array_equal(got, rows[order])
    # without the chunk starts the result is the same (only slower)
    path2 = tmp_path / "pages2.img"
    fd = os.open(path2, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _write_rows(fd, st.rows, slots)
    finally:
        os.close(fd)
    assert path.read_bytes() == path2.read_bytes()


def test_empty_selection_writes_nothing(tmp_path):
    st, _, _ = _store(10)
    path = tmp_path / "empty.img"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _write_rows(fd, st.rows, np.zeros(0, dtype=np.int64), [0])
    finally:
        os.close(fd)
    assert path.stat().st_size == 0
