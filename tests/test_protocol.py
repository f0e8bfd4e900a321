"""The wire protocol on real loopback sockets: the handshake, encrypted frames, and a
man in the middle (tests/protocol_relay.py) that tampers with, replays, reorders,
drops, reflects and truncates frames; each must be refused with an error that says
which. Also: the encryption choice is agreed authenticated (a mismatch is refused, never
downgraded), and two sessions with the same secret never share keys."""
from __future__ import annotations

import asyncio
import os

import pytest

from protocol_relay import C2S, CUT, S2C, Relay, parse
from statesync.migration import protocol as wire

SECRET = b"statesync-test-secret-0123456789"
MODES = [pytest.param(True, None, id="aes-256-gcm"),
         pytest.param(True, "chacha20-poly1305", id="chacha20-poly1305"),
         pytest.param(False, None, id="hmac-only")]
LIMIT = wire.MAX_FRAME + 1024


class Pair:
    """A client and a server Channel joined through a Relay on loopback TCP."""

    def __init__(self, client, server, relay, srv):
        self.client, self.server, self.relay, self._srv = client, server, relay, srv

    async def close(self):
        for ch in (self.client, self.server):
            if isinstance(ch, wire.Channel):
                ch.close()
        await self.relay.close()
        self._srv.close()
        await self._srv.wait_closed()


async def pair(hook=None, encrypt=True, cipher=None, server_encrypt=None, server_secret=SECRET,
               client_secret=SECRET):
    """Connect; a handshake error of either side is returned in its place."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future = loop.create_future()

    async def handle(r, w):
        try:
            got.set_result(await wire.Channel.server(
                r, w, server_secret, 5,
                encrypt=encrypt if server_encrypt is None else server_encrypt))
        except wire.ProtocolError as exc:
            got.set_result(exc)
            w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, limit=LIMIT)
    relay = await Relay(srv.sockets[0].getsockname()[1], hook).start()
    r, w = await asyncio.open_connection("127.0.0.1", relay.port, limit=LIMIT)
    try:
        client = await wire.Channel.client(r, w, client_secret, 5, encrypt=encrypt, cipher=cipher)
    except wire.ProtocolError as exc:
        client = exc
        w.close()
    server = await asyncio.wait_for(got, 5)
    return Pair(client, server, relay, srv)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _recv_all(ch, n):
    """Receive up to ``n`` frames; (payloads, the error that stopped it or None)."""
    out = []
    try:
        for _ in range(n):
            out.append((await ch.recv(timeout=3))[1])
    except wire.ProtocolError as exc:
        return out, exc
    return out, None


def _payload(i: int) -> bytes:
    return bytes([i]) * (1000 + i)


# --------------------------------------------------------------------------- happy path


@pytest.mark.parametrize("encrypt,cipher", MODES)
def test_round_trip_both_directions(encrypt, cipher):
    big = os.urandom(5 << 20)

    async def go():
        p = await pair(encrypt=encrypt, cipher=cipher)
        c, s = p.client, p.server
        assert c.encrypted is s.encrypted is encrypt
        assert c.cipher == s.cipher == (cipher or "aes-256-gcm" if encrypt else "hmac-sha256")
        await c.send(wire.PAGES, big)
        await c.send_json(wire.BEGIN, {"pid": 1}, b"tail")
        await c.send(wire.PAGES, memoryview(bytearray(b"view")))
        await c.send(wire.ROUND_END)
        assert await s.recv() == (wire.PAGES, big)
        mtype, payload = await s.expect(wire.BEGIN)
        assert wire.unpack_json(payload) == ({"pid": 1}, b"tail")
        assert await s.recv() == (wire.PAGES, b"view")
        assert await s.recv() == (wire.ROUND_END, b"")
        await s.send_json(wire.READY, {"ok": True})
        assert (await c.expect(wire.READY))[0] == wire.READY
        assert c.bytes_sent == s.bytes_received > len(big)
        assert s.bytes_sent == c.bytes_received
        frames = p.relay.frames[C2S]
        assert [parse(f)[2] for f in frames] == [0, 1, 2, 3]       # seq on the wire
        assert (big[:4096] in frames[0]) is (not encrypt)          # clear only without encryption
        c.close()
        with pytest.raises(wire.ProtocolError, match="ended the session.*authenticated CLOSE"):
            await s.recv()
        await p.close()
    run(go())


def test_frame_limits_and_describe():
    async def go():
        p = await pair()
        with pytest.raises(wire.ProtocolError, match="exceeds"):
            await p.client.send(wire.PAGES, b"\0" * (wire.MAX_FRAME + 1))
        assert p.client.describe() == {"encrypted": True, "cipher": "aes-256-gcm", "protocol": 2}
        await p.close()
        with pytest.raises(wire.ProtocolError, match="closed"):
            await p.client.send(wire.PAGES, b"x")
    run(go())
    with pytest.raises(ValueError, match="unknown cipher"):
        run(pair(cipher="rot13"))


# --------------------------------------------------------------------------- handshake


def test_wrong_secret_refused_before_any_frame():
    async def go():
        p = await pair(client_secret=b"x" * 32)
        assert isinstance(p.server, wire.AuthenticationError)
        assert "source failed authentication" in str(p.server)
        assert isinstance(p.client, wire.AuthenticationError)
        assert p.relay.frames[C2S] == [] and p.relay.frames[S2C] == []
        await p.close()
    run(go())


@pytest.mark.parametrize("client_enc,server_enc", [(False, True), (True, False)])
def test_encryption_mismatch_refused_on_both_sides(client_enc, server_enc):
    async def go():
        p = await pair(encrypt=client_enc, server_encrypt=server_enc)
        for side, exc in (("source", p.server), ("destination", p.client)):
            assert isinstance(exc, wire.ProtocolError), (side, exc)
            assert "configure both sides the same" in str(exc)
            assert "encryption off (encrypt=False / --no-encryption)" in str(exc)
        assert "refused" in str(p.client) and "refused source" in str(p.server)
        assert p.relay.frames[C2S] == []
        await p.close()
    run(go())


def test_mode_byte_cannot_be_downgraded_in_flight():
    """A man in the middle flipping the client's suite byte (encrypted -> HMAC) breaks
    the client's proof: the server refuses it as unauthenticated."""
    async def go():
        loop = asyncio.get_running_loop()
        got = loop.create_future()

        async def handle(r, w):
            try:
                got.set_result(await wire.Channel.server(r, w, SECRET, 5, encrypt=False))
            except wire.ProtocolError as exc:
                got.set_result(exc)
            w.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        r, w = await asyncio.open_connection("127.0.0.1", port)
        hello = await r.readexactly(40)
        # Pretend to be a client that computed its proof for suite 1 but send suite 0.
        ns = hello[8:]
        nc = os.urandom(32)
        proof = wire._proof(wire.auth_key(SECRET, ns, nc), b"client", b"\x01")
        w.write(wire.MAGIC + nc + b"\x00" + proof)
        exc = await asyncio.wait_for(got, 5)
        assert isinstance(exc, wire.AuthenticationError)
        w.close()
        srv.close()
    run(go())


def test_older_protocol_peer_is_named():
    async def go():
        async def v1_server(r, w):
            w.write(b"SSMIGv1\n" + os.urandom(32))
            await w.drain()
            await asyncio.sleep(0.5)
            w.close()

        srv = await asyncio.start_server(v1_server, "127.0.0.1", 0)
        r, w = await asyncio.open_connection("127.0.0.1", srv.sockets[0].getsockname()[1])
        with pytest.raises(wire.AuthenticationError, match="protocol v1, this agent v2"):
            await wire.Channel.client(r, w, SECRET, 5)
        w.close()
        srv.close()
    run(go())


# --------------------------------------------------------------------------- attacks


def _flip(frame: bytes, pos: int) -> bytes:
    b = bytearray(frame)
    b[pos] ^= 0x01
    return bytes(b)


@pytest.mark.parametrize("encrypt,cipher", MODES)
@pytest.mark.parametrize("where", ["payload", "type", "seq", "tag"])
def test_tampered_frame_refused(encrypt, cipher, where):
    pos = {"payload": 13 + 500, "type": 4, "seq": 12, "tag": -1}[where]

    def hook(d, i, f):
        return [("on", _flip(f, pos) if (d == C2S and i == 1) else f)]

    async def go():
        p = await pair(hook, encrypt, cipher)
        for i in range(3):
            await p.client.send(wire.PAGES, _payload(i))
        got, exc = await _recv_all(p.server, 3)
        assert got == [_payload(0)]
        assert "frame 1 (type" in str(exc) and "failed authentication" in str(exc), exc
        await p.close()
    run(go())


@pytest.mark.parametrize("encrypt,cipher", MODES)
def test_replayed_frame_refused(encrypt, cipher):
    def hook(d, i, f):
        return [("on", f)] * (2 if (d == C2S and i == 1) else 1)

    async def go():
        p = await pair(hook, encrypt, cipher)
        for i in range(3):
            await p.client.send(wire.PAGES, _payload(i))
        got, exc = await _recv_all(p.server, 3)
        assert got == [_payload(0), _payload(1)]
        assert "frame 1 (type PAGES, 1001 bytes) replayed" in str(exc), exc
        await p.close()
    run(go())


@pytest.mark.parametrize("encrypt,cipher", MODES)
def test_reordered_and_dropped_frames_refused(encrypt, cipher):
    held = []

    def swap(d, i, f):                  # 0, 2, 1, ...
        if d == C2S and i == 1:
            held.append(f)
            return []
        if d == C2S and i == 2:
            return [("on", f), ("on", held.pop())]
        return [("on", f)]

    def drop(d, i, f):
        return [] if (d == C2S and i == 1) else [("on", f)]

    async def go():
        for hook in (swap, drop):
            p = await pair(hook, encrypt, cipher)
            for i in range(3):
                await p.client.send(wire.PAGES, _payload(i))
            got, exc = await _recv_all(p.server, 3)
            assert got == [_payload(0)]
            assert "frame 2 (type PAGES, 1002 bytes) arrived where frame 1 was expected" \
                in str(exc) and "reordered or dropped" in str(exc), exc
            await p.close()
    run(go())


@pytest.mark.parametrize("encrypt,cipher", MODES)
@pytest.mark.parametrize("victim", ["client", "server"])
def test_reflected_frame_refused(encrypt, cipher, victim):
    """A frame sent back to its own sender, at the very sequence number the sender
    expects next from its peer (the first frame of each direction is seq 0)."""
    direction = C2S if victim == "client" else S2C

    def hook(d, i, f):
        return [("back", f)] if d == direction else [("on", f)]

    async def go():
        p = await pair(hook, encrypt, cipher)
        me = p.client if victim == "client" else p.server
        await me.send(wire.PAGES, _payload(0))
        with pytest.raises(wire.ProtocolError,
                           match=r"frame 0 \(type PAGES, 1000 bytes\) reflected"):
            await me.recv(timeout=3)
        await p.close()
    run(go())


@pytest.mark.parametrize("encrypt,cipher", MODES)
def test_truncated_stream_refused(encrypt, cipher):
    def cut_before_2(d, i, f):
        return CUT if (d == C2S and i == 2) else [("on", f)]

    def cut_mid_frame(d, i, f):
        return [("on", f[:len(f) // 2])] if (d == C2S and i == 1) else [("on", f)]

    async def go():
        p = await pair(cut_before_2, encrypt, cipher)
        for i in range(3):
            await p.client.send(wire.PAGES, _payload(i))
        got, exc = await _recv_all(p.server, 3)
        assert got == [_payload(0), _payload(1)]
        assert "cut after frame 1" in str(exc) and "without its authenticated CLOSE" in str(exc)
        assert "truncated" in str(exc)
        await p.close()

        p = await pair(cut_mid_frame, encrypt, cipher)
        await p.client.send(wire.PAGES, _payload(0))
        await p.client.send(wire.PAGES, _payload(1))
        await p.client.send(wire.PAGES, _payload(2))
        # The relay forwards half of frame 1 and then frame 2; the receiver reads
        # frame 2's bytes as the rest of frame 1: refused as unauthentic.
        got, exc = await _recv_all(p.server, 3)
        assert got == [_payload(0)] and "failed authentication" in str(exc), exc
        await p.close()

        # A CLOSE forged by stripping (an empty CLOSE frame is still sealed): a frame
        # rewritten to type CLOSE fails authentication, it does not end the session.
        def fake_close(d, i, f):
            if d == C2S and i == 1:
                b = bytearray(f)
                b[4] = wire.CLOSE
                return [("on", bytes(b))]
            return [("on", f)]
        p = await pair(fake_close, encrypt, cipher)
        for i in range(2):
            await p.client.send(wire.PAGES, _payload(i))
        got, exc = await _recv_all(p.server, 2)
        assert "failed authentication" in str(exc) and not p.server.peer_closed
        await p.close()
    run(go())


# --------------------------------------------------------------------------- key separation


def test_sessions_with_the_same_secret_never_share_keys():
    async def go():
        sessions = []
        for _ in range(3):
            p = await pair()
            await p.client.send(wire.PAGES, b"\0" * 4096)
            await p.server.send(wire.PAGES, b"\0" * 4096)
            assert (await p.server.recv())[1] == (await p.client.recv())[1] == b"\0" * 4096
            sessions.append((p.client._tx.key, p.client._rx.key, p.server._tx.key,
                             p.server._rx.key, p.relay.frames[C2S][0], p.relay.frames[S2C][0]))
            await p.close()
        keys = set()
        for c_tx, c_rx, s_tx, s_rx, f_c2s, f_s2c in sessions:
            assert c_tx == s_rx and s_tx == c_rx and c_tx != c_rx   # a key per direction
            keys |= {c_tx, c_rx}
            # Same plaintext, same seq 0, both directions: different ciphertexts.
            assert f_c2s != f_s2c and parse(f_c2s) == parse(f_s2c)
        assert len(keys) == 6                                   # no key twice, so no nonce reuse
        assert len({s[4] for s in sessions}) == 3
    run(go())


def test_frame_from_another_session_refused():
    async def go():
        p1 = await pair()
        await p1.client.send(wire.PAGES, _payload(0))
        await p1.server.recv()
        old = p1.relay.frames[C2S][0]
        await p1.close()

        def inject(d, i, f):
            return [("on", old)] if (d == C2S and i == 0) else [("on", f)]

        p2 = await pair(inject)
        await p2.client.send(wire.PAGES, _payload(0))
        got, exc = await _recv_all(p2.server, 1)
        assert got == [] and "frame 0 (type PAGES, 1000 bytes) failed authentication" in str(exc)
        await p2.close()
    run(go())


def test_hkdf_schedule_matches_labels():
    ns, nc = b"\x01" * 32, b"\x02" * 32
    c2s, s2c = wire.frame_keys(SECRET, ns, nc, wire.SUITE_AES_256_GCM)
    assert len(c2s) == len(s2c) == 32 and c2s != s2c
    # the suite is bound into the keys: a key of one suite is never used by another
    assert wire.frame_keys(SECRET, ns, nc, wire.SUITE_HMAC_SHA256)[0] != c2s
    assert wire.frame_keys(SECRET, nc, ns, wire.SUITE_AES_256_GCM)[0] != c2s
    assert wire.auth_key(SECRET, ns, nc) not in (c2s, s2c)


def test_encryption_options_for_the_agents():
    eo = wire.encryption_options
    assert eo(None) == eo(True) == eo("on") == {"encrypt": True, "cipher": None}
    assert eo(False) == eo("off") == eo("none") == {"encrypt": False, "cipher": None}
    assert eo("chacha20-poly1305") == {"encrypt": True, "cipher": "chacha20-poly1305"}
    for bad in ("hmac-sha256", "rot13", 1, 0):
        with pytest.raises(ValueError, match="unknown encryption setting"):
            eo(bad)


def test_aclose_delivers_the_last_frames_even_with_input_unread():
    """The abort path: a side that never read what its peer sent still gets its last
    frame and its CLOSE delivered (no reset over unread input), and aclose() returns
    once the peer has closed too."""
    async def go():
        p = await pair()
        for _ in range(4):                       # input the client will never read
            await p.server.send(wire.PAGES, os.urandom(1 << 20))
        await p.client.send_json(wire.ABORT, {"reason": "test"})
        closing = asyncio.ensure_future(p.client.aclose(timeout=5))
        mtype, payload = await p.server.recv()
        assert mtype == wire.ABORT and wire.unpack_json(payload)[0] == {"reason": "test"}
        with pytest.raises(wire.ProtocolError, match="authenticated CLOSE"):
            await p.server.recv()
        p.server.close()
        t0 = asyncio.get_running_loop().time()
        await closing
        assert asyncio.get_running_loop().time() - t0 < 3
        await p.close()
    run(go())
