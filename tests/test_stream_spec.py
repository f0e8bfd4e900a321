"""A second implementation of the page stream, written from docs/stream-format.md
alone (pure Python; python-lz4 for the LZ4 frames), reads what statesync.stream
writes. If the document and the code disagree, this fails."""
import struct
import zlib

import numpy as np
import pytest

from statesync import stream as S

M = (1 << 64) - 1
K1, K2, K3, K4 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                  0x85EBCA77C2B2AE63)


def rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & M


def rnd(acc, w):
    return (rotl((acc + w * K2) & M, 31) * K1) & M


def fmix(x):
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & M
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & M
    return x ^ (x >> 33)


def H(data: bytes, seed=0):
    n = len(data)
    a, b, c, d = (seed + K1 + K2) & M, (seed + K2) & M, seed & M, (seed - K1) & M
    p = 0
    words = struct.unpack_from(f"<{n // 8}Q", data) if n >= 8 else ()
    wi = 0
    while n - p >= 32:
        a, b, c, d = (rnd(a, words[wi]), rnd(b, words[wi + 1]), rnd(c, words[wi + 2]),
                      rnd(d, words[wi + 3]))
        wi += 4
        p += 32
    while n - p >= 8:
        a = (rotl(rnd(a, words[wi]), 27) * K3) & M
        wi += 1
        p += 8
    if p < n:
        w = int.from_bytes(data[p:] + bytes(8 - (n - p)), "little")
        b = rnd(b ^ K4, w)
    lo = (rotl(a, 1) + rotl(b, 7) + rotl(c, 12) + rotl(d, 18)) & M
    hi = ((a * K3) & M) ^ rotl((b * K4) & M, 23) ^ ((c * K2) & M) ^ rotl((d * K1) & M, 41)
    lo ^= (n * K4) & M
    hi = (hi + n * K1) & M
    o0 = fmix(lo ^ rotl(hi, 32))
    return o0, fmix((hi + o0 * K3) & M)


def test_hash_vectors_from_the_document():
    assert H(b"") == (0x058c64ff759d6452, 0x0a2fd2f9787b774d)
    assert H(b"abc") == (0xbe7f982c087a0f92, 0xe17a0400a3d6acc7)
    assert H(b"abc", 0x1234)[0] == 0x5b4791826118d996
    assert H(bytes(4096)) == (0xb6710ae77dc65d1a, 0x65987c33b5fd5e5b)
    assert H(bytes(range(256)) * 16) == (0xab88f76b3cedd003, 0x66cbbe380dee6cf0)


def uleb(buf, p):
    v, shift = 0, 0
    for i in range(10):
        b = buf[p + i]
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            assert not (i > 0 and b == 0), "not minimal"
            return v, p + i + 1
    raise ValueError("uleb too long")


def decode(stream: bytes, state: dict):
    """Apply one stream to ``state`` (page address -> bytes), per the document."""
    import lz4.frame
    hdr = stream[:48]
    magic, version, hlen, ps, flags, block_pages = struct.unpack_from("<4sHHIII", hdr)
    assert magic == b"SSPS" and version == 1 and hlen == 48
    assert zlib.crc32(hdr[:44]) == struct.unpack_from("<I", hdr, 44)[0]
    chain = H(hdr, 0)
    pos, expected = 48, 0
    new = dict(state)             # the state at this point of the stream
    counts = dict(blocks=0, records=0, pages=0, zero=0, raw=0, dup=0, xor=0, payload=0)
    while True:
        bh = stream[pos:pos + 32]
        kind, codec, res, stored, raw, nrec, pcheck, npages, crc = struct.unpack("<BBHIIIQII", bh)
        assert zlib.crc32(bh[:28]) == crc and res == 0
        body = stream[pos + 32:pos + 32 + stored]
        assert len(body) == stored and H(body)[0] == pcheck
        pos += 32 + stored
        if kind == 0x45:
            vals = struct.unpack("<10Q", body)
            assert vals[:8] == tuple(counts.values())
            assert vals[8:] == chain
            assert pos == len(stream)
            return new, counts
        assert kind == 0x44
        chain = H(bh, chain[0])
        payload = lz4.frame.decompress(body) if codec == 1 else body
        assert len(payload) == raw
        p, seen = 0, 0
        for _ in range(nrec):
            k = payload[p]
            gap, p = uleb(payload, p + 1)
            count, p = uleb(payload, p)
            first = expected + gap
            for page in range(first, first + count):
                addr = page * ps
                if k == 1:
                    content = bytes(ps)
                elif k == 2:
                    content = payload[p:p + ps]
                    p += ps
                elif k == 3:
                    src, p = uleb(payload, p)
                    lo, hi = struct.unpack_from("<QQ", payload, p)
                    p += 16
                    content = new[src * ps]
                    assert H(content) == (lo, hi)
                else:
                    dlen, p = uleb(payload, p)
                    check = struct.unpack_from("<Q", payload, p)[0]
                    p += 8
                    delta, p = payload[p:p + dlen], p + dlen
                    page_b = bytearray(new[addr])
                    q, at, first_pair = 0, 0, True
                    while q < len(delta):
                        z, q = uleb(delta, q)
                        nz, q = uleb(delta, q)
                        assert nz >= 1 and (first_pair or z >= 1)
                        first_pair = False
                        at += z
                        for j in range(nz):
                            page_b[at + j] ^= delta[q + j]
                        q += nz
                        at += nz
                        assert at <= ps
                    content = bytes(page_b)
                    assert H(content)[0] == check
                new[addr] = content
                counts[{1: "zero", 2: "raw", 3: "dup", 4: "xor"}[k]] += 1
            expected = first + count
            seen += count
        assert p == len(payload) and seen == npages
        counts["blocks"] += 1
        counts["records"] += nrec
        counts["pages"] += npages
        counts["payload"] += raw


@pytest.mark.parametrize("compression", ["lz4", None])
def test_second_implementation_reads_our_streams(compression):
    rng = np.random.default_rng(4)
    ps = 512
    n = 40
    addrs = (np.arange(n, dtype=np.uint64) * 2 + 7) * np.uint64(ps)
    prev = rng.integers(0, 4, (n, ps), dtype=np.uint8)
    pages = prev.copy()
    pages[::4] = 0
    pages[1::5, 10:14] ^= 9          # XOR
    pages[6] = pages[3]              # DUP of an earlier page
    pages[9] = rng.integers(0, 256, ps, dtype=np.uint8)   # RAW
    state = {int(a): prev[i].tobytes() for i, a in enumerate(addrs)}
    data = S.encode(addrs, pages, previous=prev, page_size=ps, block_pages=7,
                    compression=compression)
    out, counts = decode(data, state)
    for i, a in enumerate(addrs.tolist()):
        assert out[a] == pages[i].tobytes()
    ours = S.inspect([data])
    assert counts["xor"] == ours.pages["xor"] > 0 and counts["dup"] == ours.pages["dup"] > 0
    assert counts["zero"] == ours.pages["zero"] > 0 and counts["raw"] == ours.pages["raw"] > 0
