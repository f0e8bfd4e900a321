"""The migration agents' wire protocol: mutual authentication, then encrypted frames.

One TCP connection carries the whole migration. Before anything else both sides prove
that they hold the same shared secret (HMAC-SHA256 challenge-response over fresh nonces
of both sides) and agree, authenticated, on whether the frames are encrypted; a peer
that fails, or asks for the other choice, is refused before a single byte of process
memory moves. Afterwards every frame is sealed under a key of its own direction:

- encrypted (the default): AES-256-GCM (or ChaCha20-Poly1305 if the client asks for
  it), nonce = the frame's sequence number, associated data = the frame header;
- authenticated only (``encrypt=False``, for links that are already protected):
  HMAC-SHA256 (truncated to 16 bytes) over the header and the payload in clear.

A flipped bit, a replayed, reordered, dropped, reflected or injected frame, and a
stream cut short without the peer's authenticated CLOSE are each refused at the frame
it happens in, with an error that says which. docs/wire-format.md specifies the
handshake, key schedule, nonces and frame layout byte by byte; the primitives (AES-GCM,
ChaCha20-Poly1305, HKDF) come from the ``cryptography`` package, HMAC from the stdlib.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import struct
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from statesync.errors import AuthenticationError, ProtocolError, SecretError

VERSION = 2
MAGIC = b"SSMIGv2\n"
_MAGIC_PREFIX = b"SSMIGv"
NONCE = 32
TAG_LEN = 16
MAC_LEN = TAG_LEN                      # the name protocol v1 used
MAX_FRAME = 32 << 20
_HDR = struct.Struct("!IBQ")           # payload length, type, sequence number (13 bytes)
HEADER_LEN = _HDR.size
_SEQ_LIMIT = (1 << 64) - 1             # a key never seals more frames than this

# Cipher suites (one byte in the client hello).
SUITE_HMAC_SHA256 = 0                  # authenticated only: payload in clear
SUITE_AES_256_GCM = 1
SUITE_CHACHA20_POLY1305 = 2
SUITES = {SUITE_HMAC_SHA256: "hmac-sha256", SUITE_AES_256_GCM: "aes-256-gcm",
          SUITE_CHACHA20_POLY1305: "chacha20-poly1305"}
_SUITE_BY_NAME = {v: k for k, v in SUITES.items()}
DEFAULT_CIPHER = "aes-256-gcm"

_HELLO_S = len(MAGIC) + NONCE                  # server hello
_HELLO_C = len(MAGIC) + NONCE + 1 + 32         # client hello
_REPLY_S = 1 + 32                              # server reply

# Message types. Values 0 and 240..255 are reserved for the channel layer.
BEGIN, READY, PAGES, ROUND_END, ROUND_ACK, IMAGE, FINAL = 1, 2, 3, 4, 5, 6, 7
RESTORED, FAILED, COMMIT, ABORT, DONE, ERROR = 8, 9, 10, 11, 12, 13
CLOSE = 255                            # the authenticated end of a direction's stream
NAMES = {v: k for k, v in {"BEGIN": BEGIN, "READY": READY, "PAGES": PAGES,
                           "ROUND_END": ROUND_END, "ROUND_ACK": ROUND_ACK, "IMAGE": IMAGE,
                           "FINAL": FINAL, "RESTORED": RESTORED, "FAILED": FAILED,
                           "COMMIT": COMMIT, "ABORT": ABORT, "DONE": DONE, "ERROR": ERROR,
                           "CLOSE": CLOSE}.items()}
# The handoff's confirm phase and its resolution (docs/migrate.md, owned by the
# migration agents): RESUMED = the destination resumed the restored tree after COMMIT;
# RESOLVE = a source (agent, supervisor or `statesync recover`) tells a destination its
# decision for a session; STATUS = the destination's answer; BUSY = another migration runs.
RESUMED, RESOLVE, STATUS, BUSY = 14, 15, 16, 17
NAMES.update({RESUMED: "RESUMED", RESOLVE: "RESOLVE", STATUS: "STATUS", BUSY: "BUSY"})
# FILLED = after a lazy restore's RESUMED: every lazy page is in place (the source keeps
# its frozen copy until then; docs/migrate.md).
FILLED = 18
NAMES[FILLED] = "FILLED"
# Post-copy / hybrid switch-over (migration/postcopy.py, docs/postcopy.md): PC_REMOTE =
# the pages still only at the source (before FINAL); PC_REQUEST = the destination asks
# for pages a fault waits on; PC_PAGES = page contents (requested or pushed); PC_ACK =
# how many the destination has received (the source's push window).
PC_REMOTE, PC_REQUEST, PC_PAGES, PC_ACK = 19, 20, 21, 22
NAMES.update({PC_REMOTE: "PC_REMOTE", PC_REQUEST: "PC_REQUEST", PC_PAGES: "PC_PAGES",
              PC_ACK: "PC_ACK"})


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


# --------------------------------------------------------------------------- key schedule


def _hkdf(secret: bytes, ns: bytes, nc: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=ns + nc,
                info=info).derive(secret)


def auth_key(secret: bytes, ns: bytes, nc: bytes) -> bytes:
    """The handshake's proof key (docs/wire-format.md, "Key schedule")."""
    return _hkdf(secret, ns, nc, b"statesync/2 auth", 32)


def frame_keys(secret: bytes, ns: bytes, nc: bytes, suite: int) -> tuple[bytes, bytes]:
    """(client-to-server key, server-to-client key) of one session."""
    okm = _hkdf(secret, ns, nc, b"statesync/2 frames" + bytes([suite]), 64)
    return okm[:32], okm[32:]


def _proof(key: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, label + b"".join(parts), hashlib.sha256).digest()


def _nonce(seq: int) -> bytes:
    """The 96-bit AEAD nonce of frame ``seq``: the sequence number, big-endian."""
    return seq.to_bytes(12, "big")


def _suite_of(encrypt: bool, cipher: str | None) -> int:
    if not encrypt:
        return SUITE_HMAC_SHA256
    name = cipher or DEFAULT_CIPHER
    suite = _SUITE_BY_NAME.get(name)
    if suite is None or suite == SUITE_HMAC_SHA256:
        raise ValueError(f"unknown cipher {name!r} (aes-256-gcm, chacha20-poly1305)")
    return suite


def encryption_options(encryption: bool | str | None) -> dict[str, Any]:
    """The :meth:`Channel.client` keywords for a user's encryption setting, for the
    agents, API and CLI to pass through (``Channel.client(..., **opts)``;
    ``Channel.server(..., encrypt=opts["encrypt"])``).

    ``None``, ``True``, ``"on"``: encrypted with the default cipher (aes-256-gcm);
    ``False``, ``"off"``, ``"none"``: authenticated-only frames (both agents must say so);
    ``"aes-256-gcm"`` / ``"chacha20-poly1305"``: encrypted with that cipher (the
    destination accepts either). Raises ``ValueError`` naming the choices otherwise."""
    if encryption is None or encryption is True or encryption == "on":
        return {"encrypt": True, "cipher": None}
    if encryption is False or encryption in ("off", "none"):
        return {"encrypt": False, "cipher": None}
    if isinstance(encryption, str) and _SUITE_BY_NAME.get(encryption, 0) != SUITE_HMAC_SHA256:
        return {"encrypt": True, "cipher": encryption}
    raise ValueError(f"unknown encryption setting {encryption!r} (on, off, aes-256-gcm, "
                     f"chacha20-poly1305)")


def _mode_text(encrypted: bool) -> str:
    return "encryption on" if encrypted else "encryption off (encrypt=False / --no-encryption)"


class _Sealer:
    """One direction's key: seals (sender) or opens (receiver) frames."""

    def __init__(self, suite: int, key: bytes):
        self.suite = suite
        self.key = key
        self.aead: AESGCM | ChaCha20Poly1305 | None = None
        if suite == SUITE_AES_256_GCM:
            self.aead = AESGCM(key)
        elif suite == SUITE_CHACHA20_POLY1305:
            self.aead = ChaCha20Poly1305(key)
        # encrypt_into (cryptography >= 45) seals straight into the frame buffer.
        self.into = self.aead is not None and hasattr(self.aead, "encrypt_into")

    def mac(self, header: bytes, payload) -> bytes:
        h = hmac.new(self.key, header, hashlib.sha256)
        h.update(payload)
        return h.digest()[:TAG_LEN]

    def open(self, seq: int, header: bytes, data: bytes, tag: bytes | None) -> bytes | None:
        """The payload if the frame authenticates under this key at ``seq`` with
        ``header``, else None. AEAD: ``data`` = ciphertext || tag, ``tag`` None;
        HMAC: ``data`` = payload, ``tag`` = its MAC."""
        if self.aead is None:
            if tag is None or not hmac.compare_digest(self.mac(header, data), tag):
                return None
            return data
        try:
            return self.aead.decrypt(_nonce(seq), data, header)
        except InvalidTag:
            return None


class Channel:
    """An encrypted (or, with ``encrypt=False``, authenticated-only) frame channel
    over an asyncio stream pair. Build one with :meth:`client` / :meth:`server`.

    ``send``/``recv`` must each be used by one task at a time. ``timeout`` (seconds)
    bounds every read and every drain, so a dead peer or a dropped link surfaces as
    :class:`ProtocolError` instead of a hang. ``encrypted`` and ``cipher`` say what
    the session uses (for the report and the logs).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 suite: int, tx_key: bytes, rx_key: bytes, is_client: bool, timeout: float):
        self.reader, self.writer = reader, writer
        self.suite = suite
        self.cipher = SUITES[suite]
        self.encrypted = suite != SUITE_HMAC_SHA256
        self.is_client = is_client
        self._tx = _Sealer(suite, tx_key)
        self._rx = _Sealer(suite, rx_key)
        self._send_seq = 0
        self._recv_seq = 0
        self._closed = False
        self.peer_closed = False
        self.timeout = timeout
        self.bytes_sent = 0
        self.bytes_received = 0
        try:  # let the kernel buffer a few MB while we read/encode the next batch
            writer.transport.set_write_buffer_limits(high=8 << 20)
        except (AttributeError, NotImplementedError):
            pass

    @property
    def peer(self) -> str:
        return "destination" if self.is_client else "source"

    # -- handshake

    @classmethod
    async def client(cls, reader, writer, secret: bytes, timeout: float = 10.0, *,
                     encrypt: bool = True, cipher: str | None = None) -> Channel:
        """The source agent's side. ``encrypt=False`` asks for authenticated-only
        frames; the destination must be configured the same way or it refuses.
        ``cipher``: ``"aes-256-gcm"`` (default) or ``"chacha20-poly1305"``."""
        suite = _suite_of(encrypt, cipher)
        hello = await _read_exact(reader, _HELLO_S, timeout, "server hello", auth=True)
        _check_magic(hello, "destination")
        ns = hello[len(MAGIC):]
        nc = os.urandom(NONCE)
        ka = auth_key(secret, ns, nc)
        writer.write(MAGIC + nc + bytes([suite]) + _proof(ka, b"client", bytes([suite])))
        await _drain(writer, timeout, "client hello")
        reply = await _read_exact(reader, _REPLY_S, timeout, "server proof", auth=True)
        mode = reply[0]
        if not hmac.compare_digest(reply[1:], _proof(ka, b"server", bytes([suite, mode]))):
            raise AuthenticationError("destination failed authentication: it does not hold "
                                      "the shared secret")
        if mode not in (0, 1):
            raise ProtocolError(f"destination sent an unknown encryption mode {mode}")
        if bool(mode) != (suite != SUITE_HMAC_SHA256):
            raise ProtocolError(f"destination refused: it runs with {_mode_text(bool(mode))}, "
                                f"this source with {_mode_text(not bool(mode))}; "
                                "configure both sides the same")
        c2s, s2c = frame_keys(secret, ns, nc, suite)
        return cls(reader, writer, suite, c2s, s2c, True, timeout)

    @classmethod
    async def server(cls, reader, writer, secret: bytes, timeout: float = 10.0, *,
                     encrypt: bool = True) -> Channel:
        """The destination agent's side. ``encrypt=False`` accepts only
        authenticated-only clients; the default accepts only encrypting ones."""
        mode = 1 if encrypt else 0
        ns = os.urandom(NONCE)
        writer.write(MAGIC + ns)
        await _drain(writer, timeout, "server hello")
        msg = await _read_exact(reader, _HELLO_C, timeout, "client hello", auth=True)
        _check_magic(msg, "source")
        nc = msg[len(MAGIC):len(MAGIC) + NONCE]
        suite = msg[len(MAGIC) + NONCE]
        proof = msg[len(MAGIC) + NONCE + 1:]
        ka = auth_key(secret, ns, nc)
        if not hmac.compare_digest(proof, _proof(ka, b"client", bytes([suite]))):
            raise AuthenticationError("source failed authentication: it does not hold "
                                      "the shared secret")
        if suite not in SUITES:
            raise ProtocolError(f"source asked for unknown cipher suite {suite}")
        # The reply (our mode, authenticated) goes out even on a mismatch, so the
        # source learns why it is refused.
        writer.write(bytes([mode]) + _proof(ka, b"server", bytes([suite, mode])))
        await _drain(writer, timeout, "server proof")
        if bool(mode) != (suite != SUITE_HMAC_SHA256):
            raise ProtocolError(f"refused source: it runs with "
                                f"{_mode_text(suite != SUITE_HMAC_SHA256)}, this destination "
                                f"with {_mode_text(bool(mode))}; configure both sides the same")
        c2s, s2c = frame_keys(secret, ns, nc, suite)
        return cls(reader, writer, suite, s2c, c2s, False, timeout)

    # -- frames

    def _frame(self, mtype: int, payload) -> tuple[tuple[Any, ...], int]:
        """The wire bytes of the next frame (one or more pieces) and their length."""
        mv = memoryview(payload)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        n = mv.nbytes
        if n > MAX_FRAME:
            raise ProtocolError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
        if not 0 <= mtype <= 255:
            raise ValueError(f"message type {mtype} out of range 0..255")
        seq = self._send_seq
        if seq >= _SEQ_LIMIT:
            raise ProtocolError("session sealed 2**64-1 frames: reconnect for fresh keys")
        if self._closed:
            raise ProtocolError("channel closed: cannot send")
        self._send_seq = seq + 1
        header = _HDR.pack(n, mtype, seq)
        size = HEADER_LEN + n + TAG_LEN
        tx = self._tx
        if tx.aead is None:
            return (header, mv, tx.mac(header, mv)), size
        if tx.into:
            # One buffer for the whole frame: header, then ciphertext || tag sealed in place.
            buf = bytearray(HEADER_LEN + n + TAG_LEN)
            buf[:HEADER_LEN] = header
            tx.aead.encrypt_into(_nonce(seq), mv, header,
                                 memoryview(buf)[HEADER_LEN:])
            return (buf,), size
        return (header, tx.aead.encrypt(_nonce(seq), mv, header)), size

    async def send(self, mtype: int, payload=b"") -> None:
        pieces, size = self._frame(mtype, payload)
        for p in pieces:
            self.writer.write(p)
        self.bytes_sent += size
        try:
            await asyncio.wait_for(self.writer.drain(), self.timeout)
        except asyncio.TimeoutError:
            raise ProtocolError(f"{self.peer} stopped reading for {self.timeout:.1f}s "
                                f"(link down or peer hung)") from None
        except (ConnectionError, OSError) as exc:
            raise ProtocolError(f"connection lost while sending: {exc}") from exc

    async def send_json(self, mtype: int, obj, tail: bytes = b"") -> None:
        await self.send(mtype, pack_json(obj, tail))

    async def recv(self, timeout: float | None = None) -> tuple[int, bytes]:
        t = self.timeout if timeout is None else timeout
        expected = self._recv_seq
        if self.peer_closed:
            raise ProtocolError(f"{self.peer} already ended the session (after frame "
                                f"{expected - 1}); nothing more will arrive")
        try:
            header = await asyncio.wait_for(self.reader.readexactly(HEADER_LEN), t)
        except asyncio.IncompleteReadError as exc:
            raise ProtocolError(
                f"connection to the {self.peer} cut after frame {expected - 1} "
                f"({len(exc.partial)} of {HEADER_LEN} header bytes) without its "
                f"authenticated CLOSE: stream truncated (peer died, link failed, or "
                f"someone dropped the rest)") from None
        except asyncio.TimeoutError:
            raise ProtocolError(f"no frame {expected} from the {self.peer} within {t:.1f}s "
                                f"(link down, peer dead or hung)") from None
        except (ConnectionError, OSError) as exc:
            raise ProtocolError(f"connection lost while waiting for frame {expected}: "
                                f"{exc}") from exc
        n, mtype, seq = _HDR.unpack(header)
        if n > MAX_FRAME:
            raise ProtocolError(f"frame {expected} announces {n} bytes, over the "
                                f"{MAX_FRAME}-byte limit: corrupt or hostile stream")
        what = f"frame {expected} body"
        tag: bytes | None = None
        if self.encrypted:   # ciphertext || tag, as the AEAD takes it
            data = await _read_exact(self.reader, n + TAG_LEN, t, what, truncated=True)
        else:                # payload and MAC apart: no copy of the payload
            data = await _read_exact(self.reader, n, t, what, truncated=True)
            tag = await _read_exact(self.reader, TAG_LEN, t, what, truncated=True)
        payload = self._rx.open(seq, header, data, tag) if seq == expected else None
        if payload is None:
            raise ProtocolError(self._diagnose(seq, mtype, n, header, data, tag))
        self._recv_seq = expected + 1
        self.bytes_received += HEADER_LEN + n + TAG_LEN
        if mtype == CLOSE:
            self.peer_closed = True
            raise ProtocolError(f"{self.peer} ended the session after frame {expected - 1} "
                                f"(authenticated CLOSE) while a message was expected")
        if mtype == ERROR:
            obj, _ = unpack_json(payload)
            raise ProtocolError(f"{self.peer} reported an error: {obj.get('error')}")
        return mtype, payload

    def _diagnose(self, seq: int, mtype: int, n: int, header: bytes, data: bytes,
                  tag: bytes | None) -> str:
        """Why frame ``seq`` (which did not open as the expected one) was refused."""
        expected = self._recv_seq
        what = f"type {NAMES.get(mtype, mtype)}, {n} bytes"
        if seq != expected and self._rx.open(seq, header, data, tag) is not None:
            if seq < expected:
                return (f"frame {seq} ({what}) replayed: it was already received "
                        f"(expected frame {expected}); refusing it")
            return (f"frame {seq} ({what}) arrived where frame {expected} was expected: "
                    f"frames reordered or dropped in flight; refusing it")
        if self._tx.open(seq, header, data, tag) is not None:
            return (f"frame {seq} ({what}) reflected: it is one this side sent to the "
                    f"{self.peer}, echoed back; refusing it")
        return (f"frame {expected} ({what}) failed authentication: bytes corrupted in "
                f"flight or forged ({self.cipher})")

    async def expect(self, *types: int, timeout: float | None = None) -> tuple[int, bytes]:
        mtype, payload = await self.recv(timeout)
        if mtype not in types:
            want = "/".join(NAMES.get(t, str(t)) for t in types)
            raise ProtocolError(f"expected {want}, got {NAMES.get(mtype, mtype)}")
        return mtype, payload

    def close(self) -> None:
        """End the session: an authenticated CLOSE frame (so the peer can tell a clean
        end from a truncated stream), then close the connection (buffered frames are
        still sent). Idempotent."""
        if not self._closed:
            # Best effort: a connection already lost has nothing to end.
            with contextlib.suppress(ProtocolError, RuntimeError, OSError):
                if not self.writer.is_closing():
                    for p in self._frame(CLOSE, b"")[0]:
                        self.writer.write(p)
            self._closed = True
        with contextlib.suppress(RuntimeError, OSError):
            self.writer.close()

    async def aclose(self, timeout: float = 2.0) -> None:
        """:meth:`close`, making sure what was sent arrives: the CLOSE frame, then a FIN
        after all our frames, then whatever the peer still sends is read and dropped
        until it closes too (at most ``timeout`` seconds). Closing a socket with unread
        input makes the kernel reset the connection and discard frames not yet
        delivered (an ABORT, say); this never does. Use it where the last frame
        matters (the abort path)."""
        if not self._closed:
            with contextlib.suppress(ProtocolError, RuntimeError, OSError):
                if not self.writer.is_closing():
                    for p in self._frame(CLOSE, b"")[0]:
                        self.writer.write(p)
            self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with contextlib.suppress(asyncio.TimeoutError, RuntimeError, OSError, ConnectionError):
            await asyncio.wait_for(self.writer.drain(), timeout)
            if self.writer.can_write_eof() and not self.writer.is_closing():
                self.writer.write_eof()
            while True:
                left = deadline - loop.time()
                if left <= 0 or not await asyncio.wait_for(self.reader.read(1 << 16), left):
                    break
        with contextlib.suppress(RuntimeError, OSError):
            self.writer.close()
        with contextlib.suppress(asyncio.TimeoutError, RuntimeError, OSError, ConnectionError):
            await asyncio.wait_for(self.writer.wait_closed(), max(0.1, deadline - loop.time()))

    def describe(self) -> dict[str, Any]:
        """What the session uses, for reports and logs."""
        return {"encrypted": self.encrypted, "cipher": self.cipher, "protocol": VERSION}


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


def _check_magic(msg: bytes, peer: str) -> None:
    magic = msg[:len(MAGIC)]
    if magic == MAGIC:
        return
    if magic.startswith(_MAGIC_PREFIX) and magic.endswith(b"\n"):
        other = magic[len(_MAGIC_PREFIX):-1].decode("ascii", "replace")
        raise AuthenticationError(f"{peer} speaks statesync wire protocol v{other}, this agent "
                                  f"v{VERSION}: run the same statesync version on both hosts")
    raise AuthenticationError(f"peer is not a statesync {peer} agent (bad protocol magic)")


async def _drain(writer, timeout: float, what: str) -> None:
    try:
        await asyncio.wait_for(writer.drain(), timeout)
    except asyncio.TimeoutError:
        raise ProtocolError(f"peer did not take the {what} within {timeout:.1f}s "
                            f"(link down or peer hung)") from None
    except (ConnectionError, OSError) as exc:
        raise ProtocolError(f"connection lost while sending the {what}: {exc}") from exc


async def _read_exact(reader, n: int, timeout: float, what: str, auth: bool = False,
                      truncated: bool = False) -> bytes:
    try:
        return await asyncio.wait_for(reader.readexactly(n), timeout)
    except asyncio.IncompleteReadError as exc:
        cls = AuthenticationError if auth else ProtocolError
        how = " without an authenticated CLOSE: stream truncated" if truncated else ""
        raise cls(f"peer closed the connection during {what} "
                  f"({len(exc.partial)} of {n} bytes){how}") from None
    except asyncio.TimeoutError:
        raise ProtocolError(f"no {what} from peer within {timeout:.1f}s "
                            f"(link down, peer dead or hung)") from None
    except (ConnectionError, OSError) as exc:
        raise ProtocolError(f"connection lost during {what}: {exc}") from exc
