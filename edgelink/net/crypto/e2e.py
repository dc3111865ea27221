"""End-to-end encryption of frames between two libp2p peers: a sans-IO state machine.

It never touches a socket. The transport feeds it handshake messages and record bodies and
moves what it returns. Two parts:

**Handshake.** Each side makes a fresh X25519 key pair (libsodium ``crypto_kx``) for this one
session and sends ``HS = magic | version | role | ephemeral pk | identity pk | window | nonce |
signature``. The signature is Ed25519, made with the side's persistent libp2p identity key,
over a context string, the fields before it, the signer's peer id and the peer id of the side
it is meant for. The receiver checks that the identity key is exactly the one the libp2p
connection authenticated (the stream's remote peer id) and that the signature names it as
the recipient, so a signed ephemeral key cannot be replayed to another peer or relayed by a
third party. Session keys come from ``crypto_kx_{client,server}_session_keys`` (one key per
direction); both ephemeral secret keys are wiped at once, so a later leak of an identity key
does not open recorded sessions (forward secrecy).

**Records.** A sealed record body is ``flags u8 | counter u64 | ciphertext``:
XChaCha20-Poly1305 (IETF AEAD), nonce = the direction and the counter, associated data =
``session id | direction | flags | counter | frame number``. The session id is a BLAKE2b hash of
both handshake messages. Each direction counts its records from 0; a counter lower than the
next expected one is a replay (``RecordReplayed``), a higher one a dropped or reordered record,
and anything that does not authenticate is a ``CryptoError``. After ``rekey_bytes`` bytes or
``rekey_s`` seconds the sender ratchets its key forward (BLAKE2b of the old key) and sets the
REKEY flag; the receiver ratchets when it sees the flag. The old key is overwritten.

Wiping: keys live in ``bytearray`` objects that are overwritten with ``sodium_memzero`` on
rekey and ``close()``. Python cannot promise more than that: intermediate ``bytes`` objects
made by libraries (PyNaCl's key-exchange results before they are copied in) are immutable and
freed, not zeroed, and the garbage collector may have moved nothing but may also leave copies
in freed memory or swap.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import time

from nacl import bindings as nb
from nacl._sodium import ffi, lib
from nacl.exceptions import BadSignatureError
from nacl.exceptions import CryptoError as NaclCryptoError
from nacl.signing import VerifyKey

from edgelink.errors import CryptoError, RecordReplayed

SCHEME = "x25519-ed25519-xchacha20poly1305"
VERSION = 1
MAGIC = b"ELE2"
CONTEXT = b"edgelink-e2e-v1 handshake"
HS = struct.Struct("<4sBB32s32sQ16s")  # magic, version, role, eph pk, identity pk, window, nonce
SIG_BYTES = 64
HS_BYTES = HS.size + SIG_BYTES
RECORD = struct.Struct("<BQ")  # flags, counter
RECORD_OVERHEAD = RECORD.size + 16  # + Poly1305 tag
AD = struct.Struct("<16sBBQQ")  # session id, direction, flags, counter, frame number
FLAG_REKEY = 1
CLIENT, SERVER = 0, 1
SESSION_ID_BYTES = 16
_REKEY_PERSON = b"edgelink-rekey-1"


def _wipe(buf: bytearray) -> None:
    if len(buf):
        lib.sodium_memzero(ffi.from_buffer(buf), len(buf))


def _ratchet(key: bytearray) -> bytearray:
    """The next key: BLAKE2b-256 keyed by the current one; the current one is wiped."""
    new = bytearray(32)
    lib.crypto_generichash_blake2b_salt_personal(
        ffi.from_buffer(new), 32, _REKEY_PERSON, len(_REKEY_PERSON),
        ffi.from_buffer(key), 32, ffi.NULL, _REKEY_PERSON)
    _wipe(key)
    return new


def _nonce(direction: int, counter: int) -> bytes:
    return bytes([direction]) + bytes(15) + counter.to_bytes(8, "little")


@dataclasses.dataclass(frozen=True)
class Params:
    """What this side wants: its receive window and its rekey policy for what it sends."""

    window_bytes: int
    rekey_bytes: int
    rekey_s: float


class Sealer:
    """One direction, sending side."""

    def __init__(self, key: bytearray, session_id: bytes, direction: int, params: Params,
                 clock=time.monotonic):
        self._key = key
        self._sid = session_id
        self._dir = direction
        self._params = params
        self._clock = clock
        self.counter = 0
        self._bytes = 0
        self._since = clock()
        self.rekeys = 0

    def seal(self, plaintext, frame_no: int, headroom: int = 0) -> bytearray:
        """One record body for ``plaintext`` (any buffer), as part of frame ``frame_no``.

        ``headroom`` bytes are left free in front of the body for the caller's own framing,
        so that a transport does not copy each sealed MiB once more to prepend a header."""
        if not self._key:
            raise CryptoError("sealer is closed")
        view = memoryview(plaintext).cast("B")
        n = view.nbytes
        flags = 0
        if self._bytes >= self._params.rekey_bytes or self._clock() - self._since >= self._params.rekey_s:
            self._key = _ratchet(self._key)
            self._bytes = 0
            self._since = self._clock()
            self.rekeys += 1
            flags |= FLAG_REKEY
        counter = self.counter
        if counter >= 2**64 - 1:
            raise CryptoError("record counter exhausted; start a new session")
        out = bytearray(headroom + RECORD.size + n + 16)
        RECORD.pack_into(out, headroom, flags, counter)
        ad = AD.pack(self._sid, self._dir, flags, counter, frame_no)
        clen = ffi.new("unsigned long long *")
        rc = lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
            ffi.from_buffer(memoryview(out)[headroom + RECORD.size:]), clen, ffi.from_buffer(view), n,
            ad, len(ad), ffi.NULL, _nonce(self._dir, counter), ffi.from_buffer(self._key))
        if rc != 0:  # pragma: no cover - libsodium does not fail here
            raise CryptoError("encryption failed")
        self.counter += 1
        self._bytes += n
        return out

    def close(self) -> None:
        _wipe(self._key)
        self._key = bytearray()


class Opener:
    """One direction, receiving side."""

    def __init__(self, key: bytearray, session_id: bytes, direction: int):
        self._key = key
        self._sid = session_id
        self._dir = direction
        self.counter = 0
        self.rekeys = 0

    @staticmethod
    def plaintext_len(body_len: int) -> int:
        if body_len < RECORD_OVERHEAD:
            raise CryptoError(f"record of {body_len} bytes is shorter than its overhead")
        return body_len - RECORD_OVERHEAD

    def check_counter(self, body) -> None:
        """Raise RecordReplayed/CryptoError if ``body`` is not the next record in sequence
        (cheap: for callers that must refuse a record before they can decrypt it)."""
        body = memoryview(body).cast("B")
        self.plaintext_len(body.nbytes)
        _flags, counter = RECORD.unpack_from(body, 0)
        if counter < self.counter:
            raise RecordReplayed(f"record {counter} was already received (next is {self.counter})")
        if counter > self.counter:
            raise CryptoError(f"record {counter} arrived, {self.counter} expected (dropped or reordered)")

    def open_into(self, body, frame_no: int, out) -> int:
        """Authenticate and decrypt one record body into ``out`` (a writable buffer of at least
        ``plaintext_len(len(body))`` bytes); returns the plaintext length."""
        if not self._key:
            raise CryptoError("opener is closed")
        body = memoryview(body).cast("B")
        n = self.plaintext_len(body.nbytes)
        flags, counter = RECORD.unpack_from(body, 0)
        if counter < self.counter:
            raise RecordReplayed(f"record {counter} was already received (next is {self.counter})")
        if counter > self.counter:
            raise CryptoError(f"record {counter} arrived, {self.counter} expected (dropped or reordered)")
        if flags & ~FLAG_REKEY:
            raise CryptoError(f"unknown record flags {flags:#x}")
        key = self._key
        if flags & FLAG_REKEY:
            key = bytearray(self._key)
            key = _ratchet(key)
        ad = AD.pack(self._sid, self._dir, flags, counter, frame_no)
        outv = memoryview(out).cast("B")
        if outv.nbytes < n:
            raise CryptoError("output buffer too small")
        mlen = ffi.new("unsigned long long *")
        rc = lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
            ffi.from_buffer(outv, require_writable=True), mlen, ffi.NULL,
            ffi.from_buffer(body[RECORD.size:]), n + 16, ad, len(ad),
            _nonce(self._dir, counter), ffi.from_buffer(key))
        if rc != 0:
            if key is not self._key:
                _wipe(key)
            raise CryptoError(f"record {counter} of frame {frame_no} does not authenticate "
                              "(tampered, or not from this session)")
        if key is not self._key:
            _wipe(self._key)
            self._key = key
            self.rekeys += 1
        self.counter += 1
        return n

    def close(self) -> None:
        _wipe(self._key)
        self._key = bytearray()


@dataclasses.dataclass
class Keys:
    """The outcome of a handshake: what this side seals with and opens with."""

    session_id: bytes
    sealer: Sealer
    opener: Opener
    peer_window: int

    def close(self) -> None:
        self.sealer.close()
        self.opener.close()


class Handshake:
    """One side of the key exchange.

    ``sign`` signs with the local identity key, ``identity_pk`` is its raw 32-byte Ed25519
    public key; ``local_id``/``remote_id`` are the peer ids (bytes) as the libp2p connection
    authenticated them, and ``remote_pk`` the Ed25519 key that ``remote_id`` encodes.
    """

    def __init__(self, role: int, *, sign, identity_pk: bytes, local_id: bytes, remote_id: bytes,
                 remote_pk: bytes, params: Params):
        if role not in (CLIENT, SERVER):
            raise ValueError("role is CLIENT or SERVER")
        self.role = role
        self._sign = sign
        self._identity_pk = bytes(identity_pk)
        self._local_id = bytes(local_id)
        self._remote_id = bytes(remote_id)
        self._remote_pk = bytes(remote_pk)
        self._params = params
        pk, sk = nb.crypto_kx_keypair()
        self._eph_pk = pk
        self._eph_sk = bytearray(sk)
        self._mine: bytes | None = None
        self._theirs: bytes | None = None
        self._their_eph: bytes | None = None
        self._their_window = 0

    def message(self) -> bytes:
        """Our handshake message (sent once)."""
        if self._mine is not None:
            raise CryptoError("handshake message already made")
        fields = HS.pack(MAGIC, VERSION, self.role, self._eph_pk, self._identity_pk,
                         self._params.window_bytes, os.urandom(16))
        sig = self._sign(CONTEXT + fields + self._local_id + self._remote_id)
        if len(sig) != SIG_BYTES:
            raise CryptoError("identity signature has the wrong length")
        self._mine = fields + sig
        return self._mine

    def receive(self, msg) -> None:
        """Verify the peer's handshake message; raises CryptoError if anything is off."""
        msg = bytes(msg)
        if self._theirs is not None:
            raise CryptoError("second handshake message")
        if len(msg) != HS_BYTES:
            raise CryptoError(f"handshake message of {len(msg)} bytes (expected {HS_BYTES})")
        magic, version, role, eph, ident, window, _nonce16 = HS.unpack_from(msg, 0)
        if magic != MAGIC:
            raise CryptoError("not an edgelink handshake message")
        if version != VERSION:
            raise CryptoError(f"end-to-end protocol version {version} (this side speaks {VERSION})")
        if role != 1 - self.role:
            raise CryptoError("both sides claim the same role")
        if ident != self._remote_pk:
            raise CryptoError("handshake signed by a key that is not the connected peer's identity")
        try:
            VerifyKey(ident).verify(CONTEXT + msg[:HS.size] + self._remote_id + self._local_id,
                                    msg[HS.size:])
        except (BadSignatureError, NaclCryptoError, ValueError) as exc:
            raise CryptoError(f"handshake signature does not verify for the connected peer: {exc}") from None
        if window < 1:
            raise CryptoError("peer announced an empty receive window")
        self._theirs = msg
        self._their_eph = eph
        self._their_window = window

    def finish(self) -> Keys:
        """Derive the session keys (needs both messages); wipes the ephemeral secret key."""
        if self._mine is None or self._theirs is None:
            raise CryptoError("handshake is not complete")
        try:
            if self.role == CLIENT:
                rx, tx = nb.crypto_kx_client_session_keys(self._eph_pk, bytes(self._eph_sk), self._their_eph)
                transcript = self._mine + self._theirs
            else:
                rx, tx = nb.crypto_kx_server_session_keys(self._eph_pk, bytes(self._eph_sk), self._their_eph)
                transcript = self._theirs + self._mine
        except (NaclCryptoError, ValueError) as exc:
            raise CryptoError(f"key exchange failed: {exc}") from None
        finally:
            _wipe(self._eph_sk)
        sid = nb.crypto_generichash_blake2b_salt_personal(
            transcript, digest_size=SESSION_ID_BYTES, person=b"edgelink-e2e-sid")
        send_dir = self.role
        return Keys(sid, Sealer(bytearray(tx), sid, send_dir, self._params),
                    Opener(bytearray(rx), sid, 1 - send_dir), self._their_window)

    def encryption_params(self, keys: Keys) -> dict:
        """What the protocol HELLO carries as ``encryption`` on this path (equal on both sides)."""
        return {"scheme": SCHEME, "session": keys.session_id.hex()}
