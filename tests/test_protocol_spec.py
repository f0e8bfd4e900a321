"""docs/wire-format.md is precise enough for a second implementation.

The decoder here is written from that document only: it uses the ``cryptography``
primitives (AES-GCM, ChaCha20-Poly1305, HKDF) and the stdlib's HMAC, and nothing of
statesync.migration.protocol. It checks the document's test vectors, then decodes real
sessions (a client and a server Channel over loopback TCP, every byte recorded on the
way by tests/protocol_relay.py) and must recover every payload each side sent, in order,
ending with an authenticated CLOSE in each direction.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import struct
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

DOC = Path(__file__).resolve().parent.parent / "docs" / "wire-format.md"
SECRET = b"statesync-test-secret-0123456789"


# --------------------------------------------------------------------------- the decoder


def hkdf(ikm: bytes, salt: bytes, info: bytes, n: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=n, salt=salt, info=info).derive(ikm)


def keys(secret: bytes, ns: bytes, nc: bytes, suite: int):
    k_auth = hkdf(secret, ns + nc, b"statesync/2 auth", 32)
    okm = hkdf(secret, ns + nc, b"statesync/2 frames" + bytes([suite]), 64)
    return k_auth, okm[:32], okm[32:]


class SpecError(Exception):
    pass


def open_frame(suite: int, key: bytes, header: bytes, body_tag: bytes) -> bytes:
    length, _, seq = struct.unpack("!IBQ", header)
    if suite == 0:
        body, tag = body_tag[:length], body_tag[length:]
        if not hmac.compare_digest(hmac.new(key, header + body, hashlib.sha256).digest()[:16],
                                   tag):
            raise SpecError("bad HMAC")
        return body
    aead = AESGCM(key) if suite == 1 else ChaCha20Poly1305(key)
    return aead.decrypt(b"\0\0\0\0" + struct.pack("!Q", seq), body_tag, header)


def decode_session(c2s: bytes, s2c: bytes, secret: bytes):
    """(suite, client's frames, server's frames), each a list of (type, payload)."""
    if c2s[:8] != b"SSMIGv2\n" or s2c[:8] != b"SSMIGv2\n":
        raise SpecError("magic")
    ns, nc = s2c[8:40], c2s[8:40]
    suite = c2s[40]
    k_auth, k_c2s, k_s2c = keys(secret, ns, nc, suite)
    if c2s[41:73] != hmac.new(k_auth, b"client" + bytes([suite]), hashlib.sha256).digest():
        raise SpecError("client proof")
    mode = s2c[40]
    if s2c[41:73] != hmac.new(k_auth, b"server" + bytes([suite, mode]),
                              hashlib.sha256).digest():
        raise SpecError("server proof")
    if (suite != 0) != (mode == 1):
        raise SpecError("mode mismatch")
    out = []
    for stream, off, key in ((c2s, 73, k_c2s), (s2c, 73, k_s2c)):
        frames, expected = [], 0
        while off < len(stream):
            header = stream[off:off + 13]
            length, mtype, seq = struct.unpack("!IBQ", header)
            if seq != expected or length > 32 << 20:
                raise SpecError(f"seq {seq} / length {length}")
            body_tag = stream[off + 13:off + 13 + length + 16]
            if len(body_tag) != length + 16:
                raise SpecError("truncated")
            frames.append((mtype, open_frame(suite, key, header, body_tag)))
            off += 13 + length + 16
            expected += 1
        if not frames or frames[-1] != (255, b""):
            raise SpecError("no CLOSE at the end")
        out.append(frames[:-1])
    return suite, out[0], out[1]


# --------------------------------------------------------------------------- vectors


def _vec(name: str) -> bytes:
    text = DOC.read_text()
    m = re.search(re.escape(name) + r"\s+([0-9a-f]{26,})", text)
    assert m, f"{name} not in {DOC.name}"
    return bytes.fromhex(m.group(1))


def test_document_test_vectors():
    ns, nc = bytes(range(32)), bytes(range(32, 64))
    k_auth, c1, s1 = keys(SECRET, ns, nc, 1)
    assert _vec("K_auth") == k_auth
    assert _vec("proof_c (suite 1)") == hmac.new(k_auth, b"client\x01", hashlib.sha256).digest()
    assert _vec("proof_s (suite 1, mode 1)") == hmac.new(k_auth, b"server\x01\x01",
                                                         hashlib.sha256).digest()
    for suite in (0, 1, 2):
        _, c, s = keys(SECRET, ns, nc, suite)
        assert _vec(f"suite {suite} K_c2s") == c and _vec(f"suite {suite} K_s2c") == s
    header = _vec("header")
    assert struct.unpack("!IBQ", header) == (5, 3, 0)
    f1 = _vec("suite 1 frame")
    assert f1[:13] == header and open_frame(1, c1, header, f1[13:]) == b"hello"
    _, c0, _ = keys(SECRET, ns, nc, 0)
    f0 = _vec("suite 0 frame")
    assert open_frame(0, c0, header, f0[13:]) == b"hello"


# --------------------------------------------------------------------------- a real session


async def _session(encrypt: bool, cipher):
    from protocol_relay import C2S, S2C, Relay
    from statesync.migration import protocol as wire   # the implementation under test

    big = os.urandom(3 << 20)
    sent_c = [(wire.BEGIN, wire.pack_json({"pid": 7})), (wire.PAGES, big),
              (wire.PAGES, b""), (wire.ROUND_END, wire.pack_json({"round": 0}, b"\x01\x02"))]
    sent_s = [(wire.READY, wire.pack_json({})), (wire.ROUND_ACK, wire.pack_json({"n": 1}))]
    got = asyncio.get_running_loop().create_future()

    async def handle(r, w):
        ch = await wire.Channel.server(r, w, SECRET, 5, encrypt=encrypt)
        recv = [await ch.recv() for _ in sent_c]
        for m, p in sent_s:
            await ch.send(m, p)
        ch.close()
        got.set_result(recv)

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, limit=64 << 20)
    relay = await Relay(srv.sockets[0].getsockname()[1]).start()
    r, w = await asyncio.open_connection("127.0.0.1", relay.port, limit=64 << 20)
    ch = await wire.Channel.client(r, w, SECRET, 5, encrypt=encrypt, cipher=cipher)
    for m, p in sent_c:
        await ch.send(m, p)
    recv_c = [await ch.recv() for _ in sent_s]
    recv_s = await got
    ch.close()
    await asyncio.wait_for(relay.done.wait(), 5)
    await relay.close()
    srv.close()
    assert recv_s == sent_c and recv_c == sent_s
    return bytes(relay.raw[C2S]), bytes(relay.raw[S2C]), sent_c, sent_s, big


@pytest.mark.parametrize("encrypt,cipher,suite", [(True, None, 1),
                                                  (True, "chacha20-poly1305", 2),
                                                  (False, None, 0)])
def test_decode_a_captured_session(encrypt, cipher, suite):
    c2s, s2c, sent_c, sent_s, big = asyncio.run(_session(encrypt, cipher))
    assert (big[1000:1064] in c2s) is (suite == 0)
    got_suite, frames_c, frames_s = decode_session(c2s, s2c, SECRET)
    assert got_suite == suite
    assert frames_c == sent_c and frames_s == sent_s
    with pytest.raises(SpecError, match="client proof"):
        decode_session(c2s, s2c, b"another-secret-of-32-bytes......")
    # A flipped bit anywhere in a frame is caught by the independent decoder too.
    bad = bytearray(c2s)
    bad[73 + 13 + 20] ^= 1
    with pytest.raises((SpecError, InvalidTag)):
        decode_session(bytes(bad), s2c, SECRET)
