"""Layered configuration: file < --config file < EDGELINK_* < flags; unknown keys are errors."""

from __future__ import annotations

import pytest

from edgelink.config import load_config, to_env
from edgelink.errors import ConfigError


def test_precedence(tmp_path):
    user = tmp_path / "user.cfg"
    user.write_text("[shm]\nring_bytes = 1024\ntimeout_s = 7\n")
    cfg = load_config(user, env={})
    assert cfg.shm.ring_bytes == 1024 and cfg.shm.timeout_s == 7.0
    cfg = load_config(user, env={"EDGELINK_SHM_RING_BYTES": "2048"})
    assert cfg.shm.ring_bytes == 2048 and cfg.shm.timeout_s == 7.0
    cfg = load_config(user, env={"EDGELINK_SHM_RING_BYTES": "2048"}, shm_ring_bytes=4096)
    assert cfg.shm.ring_bytes == 4096
    cfg = load_config(env={"EDGELINK_CONFIG": str(user)})
    assert cfg.shm.ring_bytes == 1024


def test_relative_paths_resolve_against_their_file(tmp_path):
    user = tmp_path / "user.cfg"
    user.write_text("[paths]\ncache_dir = cache\n")
    assert load_config(user, env={}).paths.cache_dir == tmp_path / "cache"


@pytest.mark.parametrize("text", ["[nope]\nx = 1\n", "[shm]\nnope = 1\n", "[shm]\nring_bytes = lots\n"])
def test_bad_files_are_typed_errors(tmp_path, text):
    bad = tmp_path / "bad.cfg"
    bad.write_text(text)
    with pytest.raises(ConfigError):
        load_config(bad, env={})


def test_bad_env_and_overrides(tmp_path):
    with pytest.raises(ConfigError):
        load_config(env={"EDGELINK_RUNTIME_N_CTX": "big"})
    with pytest.raises(ConfigError):
        load_config(env={}, nonsense_key=1)
    with pytest.raises(ConfigError):
        load_config(tmp_path / "missing.cfg", env={})


def test_to_env_round_trips():
    cfg = load_config(env={}, bench_tokens="16,32", shm_timeout_s=2.5)
    again = load_config(env=to_env(cfg))
    assert again == cfg


def test_switches_are_booleans_checked_once_where_they_are_read():
    """on/off settings arrive in code as bools (no string compared in twenty places), from a
    file, a variable or an override alike; any other word is refused naming the setting."""
    cfg = load_config(env={"EDGELINK_CACHE_SHARE": "off", "EDGELINK_WIRE_ALLOW_LOSSY": "true"},
                      runtime_eval_hook="on")
    assert cfg.cache.share is False and cfg.wire.allow_lossy is True and cfg.runtime.eval_hook is True
    assert to_env(cfg)["EDGELINK_CACHE_SHARE"] == "off"
    for bad in ("maybe", "yes", "", "2"):
        with pytest.raises(ConfigError, match="EDGELINK_NODE_OPEN.*not on or off"):
            load_config(env={"EDGELINK_NODE_OPEN": bad})
        with pytest.raises(ConfigError, match="not on or off"):
            cfg.replace(p2p_hole_punch=bad)
