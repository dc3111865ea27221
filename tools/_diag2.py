import sys, time
from edgelink.api import connect
from edgelink.bench import context_tokens
from edgelink.config import load_config
from edgelink.launcher import start_node, stop_receiver
from edgelink.registry import resolve_model
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.kvstate import parse_seq_state, bytes_from_position
from edgelink.latent.delta import delta_tensors
from edgelink.wire import encode_tensors
from edgelink.sender import Sender
from edgelink.signature import model_signature
from tools.netns import remote_host, shape
cfg = load_config(); path = resolve_model("smollm2-135m", cfg, pull=True)
with remote_host() as host, LlamaRuntime(path, cfg) as rt:
    node = start_node(str(path), cfg, listen=f"/ip4/{host.ip}/tcp/0", wrapper=host.wrapper)
    try:
        shape(host, float(sys.argv[1]))
        rt.prefill(context_tokens(rt, 1024))
        sig = model_signature(rt, cfg).to_dict()
        s = Sender(connect(node.ready["addrs"][0], cfg), cfg, sig); s.handshake()
        for i in range(3):
            s.link = None
            t = time.perf_counter(); l = s.measure_link(); print("probe", time.perf_counter() - t, l)
        s.close()
        t = time.perf_counter(); full = parse_seq_state(rt.export_state()); print("export", time.perf_counter() - t)
        t = time.perf_counter(); f = bytes_from_position(full); print("bytes_from", time.perf_counter() - t)
        t = time.perf_counter(); d = delta_tensors(rt, 256, True, full); print("delta", time.perf_counter() - t)
        t = time.perf_counter(); d2 = delta_tensors(rt, 256, False, full); print("delta no verify", time.perf_counter() - t)
        t = time.perf_counter(); encode_tensors(d[0], d[1], "zstd-shuffle/1", s.session.send_checksum); print("encode", time.perf_counter() - t)
    finally:
        stop_receiver(node)
