"""statesync._util.sorted: the sorted-array helpers, against plain-Python models."""
import numpy as np
from hypothesis import given, settings, strategies as st

from statesync._util import sorted as srt

PS = 4096

sorted_u64 = st.lists(st.integers(0, 1 << 20), max_size=60, unique=True).map(
    lambda xs: np.array(sorted(xs), dtype=np.uint64))
probe_u64 = st.lists(st.integers(0, 1 << 20), max_size=60).map(
    lambda xs: np.array(xs, dtype=np.uint64))


def test_lookup_and_member_examples():
    keys = np.array([2, 5, 9], np.uint64)
    pos, found = srt.lookup(keys, np.array([1, 2, 5, 6, 9, 10], np.uint64))
    assert found.tolist() == [False, True, True, False, True, False]
    assert keys[pos[found]].tolist() == [2, 5, 9]
    assert pos.max() < keys.size            # clamped: keys[pos] is always valid
    assert srt.member(np.array([9, 3], np.uint64), keys).tolist() == [True, False]
    assert srt.contains(keys, 5) and not srt.contains(keys, 6) and not srt.contains(keys, 10)


def test_empty_inputs():
    e = np.zeros(0, np.uint64)
    pos, found = srt.lookup(e, np.array([1, 2], np.uint64))
    assert pos.tolist() == [0, 0] and found.tolist() == [False, False]
    assert srt.member(e, np.array([1], np.uint64)).size == 0
    assert not srt.contains(e, 0)
    starts, lengths = srt.runs(e)
    assert starts.size == lengths.size == 0 and srt.run_list(e) == []
    assert srt.expand_runs(e, e, PS).size == 0
    assert srt.in_intervals(np.array([1], np.uint64), e, e).tolist() == [False]
    assert srt.merge([e, e]).size == 0


def test_runs_and_page_runs_examples():
    assert srt.run_list(np.array([3, 4, 5, 9, 10, 12])) == [(0, 3), (3, 2), (5, 1)]
    assert srt.run_list(np.array([7])) == [(0, 1)]
    a = np.array([0x1000, 0x2000, 0x5000, 0x6000, 0x7000], np.uint64)
    first, n = srt.page_runs(a, PS)
    assert first.tolist() == [0x1000, 0x5000] and n.tolist() == [2, 3]
    assert np.array_equal(srt.expand_runs(first, n, PS), a)


def test_intervals_examples():
    starts = np.array([0x1000, 0x8000], np.uint64)
    ends = np.array([0x3000, 0x9000], np.uint64)
    x = np.array([0x0, 0x1000, 0x2fff, 0x3000, 0x8000, 0x9000], np.uint64)
    assert srt.interval_of(x, starts, ends).tolist() == [-1, 0, 0, -1, 1, -1]
    assert srt.in_intervals(x, starts, ends).tolist() == [False, True, True, False, True, False]


@settings(max_examples=200, deadline=None)
@given(sorted_u64, probe_u64)
def test_lookup_matches_python_sets(keys, x):
    pos, found = srt.lookup(keys, x)
    want = [int(v) in set(keys.tolist()) for v in x]
    assert found.tolist() == want
    assert srt.member(x, keys).tolist() == want
    if keys.size:
        assert np.array_equal(keys[pos[found]], x[found])
    for v in x[:5].tolist():
        assert srt.contains(keys, v) == (v in set(keys.tolist()))


@settings(max_examples=200, deadline=None)
@given(sorted_u64, st.sampled_from([1, PS]))
def test_runs_partition_into_consecutive_values(idx, step):
    idx = idx * np.uint64(step)
    starts, lengths = srt.runs(idx, step)
    assert int(lengths.sum()) == idx.size
    cover = []
    for s, n in zip(starts.tolist(), lengths.tolist()):
        run = idx[s:s + n].tolist()
        assert run == [run[0] + step * j for j in range(n)]
        cover.extend(range(s, s + n))
    assert cover == list(range(idx.size))
    for (s, n), nxt in zip(zip(starts.tolist(), lengths.tolist()), starts[1:].tolist()):
        assert int(idx[nxt]) != int(idx[s + n - 1]) + step   # runs are maximal


@settings(max_examples=200, deadline=None)
@given(sorted_u64)
def test_page_runs_and_expand_runs_are_inverse(pagenos):
    addrs = pagenos * np.uint64(PS)
    first, n = srt.page_runs(addrs, PS)
    assert first.dtype == np.uint64 and n.dtype == np.uint64
    assert np.array_equal(srt.expand_runs(first, n, PS), addrs)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(1, 20)), max_size=8), probe_u64)
def test_in_intervals_matches_python(gaps, x):
    starts, ends, at = [], [], 0
    for gap, length in gaps:            # sorted disjoint intervals, maybe adjacent
        at += gap
        starts.append(at)
        ends.append(at + length)
        at += length
    s = np.array(starts, np.uint64)
    e = np.array(ends, np.uint64)
    x = x % np.uint64(max(at + 5, 1))
    k = srt.interval_of(x, s, e)
    for v, ki in zip(x.tolist(), k.tolist()):
        holders = [i for i, (a, b) in enumerate(zip(starts, ends)) if a <= v < b]
        assert ki == (holders[0] if holders else -1)
    assert np.array_equal(srt.in_intervals(x, s, e), k >= 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(sorted_u64, max_size=5))
def test_merge_is_the_sorted_union(arrays):
    want = sorted(set(v for a in arrays for v in a.tolist()))
    assert srt.merge(arrays).tolist() == want
