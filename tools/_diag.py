import sys, time, statistics
from edgelink.api import connect
from edgelink.bench import context_tokens
from edgelink.config import load_config
from edgelink.launcher import start_node, stop_receiver
from edgelink.registry import resolve_model
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.sizing import fit_limits
from edgelink.sender import Sender
from edgelink.signature import model_signature
from tools.netns import remote_host, shape
model, mbit = sys.argv[1], float(sys.argv[2])
opts = [dict(x.split("=") for x in o.split(";")) for o in sys.argv[3:]]
cfg = load_config(); path = resolve_model(model, cfg, pull=True)
with remote_host() as host, LlamaRuntime(path, cfg) as rt:
    node = start_node(str(path), cfg.replace(wire_allow_lossy="on"), listen=f"/ip4/{host.ip}/tcp/0", wrapper=host.wrapper, extra_args=("-v",))
    try:
        shape(host, mbit)
        toks = context_tokens(rt, 1024); rt.prefill(toks)
        sig = model_signature(rt, cfg).to_dict()
        for o in opts:
            c = fit_limits(cfg.replace(**{k: (float(v) if k.endswith(("mbit","tps")) else v) for k, v in o.items()}), rt)
            s = Sender(connect(node.ready["addrs"][0], c), c, sig); s.handshake()
            t0 = time.perf_counter(); sent = s.send_snapshot(rt); s.request("generate", n_tokens=1); dt = time.perf_counter() - t0
            s.close(); node.next_event()
            print(o, s.session.peer.prefill_tps, f"ttft {dt:.2f} pred {sent.predicted_s} split {sent.split} fb {sent.fallback} export {sent.export_s:.3f}", flush=True)
        print("\n".join(l for l in node.stderr_tail(20000).splitlines() if "prefill" in l or "applied" in l or "plan" in l))
    finally:
        stop_receiver(node)
