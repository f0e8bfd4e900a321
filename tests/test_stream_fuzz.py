"""Property tests of statesync.stream: exact round trips for any pages, options and
chunking; every mutation of a valid stream is refused cleanly with the target
unchanged; the XOR codec never misbehaves on hostile deltas."""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as hs

from statesync import _core, stream as S
from statesync.errors import StreamError

PS = 512  # the smallest page size the format allows: keeps examples small and fast

FUZZ = settings(max_examples=int(os.environ.get("STATESYNC_FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@hs.composite
def page_sets(draw, max_pages=24):
    """(addrs, pages, previous, mask): pages built from zero pages, copies of earlier
    pages, small edits of the previous content, and random bytes."""
    n = draw(hs.integers(0, max_pages))
    gaps = draw(hs.lists(hs.integers(1, 3), min_size=n, max_size=n))
    first = draw(hs.integers(0, 2 ** 20))
    pagenos = first + np.cumsum(np.array(gaps, dtype=np.uint64)) if n else np.empty(0, np.uint64)
    addrs = pagenos.astype(np.uint64) * np.uint64(PS)
    seed = draw(hs.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    prev = rng.integers(0, 256, (n, PS), dtype=np.uint8)
    prev[rng.random(n) < 0.2] = 0
    pages = np.empty((n, PS), np.uint8)
    kinds = draw(hs.lists(hs.sampled_from("zrdeu"), min_size=n, max_size=n))
    for i, k in enumerate(kinds):
        if k == "z":
            pages[i] = 0
        elif k == "d" and i:
            pages[i] = pages[int(rng.integers(0, i))]
        elif k == "e":
            pages[i] = prev[i]
            for _ in range(int(rng.integers(1, 6))):
                pages[i, int(rng.integers(0, PS))] ^= int(rng.integers(1, 256))
        elif k == "u":
            pages[i] = prev[i]
        else:
            pages[i] = rng.integers(0, 256, PS, dtype=np.uint8)
    mask = rng.random(n) < 0.8
    return addrs, pages, prev, mask


options = hs.fixed_dictionaries({
    "compression": hs.sampled_from(["lz4", None]),
    "xor": hs.booleans(),
    "dedup": hs.booleans(),
    "block_pages": hs.integers(1, 9),
    "level": hs.sampled_from([0, 1, 9]),
    "threads": hs.sampled_from([1, 2]),
    "frame_checksum": hs.booleans(),
})


def receiver(addrs, prev, mask):
    return S.MemoryPageStore(PS, addrs[mask], prev[mask])


@FUZZ
@given(page_sets(), options, hs.booleans(), hs.data())
def test_round_trip_any_pages_options_and_chunking(ps, opts, use_prev, data):
    addrs, pages, prev, mask = ps
    store = receiver(addrs, prev, mask)
    enc = S.Encoder(PS, **opts)
    chunks = list(enc.encode(addrs, pages, previous=prev if use_prev else None,
                             previous_mask=mask if use_prev else None))
    blob = b"".join(chunks)
    # re-chunk at arbitrary points
    cuts = sorted(data.draw(hs.lists(hs.integers(0, len(blob)), max_size=6)))
    pieces = [blob[a:b] for a, b in zip([0] + cuts, cuts + [len(blob)])]
    st = S.apply(pieces, store)
    got, ok = store.get(addrs)
    assert ok.all() and np.array_equal(got, pages)
    assert st.total_pages == len(addrs) and st.bytes_in == len(blob)
    assert st.pages == enc.last_stats.pages
    if not use_prev:
        assert st.pages["xor"] == 0
    info = S.inspect([blob])
    assert info.pages == st.pages and info.records == st.records


@pytest.fixture(scope="module")
def corpus():
    """A few valid streams with their receivers, built once."""
    rng = np.random.default_rng(42)
    out = []
    for k in range(4):
        n = 12
        addrs = (np.arange(n, dtype=np.uint64) * 3 + 100) * np.uint64(PS)
        prev = rng.integers(0, 256, (n, PS), dtype=np.uint8)
        pages = prev.copy()
        pages[::3] = 0
        pages[1::4, :9] ^= 5
        pages[5] = pages[2]
        pages[7] = rng.integers(0, 256, PS, dtype=np.uint8)
        blob = S.encode(addrs, pages, previous=prev, page_size=PS, block_pages=4,
                        compression=None if k == 3 else "lz4")
        out.append((blob, addrs, prev))
    return out


mutations = hs.one_of(
    hs.tuples(hs.just("flip"), hs.integers(0, 10 ** 6), hs.integers(0, 7)),
    hs.tuples(hs.just("set"), hs.integers(0, 10 ** 6), hs.integers(0, 255)),
    hs.tuples(hs.just("cut"), hs.integers(0, 10 ** 6), hs.just(0)),
    hs.tuples(hs.just("del"), hs.integers(0, 10 ** 6), hs.integers(1, 40)),
    hs.tuples(hs.just("ins"), hs.integers(0, 10 ** 6), hs.integers(0, 255)),
    hs.tuples(hs.just("dupe"), hs.integers(0, 10 ** 6), hs.integers(1, 200)),
)


@FUZZ
@given(hs.integers(0, 3), hs.lists(mutations, min_size=1, max_size=3))
def test_every_mutation_is_refused_and_target_unchanged(corpus, which, muts):
    blob, addrs, prev = corpus[which]
    b = bytearray(blob)
    for kind, pos, arg in muts:
        pos %= max(len(b), 1)
        if kind == "flip" and b:
            b[pos] ^= 1 << arg
        elif kind == "set" and b:
            b[pos] = arg
        elif kind == "cut":
            del b[pos:]
        elif kind == "del":
            del b[pos:pos + arg]
        elif kind == "ins":
            b[pos:pos] = bytes([arg])
        elif kind == "dupe":
            b[pos:pos] = b[pos:pos + arg]
    store = S.MemoryPageStore(PS, addrs, prev)
    before = store.pages.copy()
    if bytes(b) == blob:
        S.apply([bytes(b)], store)
        return
    with pytest.raises(StreamError) as ei:
        S.apply([bytes(b)], store)
    assert ei.value.offset is not None and ei.value.record is not None
    assert 0 <= ei.value.offset <= len(b)
    assert np.array_equal(store.pages, before) and np.array_equal(store.addrs, addrs)


@FUZZ
@given(hs.binary(min_size=0, max_size=600))
def test_random_bytes_never_crash_the_reader(junk):
    store = S.MemoryPageStore(PS)
    for data in (junk, S.MAGIC + junk):
        with pytest.raises(StreamError):
            S.apply([data], store)
    assert len(store) == 0


@FUZZ
@given(hs.binary(min_size=PS, max_size=PS), hs.lists(hs.tuples(hs.integers(0, PS - 1),
                                                               hs.integers(0, 255)), max_size=40))
def test_xor_codec_round_trip(old, edits):
    new = bytearray(old)
    for pos, v in edits:
        new[pos] = v
    o = np.frombuffer(old, np.uint8)
    nw = np.frombuffer(bytes(new), np.uint8)
    d = _core.xor_encode(nw, o, 4 * PS)
    assert d is not None
    assert np.array_equal(_core.xor_decode(np.frombuffer(d, np.uint8), o), nw)
    if len(d) > 1:
        assert _core.xor_encode(nw, o, len(d) - 1) is None   # bounded output, refused


@FUZZ
@given(hs.binary(max_size=64))
def test_xor_decoder_on_hostile_deltas(delta):
    old = np.zeros(PS, np.uint8)
    try:
        out = _core.xor_decode(np.frombuffer(delta, np.uint8), old)
    except ValueError:
        return
    assert out.shape == (PS,)
