"""The handoff planner (edgelink/wire/plan.py) and what auto may choose from: pure, no I/O."""

from __future__ import annotations

import pytest

from edgelink import wire
from edgelink.wire.plan import SPLIT_ALIGN, SPLIT_MIN, Link, choose_plan, estimate

MBIT = 1e6 / 8
N = 1024
STATE = 23_600_000  # SmolLM2-135M, 1,024 tokens of f16 KV
TPS = 190.0  # its prefill speed on two cores


def _shipped(k: int) -> int:
    return STATE * (N - k) // N


def _plan(mbit: float, codecs=(None, "zstd-shuffle/1"), tps=TPS, max_split=N):
    return choose_plan(N, _shipped, list(codecs), Link(mbit * MBIT, 0.001), tps, max_split)


def test_a_fast_link_ships_the_whole_state():
    plan = _plan(1000)
    assert plan.split == 0
    assert plan.seconds < N / TPS / 10


def test_a_slow_link_splits_on_an_aligned_length_and_beats_both_ends():
    link = Link(20 * MBIT, 0.001)
    plan = _plan(20)
    assert plan.split >= SPLIT_MIN and plan.split % SPLIT_ALIGN == 0
    whole = min(estimate(_shipped, c, 0, link, TPS) for c in (None, "zstd-shuffle/1"))
    text = N / TPS
    assert plan.seconds < 0.7 * whole and plan.seconds < 0.75 * text
    # the split balances the two halves: one step either way is no better
    for k in (plan.split - SPLIT_ALIGN, plan.split + SPLIT_ALIGN):
        assert estimate(_shipped, plan.codec, k, link, TPS) >= plan.seconds
    # and a receiver's prefill is slower while the KV arrives, so it prefills less than the
    # idle speed alone would suggest
    assert plan.split / TPS < plan.seconds


def test_the_slower_the_link_the_more_the_receiver_prefills():
    splits = [_plan(mbit).split for mbit in (200, 100, 50, 20, 5, 1)]
    assert splits == sorted(splits) and splits[-1] > splits[0]
    assert splits[-1] >= N - 2 * SPLIT_ALIGN
    dial_up = _plan(0.2)  # even a few tokens of KV cost more than prefilling them: the text
    assert dial_up.split == N and "text" in dial_up.describe(N)
    assert _plan(0.2, max_split=N - 1).split < N  # the text only when all its cells are reproducible


def test_no_split_without_a_prefill_speed_or_a_reproducible_prefix():
    assert _plan(20, tps=0.0).split == 0
    assert _plan(20, max_split=0).split == 0
    assert _plan(20, max_split=63).split == 0
    assert _plan(20, max_split=300).split <= 300


def test_a_lossy_codec_wins_only_where_it_may_be_chosen():
    assert _plan(20, codecs=(None, "zstd-shuffle/1", "kivi4/1")).codec == "kivi4/1"
    assert _plan(20).codec in (None, "zstd-shuffle/1")


def test_auto_offers_lossy_codecs_only_when_both_sides_allow_them(cfg):
    peer = ("zstd-shuffle/1", "q8/1", "kivi4/1")
    exact = wire.candidates(cfg.wire, peer, "zstd-shuffle/1")
    assert exact == [None, "zstd-shuffle/1"]
    both = wire.candidates(cfg.replace(wire_allow_lossy="on").wire, peer, "zstd-shuffle/1")
    assert both == [None, "zstd-shuffle/1", "q8/1", "kivi4/1"]
    fixed = wire.candidates(cfg.replace(wire_codec="raw").wire, peer, None)
    assert fixed == [None]


@pytest.mark.parametrize(("key", "value"), [("wire_split", "sometimes"), ("wire_probe_bytes", -1),
                                            ("wire_link_mbit", -5.0), ("wire_prefill_tps", -1.0)])
def test_bad_plan_settings_name_the_key(cfg, key, value):
    from edgelink.errors import ConfigError

    with pytest.raises(ConfigError, match=key.replace("_", ".", 1)):
        wire.choose(cfg.replace(**{key: value}).wire, (), True)


def test_lossless_is_a_name_for_the_lossless_codec(cfg):
    assert wire.choose(cfg.replace(wire_codec="lossless").wire, ("zstd-shuffle/1",), True) == "zstd-shuffle/1"
