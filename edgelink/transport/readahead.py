"""Read-ahead for py-libp2p's TCP connections, under Noise.

py-libp2p's Noise reader asks the socket for each 2-byte length prefix and then for each
body (up to 64 KiB) separately, and yamux asks for each 12-byte header: three or more
``recv`` syscalls, each a trip through trio's scheduler, per 64 KiB of payload. Profiling a
bulk transfer showed the receiving process spending more time in those calls than in
decryption. ``ReadAhead`` asks the socket for up to ``size`` bytes at once and serves the
small reads from memory. The bytes on the wire are unchanged (this is still plain libp2p
Noise), so peers that do not use it interoperate.

``ReadAheadNoise`` is the Noise security transport with the wrapper put in place before
the handshake; it is handed to ``new_host`` like the stock one.
"""

from __future__ import annotations

from typing import Any

from libp2p.security.noise.transport import Transport as NoiseTransport


class ReadAhead:
    """A ReadWriteCloser that reads ahead from ``inner``; writes pass straight through."""

    def __init__(self, inner: Any, size: int):
        self._inner = inner
        self._size = size
        self._buf = b""
        self._pos = 0

    async def read(self, n: int | None = None) -> bytes:
        avail = len(self._buf) - self._pos
        if avail:
            take = avail if n is None else min(n, avail)
            start = self._pos
            self._pos += take
            if self._pos == len(self._buf):
                buf, self._buf, self._pos = self._buf, b"", 0
                return buf if start == 0 else buf[start:]
            return self._buf[start:self._pos]
        if n == 0:
            return b""
        data = await self._inner.read(max(n or 0, self._size))
        if n is None or len(data) <= n:
            return data
        self._buf, self._pos = data, n
        return data[:n]

    async def write(self, data: bytes) -> None:
        await self._inner.write(data)

    async def close(self) -> None:
        await self._inner.close()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self._inner.get_remote_address()

    def __getattr__(self, name: str) -> Any:  # anything else the stream offers
        return getattr(self._inner, name)


def _wrap(conn: Any, size: int) -> Any:
    stream = getattr(conn, "stream", None)
    if size > 0 and stream is not None and not isinstance(stream, ReadAhead):
        conn.stream = ReadAhead(stream, size)
    return conn


class ReadAheadNoise(NoiseTransport):
    """libp2p's Noise transport, reading ``read_ahead`` bytes per socket read."""

    def __init__(self, *args: Any, read_ahead: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.read_ahead = read_ahead

    async def secure_inbound(self, conn):
        return await super().secure_inbound(_wrap(conn, self.read_ahead))

    async def secure_outbound(self, conn, peer_id):
        return await super().secure_outbound(_wrap(conn, self.read_ahead), peer_id)


def stock_noise_option(identity: Any) -> dict:
    """``sec_opt`` for a host with py-libp2p's own Noise transport, as ``new_host`` would
    set it up: the baseline in ``edgelink bench transport`` and the interop tests."""
    from libp2p.crypto.x25519 import create_new_key_pair as x25519_pair
    from libp2p.security.noise.transport import PROTOCOL_ID

    return {PROTOCOL_ID: NoiseTransport(identity.key_pair, noise_privkey=x25519_pair().private_key)}
