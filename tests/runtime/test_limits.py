"""Limits that fit the model: by default the largest message a receiver accepts is what its own
context can hold; its HELLO says so, and a sender refuses a larger message locally, before any
bytes move, naming both sizes and the setting to change."""

from __future__ import annotations

import pytest

from edgelink.bench import context_tokens
from edgelink.errors import MessageTooLarge
from edgelink.kinds.snapshot import snapshot_tensors
from edgelink.protocol import codec
from edgelink.protocol.kinds import ApplyMode, Kind
from edgelink.protocol.session import Role, Session
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.signature import model_signature
from edgelink.runtime.sizing import fit_limits, kv_bytes_per_token, largest_message_bytes


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_the_derived_limit_holds_a_full_context_and_little_more(model_paths, cfg, name):
    c = cfg.replace(runtime_n_ctx=256)
    with LlamaRuntime(model_paths[name], c) as rt:
        rt.prefill(context_tokens(rt, 256))
        tensors, attrs, tr = snapshot_tensors(rt)
        sig = model_signature(rt, c)
        s = Session(Role.CLIENT, sig, fit_limits(c, rt).protocol, kinds=(Kind.KV_CACHE,))
        s.hello()
        s.assume_peer_accepts()
        _, msg = s.encode_tensor_message(Kind.KV_CACHE, ApplyMode.OVERWRITE, tensors,
                                         layer_range=(0, rt.n_layer), token_range=tr, attrs=attrs)
        limit = largest_message_bytes(rt)
        assert msg.payload_bytes <= limit
        if rt.n_swa == 0:  # no sliding window: a full context is the worst case, and it is tight
            assert msg.payload_bytes > 0.99 * limit
            assert kv_bytes_per_token(rt) == sum(t.nbytes for t in tensors if ".k" in t.name or ".v" in t.name) // 256
        assert fit_limits(c, rt).protocol.max_message_bytes == limit
        assert fit_limits(c, rt).node.max_message_bytes == limit
        explicit = c.replace(protocol_max_message_bytes=12345, node_max_message_bytes=999)
        assert fit_limits(explicit, rt) is explicit  # explicit settings still win


def test_llama3_8b_at_8k_would_fit_where_the_old_fixed_limits_refused():
    """The arithmetic for the model this issue is about (no 8B model on this machine): 32 layers
    x 8 KV heads x 128 x 2 (K, V) x f16 = 131,072 bytes per token."""

    class Twin:  # the attributes sizing reads, with Llama-3-8B's geometry
        n_layer, n_embd, n_vocab, n_ctx, kv_widths = 32, 4096, 128256, 8192, (1024, 1024)

        class cfg:
            class runtime:
                type_k = type_v = "f16"

    assert kv_bytes_per_token(Twin) == 131072
    limit = largest_message_bytes(Twin)
    assert 8192 * 131072 < limit < 8192 * 131072 * 1.01
    assert limit > 1 << 30  # the old fixed protocol limit would have refused it


def test_sender_refuses_locally_naming_sizes_and_setting(smollm2_path, cfg):
    """A receiver whose context is 128 tokens announces a limit that a 512-token state exceeds:
    the sender's session refuses before encoding a frame for the wire."""
    small, big = cfg.replace(runtime_n_ctx=128), cfg.replace(runtime_n_ctx=512)
    with LlamaRuntime(smollm2_path, small) as rrt, LlamaRuntime(smollm2_path, big) as srt:
        sig = model_signature(rrt, small)
        server = Session(Role.SERVER, sig, fit_limits(small, rrt).protocol, kinds=(Kind.KV_CACHE,))
        client = Session(Role.CLIENT, sig, fit_limits(big, srt).protocol, kinds=(Kind.KV_CACHE,))
        server.receive(client.hello())
        answer = server.hello()
        assert codec.decode_frame(answer, small.protocol).max_message_bytes == largest_message_bytes(rrt)
        client.receive(answer)
        srt.prefill(context_tokens(srt, 300))
        tensors, attrs, tr = snapshot_tensors(srt)
        with pytest.raises(MessageTooLarge) as err:
            client.encode_tensor_message(Kind.KV_CACHE, ApplyMode.OVERWRITE, tensors,
                                         layer_range=(0, srt.n_layer), token_range=tr, attrs=attrs)
        text = str(err.value)
        assert "protocol.max_message_bytes" in text and "node.max_message_bytes" in text
        assert f"{largest_message_bytes(rrt):,} bytes" in text and "nothing was sent" in text
        assert client.state.value == "ready"  # nothing half-done: the session goes on


def test_inspect_is_bounded_by_the_file_not_a_fixed_limit(tmp_path, cfg, monkeypatch):
    """Without a model there is no context to derive a limit from: `edgelink inspect` takes the
    file's size as the bound, so a file with a message over the 1 GiB fallback still reads."""
    import edgelink.protocol.limits as limits
    from edgelink.api.inspect import inspect_file
    from edgelink.errors import TransportError
    from edgelink.fuzz import seed_frames
    from edgelink.transport.framing import HEADER

    frames = seed_frames(limits=cfg.protocol)[:2]  # HELLO and a KV_CACHE message
    path = tmp_path / "m.elk"
    path.write_bytes(b"".join(HEADER.pack(len(f)) + f for f in frames))
    monkeypatch.setattr(limits, "UNFITTED_MAX_MESSAGE_BYTES", 100)  # smaller than the message
    with pytest.raises(MessageTooLarge):
        codec.decode_frame(frames[1], cfg.protocol)
    described = inspect_file(path, cfg)
    assert [d["frame"] for d in described] == ["HELLO", "TENSOR"] and described[1]["verified"]
    with pytest.raises(TransportError):
        inspect_file(tmp_path / "a\0b", cfg)
