"""statesync.stream: exact round trips, every target, many rounds over one
connection, and every class of bad input (clean StreamError, target unchanged)."""
import os
import socket
import struct
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest

from statesync import _core, stream as S
from statesync.errors import StreamError

PS = 4096


def make_pages(n=600, seed=1, base_page=0x1000):
    """Pages with zero pages, duplicates, low-entropy and random content."""
    rng = np.random.default_rng(seed)
    addrs = (np.sort(rng.choice(n * 4, n, replace=False)).astype(np.uint64) + base_page) * PS
    pages = rng.integers(0, 4, (n, PS), dtype=np.uint8)
    pages[::5] = 0
    pages[3::11] = pages[2]
    pages[7::13] = rng.integers(0, 256, (len(pages[7::13]), PS), dtype=np.uint8)
    return addrs, pages


def modify(pages, seed=2, frac=0.3):
    rng = np.random.default_rng(seed)
    new = pages.copy()
    idx = rng.choice(len(pages), int(len(pages) * frac), replace=False)
    for i in idx:
        off = int(rng.integers(0, PS - 16))
        new[i, off:off + 8] = rng.integers(0, 256, 8, dtype=np.uint8)
    return new


def store_from(addrs, pages):
    return S.MemoryPageStore(PS, addrs.copy(), pages.copy())


def snapshot(store):
    return store.addrs.copy(), store.pages.copy()


def assert_same(store, snap):
    assert np.array_equal(store.addrs, snap[0]) and np.array_equal(store.pages, snap[1])


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("compression", ["lz4", None])
@pytest.mark.parametrize("xor,dedup", [(True, True), (False, False), (True, False), (False, True)])
def test_round_trip_every_option(compression, xor, dedup):
    addrs, pages = make_pages()
    enc = S.Encoder(compression=compression, xor=xor, dedup=dedup, block_pages=64)
    store = S.MemoryPageStore(PS)
    st = S.apply(enc.encode(addrs, pages), store)
    assert np.array_equal(store.addrs, addrs) and np.array_equal(store.pages, pages)
    assert st.total_pages == len(addrs) and st.bytes_out == pages.nbytes
    assert st.pages["zero"] > 0
    assert (st.pages["dup"] > 0) == dedup
    # round 2 against the receiver's copy
    new = modify(pages)
    st2 = S.apply(enc.encode(addrs, new, previous=store), store)
    assert np.array_equal(store.pages, new)
    assert (st2.pages["xor"] > 0) == xor
    # Every changed page is XOR (xor on) or RAW (off); every unchanged non-zero page is a
    # DUP to itself (the receiver holds it), with or without dedup.
    changed = (new != pages).any(axis=1)
    zero = ~new.any(axis=1)
    assert st2.pages["dup"] == int((~changed & ~zero).sum()) > 0
    assert st2.pages["zero"] == int(zero.sum())
    assert st2.pages["xor" if xor else "raw"] == int(changed.sum()) > 0
    assert enc.last_stats.bytes_in == st2.bytes_in


def test_second_round_is_small_and_chunking_is_free():
    addrs, pages = make_pages(800)
    full = S.encode(addrs, pages)
    store = S.MemoryPageStore(PS)
    # the same stream fed 1 byte, 7 bytes and 1 MiB at a time decodes identically
    for step in (1, 7, 1 << 20):
        s = S.MemoryPageStore(PS)
        chunks = (full[i:i + step] for i in range(0, len(full), step))
        st = S.apply(chunks, s)
        assert np.array_equal(s.pages, pages) and st.bytes_in == len(full)
    S.apply([bytearray(full)], store)
    new = modify(pages, frac=0.05)
    delta = S.encode(addrs, new, previous=pages)
    assert len(delta) < 0.05 * len(full)
    S.apply([memoryview(delta)], store)
    assert np.array_equal(store.pages, new)


def test_empty_stream_and_single_pages():
    store = S.MemoryPageStore(PS)
    st = S.apply(S.encode(np.empty(0, np.uint64), np.empty((0, PS), np.uint8)), store)
    assert st.total_pages == 0 and len(store) == 0
    # the highest page of the address space and page 0
    top = np.array([0, (2 ** 64 - PS)], dtype=np.uint64)
    pg = np.zeros((2, PS), np.uint8)
    pg[1, -1] = 9
    S.apply(S.encode(top, pg), store)
    assert np.array_equal(store.pages, pg)


def test_dedup_is_exact_even_when_hashes_collide():
    """The sender confirms hash matches with memcmp; a DUP record is only emitted for
    byte-identical pages (checked by decoding: the receiver verifies every hash too)."""
    addrs, pages = make_pages(300)
    enc = S.Encoder()
    data = b"".join(enc.encode(addrs, pages))
    assert enc.last_encoder_stats["hash_collisions"] == 0
    s = S.MemoryPageStore(PS)
    st = S.apply([data], s)
    uniq = len(np.unique(pages[~np.all(pages == 0, axis=1)], axis=0))
    assert st.pages["raw"] == uniq and np.array_equal(s.pages, pages)


def test_bad_encoder_input():
    enc = S.Encoder()
    with pytest.raises(ValueError, match="strictly increasing"):
        list(enc.encode(np.array([PS, PS], np.uint64), np.zeros((2, PS), np.uint8)))
    with pytest.raises(ValueError, match="aligned"):
        list(enc.encode(np.array([5], np.uint64), np.zeros((1, PS), np.uint8)))
    with pytest.raises(ValueError):
        S.Encoder(page_size=3000)
    with pytest.raises(ValueError):
        S.Encoder(compression="gzip")


# ------------------------------------------------------------------ targets


def test_file_page_store_round_trip_and_atomicity(tmp_path):
    addrs, pages = make_pages(400)
    path = tmp_path / "store.pages"
    fs = S.FilePageStore(path)
    S.apply(S.Encoder(block_pages=50).encode(addrs, pages), fs)
    got, ok = S.FilePageStore(path).get(addrs)
    assert ok.all() and np.array_equal(got, pages)
    # round 2: changed pages plus brand-new addresses, XOR against the stored copy
    new = modify(pages)
    extra_a = addrs[-1] + np.arange(1, 40, dtype=np.uint64) * PS
    extra_p = np.random.default_rng(5).integers(0, 256, (39, PS), dtype=np.uint8)
    a2 = np.concatenate([addrs, extra_a])
    p2 = np.concatenate([new, extra_p])
    prev, ok = fs.get(a2)
    stream = S.encode(a2, p2, previous=prev, previous_mask=ok, block_pages=50)
    before = path.read_bytes()
    # a corrupt copy of it fails and leaves the file byte-identical, no temp files left
    bad = bytearray(stream)
    bad[len(bad) // 2] ^= 0x40
    with pytest.raises(StreamError):
        S.apply([bytes(bad)], fs)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["store.pages"]
    st = S.apply([stream], fs)
    assert st.pages["xor"] > 0
    got, ok = S.FilePageStore(path).get(a2)
    assert ok.all() and np.array_equal(got, p2)


class _SyscallLog:
    """Records, in order, the real renames and fsyncs (of a file or a directory)
    the stream targets make; every call goes through to the real os function."""

    def __init__(self, monkeypatch):
        import stat
        self.events = []
        real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

        def fsync(fd):
            st = os.fstat(fd)
            self.events.append(("fsync_dir" if stat.S_ISDIR(st.st_mode) else "fsync_file",
                                (st.st_dev, st.st_ino)))
            return real_fsync(fd)

        def replace(a, b, **kw):
            real_replace(a, b, **kw)
            self.events.append(("rename", os.fspath(b)))

        def rename(a, b, **kw):
            real_rename(a, b, **kw)
            self.events.append(("rename", os.fspath(b)))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "rename", rename)

    def durable_rename_of(self, path):
        """True if path was renamed into place after its data was fsynced and its
        directory was fsynced after the rename."""
        d = os.stat(os.path.dirname(os.path.abspath(path)))
        names = [e[0] for e in self.events]
        renames = [i for i, e in enumerate(self.events) if e == ("rename", os.fspath(path))]
        if not renames:
            return False
        i = renames[-1]
        return ("fsync_file" in names[:i] and
                ("fsync_dir", (d.st_dev, d.st_ino)) in self.events[i + 1:])


@pytest.mark.parametrize("kind", ["store", "file"])
def test_file_targets_rename_durably_and_never_follow_a_planted_temp(tmp_path, monkeypatch,
                                                                      kind):
    """The temp file is created O_EXCL under a fresh name (a symlink planted at a
    predictable temp name is not followed: the victim stays intact), and after the
    rename the directory is fsynced, at creation of a store and at every commit."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    path = tmp_path / "t.pages"
    os.symlink(victim, str(path) + ".init")
    log = _SyscallLog(monkeypatch)
    addrs, pages = make_pages(50)
    if kind == "store":
        target = S.FilePageStore(path)
        assert log.durable_rename_of(path), log.events
    else:
        path.write_bytes(b"")
        target = S.FileTarget(path, base=int(addrs[0]))
    log.events.clear()
    S.apply(S.encode(addrs, pages), target)
    assert log.durable_rename_of(path), log.events
    assert victim.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == sorted(["victim", "t.pages", "t.pages.init"])
    if kind == "store":
        got, ok = S.FilePageStore(path).get(addrs)
        assert ok.all() and np.array_equal(got, pages)
    else:
        out = np.frombuffer(path.read_bytes(), np.uint8).reshape(-1, PS)
        assert np.array_equal(out[(addrs - addrs[0]) // PS], pages)


def test_atomic_dir_fsyncs_the_parent_after_the_rename(tmp_path, monkeypatch):
    from statesync.criu.imageset import AtomicDir
    log = _SyscallLog(monkeypatch)
    final = tmp_path / "out"
    with AtomicDir(str(final)) as ad:
        (tmp_path / os.path.basename(ad.tmp) / "x.img").write_bytes(b"x")
    assert (final / "x.img").read_bytes() == b"x"
    i = log.events.index(("rename", str(final)))
    t = os.stat(tmp_path)
    assert ("fsync_dir", (t.st_dev, t.st_ino)) in log.events[i + 1:]
    f = os.stat(final)
    assert ("fsync_dir", (f.st_dev, f.st_ino)) in log.events[:i]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_plain_file_target(tmp_path):
    base = 0x7F0000000000
    img = np.random.default_rng(3).integers(0, 256, (64, PS), dtype=np.uint8)
    img[10:20] = 0
    path = tmp_path / "mem.img"
    path.write_bytes(img.tobytes())
    target = S.FileTarget(path, base=base)
    new = img.copy()
    new[5, 100:110] = 7
    new[40] = new[41]
    new[63, :] = 0
    addrs = base + np.array([5, 40, 63, 64, 65], np.uint64) * PS
    rows = np.concatenate([new[[5, 40, 63]], np.full((2, PS), 3, np.uint8)])
    st = S.apply(S.encode(addrs, rows, previous=target_read(path, base, addrs),
                          previous_mask=np.array([1, 1, 1, 0, 0], bool)), target)
    assert st.pages["xor"] >= 1
    out = np.frombuffer(path.read_bytes(), np.uint8).reshape(-1, PS)
    assert out.shape[0] == 66
    assert np.array_equal(out[:64], new) and np.all(out[64:] == 3)
    # an XOR against a page past the end of the file: refused, file unchanged
    before = path.read_bytes()
    far = np.array([base + 100 * PS], np.uint64)
    one = np.zeros((1, PS), np.uint8)
    one[0, 9] = 1
    s = S.encode(far, one, previous=np.zeros((1, PS), np.uint8))
    with pytest.raises(StreamError, match="does not hold"):
        S.apply([s], target)
    assert path.read_bytes() == before


def target_read(path, base, addrs):
    data = np.frombuffer(open(path, "rb").read(), np.uint8).reshape(-1, PS)
    idx = ((addrs - np.uint64(base)) // np.uint64(PS)).astype(np.int64)
    out = np.zeros((len(addrs), PS), np.uint8)
    ok = idx < len(data)
    out[ok] = data[idx[ok]]
    return out


def test_many_rounds_over_one_socket():
    """One stream per round on one connection; StreamReader applies them in turn."""
    addrs, pages = make_pages(300)
    rounds = [pages]
    for r in range(1, 4):
        rounds.append(modify(rounds[-1], seed=r, frac=0.1))
    a, b = socket.socketpair()
    store = S.MemoryPageStore(PS)
    results = []

    def receive():
        reader = S.StreamReader(b)
        while True:
            st = reader.apply(store)
            if st is None:
                break
            results.append((st.round, st.pages.copy(), store.pages.copy()))

    t = threading.Thread(target=receive)
    t.start()
    mirror = None
    for r, content in enumerate(rounds):
        enc = S.Encoder(round=r, block_pages=32)
        for chunk in enc.encode(addrs, content, previous=mirror):
            a.sendall(chunk)
        mirror = content
    a.shutdown(socket.SHUT_WR)
    t.join(30)
    a.close()
    b.close()
    assert [r[0] for r in results] == [0, 1, 2, 3]
    for (_, _counts, got), want in zip(results, rounds):
        assert np.array_equal(got, want)
    assert results[1][1]["xor"] > 0 and results[1][1]["raw"] == 0


def test_cli_stats(tmp_path):
    addrs, pages = make_pages(200)
    f = tmp_path / "s.ssps"
    f.write_bytes(S.encode(addrs, pages) + S.encode(addrs, modify(pages), previous=pages))
    out = subprocess.run([sys.executable, "-m", "statesync", "stream", "stats", str(f)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("stream ") >= 2 and "xor" in out.stdout and "zero" in out.stdout
    bad = f.read_bytes()[:-10]
    f.write_bytes(bad)
    out = subprocess.run([sys.executable, "-m", "statesync", "stream", "stats", str(f)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "truncated" in out.stderr


# ------------------------------------------------------------------ bad input
# A tiny stream builder for hostile inputs with *valid* checksums, so the checks
# behind the checksums are reached.


def header(version=S.VERSION, ps=PS, flags=S.FLAG_LZ4 | S.FLAG_XOR | S.FLAG_DEDUP, block_pages=8):
    b = S.HEADER.pack(S.MAGIC, version, 48, ps, flags, block_pages, 0, b"\1" * 16, 0, 0)[:-4]
    return b + struct.pack("<I", zlib.crc32(b))


class Forge:
    def __init__(self, **kw):
        self.head = header(**kw)
        self.chain = _core.hash128(self.head, 0)
        self.parts = [self.head]
        self.counts = [0] * 8  # blocks, records, pages, zero, raw, dup, xor, payload

    def block(self, payload, nrec, npages, kinds=(), codec=S.CODEC_NONE, stored=None):
        stored = payload if stored is None else stored
        h = S.BLOCK.pack(S.KIND_DATA, codec, 0, len(stored), len(payload), nrec,
                         _core.hash128(stored)[0], npages, 0)[:-4]
        h += struct.pack("<I", zlib.crc32(h))
        self.chain = _core.hash128(h, self.chain[0])
        self.parts.append(h + stored)
        c = self.counts
        c[0] += 1
        c[1] += nrec
        c[2] += npages
        for k, n in kinds:
            c[2 + k] += n
        c[7] += len(payload)
        return self

    def end(self):
        body = S.END_BODY.pack(*self.counts, *self.chain)
        h = S.BLOCK.pack(S.KIND_END, 0, 0, 80, 80, 0, _core.hash128(body)[0], 0, 0)[:-4]
        h += struct.pack("<I", zlib.crc32(h))
        self.parts.append(h + body)
        return b"".join(self.parts)


def uleb(v):
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def test_forge_matches_encoder():
    # the test's forger writes the same bytes as the encoder: the checks below are real
    pg = np.zeros((1, PS), np.uint8)
    f = Forge(block_pages=8).block(bytes([1]) + uleb(16) + uleb(1), 1, 1, [(1, 1)]).end()
    got = S.encode(np.array([16 * PS], np.uint64), pg, block_pages=8,
                   stream_id=b"\1" * 16)
    assert got == f


def expect_error(data, store, match=None, **kw):
    snap = snapshot(store)
    with pytest.raises(StreamError, match=match) as ei:
        S.apply([data], store, **kw)
    assert_same(store, snap)
    e = ei.value
    assert e.offset is not None and e.record is not None
    assert f"byte {e.offset}" in str(e)
    return e


def test_truncated_anywhere():
    addrs, pages = make_pages(120)
    data = S.encode(addrs, pages, block_pages=16)
    store = store_from(addrs[:10], pages[:10] ^ 1)
    cuts = sorted(set(list(range(0, 120)) + list(range(0, len(data), 97)) +
                      [len(data) - k for k in range(1, 100)]))
    for cut in cuts:
        e = expect_error(data[:cut], store)
        assert e.offset <= cut


def test_flipped_bit_anywhere():
    addrs, pages = make_pages(40)
    new = modify(pages, frac=0.5)
    store = store_from(addrs, pages)
    data = S.encode(addrs, new, previous=pages, block_pages=8)
    rng = np.random.default_rng(0)
    positions = sorted(set(range(len(data))) if len(data) < 6000 else
                       set(rng.choice(len(data), 3000, replace=False).tolist()) |
                       set(range(0, 200)) | set(range(len(data) - 200, len(data))))
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        expect_error(bytes(bad), store)
    S.apply([data], store)
    assert np.array_equal(store.pages, new)


def test_wrong_version_and_magic():
    store = S.MemoryPageStore(PS)
    good = Forge().end()
    S.apply([good], store)
    e = expect_error(Forge(version=2).end(), store, match="version 2 is not supported")
    assert e.offset == 4 and e.record == 0
    expect_error(b"GZIP" + good[4:], store, match="not a statesync page stream")
    expect_error(Forge(ps=8192).end(), S.MemoryPageStore(PS), match="page size 8192")


def test_reference_to_missing_page():
    store = S.MemoryPageStore(PS, np.array([0x10 * PS], np.uint64), np.ones((1, PS), np.uint8))
    page = np.ones((1, PS), np.uint8)
    page[0, 5] = 2
    # XOR against a page the receiver lacks
    s = S.encode(np.array([0x20 * PS], np.uint64), page, previous=np.ones((1, PS), np.uint8))
    e = expect_error(s, store, match="XOR record refers to page 0x20000, which the receiver")
    assert e.record == 0
    # DUP of a page the receiver lacks (forged: the encoder never does this)
    h = _core.hash128(page[0])
    payload = bytes([3]) + uleb(0x30) + uleb(1) + uleb(0x31) + struct.pack("<QQ", *h)
    s = Forge().block(payload, 1, 1, [(3, 1)]).end()
    expect_error(s, store, match="DUP record refers to page 0x31000")
    # DUP of a page the receiver holds but with other content: hash mismatch
    payload = bytes([3]) + uleb(0x30) + uleb(1) + uleb(0x10) + struct.pack("<QQ", *h)
    expect_error(Forge().block(payload, 1, 1, [(3, 1)]).end(), store, match="differs")
    # XOR against a base that changed since the sender read it
    assumed = np.ones((1, PS), np.uint8)
    assumed[0, 7] = 3
    stale = S.encode(np.array([0x10 * PS], np.uint64), page, previous=assumed)
    expect_error(stale, store, match="differs")


def test_absurd_lengths():
    store = store_from(*make_pages(20))
    # a record claiming 2^40 zero pages in a block of 8
    p = bytes([1]) + uleb(5) + uleb(1 << 40)
    expect_error(Forge().block(p, 1, 8).end(), store, match="more pages than the block")
    # block header claiming a 4 GiB payload / stored length
    f = Forge()
    h = S.BLOCK.pack(S.KIND_DATA, 0, 0, 0xFFFFFFFF, 0xFFFFFFFF, 1, 0, 1, 0)[:-4]
    h += struct.pack("<I", zlib.crc32(h))
    expect_error(f.head + h, store, match="payload length")
    # more pages than the header's block size
    h = S.BLOCK.pack(S.KIND_DATA, 0, 0, 10, 10, 1, 0, 1 << 30, 0)[:-4]
    expect_error(f.head + h + struct.pack("<I", zlib.crc32(h)), store, match="invalid")
    # a block size beyond what this receiver accepts
    expect_error(Forge(block_pages=60000).end(), store, match="receiver's limit")
    # gaps that overflow the 64-bit page space
    p = bytes([1]) + uleb(2 ** 64 - 2) + uleb(1) + bytes([1]) + uleb(5) + uleb(1)
    expect_error(Forge().block(p, 2, 2).end(), store, match="page numbers")
    # XOR delta length past the payload; RAW with fewer bytes than a page
    p = bytes([4]) + uleb(3) + uleb(1) + uleb(3000) + bytes(8) + b"ab"
    expect_error(Forge().block(p, 1, 1).end(), store, match="malformed")
    p = bytes([2]) + uleb(3) + uleb(1) + bytes(100)
    expect_error(Forge().block(p, 1, 1).end(), store, match="malformed")
    # an LZ4 frame inflating beyond the declared payload length (a zip bomb)
    import lz4.frame
    bomb = lz4.frame.compress(bytes(64 << 20), store_size=True, content_checksum=True)
    p = bytes([1]) + uleb(3) + uleb(1)
    expect_error(Forge().block(p, 1, 1, codec=S.CODEC_LZ4, stored=bomb).end(), store,
                 match="block stored length|does not decode")
    small_bomb = lz4.frame.compress(bytes(200000), store_size=True)
    expect_error(Forge().block(bytes(3000), 1, 1, codec=S.CODEC_LZ4, stored=small_bomb).end(),
                 store, match="exactly")


def _huge_block_stream(ps, block_pages):
    """A valid stream whose header announces blocks of block_pages pages of ps bytes,
    carrying one LZ4 block with a single zero page: tiny on the wire."""
    import lz4.frame
    p = bytes([1]) + uleb(0) + uleb(1)
    frame = lz4.frame.compress(p, store_size=True)
    return Forge(ps=ps, block_pages=block_pages).block(p, 1, 1, [(1, 1)], codec=S.CODEC_LZ4,
                                                        stored=frame).end()


def test_block_size_from_header_never_sizes_an_allocation(tmp_path):
    """page_size (up to 1 MiB) and block_pages both come from the untrusted header;
    their product is capped by max_block_bytes when the header is read, so a
    48-byte header cannot make the reader reserve GiBs (4 GiB at the default page
    limit, 64 GiB for `stream stats`, which accepts any block_pages)."""
    import tracemalloc
    store = S.MemoryPageStore(1 << 20)
    data = _huge_block_stream(1 << 20, 4096)
    tracemalloc.start()
    try:
        e = expect_error(data, store, match="max_block_bytes")
        assert e.offset == 16 and e.record == 0
        with pytest.raises(StreamError, match="max_block_bytes") as ei:
            S.inspect([_huge_block_stream(1 << 20, S.MAX_BLOCK_PAGES)])
        assert ei.value.offset == 16
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak
    # the same stream is fine for a receiver that raises the limit on purpose
    # (64 pages of 1 MiB), and the largest block under the default limit is accepted
    st = S.apply([_huge_block_stream(1 << 20, 64)], S.MemoryPageStore(1 << 20))
    assert st.total_pages == 1 and st.pages["zero"] == 1
    with pytest.raises(StreamError, match="max_block_bytes"):
        S.apply([_huge_block_stream(1 << 20, 65)], S.MemoryPageStore(1 << 20))
    st = S.apply([_huge_block_stream(1 << 20, 65)], S.MemoryPageStore(1 << 20),
                 max_block_bytes=65 << 20)
    assert st.total_pages == 1
    # the CLI (format-wide block_pages limit) reports it as a stream error, exit 1
    f = tmp_path / "huge.ssps"
    f.write_bytes(_huge_block_stream(1 << 20, S.MAX_BLOCK_PAGES))
    out = subprocess.run([sys.executable, "-m", "statesync", "stream", "stats", str(f)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "max_block_bytes" in out.stderr, out.stderr
    assert "MemoryError" not in out.stderr


def test_endless_stream_is_cut_off_with_bounded_memory():
    """A sender that never ends: the receiver stops at max_pages with a clean error,
    its memory bounded (it never buffers more than a block)."""
    code = r"""
import resource, struct, zlib, sys
import numpy as np
from statesync import stream as S, _core
from statesync.errors import StreamError
PS = 4096
def gen():
    h = S.HEADER.pack(S.MAGIC, 1, 48, PS, 0, 256, 0, bytes(16), 0, 0)[:-4]
    yield h + struct.pack("<I", zlib.crc32(h))
    page = 0
    while True:   # endless: 256-page zero runs, forever
        p = bytes([1]) + bytes([0]) + bytes([0x80, 0x02])
        blk = S.BLOCK.pack(S.KIND_DATA, 0, 0, len(p), len(p), 1, _core.hash128(p)[0], 256, 0)[:-4]
        yield blk + struct.pack("<I", zlib.crc32(blk)) + p
class Null:
    def begin(self, ps): return self
    def read(self, a): return np.zeros((len(a), PS), np.uint8), np.zeros(len(a), bool)
    def write(self, a, p): pass
    def commit(self): raise SystemExit("committed an endless stream")
    def abort(self): pass
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    S.apply(gen(), Null(), max_pages=1 << 20)   # 4 GiB worth of pages
except StreamError as e:
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print("ERR", e.record, grown)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    tag, rec, grown_kib = out.stdout.split()
    assert tag == "ERR" and int(rec) == (1 << 20) // 256
    assert int(grown_kib) < 64 * 1024  # < 64 MiB growth while "receiving" 4 GiB


def test_trailing_garbage_and_unknown_blocks():
    store = S.MemoryPageStore(PS)
    good = Forge().end()
    expect_error(good + b"x", store, match="after the END")
    # with pages in it: nothing is committed when bytes follow END (found by the fuzzer)
    addrs, pages = make_pages(30)
    store = store_from(addrs, pages ^ 1)
    full = S.encode(addrs, pages)
    expect_error(full + b"\0", store, match="after the END")
    expect_error(full + full[:5], store, match="after the END")
    with pytest.raises(StreamError):
        S.apply([full, b"", b"junk"], store)
    assert np.array_equal(store.pages, pages ^ 1)
    f = Forge()
    h = S.BLOCK.pack(0x51, 0, 0, 1, 1, 1, _core.hash128(b"a")[0], 1, 0)[:-4]
    expect_error(f.head + h + struct.pack("<I", zlib.crc32(h)) + b"a", store, match="kind")
    # an empty data block and a block whose header counts lie
    expect_error(Forge().block(b"", 0, 0).end(), store)
    p = bytes([1]) + uleb(3) + uleb(2)
    expect_error(Forge().block(p, 1, 1).end(), store, match="header says")
    # END counts that do not match (a block was dropped)
    s = Forge().block(bytes([1]) + uleb(3) + uleb(1), 1, 1, [(1, 1)])
    s.counts[2] += 1
    expect_error(s.end(), store, match="END counts")


def test_real_process_memory_round_trip(spawn_workload):
    """Pages read from a live process (/proc/PID/mem) round-trip exactly, and the
    second read after writes travels as a small delta."""
    wl = spawn_workload(size="8M", rate=0, paused=True)
    c = wl.client
    st = c.status()
    base, npages = st["addr"], st["npages"]
    addrs = base + np.arange(npages, dtype=np.uint64) * PS

    def read():
        with open(f"/proc/{wl.pid}/mem", "rb", buffering=0) as f:
            f.seek(base)
            return np.frombuffer(f.read(npages * PS), np.uint8).reshape(npages, PS).copy()

    v1 = read()
    store = S.MemoryPageStore(PS)
    st1 = S.apply(S.Encoder().encode(addrs, v1), store)
    assert np.array_equal(store.pages, v1)
    c.write(list(range(0, npages, 7)))
    v2 = read()
    assert not np.array_equal(v1, v2)
    enc = S.Encoder()
    st2 = S.apply(enc.encode(addrs, v2, previous=store), store)
    assert np.array_equal(store.pages, v2)
    assert st2.pages["xor"] >= npages // 7 - 1
    assert st2.bytes_in < st1.bytes_in / 5


def test_criu_image_set_target_restores(spawn_workload, tmp_path):
    """A receiver holding stale pages under the final dump's metadata gets the changed
    pages as a stream (XOR against its copy) into a CRIU image set that restores to
    exactly the source's state."""
    import signal
    from conftest import have_root, require
    from statesync import criu
    from statesync.testing import workloads
    require(have_root(), "CRIU dump/restore needs root")
    info = criu.check()
    require(info.ok, f"needs a working CRIU >= 4: {info.reasons.get('criu')}")
    wl = spawn_workload("8M", 0, own_pidns=True, paused=True, seed=9)
    c = wl.client
    npages = c.status()["npages"]
    criu.dump(wl.pid, tmp_path / "d1", leave_running=True)
    c.write(list(range(0, npages, 5)))
    checksum, seq = c.checksum(), c.status()["seq"]
    criu.dump(wl.pid, tmp_path / "d2", leave_running=True)
    s1, s2 = criu.ImageSet(tmp_path / "d1"), criu.ImageSet(tmp_path / "d2")
    a1, a2, p2 = s1.addresses(), s2.addresses(), np.array(s2.pages())
    common = np.intersect1d(a1, a2)
    # the receiver: d2's metadata with d1's (stale) content of every page it had
    criu.write_image_set(tmp_path / "d2", tmp_path / "base", common, s1.read(common))
    base = criu.ImageSet(tmp_path / "base")
    prev = base.read(a2)
    data = S.encode(a2, p2, previous=prev)
    # a corrupt copy leaves no output directory behind
    bad = bytearray(data)
    bad[len(bad) // 3] ^= 4
    target = S.CriuImageTarget(tmp_path / "base", tmp_path / "out")
    with pytest.raises(StreamError):
        S.apply([bytes(bad)], target)
    assert not (tmp_path / "out").exists()
    st = S.apply([data], target)
    assert st.pages["xor"] >= npages // 5 - 1 and st.pages["dup"] > 0
    assert len(data) < 0.1 * p2.nbytes
    out = criu.ImageSet(tmp_path / "out")
    assert np.array_equal(out.addresses(), a2) and np.array_equal(np.array(out.pages()), p2)
    wl.kill()
    rr = criu.restore(tmp_path / "out")
    try:
        c2 = workloads.WorkloadClient(wl.control)
        c2.wait_ready(20)
        assert c2.checksum() == checksum and c2.status()["seq"] == seq
    finally:
        os.kill(rr.pid, signal.SIGKILL)


def test_store_survives_many_streams_with_arena_reuse():
    """Successive streams into one MemoryPageStore (new and existing addresses, a
    corrupt one in between): the staging arena the store keeps for reuse never
    aliases the pages it holds."""
    rng = np.random.default_rng(11)
    store = S.MemoryPageStore(PS)
    truth = {}
    for r in range(8):
        n = int(rng.integers(1, 3000))
        addrs = np.unique(rng.integers(0, 5000, n).astype(np.uint64)) * np.uint64(PS)
        pages = rng.integers(0, 3, (len(addrs), PS), dtype=np.uint8)
        pages[rng.random(len(addrs)) < 0.3] = 0
        prev, ok = store.get(addrs)
        data = S.encode(addrs, pages, previous=prev, previous_mask=ok, block_pages=128)
        if r == 4:
            bad = bytearray(data)
            bad[-30] ^= 1
            snap = snapshot(store)
            with pytest.raises(StreamError):
                S.apply([bytes(bad)], store)
            assert_same(store, snap)
        S.apply([data], store)
        for a, p in zip(addrs.tolist(), pages):
            truth[a] = p
        keys = np.array(sorted(truth), dtype=np.uint64)
        assert np.array_equal(store.addrs, keys)
        assert np.array_equal(store.pages, np.stack([truth[k] for k in keys.tolist()]))


def test_lz4_frames_interoperate_with_python_lz4():
    """Our blocks are standard LZ4 frames: python-lz4 decodes them, and a stream whose
    block was compressed by python-lz4 (with its checksums) decodes here."""
    import lz4.frame
    addrs, pages = make_pages(60)
    data = S.encode(addrs, pages, block_pages=64)
    ref = S.inspect([data])
    assert ref.blocks == 1
    off = S.HEADER.size
    kind, codec, _, stored, raw, nrec, _, npages, _ = S.BLOCK.unpack(data[off:off + 32])
    assert kind == S.KIND_DATA and codec == S.CODEC_LZ4 and npages == len(addrs)
    frame = data[off + 32:off + 32 + stored]
    payload = lz4.frame.decompress(frame)
    assert len(payload) == raw
    mine = np.empty(raw + _core.LZ4F_SLACK, np.uint8)
    assert _core.lz4f_decompress_into(frame, raw, mine) == 0
    assert mine[:raw].tobytes() == payload
    # the same payload, compressed by python-lz4 with block and content checksums
    theirs = lz4.frame.compress(payload, block_checksum=True, content_checksum=True,
                                store_size=True)
    kinds = [(k, ref.pages[name]) for k, name in S.KIND_NAMES.items()]
    blob = Forge(block_pages=64).block(payload, nrec, npages, kinds, codec=S.CODEC_LZ4,
                                       stored=theirs).end()
    store = S.MemoryPageStore(PS)
    st = S.apply([blob], store)
    assert np.array_equal(store.pages, pages) and st.pages == ref.pages


def test_encoder_yields_as_it_goes_and_is_one_stream_at_a_time():
    addrs, pages = make_pages(2000)
    enc = S.Encoder(block_pages=64, threads=1)
    gen = enc.encode(addrs, pages)
    head, first = next(gen), next(gen)
    assert head[:4] == S.MAGIC and first[0] == S.KIND_DATA
    assert enc.last_stats is None            # the rest is not encoded yet
    with pytest.raises(RuntimeError, match="already producing"):
        next(enc.encode(addrs, pages))
    rest = b"".join(gen)
    store = S.MemoryPageStore(PS)
    S.apply([head + first + rest], store)
    assert np.array_equal(store.pages, pages) and enc.last_stats.blocks > 10
    # threads do not change the bytes
    sid = b"\7" * 16
    assert (S.encode(addrs, pages, threads=1, stream_id=sid)
            == S.encode(addrs, pages, threads=3, stream_id=sid))


# ------------------------------------------------------------------ codec bindings


def test_dec_build_refuses_pages_info_it_cannot_trust():
    """dec_build hands pages_info's memory to C as ss_dec_page records: anything but
    a 1-d DEC_PAGE_DTYPE array (another dtype, a slice of records, 2-d) is refused
    before C reads it, instead of C reading past the array."""
    payload = bytes([S.REC_RAW]) + uleb(0) + uleb(2) + bytes(range(256)) * (2 * PS // 256)
    rc, info, nr, _, _ = _core.dec_parse(payload, PS, 0, 8)
    assert rc == 0 and len(info) == 2 and nr == 1
    out = np.empty((2, PS), np.uint8)
    idx = np.full(2, -1, np.int64)
    assert _core.dec_build(payload, PS, info, idx, out)[0] == 0
    assert np.array_equal(out[0], np.frombuffer(payload[3:3 + PS], np.uint8))
    for bad in (info["page"],                                  # uint64: 8 bytes a record
                np.zeros(10, np.uint64).view(np.dtype((np.void, 40))),  # 40 bytes, untyped
                np.stack([info, info]),                        # 2-d
                info.tolist()):                                # not an array at all
        with pytest.raises(ValueError, match="pages_info"):
            _core.dec_build(payload, PS, bad, idx, out)
    with pytest.raises(ValueError, match="payload"):
        _core.dec_build(b"", PS, info, idx, out)


def test_dec_parse_refuses_payloads_over_4_gib():
    """Parsed offsets are 32-bit: a payload over UINT32_MAX bytes is -E2BIG, not
    truncated offsets. The payload is an untouched anonymous mapping (no memory)."""
    import mmap
    ps = 1 << 20
    mm = mmap.mmap(-1, 4 + 4097 * ps, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf = np.frombuffer(mm, np.uint8)
        buf[:4] = [S.REC_RAW, 0, 0x81, 0x20]          # RAW, gap 0, 4097 pages
        rc, info, nr, _, _ = _core.dec_parse(buf, ps, 0, 4097)
        assert rc == -_core.CODEC_E2BIG and len(info) == 0
        buf[2:4] = [0xFF, 0x1F]                         # 4095 pages: under 4 GiB
        rc, info, nr, _, _ = _core.dec_parse(buf[:4 + 4095 * ps], ps, 0, 4097)
        assert rc == 0 and len(info) == 4095 and int(info["off"][-1]) == 4 + 4094 * ps
        del buf, info
    finally:
        mm.close()
