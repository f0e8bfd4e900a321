"""The C page hash and zero-page test, through the binding, on every buffer type."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from statesync import _core


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_hash128_accepts_every_bytes_like(kind):
    data = bytes(range(256)) * 17
    assert _core.hash128(kind(data)) == _core.hash128(data)
    assert _core.hash128(kind(b"")) == _core.hash128(b"")


def test_hash_pages_matches_hash128_per_row_and_separates_changed_pages():
    rng = np.random.default_rng(0)
    pages = rng.integers(0, 256, size=(50, 4096), dtype=np.uint8)
    pages[10] = pages[20]
    h = _core.hash_pages(pages)
    assert h.shape == (50, 2) and h.dtype == np.uint64
    for i in (0, 10, 49):
        assert tuple(int(x) for x in h[i]) == _core.hash128(pages[i].tobytes())
    assert (h[10] == h[20]).all()
    changed = pages.copy()
    changed[np.arange(50), rng.integers(0, 4096, 50)] ^= 1
    h2 = _core.hash_pages(changed)
    assert (h2 != h).any(axis=1).all()


def test_hash_pages_readonly_and_empty():
    pages = np.zeros((3, 4096), dtype=np.uint8)
    pages.setflags(write=False)
    assert _core.hash_pages(pages).shape == (3, 2)
    assert _core.hash_pages(np.zeros((0, 4096), dtype=np.uint8)).shape == (0, 2)


def test_zero_pages():
    pages = np.zeros((5, 4096), dtype=np.uint8)
    pages[1, 4095] = 1
    pages[3, 0] = 255
    assert _core.zero_pages(pages).tolist() == [True, False, True, False, True]


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=300), st.integers(0, 2**64 - 1))
def test_hash128_is_deterministic_and_sensitive_to_any_byte(data, seed):
    h = _core.hash128(data, seed)
    assert h == _core.hash128(bytes(data), seed)
    if data:
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x80
        assert _core.hash128(bytes(flipped), seed) != h
