"""Remote prefill (issue 27, docs/http.md): the HTTP engine hands a long uncached prompt to
``http.prefill_peer`` when the plan says that is sooner, imports the verified cells, decodes
here, and says so in the usage; the continuation is the one a prefill here gives; a slow peer
is not used; a peer that is gone costs a fallback, not the request."""

from __future__ import annotations

import os
import uuid

import pytest

from edgelink.roles.launcher import start_receiver, stop_receiver
from edgelink.server.engine import Engine, Outcome, Params

TEXT = ("The keeper of the northern light kept a logbook of every ship that passed, the weather at "
        "dawn and dusk, and the state of the lamp's wick, which he trimmed each evening. ") * 12


def _ask(eng: Engine, tokens: list[int]) -> tuple[str, Outcome]:
    items = list(eng.run(tokens, Params(max_tokens=24)))
    return "".join(i for i in items if isinstance(i, str)), items[-1]


@pytest.fixture
def peer(smollm2_path, cfg, request):
    """A `serve` receiver announcing the prefill speed the test asks for (``wire.prefill_tps``)."""
    name = f"t-rp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    proc = start_receiver(str(smollm2_path), cfg, name, extra_env={"EDGELINK_WIRE_PREFILL_TPS": str(request.param)})
    yield f"shm:{name}", proc
    if proc.poll() is None:
        assert stop_receiver(proc) in (0, -15), proc.stderr_tail()


def _engine(smollm2_path, cfg, tmp_path, peer_addr: str) -> Engine:
    return Engine(str(smollm2_path), cfg.replace(cache_dir=str(tmp_path / "kv"), cache_ram_bytes=0,
                                                 cache_disk_bytes=0, http_parallel=1, http_prefill_peer=peer_addr,
                                                 http_prefill_min_tokens=64))


@pytest.fixture(scope="module")
def reference(smollm2_path, cfg, tmp_path_factory):
    eng = Engine(str(smollm2_path), cfg.replace(cache_dir=str(tmp_path_factory.mktemp("ref") / "kv"),
                                                cache_ram_bytes=0, cache_disk_bytes=0, http_parallel=1))
    try:
        tokens = eng.text_tokens(TEXT)
        return tokens, _ask(eng, tokens)[0]
    finally:
        eng.close()


@pytest.mark.parametrize("peer", [1_000_000], indirect=True)
def test_a_faster_peer_prefills_and_the_reply_is_the_local_one(peer, reference, smollm2_path, cfg, tmp_path):
    addr, proc = peer
    tokens, want = reference
    assert len(tokens) > 256
    eng = _engine(smollm2_path, cfg, tmp_path, addr)
    try:
        text, out = _ask(eng, tokens)
        assert out.prefilled_by == addr and text == want
        st = out.remote_prefill  # the steps add up to no more than the request's prefill
        assert st is not None and min(st.link_s, st.head_s, st.pull_s) > 0 and st.peer_wait_s >= 0
        assert st.link_s + st.head_s + st.peer_wait_s + st.pull_s <= out.prefill_s and st.delta_bytes > 1 << 20
        # the peer is gone: the next request is prefilled here, and still exact
        assert stop_receiver(proc) in (0, -15)
        text, out = _ask(eng, tokens)
        assert out.prefilled_by == "here" and out.remote_prefill is None and text == want
    finally:
        eng.close()


@pytest.mark.parametrize("peer", [1], indirect=True)
def test_a_slower_peer_is_not_used(peer, reference, smollm2_path, cfg, tmp_path):
    addr, _ = peer
    tokens, want = reference
    eng = _engine(smollm2_path, cfg, tmp_path, addr)
    try:
        text, out = _ask(eng, tokens)
        assert out.prefilled_by == "here" and text == want
    finally:
        eng.close()
