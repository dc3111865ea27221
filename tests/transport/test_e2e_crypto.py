"""The end-to-end crypto state machine on its own (no sockets): handshake, seal/open, and every
way a record can be wrong."""

from __future__ import annotations

import pytest
from nacl.signing import SigningKey

from edgelink.errors import CryptoError, RecordReplayed
from edgelink.transport import e2e

PARAMS = e2e.Params(window_bytes=1 << 20, rekey_bytes=1 << 30, rekey_s=1e9)


class Ident:
    def __init__(self, tag: bytes):
        self.sk = SigningKey.generate()
        self.pk = bytes(self.sk.verify_key)
        self.id = b"peer-" + tag

    def sign(self, data: bytes) -> bytes:
        return self.sk.sign(data).signature


def _handshakes(a: Ident, b: Ident, params=PARAMS, b_thinks_a=None):
    """Both sides' handshakes and keys; ``b_thinks_a``: who b believes it is connected to."""
    seen = b_thinks_a or a
    ha = e2e.Handshake(e2e.CLIENT, sign=a.sign, identity_pk=a.pk, local_id=a.id, remote_id=b.id,
                       remote_pk=b.pk, params=params)
    hb = e2e.Handshake(e2e.SERVER, sign=b.sign, identity_pk=b.pk, local_id=b.id, remote_id=seen.id,
                       remote_pk=seen.pk, params=params)
    hb.receive(ha.message())
    ha.receive(hb.message())
    return ha, hb, ha.finish(), hb.finish()


def _pair(a: Ident, b: Ident, params=PARAMS, b_thinks_a=None):
    """Run a full handshake; ``b_thinks_a`` is the identity b believes it is connected to."""
    return _handshakes(a, b, params, b_thinks_a)[2:]


def _open(keys, body, frame=0):
    out = bytearray(e2e.Opener.plaintext_len(body))
    keys.opener.open_into(body, frame, out)
    return bytes(out)


def test_round_trip_both_directions_and_same_session_id():
    ka, kb = _pair(Ident(b"a"), Ident(b"b"))
    assert ka.session_id == kb.session_id and len(ka.session_id) == 16
    for i in range(5):
        msg = bytes([i]) * (1000 + i)
        assert _open(kb, ka.sealer.seal(msg, 3), 3) == msg
        assert _open(ka, kb.sealer.seal(msg[::-1], i), i) == msg[::-1]
    assert ka.peer_window == PARAMS.window_bytes


def test_headroom_leaves_the_front_free_and_seals_the_same_record():
    ka, kb = _pair(Ident(b"a"), Ident(b"b"))
    ka2, kb2 = _pair(Ident(b"c"), Ident(b"d"))
    msg = bytes(range(256)) * 40
    plain = ka.sealer.seal(msg, 1)
    roomy = ka.sealer.seal(msg, 2, headroom=5)
    assert len(roomy) == len(plain) + 5 and roomy[:5] == bytes(5)
    roomy[:5] = b"HDR!!"  # the caller writes its header there; the record is untouched
    assert _open(kb, plain, 1) == msg
    assert _open(kb, memoryview(roomy)[5:], 2) == msg
    with pytest.raises(CryptoError):  # the headroom is not part of the record
        _open(kb2, ka2.sealer.seal(msg, 0, headroom=5), 0)


def test_tampered_ciphertext_header_or_frame_number_is_refused():
    ka, kb = _pair(Ident(b"a"), Ident(b"b"))
    body = bytearray(ka.sealer.seal(b"x" * 100, 0))
    body[-20] ^= 1
    with pytest.raises(CryptoError, match="authenticate"):
        _open(kb, bytes(body))
    ka, kb = _pair(Ident(b"a"), Ident(b"b"))
    body = ka.sealer.seal(b"x" * 100, 7)
    with pytest.raises(CryptoError):
        _open(kb, body, frame=8)  # bound to its frame number


def test_replay_and_reorder_are_refused():
    ka, kb = _pair(Ident(b"a"), Ident(b"b"))
    r0, r1, r2 = (ka.sealer.seal(bytes([i]) * 10, 0) for i in range(3))
    _open(kb, r0)
    with pytest.raises(RecordReplayed):
        _open(kb, r0)
    with pytest.raises(CryptoError, match="reordered"):
        _open(kb, r2)
    assert _open(kb, r1) == bytes([1]) * 10


def test_record_from_another_session_is_refused():
    a, b = Ident(b"a"), Ident(b"b")
    ka, _ = _pair(a, b)
    _, kb2 = _pair(a, b)
    with pytest.raises(CryptoError):
        _open(kb2, ka.sealer.seal(b"hello", 0))


def test_wrong_signer_is_refused():
    a, b, mallory = Ident(b"a"), Ident(b"b"), Ident(b"m")
    # b is connected (per libp2p) to a, but the handshake comes signed by mallory's key
    hm = e2e.Handshake(e2e.CLIENT, sign=mallory.sign, identity_pk=mallory.pk, local_id=a.id,
                       remote_id=b.id, remote_pk=b.pk, params=PARAMS)
    hb = e2e.Handshake(e2e.SERVER, sign=b.sign, identity_pk=b.pk, local_id=b.id, remote_id=a.id,
                       remote_pk=a.pk, params=PARAMS)
    with pytest.raises(CryptoError, match="not the connected peer"):
        hb.receive(hm.message())
    # a forged signature under the right public key
    ha = e2e.Handshake(e2e.CLIENT, sign=mallory.sign, identity_pk=a.pk, local_id=a.id,
                       remote_id=b.id, remote_pk=b.pk, params=PARAMS)
    hb = e2e.Handshake(e2e.SERVER, sign=b.sign, identity_pk=b.pk, local_id=b.id, remote_id=a.id,
                       remote_pk=a.pk, params=PARAMS)
    with pytest.raises(CryptoError, match="signature"):
        hb.receive(ha.message())


def test_signature_is_bound_to_the_recipient():
    a, b, c = Ident(b"a"), Ident(b"b"), Ident(b"c")
    # a's handshake meant for b, relayed to c: c refuses it
    ha = e2e.Handshake(e2e.CLIENT, sign=a.sign, identity_pk=a.pk, local_id=a.id, remote_id=b.id,
                       remote_pk=b.pk, params=PARAMS)
    hc = e2e.Handshake(e2e.SERVER, sign=c.sign, identity_pk=c.pk, local_id=c.id, remote_id=a.id,
                       remote_pk=a.pk, params=PARAMS)
    with pytest.raises(CryptoError, match="signature"):
        hc.receive(ha.message())


def test_rekey_by_bytes_and_by_time():
    params = e2e.Params(window_bytes=1 << 20, rekey_bytes=1000, rekey_s=1e9)
    ka, kb = _pair(Ident(b"a"), Ident(b"b"), params)
    for i in range(10):
        assert _open(kb, ka.sealer.seal(bytes([i]) * 600, i), i) == bytes([i]) * 600
    assert ka.sealer.rekeys == kb.opener.rekeys == 4
    now = [0.0]
    params = e2e.Params(window_bytes=1 << 20, rekey_bytes=1 << 40, rekey_s=5)
    ka, kb = _pair(Ident(b"a"), Ident(b"b"), params)
    ka.sealer._clock = lambda: now[0]
    ka.sealer._since = 0.0
    _open(kb, ka.sealer.seal(b"a", 0))
    now[0] = 6.0
    _open(kb, ka.sealer.seal(b"b", 0))
    assert ka.sealer.rekeys == kb.opener.rekeys == 1
    # a record sealed before the rekey no longer opens under the new key
    ka2, kb2 = _pair(Ident(b"a"), Ident(b"b"), e2e.Params(1 << 20, 10, 1e9))
    first = ka2.sealer.seal(b"y" * 20, 0)
    _open(kb2, first)
    second = bytearray(ka2.sealer.seal(b"z" * 20, 0))
    second[0] = 0  # strip the REKEY flag: the receiver would use the old key
    with pytest.raises(CryptoError):
        _open(kb2, bytes(second))


def test_close_wipes_keys():
    ka, kb = _pair(Ident(b"a"), Ident(b"b"))
    key = ka.sealer._key
    ka.close()
    assert key == bytearray(32) and not ka.sealer._key
    with pytest.raises(CryptoError):
        ka.sealer.seal(b"x", 0)


def test_keys_are_bound_to_the_transcript_and_each_side_confirms_it():
    """A confirmation signs the hash of both handshake messages (both ephemeral keys): it
    verifies only for the session it was made in, and only from the connected peer."""
    a, b = Ident(b"a"), Ident(b"b")
    ha, hb, ka, kb = _handshakes(a, b)
    assert ka.transcript_hash == kb.transcript_hash
    hb.check_confirmation(kb, ha.confirmation(ka))
    ha.check_confirmation(ka, hb.confirmation(kb))
    assert ka.confirmed and kb.confirmed
    assert ka.sealer.peer_rekey_pk == kb.opener.rekey_pk
    # the same two identities, another session: its confirmation does not carry over
    ha2, hb2, ka2, kb2 = _handshakes(a, b)
    with pytest.raises(CryptoError, match="key confirmation does not verify"):
        hb.check_confirmation(kb, ha2.confirmation(ka2))
    # the server's own confirmation sent back as the client's (a reflection) fails too
    with pytest.raises(CryptoError, match="key confirmation does not verify"):
        ha2.check_confirmation(ka2, ha2.confirmation(ka2))
    with pytest.raises(CryptoError, match="wrong size"):
        hb.check_confirmation(kb, b"short")
    # data and control records use different keys: one never opens as the other
    body = ka.sealer.seal(b"12345678", 3)
    with pytest.raises(CryptoError):
        kb.control_opener.open_into(body, 3, bytearray(8))


def test_a_fresh_dh_rekey_leaves_a_stolen_key_useless():
    """Past rekey_bytes, the sender mixes a fresh X25519 secret (against the key the receiver
    announced) into its key. Someone who copied the old key can follow a hash ratchet, not this."""
    a, b = Ident(b"a"), Ident(b"b")
    params = e2e.Params(window_bytes=1 << 20, rekey_bytes=1000, rekey_s=1e9)
    ha, hb, ka, kb = _handshakes(a, b, params)
    ha.check_confirmation(ka, hb.confirmation(kb))
    first_pk = kb.opener.rekey_pk
    stolen = bytes(ka.sealer._key)
    assert _open(kb, ka.sealer.seal(b"x" * 1000, 0)) == b"x" * 1000
    dh = ka.sealer.seal(b"secret after the rekey", 1)
    assert e2e.Opener.flags_of(dh) & e2e.FLAG_DH and ka.sealer.dh_rekeys == 1
    thief = e2e.Opener(bytearray(stolen), ka.session_id, e2e.CLIENT)
    thief.counter = 1
    with pytest.raises(CryptoError):
        thief.open_into(dh, 1, bytearray(64))
    assert _open(kb, dh, 1) == b"secret after the rekey"
    # the announced key was used once; a new one is announced, until then the hash ratchets
    new_pk = kb.opener.take_announcement()
    assert new_pk and new_pk != first_pk and kb.opener.take_announcement() is None
    later = [(2, b"y" * 1000), (3, b"z")]
    bodies = [ka.sealer.seal(m, i) for i, m in later]
    assert e2e.Opener.flags_of(bodies[1]) & e2e.FLAG_REKEY  # no key announced yet: the hash
    ka.sealer.peer_rekey_pk = new_pk  # what the channel does when the announcement arrives
    later += [(4, b"w" * 1000), (5, b"v")]
    bodies += [ka.sealer.seal(m, i) for i, m in later[2:]]
    assert e2e.Opener.flags_of(bodies[3]) & e2e.FLAG_DH and ka.sealer.dh_rekeys == 2
    for (i, want), body in zip(later, bodies, strict=True):
        assert _open(kb, body, i) == want
    assert kb.opener.dh_rekeys == 2 and kb.opener.rekeys == 3


def test_an_earlier_version_is_refused_with_a_reason():
    a, b = Ident(b"a"), Ident(b"b")
    fields = e2e.HS.pack(e2e.MAGIC, 1, e2e.CLIENT, bytes(32), a.pk, 1 << 20, bytes(16))
    old = fields + a.sign(b"edgelink-e2e-v1 handshake" + fields + a.id + b.id)
    hb = e2e.Handshake(e2e.SERVER, sign=b.sign, identity_pk=b.pk, local_id=b.id, remote_id=a.id,
                       remote_pk=a.pk, params=PARAMS)
    with pytest.raises(CryptoError, match="version 1 and this side speaks 2"):
        hb.receive(old)
