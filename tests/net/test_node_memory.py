"""A node says what its contexts take, and holds one full-context KV cache per client that
exists, not per client it could serve: on the Llama-3-8B shape twin with a 2,048-token context
(268 MB of KV per context), two slots configured, the second context appears only when a second
client is served at the same time, and a third client is refused busy."""

from __future__ import annotations

import contextlib

import pytest

from edgelink.api import connect
from edgelink.bench.rss import rss_bytes
from edgelink.errors import EdgelinkError, PeerRejected
from edgelink.models.twins import TWINS, twin_path
from edgelink.roles.launcher import start_node, stop_receiver
from edgelink.roles.sender import Sender
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.signature import model_signature
from edgelink.runtime.sizing import fit_limits


def test_node_creates_contexts_as_clients_arrive(cfg, tmp_path):
    c = cfg.replace(paths_cache_dir=tmp_path / "cache", runtime_n_ctx=2048, node_max_clients=2,
                    p2p_identity_key=tmp_path / "client.key")
    path = str(twin_path("llama-3-8b", c))
    with LlamaRuntime(path, c) as rt:
        sig = model_signature(rt, c)
        sender_cfg = fit_limits(c, rt)
    proc = start_node(path, c, extra_env={"EDGELINK_P2P_IDENTITY_KEY": str(tmp_path / "node.key")},
                      extra_args=("-v",))  # libp2p's own log lines too, for the flake below
    senders = []
    try:
        ready = proc.ready
        per = 2048 * TWINS["llama-3-8b"].kv_bytes_per_token
        assert ready["kv_bytes_per_context"] == per and ready["max_clients"] == 2
        assert ready["contexts"] == 1 and ready["kv_bytes_at_max_clients"] == 2 * per
        base = rss_bytes(proc.pid)
        assert base < 100e6 + 1.5 * per  # model and Python, one context: not two
        for _ in range(2):  # two clients at once: the second gets a new context
            s = Sender(connect(ready["addrs"][0], sender_cfg), sender_cfg, sig)
            s.handshake()
            senders.append(s)
            assert s.request("digest").context_tokens == 0
        assert rss_bytes(proc.pid) - base > 0.9 * per
        third = Sender(connect(ready["addrs"][0], sender_cfg), sender_cfg, sig)
        with pytest.raises(PeerRejected) as err:
            third.handshake()
        assert err.value.reason == "busy" and "node.max_clients" in err.value.detail
        third.ch.close()
        try:  # the refusal of a third session cuts neither of the two it shares a connection with
            for s in senders:
                assert s.request("digest").context_tokens == 0
            while senders:
                senders.pop().close()
        except EdgelinkError as exc:
            # a known flake (about one full run in three, never alone): whether the node ended
            # that session itself (its event) or the connection went, to find where it breaks
            raise AssertionError(f"{exc}; the node said: {proc.stderr_tail()}; its events: "
                                 f"{proc.drain_events()}") from None
    finally:
        for s in senders:
            with contextlib.suppress(EdgelinkError):
                s.close()
        from edgelink.transport import p2p

        p2p.close_client_hosts()
        assert stop_receiver(proc) in (0, -15), proc.stderr_tail()
