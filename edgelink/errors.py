"""Typed errors. Every failure a user can cause maps to one of these, never a bare Exception.

The hierarchy mirrors the layers so callers can catch at the level they care about; each
protocol-level error also carries a stable ``code`` that travels in a REJECT message, and
each family its own process exit status (``exit_code``, docs/cli.md): 1 any other edgelink
error, 2 a setting or argument, 3 a model, 4 bytes that are not a valid message or file, 5 a
state that cannot be applied here, 6 a peer that refused the session, 7 a peer that cannot be
reached or went away; 130 an interrupt.
"""

from __future__ import annotations


class EdgelinkError(Exception):
    """Base of every error edgelink raises on purpose."""

    code = "error"
    exit_code = 1


class EdgelinkWarning(UserWarning):
    """Something works now but is known to fail or cost more; the text says what to change."""


class ConfigError(EdgelinkError):
    code = "config"
    exit_code = 2


class ModelError(EdgelinkError):
    """A model cannot be found, pulled, verified or loaded."""

    code = "model"
    exit_code = 3


class ProtocolError(EdgelinkError):
    """Bytes that do not decode to a valid message: bad magic, version, kind, length, layout."""

    code = "protocol"
    exit_code = 4


class UnsupportedVersion(ProtocolError):
    code = "version"


class UnknownKind(ProtocolError):
    code = "kind"


class MessageTooLarge(ProtocolError):
    """A declared length exceeds a configured bound; raised before any allocation."""

    code = "too_large"


class TruncatedMessage(ProtocolError):
    code = "truncated"


class ChecksumMismatch(ProtocolError):
    code = "checksum"


class SessionError(EdgelinkError):
    """A message that decodes but is not allowed here: wrong session, order, or state."""

    code = "session"
    exit_code = 6


class SignatureMismatch(SessionError):
    """The peers' model signatures differ: the session is rejected, never downgraded to text."""

    code = "signature"

    def __init__(self, message: str, fields: dict[str, tuple[object, object]] | None = None):
        super().__init__(message)
        self.fields = fields or {}


class BridgeMismatch(SignatureMismatch):
    """A bridged session (two different models, docs/protocol.md) cannot be set up: the peer
    names another bridge, or none where one is required, or one side's model is not the one
    the bridge names for its role. Rejected at the handshake like any signature mismatch."""

    code = "bridge"


class ReplayError(SessionError):
    """A message id that is not exactly the next expected one (replayed or out of order)."""

    code = "replay"


class AuthError(SessionError):
    """A peer that is not on the allowlist, or a missing or wrong bearer token (checked before
    any model work)."""

    code = "auth"


class BusyError(SessionError):
    """The node is serving as many clients as it is configured for, or is shutting down."""

    code = "busy"


class PeerRejected(SessionError):
    """The peer sent a REJECT; ``reason`` is its typed code, ``detail`` its text."""

    code = "rejected"

    def __init__(self, reason: str, detail: str):
        super().__init__(f"peer rejected ({reason}): {detail}")
        self.reason = reason
        self.detail = detail


class InternalError(SessionError):
    """A fault inside this side while handling a peer's message (a bug, not the peer's typed
    error): the message is refused with code ``internal``, the sequence is left as it was
    before the message, and the receiver goes on serving."""

    code = "internal"


class StateError(EdgelinkError):
    """A tensor payload that cannot be applied to this runtime (shape, type, capacity)."""

    code = "state"
    exit_code = 5


class NormGateError(StateError):
    """A RESIDUAL_PATCH row whose norm exceeds the receiver's configured multiple of its own
    residual norm at that layer (latent.norm_gate_mode = reject)."""

    code = "norm_gate"


class TransportError(EdgelinkError):
    code = "transport"
    exit_code = 7


class TransportTimeout(TransportError):
    code = "timeout"


class PeerGone(TransportError):
    """The peer process died or closed the channel mid-stream."""

    code = "peer_gone"


class Unreachable(PeerGone):
    """A dial that found no peer: nothing listening there, another peer id, not a libp2p node."""

    code = "unreachable"


class CryptoError(TransportError):
    """End-to-end encryption failed: a bad handshake signature, a key that does not belong to
    the connected peer id, or a record that does not authenticate (tampered, truncated,
    out of order). The channel cannot continue after it."""

    code = "crypto"


class RecordReplayed(CryptoError):
    """An encrypted record whose counter was already used in this session (a replay)."""

    code = "replay"


class SegmentBusy(TransportError):
    """A shared-memory name is held by a live process."""

    code = "busy"


class SegmentUntrusted(TransportError):
    """A shared-memory segment file that is not this user's own private file: another local
    user created the name first (to read the state sent to it), or it is a link or open to
    others. Nothing is sent to it and nothing is removed."""

    code = "untrusted"
