"""Reading a message limit: ``protocol.max_message_bytes = 0`` means "derived from the model"
(edgelink/runtime/sizing.py fits it once a runtime is loaded); where no model is loaded (raw
channels, transport tools) it means a fixed 1 GiB."""

from __future__ import annotations

UNFITTED_MAX_MESSAGE_BYTES = 1 << 30


def limit_of(limits) -> int:
    """A ProtocolConfig's message limit in bytes."""
    return limits.max_message_bytes or UNFITTED_MAX_MESSAGE_BYTES


def describe_bytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB ({n:,} bytes)" if n >= 1e6 else f"{n:,} bytes"
