"""The contract every transport meets: it moves opaque frames and knows nothing of tensors."""

from __future__ import annotations

from typing import Protocol

Buffer = bytes | bytearray | memoryview


class Channel(Protocol):
    """A bidirectional, ordered, reliable channel of frames between two peers.

    A channel over a network says so with ``link = "network"`` (absent means local: shared
    memory, a file), which is what ``wire.codec = auto`` goes by."""

    def send(self, *parts: Buffer) -> None:
        """Send one frame made of ``parts`` concatenated (they are never joined in memory)."""

    def recv(self, max_bytes: int, timeout: float | None = None) -> memoryview:
        """Receive one whole frame.

        Raises MessageTooLarge before allocating when the declared length exceeds
        ``max_bytes``, TransportTimeout when nothing arrives in time, PeerGone when the
        peer died or closed. The view stays valid until the next ``recv`` on this channel.
        """

    def close(self) -> None:
        """Release the channel; further calls raise TransportError."""
