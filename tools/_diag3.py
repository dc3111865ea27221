import sys, time, statistics
from edgelink.api import connect
from edgelink.config import load_config
from edgelink.launcher import start_node, stop_receiver
from edgelink.registry import resolve_model
from edgelink.runtime.llama import LlamaRuntime
from edgelink.sender import Sender
from edgelink.signature import model_signature
from tools.netns import remote_host, shape
cfg = load_config(); path = resolve_model("smollm2-135m", cfg, pull=True)
with remote_host() as host, LlamaRuntime(path, cfg) as rt:
    node = start_node(str(path), cfg, listen=f"/ip4/{host.ip}/tcp/0", wrapper=host.wrapper)
    try:
        for mbit in (20, 100):
            shape(host, mbit)
            sig = model_signature(rt, cfg).to_dict()
            s = Sender(connect(node.ready["addrs"][0], cfg), cfg, sig); s.handshake()
            res = {"train": [], "single": [], "train3": [], "bulk": []}
            for i in range(6):
                s.link = None; res["train"].append(s.measure_link().bytes_per_s * 8e-6)
                t = time.perf_counter(); s.request("probe", pad=""); rtt = time.perf_counter() - t
                t = time.perf_counter(); s.request("probe", pad="x" * 262144); res["single"].append(262144 / (time.perf_counter() - t - rtt) * 8e-6)
                sizes = [65536, 262144, 262144]
                for z in sizes: s.ch.send(s.session.request("probe", {"pad": "x" * z}))
                at = []
                for z in sizes: s._reply(); at.append(time.perf_counter())
                res["train3"].append(262144 / (at[2] - at[1]) * 8e-6)
                t = time.perf_counter(); s.request("probe", pad="x" * 1000000); res["bulk"].append(1e6 / (time.perf_counter() - t - rtt) * 8e-6)
            s.close(); node.next_event()
            for k, v in res.items():
                print(mbit, k, " ".join(f"{x:.1f}" for x in v), "median", f"{statistics.median(v):.1f}")
    finally:
        stop_receiver(node)
