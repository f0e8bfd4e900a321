"""statesync.stream.store.PageStore: the one in-memory page store (engine tables,
MemoryPageStore, stream target), against a dict model."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from statesync import stream as S
from statesync.errors import StreamError
from statesync.migration.pagetable import PageTable
from statesync.stream.store import PageStore

PS = 4096


def test_one_type_under_every_name():
    assert PageTable is PageStore and S.PageStore is PageStore
    assert issubclass(S.MemoryPageStore, PageStore)
    assert isinstance(PageStore(PS), S.PageTarget)
    assert isinstance(PageStore(PS).begin(PS), S.PageTransaction)


def test_hash_rows_put_lookup_take():
    t = PageStore(2, np.uint64)
    a = np.array([0x3000, 0x1000], np.uint64)
    t.put(a, np.array([[3, 30], [1, 10]], np.uint64))
    slots, found = t.lookup(np.array([0x1000, 0x2000, 0x3000], np.uint64))
    assert found.tolist() == [True, False, True]
    assert t.rows[slots[found]].tolist() == [[1, 10], [3, 30]]
    assert t.take(np.array([0x3000], np.uint64)).tolist() == [[3, 30]]
    with pytest.raises(KeyError, match="0x2000"):
        t.take(np.array([0x2000], np.uint64))
    rows, ok = t.get(np.array([0x2000, 0x1000], np.uint64))
    assert ok.tolist() == [False, True] and rows.tolist() == [[0, 0], [1, 10]]
    assert t.nbytes == 2 * 16 and len(t) == 2
    with pytest.raises(StreamError, match="page size"):
        t.begin(PS)                       # hash rows are not a page target


def test_growth_adds_chunks_and_never_moves_rows():
    t = PageStore(PS)
    first = None
    for r in range(40):                   # 40 x 512 pages = 80 MiB: several chunks
        a = (np.arange(512, dtype=np.uint64) + np.uint64(512 * r)) * np.uint64(PS)
        t.put(a, np.full((512, PS), r % 251, np.uint8))
        if first is None:
            first = t._chunks[0]
    assert len(t._chunks) > 2 and t._chunks[0] is first   # grown without a copy
    assert max(c.nbytes for c in t._chunks) <= 64 << 20
    slots, found = t.lookup(np.array([0, 39 * 512 * PS], np.uint64))
    assert found.all()
    assert t.rows[slots][:, 0].tolist() == [0, 39]
    pieces = t.pieces()
    assert [first for first, _ in pieces] == t._starts and pieces[0][1] is first
    # a slice of consecutive slots across a chunk boundary still reads right
    b = t._starts[1]
    assert t.rows[b - 1:b + 1].shape == (2, PS)


def test_reserve_makes_room_in_one_allocation():
    t = PageStore(PS)
    t.reserve(1000)
    assert t.capacity >= 1000 and len(t._chunks) == 1
    t.put(np.arange(1000, dtype=np.uint64) * np.uint64(PS), np.ones((1000, PS), np.uint8))
    assert len(t._chunks) == 1 and t.capacity == 0
    assert np.shares_memory(t.pages, t._chunks[0])          # compact: a view, no copy
    assert np.shares_memory(t.as_array(), t._chunks[0])


def test_wrap_is_zero_copy_and_copies_on_write():
    pages = np.arange(3 * PS, dtype=np.uint8).reshape(3, PS) % 7
    pages.flags.writeable = False
    s = PageStore.wrap(np.array([PS, 2 * PS, 3 * PS], np.uint64), pages)
    assert np.shares_memory(s.pages, pages)
    s.put(np.array([2 * PS], np.uint64), np.zeros((1, PS), np.uint8))
    assert not np.shares_memory(s.pages, pages) and s.pages[1].sum() == 0
    assert pages[1].sum() != 0


def test_decodes_into_the_store_directly_and_atomically():
    addrs = np.arange(64, dtype=np.uint64) * np.uint64(PS) + np.uint64(1 << 30)
    pages = np.random.default_rng(3).integers(0, 4, (64, PS), dtype=np.uint8)
    t = PageStore(PS)
    S.apply([S.encode(addrs, pages, compression="lz4")], t)
    assert np.array_equal(t.take(addrs), pages)
    new = pages.copy()
    new[5:9] ^= 0x5A
    data = S.encode(addrs, new, previous=pages, previous_mask=np.ones(64, bool), xor=True)
    bad = bytearray(data)
    bad[-20] ^= 1
    with pytest.raises(StreamError):
        S.apply([bytes(bad)], t)
    assert np.array_equal(t.take(addrs), pages)      # unchanged by the corrupt stream
    S.apply([data], t)
    assert np.array_equal(t.take(addrs), new)


keys_st = st.lists(st.integers(0, 300), min_size=1, max_size=40, unique=True)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(keys_st, st.integers(0, 255)), min_size=1, max_size=12),
       st.booleans())
def test_put_matches_a_dict(batches, via_stream):
    ps = 512
    t = PageStore(ps)
    model = {}
    for keys, fill in batches:
        a = np.array(keys, np.uint64) * np.uint64(ps)
        v = (np.arange(len(keys) * ps, dtype=np.int64).reshape(len(keys), ps) + fill) % 256
        v = v.astype(np.uint8)
        if via_stream:
            order = np.argsort(a)
            S.apply([S.encode(a[order], v[order], page_size=ps)], t)
        else:
            t.put(a, v)
        for k, row in zip(a.tolist(), v):
            model[k] = row
    want = sorted(model)
    assert t.addrs.tolist() == want
    assert np.array_equal(t.pages, np.stack([model[k] for k in want]))
    rows, ok = t.get(np.array(want + [max(want) + ps], np.uint64))
    assert ok.tolist() == [True] * len(want) + [False]
    assert np.array_equal(rows[:-1], t.pages) and not rows[-1].any()
    assert t.to_dict() == {k: model[k].tobytes() for k in want}


def test_arena_chunks_handed_to_the_store_never_alias_later_streams():
    """Streams of new pages give the arena chunks they fill to the store (no copy);
    later streams (new pages, overwrites, a corrupt one) must not write into them."""
    rng = np.random.default_rng(5)
    t = S.MemoryPageStore(PS)
    model = {}
    plan = [(0, 5000), (20000, 7000), (0, 5000), (40000, 300), (20000, 7000), (60000, 9000)]
    for r, (first, n) in enumerate(plan):
        a = (np.arange(n, dtype=np.uint64) + np.uint64(first)) * np.uint64(PS)
        p = rng.integers(0, 255, (n, PS), dtype=np.uint8)
        data = S.encode(a, p, compression=None, xor=False, dedup=False, block_pages=256)
        if r == 3:
            bad = bytearray(data)
            bad[-24] ^= 1
            with pytest.raises(StreamError):
                S.apply([bytes(bad)], t)
        S.apply([data], t)
        model.update(zip(a.tolist(), p))
        keys = sorted(model)
        assert t.addrs.tolist() == keys
        got = t.take(np.array(keys, np.uint64))
        assert np.array_equal(got, np.stack([model[k] for k in keys]))
    assert len(t._chunks) > 1          # arena chunks were adopted as store chunks
