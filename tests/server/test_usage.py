"""The usage block a response carries: OpenAI's fields, then edgelink's own beside them."""

from __future__ import annotations

import json

from edgelink.server.engine import Outcome, RemotePrefillSteps
from edgelink.server.openai import usage


def test_usage_has_openais_fields_and_says_where_the_prompt_was_prefilled():
    u = usage(Outcome(prompt_tokens=300, cached_tokens=256, completion_tokens=8, prefill_s=0.5))
    assert (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]) == (300, 8, 308)
    assert u["prompt_tokens_details"] == {"cached_tokens": 256}
    assert u["edgelink"] == {"prefilled_by": "here", "prefill_s": 0.5}


def test_a_remote_prefill_reports_its_steps_as_json():
    steps = RemotePrefillSteps(link_s=0.02, head_s=2.4, peer_wait_s=8.5, pull_s=4.4, delta_bytes=44_825_280)
    out = Outcome(prompt_tokens=2000, prefill_s=16.0, prefilled_by="/ip4/10.0.0.2/tcp/4001/p2p/X", remote_prefill=steps)
    u = json.loads(json.dumps(usage(out)))
    assert u["edgelink"]["prefilled_by"].startswith("/ip4/")
    assert u["edgelink"]["remote_prefill"] == {"link_s": 0.02, "head_s": 2.4, "peer_wait_s": 8.5, "pull_s": 4.4,
                                               "delta_bytes": 44_825_280}
