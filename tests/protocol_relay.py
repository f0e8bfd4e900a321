"""A man in the middle for the migration wire protocol, for tests.

:class:`Relay` sits between a client and a server on loopback TCP (or, with
``connect``, any socket factory), passes the handshake through, then cuts each
direction's stream into frames (the header is in clear: u32 length, u8 type, u64 seq,
then length + 16 bytes) and lets a hook forward, drop, duplicate, hold, alter or send
back each frame. It records every byte it saw per direction, so a test can decode a
real session afterwards. It knows only the documented sizes (docs/wire-format.md),
not protocol.py.
"""
from __future__ import annotations

import asyncio
import struct
from typing import Callable, Dict, List, Optional, Tuple

HELLO_S, HELLO_C, REPLY_S = 8 + 32, 8 + 32 + 1 + 32, 1 + 32
HDR = struct.Struct("!IBQ")
TAG = 16

C2S, S2C = "c2s", "s2c"
# A hook's answer: a list of (where, bytes), where is "on" (towards the receiver) or
# "back" (to the frame's own sender); or CUT to end both connections right there.
CUT = "cut"
Hook = Callable[[str, int, bytes], object]


def parse(frame: bytes) -> Tuple[int, int, int]:
    """(length, type, seq) of a frame."""
    return HDR.unpack_from(frame)


class Relay:
    def __init__(self, target_port: int, hook: Optional[Hook] = None, host: str = "127.0.0.1"):
        self.target = (host, target_port)
        self.host = host
        self.hook = hook
        self.raw: Dict[str, bytearray] = {C2S: bytearray(), S2C: bytearray()}
        self.frames: Dict[str, List[bytes]] = {C2S: [], S2C: []}
        self.port = 0
        self._server: Optional[asyncio.base_events.Server] = None
        self._writers: List[asyncio.StreamWriter] = []
        self.done = asyncio.Event()

    async def start(self) -> "Relay":
        self._server = await asyncio.start_server(self._handle, self.host, 0, limit=64 << 20)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, cr, cw) -> None:
        sr, sw = await asyncio.open_connection(*self.target, limit=64 << 20)
        self._writers += [cw, sw]
        ends = {C2S: (cr, sw, cw), S2C: (sr, cw, sw)}

        async def pump(direction: str, hs: List[int]) -> None:
            src, dst, back = ends[direction]
            try:
                for n in hs:
                    data = await src.readexactly(n)
                    self.raw[direction] += data
                    dst.write(data)
                i = 0
                while True:
                    hdr = await src.readexactly(HDR.size)
                    n, _, _ = HDR.unpack(hdr)
                    frame = hdr + await src.readexactly(n + TAG)
                    self.raw[direction] += frame
                    self.frames[direction].append(frame)
                    out = self.hook(direction, i, frame) if self.hook else [("on", frame)]
                    i += 1
                    if out == CUT:
                        for w in (cw, sw):
                            w.transport.abort()
                        return
                    for where, data in out:  # type: ignore[union-attr]
                        (dst if where == "on" else back).write(data)
                    await dst.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                try:
                    dst.write_eof()
                except (OSError, RuntimeError):
                    pass

        await asyncio.gather(pump(C2S, [HELLO_C]), pump(S2C, [HELLO_S, REPLY_S]))
        self.done.set()
