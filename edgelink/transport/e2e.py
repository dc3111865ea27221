"""End-to-end encryption of frames between two libp2p peers: a sans-IO state machine.

It never touches a socket. The transport feeds it handshake messages and record bodies and
moves what it returns. Version 2 (a peer speaking another version is refused, saying so).

**Handshake.** Each side makes a fresh X25519 key pair (libsodium ``crypto_kx``) for this one
session and sends ``HS = magic | version | role | ephemeral pk | identity pk | window | nonce |
signature`` (the client first, the server once it verified the client's). The signature is
Ed25519, made with the side's persistent libp2p identity key, over a context string, the fields
before it, the signer's peer id and the peer id of the side it is meant for. The receiver checks
that the identity key is exactly the one the libp2p connection authenticated (the stream's
remote peer id) and that the signature names it as the recipient, so a signed ephemeral key
cannot be replayed to another peer or relayed by a third party. Session keys come from
``crypto_kx_{client,server}_session_keys`` (one per direction), each then keyed through
BLAKE2b with the hash of the whole transcript (both messages), so a key belongs to exactly this
exchange; both ephemeral secret keys are wiped at once (forward secrecy).

**Key confirmation.** Each side's first sealed record is an Ed25519 signature over the
transcript hash (so over *both* ephemeral keys, which a signature inside one HS message cannot
cover) and over the public key the peer's first fresh-DH rekey must use. Nothing a peer sends
after its HS (the client's HELLO and token included) is used before its confirmation verified.

**Records.** A sealed record body is ``flags u8 | counter u64 | [DH public key] | ciphertext``:
XChaCha20-Poly1305 (IETF AEAD), nonce = the direction and the counter, associated data =
``session id | direction | kind | flags | counter | frame number [| DH public key]``. Frames
and the special records (confirmation, rekey announcement, end of stream) share one key and
counter per direction; flow-control records (credit, stop) have their own (``KIND_CONTROL``),
since the transport seals and opens them on its own schedule; nothing crosses in the clear but
the record's type and length, and a record relabelled to another type does not open. Each
direction counts its records from 0; a counter lower than the next expected one is a replay
(``RecordReplayed``), a higher one a dropped or reordered record, and anything that does not
authenticate is a ``CryptoError``. A sender's last record is an end record (``FLAG_END``), so
a cut stream is told from a closed one.

**Rekeying.** After ``rekey_bytes`` bytes or ``rekey_s`` seconds the sender renews its key:
with a fresh X25519 exchange against the public key the receiver announced for that purpose
(``FLAG_DH``: the sender's new public key rides in the record header; the new key is BLAKE2b
of the old key and the new shared secret, so it is secret if either is: a key stolen before the
rekey does not open what follows). Each announced key is used once; the receiver then makes a
new pair and announces it with its next frame (``FLAG_ANNOUNCE``). While no fresh key has been
announced (a peer that only receives), the sender ratchets the hash instead (``FLAG_REKEY``:
BLAKE2b of the old key). Old keys are overwritten.

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
VERSION = 2
MAGIC = b"ELE2"
CONTEXT = b"edgelink-e2e-v2 handshake"
CONFIRM_CONTEXT = b"edgelink-e2e-v2 confirm"
HS = struct.Struct("<4sBB32s32sQ16s")  # magic, version, role, eph pk, identity pk, window, nonce
SIG_BYTES = 64
HS_BYTES = HS.size + SIG_BYTES
RECORD = struct.Struct("<BQ")  # flags, counter (then the DH key when FLAG_DH)
TAG_BYTES = 16
RECORD_OVERHEAD = RECORD.size + 32 + TAG_BYTES  # the most a record adds to its plaintext
AD = struct.Struct("<16sBBBQQ")  # session id, direction, kind, flags, counter, frame number
FLAG_REKEY = 1  # the key was ratcheted (hash of the old one) before this record
FLAG_DH = 2  # the key was renewed with a fresh X25519 exchange; its public key follows
FLAG_CONFIRM = 4  # key confirmation: a signature over the whole handshake
FLAG_ANNOUNCE = 8  # a new public key for the peer's next fresh-DH rekey of this direction
FLAG_END = 16  # the sender's last record: the stream ends here, complete
_KNOWN_FLAGS = FLAG_REKEY | FLAG_DH | FLAG_CONFIRM | FLAG_ANNOUNCE | FLAG_END
KIND_DATA, KIND_CONTROL = 0, 1  # what a key seals: frames, or flow-control records
# frame numbers the special records are bound to (never a real frame's)
CONFIRM_FRAME, ANNOUNCE_FRAME, END_FRAME = 2**64 - 1, 2**64 - 2, 2**64 - 3
CONTROL_PLAIN = 8
CONTROL_BYTES = RECORD.size + CONTROL_PLAIN + TAG_BYTES  # a sealed credit or stop record
CLIENT, SERVER = 0, 1
SESSION_ID_BYTES = 16
_REKEY_PERSON = b"edgelink-rekey-1"
_DH_PERSON = b"edgelink-rk-dh-2"


def _wipe(buf: bytearray) -> None:
    if len(buf):
        lib.sodium_memzero(ffi.from_buffer(buf), len(buf))


def _kdf(key, data: bytes, person: bytes) -> bytearray:
    """BLAKE2b-256 keyed by ``key`` over ``data`` (a personalised domain per use)."""
    out = bytearray(32)
    lib.crypto_generichash_blake2b_salt_personal(
        ffi.from_buffer(out), 32, data, len(data), ffi.from_buffer(key), len(key), ffi.NULL, person)
    return out


def _ratchet(key: bytearray) -> bytearray:
    """The next key: BLAKE2b-256 keyed by the current one; the current one is wiped."""
    new = _kdf(key, _REKEY_PERSON, _REKEY_PERSON)
    _wipe(key)
    return new


def _dh_key(key: bytearray, shared: bytes, eph_pk: bytes, rk_pk: bytes) -> bytearray:
    """The key after a fresh-DH rekey: the old key and the new shared secret together, so
    the new key is secret if either is (post-compromise security, as in WireGuard)."""
    return _kdf(key, shared + eph_pk + rk_pk, _DH_PERSON)


def _nonce(direction: int, counter: int) -> bytes:
    return bytes([direction]) + bytes(15) + counter.to_bytes(8, "little")


def header_len(flags: int) -> int:
    return RECORD.size + (32 if flags & FLAG_DH else 0)


@dataclasses.dataclass(frozen=True)
class Params:
    """What this side wants: its receive window and its rekey policy for what it sends."""

    window_bytes: int
    rekey_bytes: int
    rekey_s: float


class Sealer:
    """One direction, sending side.

    Past ``rekey_bytes`` or ``rekey_s`` it renews its key: with a fresh X25519 exchange
    against the public key the peer announced for it (``peer_rekey_pk``, used once), or,
    while the peer has announced none since the last one, by ratcheting the hash."""

    def __init__(self, key: bytearray, session_id: bytes, direction: int, params: Params,
                 clock=time.monotonic, kind: int = KIND_DATA):
        self._key = key
        self._sid = session_id
        self._dir = direction
        self._kind = kind
        self._params = params
        self._clock = clock
        self.counter = 0
        self._bytes = 0
        self._since = clock()
        self.rekeys = 0
        self.dh_rekeys = 0
        self.peer_rekey_pk: bytes | None = None

    def seal(self, plaintext, frame_no: int, headroom: int = 0, flags: int = 0) -> bytearray:
        """One record body for ``plaintext`` (any buffer), as part of frame ``frame_no``.

        ``headroom`` bytes are left free in front of the body for the caller's own framing,
        so that a transport does not copy each sealed MiB once more to prepend a header.
        ``flags``: FLAG_CONFIRM, FLAG_ANNOUNCE or FLAG_END for those records."""
        if not self._key:
            raise CryptoError("sealer is closed")
        view = memoryview(plaintext).cast("B")
        n = view.nbytes
        eph_pk = b""
        if self._bytes >= self._params.rekey_bytes or self._clock() - self._since >= self._params.rekey_s:
            rk_pk, self.peer_rekey_pk = self.peer_rekey_pk, None
            shared = None
            if rk_pk is not None:
                eph_pk, eph_sk = nb.crypto_kx_keypair()
                try:
                    shared = nb.crypto_scalarmult(eph_sk, rk_pk)
                except (NaclCryptoError, ValueError, RuntimeError):
                    eph_pk = b""  # a key the peer announced that yields no secret: ratchet instead
            if shared is not None:
                new = _dh_key(self._key, shared, eph_pk, rk_pk)
                _wipe(self._key)
                self._key = new
                flags |= FLAG_DH
                self.dh_rekeys += 1
            else:
                self._key = _ratchet(self._key)
                flags |= FLAG_REKEY
            self._bytes = 0
            self._since = self._clock()
            self.rekeys += 1
        counter = self.counter
        if counter >= 2**64 - 1:
            raise CryptoError("record counter exhausted; start a new session")
        head = header_len(flags)
        out = bytearray(headroom + head + n + TAG_BYTES)
        RECORD.pack_into(out, headroom, flags, counter)
        out[headroom + RECORD.size:headroom + head] = eph_pk
        ad = AD.pack(self._sid, self._dir, self._kind, flags, counter, frame_no) + bytes(eph_pk)
        clen = ffi.new("unsigned long long *")
        rc = lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
            ffi.from_buffer(memoryview(out)[headroom + head:]), clen, ffi.from_buffer(view), n,
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
    """One direction, receiving side. Holds the secret half of the key this direction's next
    fresh-DH rekey uses; after each use it makes a new pair, whose public half the channel
    announces to the peer (``take_announcement``)."""

    def __init__(self, key: bytearray, session_id: bytes, direction: int, kind: int = KIND_DATA):
        self._key = key
        self._sid = session_id
        self._dir = direction
        self._kind = kind
        self.counter = 0
        self.rekeys = 0
        self.dh_rekeys = 0
        self._rk_pk, sk = nb.crypto_kx_keypair()
        self._rk_sk = bytearray(sk)
        self._announce: bytes | None = None

    @property
    def rekey_pk(self) -> bytes:
        """The public key the peer's next fresh-DH rekey of this direction must use."""
        return self._rk_pk

    def take_announcement(self) -> bytes | None:
        """A new ``rekey_pk`` the peer has not been told yet (once)."""
        out, self._announce = self._announce, None
        return out

    @staticmethod
    def flags_of(body) -> int:
        body = memoryview(body).cast("B")
        if body.nbytes < RECORD.size + TAG_BYTES:
            raise CryptoError(f"record of {body.nbytes} bytes is shorter than its overhead")
        flags = body[0]
        if flags & ~_KNOWN_FLAGS:
            raise CryptoError(f"unknown record flags {flags:#x}")
        return flags

    @staticmethod
    def plaintext_len(body) -> int:
        """The plaintext length of a record body (its header says how long the header is)."""
        body = memoryview(body).cast("B")
        n = body.nbytes - header_len(Opener.flags_of(body)) - TAG_BYTES
        if n < 0:
            raise CryptoError(f"record of {body.nbytes} bytes is shorter than its overhead")
        return n

    def check_counter(self, body) -> None:
        """Raise RecordReplayed/CryptoError if ``body`` is not the next record in sequence
        (cheap: for callers that must refuse a record before they can decrypt it)."""
        body = memoryview(body).cast("B")
        self.plaintext_len(body)
        _flags, counter = RECORD.unpack_from(body, 0)
        if counter < self.counter:
            raise RecordReplayed(f"record {counter} was already received (next is {self.counter})")
        if counter > self.counter:
            raise CryptoError(f"record {counter} arrived, {self.counter} expected (dropped or reordered)")

    def open_into(self, body, frame_no: int, out) -> int:
        """Authenticate and decrypt one record body into ``out`` (a writable buffer of at least
        ``plaintext_len(body)`` bytes); returns the plaintext length."""
        if not self._key:
            raise CryptoError("opener is closed")
        body = memoryview(body).cast("B")
        n = self.plaintext_len(body)
        flags, counter = RECORD.unpack_from(body, 0)
        if counter < self.counter:
            raise RecordReplayed(f"record {counter} was already received (next is {self.counter})")
        if counter > self.counter:
            raise CryptoError(f"record {counter} arrived, {self.counter} expected (dropped or reordered)")
        if flags & FLAG_REKEY and flags & FLAG_DH:
            raise CryptoError("a record cannot be rekeyed both ways")
        head = header_len(flags)
        eph_pk = bytes(body[RECORD.size:head])
        key = self._key
        if flags & FLAG_REKEY:
            key = _ratchet(bytearray(self._key))
        elif flags & FLAG_DH:
            if not self._rk_sk:
                raise CryptoError("a fresh-DH rekey with no announced key to answer it")
            try:
                shared = nb.crypto_scalarmult(bytes(self._rk_sk), eph_pk)
            except (NaclCryptoError, ValueError, RuntimeError) as exc:
                raise CryptoError(f"fresh-DH rekey failed: {exc}") from None
            key = _dh_key(self._key, shared, eph_pk, self._rk_pk)
        ad = AD.pack(self._sid, self._dir, self._kind, flags, counter, frame_no) + eph_pk
        outv = memoryview(out).cast("B")
        if outv.nbytes < n:
            raise CryptoError("output buffer too small")
        mlen = ffi.new("unsigned long long *")
        rc = lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
            ffi.from_buffer(outv, require_writable=True), mlen, ffi.NULL,
            ffi.from_buffer(body[head:]), n + TAG_BYTES, ad, len(ad),
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
            if flags & FLAG_DH:
                self.dh_rekeys += 1
                _wipe(self._rk_sk)
                self._rk_pk, sk = nb.crypto_kx_keypair()
                self._rk_sk = bytearray(sk)
                self._announce = self._rk_pk
        self.counter += 1
        return n

    def close(self) -> None:
        _wipe(self._key)
        _wipe(self._rk_sk)
        self._key = bytearray()
        self._rk_sk = bytearray()


@dataclasses.dataclass
class Keys:
    """The outcome of a handshake: what this side seals with and opens with, frames
    (``sealer``/``opener``) and flow-control records (``control_*``: their own keys and
    counters, since they are sealed and opened on the transport's own schedule)."""

    session_id: bytes
    sealer: Sealer
    opener: Opener
    control_sealer: Sealer
    control_opener: Opener
    peer_window: int
    transcript_hash: bytes
    confirmed: bool = False

    def close(self) -> None:
        for part in (self.sealer, self.opener, self.control_sealer, self.control_opener):
            part.close()


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
            raise CryptoError(f"the peer speaks end-to-end protocol version {version} and this side "
                              f"speaks {VERSION}: run the same edgelink release on both ends "
                              "(earlier versions are refused: their keys are not bound to the transcript)")
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
        """Derive the session keys (needs both messages); wipes the ephemeral secret key.

        The X25519 session keys are not used as they come: each is mixed with a hash of the
        whole handshake (both messages, so both ephemeral keys, identities and nonces), so a
        key belongs to exactly this transcript."""
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
        th = nb.crypto_generichash_blake2b_salt_personal(transcript, digest_size=32, person=b"edgelink-e2e-th2")
        tx, rx = bytearray(tx), bytearray(rx)
        try:
            send_dir = self.role
            recv_dir = 1 - send_dir
            return Keys(sid,
                        Sealer(_kdf(tx, th, b"edgelink-data-tx"), sid, send_dir, self._params),
                        Opener(_kdf(rx, th, b"edgelink-data-tx"), sid, recv_dir),
                        Sealer(_kdf(tx, th, b"edgelink-ctrl-tx"), sid, send_dir, _NO_REKEY, kind=KIND_CONTROL),
                        Opener(_kdf(rx, th, b"edgelink-ctrl-tx"), sid, recv_dir, kind=KIND_CONTROL),
                        self._their_window, th)
        finally:
            _wipe(tx)
            _wipe(rx)

    def confirmation(self, keys: Keys) -> bytes:
        """What this side's first sealed record carries: a signature, with its identity key,
        over the transcript hash (so over both ephemeral keys) and the public key the peer's
        first fresh-DH rekey must use; then that key."""
        rk = keys.opener.rekey_pk
        sig = self._sign(CONFIRM_CONTEXT + bytes([self.role]) + keys.transcript_hash + rk)
        if len(sig) != SIG_BYTES:
            raise CryptoError("identity signature has the wrong length")
        return sig + rk

    def check_confirmation(self, keys: Keys, plaintext) -> None:
        """Verify the peer's confirmation; only then may anything it sends be used."""
        plaintext = bytes(plaintext)
        if len(plaintext) != SIG_BYTES + 32:
            raise CryptoError("key confirmation of the wrong size")
        sig, rk = plaintext[:SIG_BYTES], plaintext[SIG_BYTES:]
        try:
            VerifyKey(self._remote_pk).verify(
                CONFIRM_CONTEXT + bytes([1 - self.role]) + keys.transcript_hash + rk, sig)
        except (BadSignatureError, NaclCryptoError, ValueError) as exc:
            raise CryptoError(f"key confirmation does not verify (another transcript, or not the "
                              f"connected peer): {exc}") from None
        keys.sealer.peer_rekey_pk = rk
        keys.confirmed = True

    def encryption_params(self, keys: Keys) -> dict:
        """What the protocol HELLO carries as ``encryption`` on this path (equal on both sides)."""
        return {"scheme": SCHEME, "version": VERSION, "session": keys.session_id.hex()}


_NO_REKEY = Params(window_bytes=0, rekey_bytes=2**63, rekey_s=float("inf"))
