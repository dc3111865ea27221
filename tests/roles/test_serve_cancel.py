"""A client that goes away mid-generation (issue 24): `edgelink serve` stops generating within
a token, ends the session as the peer's, and serves the next client at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid

from edgelink.roles.launcher import start_receiver, stop_receiver


def test_a_client_killed_mid_generation_frees_serve(smollm2_path, cfg):
    import edgelink

    name = f"cancel-{uuid.uuid4().hex[:8]}"
    proc = start_receiver(str(smollm2_path), cfg, name)
    try:
        script = textwrap.dedent(f"""
            import os
            import edgelink
            from edgelink.config import load_config
            with edgelink.load({str(smollm2_path)!r}, load_config()) as m:
                m.prefill("The lighthouse keeper climbed the stairs and")
                with m.connect("shm:{name}") as peer:
                    peer.handoff(n_tokens=0)
                    s = peer.sender
                    s.ch.send(s.session.request("generate", {{"n_tokens": 3000, "stop_at_eog": False}}))
                    print("asked", flush=True)
                    os._exit(9)  # gone, as after Ctrl-C or a kill, while the node generates
        """)
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert done.returncode == 9 and "asked" in done.stdout, done.stderr
        ended = proc.next_event(timeout=120)  # the session ends when its client is gone
        took = time.monotonic() - t0
        assert ended["ended_by"] == "peer_gone", ended
        assert took < 30, took  # 3,000 tokens would take about a minute here
        # the next client is served at once, exactly
        with edgelink.load(str(smollm2_path), cfg) as m:
            m.prefill("Once upon a time")
            with m.connect(f"shm:{name}") as peer:
                g = peer.handoff(n_tokens=6)
            m2 = m.generate(6)
        assert g.tokens == m2.tokens
    finally:
        assert stop_receiver(proc) in (0, -15), proc.stderr_tail()
