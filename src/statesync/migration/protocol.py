"""The migration agents' wire protocol: mutual authentication and authenticated frames.

One TCP connection carries the whole migration. Before anything else both sides prove
that they hold the same shared secret (HMAC-SHA256 challenge-response, each side
challenging the other); a peer that fails is disconnected before it can send or
receive a single byte of process memory. Afterwards every frame carries a MAC over
its direction, sequence number, type and payload under a per-connection session key,
so a flipped bit, a dropped, replayed or reordered frame, or a frame injected by a
third party is detected at the frame it happens in.

Handshake (``||`` is concatenation, H = HMAC-SHA256 with the shared secret as key)::

    server -> client   MAGIC || Ns (32 random bytes)
    client -> server   MAGIC || Nc (32 random bytes) || H("client" || Ns || Nc)
    server -> client   H("server" || Ns || Nc)             (only if the client's MAC is right)
    session key K    = H("session" || Ns || Nc)

Frame::

    u32 length (big-endian, of payload) | u8 type | payload | 16-byte MAC
    MAC = HMAC-SHA256(K, direction byte || u64 seq || u8 type || u32 length || payload)[:16]

Frames are limited to :data:`MAX_FRAME` bytes of payload, checked before anything is
allocated. The stream is authenticated, not encrypted: run it over a trusted link or
inside a tunnel if the memory must stay confidential (docs/migrate.md).
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import struct
from typing import Optional, Tuple

from statesync.errors import AuthenticationError, ProtocolError, SecretError

MAGIC = b"SSMIGv1\n"
NONCE = 32
MAC_LEN = 16
MAX_FRAME = 32 << 20
_HDR = struct.Struct("!IB")

# Message types.
BEGIN, READY, PAGES, ROUND_END, ROUND_ACK, IMAGE, FINAL = 1, 2, 3, 4, 5, 6, 7
RESTORED, FAILED, COMMIT, ABORT, DONE, ERROR = 8, 9, 10, 11, 12, 13
NAMES = {v: k for k, v in dict(BEGIN=BEGIN, READY=READY, PAGES=PAGES, ROUND_END=ROUND_END,
                                ROUND_ACK=ROUND_ACK, IMAGE=IMAGE, FINAL=FINAL,
                                RESTORED=RESTORED, FAILED=FAILED, COMMIT=COMMIT, ABORT=ABORT,
                                DONE=DONE, ERROR=ERROR).items()}


_SECRET_HOWTO = "e.g. `head -c 32 /dev/urandom | base64 > FILE`, then pass secret=\"@FILE\""


def load_secret(secret) -> bytes:
    """The shared secret as bytes, from ``bytes``/``str`` (used as given, UTF-8), or
    from a file with ``"@PATH"`` / ``"file:PATH"`` (its contents, surrounding
    whitespace stripped). At least 16 bytes are required. Raises
    :class:`~statesync.errors.SecretError` (also a ``ValueError``) naming the file and
    what to do when the secret is missing, unreadable or too short."""
    if secret is None:
        raise SecretError("a shared secret is required (secret=..., or --secret-file PATH); "
                          + _SECRET_HOWTO)
    path = None
    if isinstance(secret, str):
        for prefix in ("@", "file:"):
            if secret.startswith(prefix):
                path = secret[len(prefix):]
                try:
                    with open(path, "rb") as f:
                        secret = f.read().strip()
                except OSError as exc:
                    raise SecretError(f"secret file {path}: cannot read it "
                                      f"({exc.strerror or exc}); create it on both hosts, "
                                      f"readable only by the agents' user ({_SECRET_HOWTO})",
                                      path) from exc
                break
        else:
            secret = secret.encode()
    secret = bytes(secret)
    if len(secret) < 16:
        where = f"secret file {path}: " if path is not None else ""
        raise SecretError(f"{where}shared secret too short ({len(secret)} bytes; use >= 16, "
                          f"{_SECRET_HOWTO})", path)
    return secret


def _mac(key: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, label + b"".join(parts), hashlib.sha256).digest()


class Channel:
    """An authenticated frame channel over an asyncio stream pair.

    ``send``/``recv`` must each be used by one task at a time. ``timeout`` (seconds)
    bounds every read and every drain, so a dead peer or a dropped link surfaces as
    :class:`ProtocolError` instead of a hang.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 key: bytes, is_client: bool, timeout: float):
        self.reader, self.writer = reader, writer
        self._key = key
        self._out_dir = b"C" if is_client else b"S"
        self._in_dir = b"S" if is_client else b"C"
        self._send_seq = 0
        self._recv_seq = 0
        self.timeout = timeout
        self.bytes_sent = 0
        self.bytes_received = 0
        try:  # let the kernel buffer a few MB while we read/encode the next batch
            writer.transport.set_write_buffer_limits(high=8 << 20)
        except (AttributeError, NotImplementedError):
            pass

    # -- handshake

    @classmethod
    async def client(cls, reader, writer, secret: bytes, timeout: float = 10.0) -> "Channel":
        hello = await _read_exact(reader, len(MAGIC) + NONCE, timeout, "server hello")
        if hello[:len(MAGIC)] != MAGIC:
            raise AuthenticationError("peer is not a statesync destination agent "
                                      "(bad protocol magic)")
        ns = hello[len(MAGIC):]
        nc = os.urandom(NONCE)
        writer.write(MAGIC + nc + _mac(secret, b"client", ns, nc))
        await asyncio.wait_for(writer.drain(), timeout)
        proof = await _read_exact(reader, 32, timeout, "server proof", auth=True)
        if not hmac.compare_digest(proof, _mac(secret, b"server", ns, nc)):
            raise AuthenticationError("destination failed authentication: it does not hold "
                                      "the shared secret")
        return cls(reader, writer, _mac(secret, b"session", ns, nc), True, timeout)

    @classmethod
    async def server(cls, reader, writer, secret: bytes, timeout: float = 10.0) -> "Channel":
        ns = os.urandom(NONCE)
        writer.write(MAGIC + ns)
        await asyncio.wait_for(writer.drain(), timeout)
        msg = await _read_exact(reader, len(MAGIC) + NONCE + 32, timeout, "client hello",
                                auth=True)
        if msg[:len(MAGIC)] != MAGIC:
            raise AuthenticationError("peer is not a statesync source agent (bad magic)")
        nc, proof = msg[len(MAGIC):len(MAGIC) + NONCE], msg[len(MAGIC) + NONCE:]
        if not hmac.compare_digest(proof, _mac(secret, b"client", ns, nc)):
            raise AuthenticationError("source failed authentication: it does not hold "
                                      "the shared secret")
        writer.write(_mac(secret, b"server", ns, nc))
        await asyncio.wait_for(writer.drain(), timeout)
        return cls(reader, writer, _mac(secret, b"session", ns, nc), False, timeout)

    # -- frames

    def _frame_mac(self, direction: bytes, seq: int, mtype: int, payload) -> bytes:
        h = hmac.new(self._key, direction + struct.pack("!QBI", seq, mtype, len(payload)),
                     hashlib.sha256)
        h.update(payload)
        return h.digest()[:MAC_LEN]

    async def send(self, mtype: int, payload=b"") -> None:
        n = len(payload)
        if n > MAX_FRAME:
            raise ProtocolError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
        mac = self._frame_mac(self._out_dir, self._send_seq, mtype, payload)
        self._send_seq += 1
        self.writer.write(_HDR.pack(n, mtype))
        self.writer.write(payload)
        self.writer.write(mac)
        self.bytes_sent += _HDR.size + n + MAC_LEN
        try:
            await asyncio.wait_for(self.writer.drain(), self.timeout)
        except asyncio.TimeoutError:
            raise ProtocolError(f"peer stopped reading for {self.timeout:.1f}s "
                                f"(link down or peer hung)") from None
        except (ConnectionError, OSError) as exc:
            raise ProtocolError(f"connection lost while sending: {exc}") from exc

    async def send_json(self, mtype: int, obj, tail: bytes = b"") -> None:
        await self.send(mtype, pack_json(obj, tail))

    async def recv(self, timeout: Optional[float] = None) -> Tuple[int, bytes]:
        t = self.timeout if timeout is None else timeout
        hdr = await _read_exact(self.reader, _HDR.size, t, "frame header")
        n, mtype = _HDR.unpack(hdr)
        if n > MAX_FRAME:
            raise ProtocolError(f"frame {self._recv_seq} announces {n} bytes, over the "
                                f"{MAX_FRAME}-byte limit: corrupt or hostile stream")
        body = await _read_exact(self.reader, n + MAC_LEN, t, "frame body")
        payload, mac = body[:n], body[n:]
        if not hmac.compare_digest(mac, self._frame_mac(self._in_dir, self._recv_seq,
                                                        mtype, payload)):
            raise ProtocolError(f"frame {self._recv_seq} (type {mtype}, {n} bytes) failed "
                                f"authentication: bytes corrupted in flight or forged")
        self._recv_seq += 1
        self.bytes_received += _HDR.size + n + MAC_LEN
        if mtype == ERROR:
            obj, _ = unpack_json(payload)
            raise ProtocolError(f"peer reported an error: {obj.get('error')}")
        return mtype, payload

    async def expect(self, *types: int, timeout: Optional[float] = None) -> Tuple[int, bytes]:
        mtype, payload = await self.recv(timeout)
        if mtype not in types:
            want = "/".join(NAMES.get(t, str(t)) for t in types)
            raise ProtocolError(f"expected {want}, got {NAMES.get(mtype, mtype)}")
        return mtype, payload

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:
            pass


def pack_json(obj, tail: bytes = b"") -> bytes:
    js = json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack("!I", len(js)) + js + tail


def unpack_json(payload: bytes):
    if len(payload) < 4:
        raise ProtocolError("short JSON frame")
    (n,) = struct.unpack_from("!I", payload)
    if n > len(payload) - 4:
        raise ProtocolError(f"JSON length {n} exceeds the frame ({len(payload)} bytes)")
    try:
        obj = json.loads(payload[4:4 + n])
    except ValueError as exc:
        raise ProtocolError(f"malformed JSON in frame: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("JSON frame is not an object")
    return obj, payload[4 + n:]


async def _read_exact(reader, n: int, timeout: float, what: str, auth: bool = False) -> bytes:
    try:
        return await asyncio.wait_for(reader.readexactly(n), timeout)
    except asyncio.IncompleteReadError as exc:
        cls = AuthenticationError if auth else ProtocolError
        raise cls(f"peer closed the connection during {what} "
                  f"({len(exc.partial)} of {n} bytes)") from None
    except asyncio.TimeoutError:
        raise ProtocolError(f"no {what} from peer within {timeout:.1f}s "
                            f"(link down, peer dead or hung)") from None
    except (ConnectionError, OSError) as exc:
        raise ProtocolError(f"connection lost during {what}: {exc}") from exc
