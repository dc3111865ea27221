"""Shared fixtures: the real models (pulled once per machine into the configured cache)."""

from __future__ import annotations

import pytest

from edgelink.config import load_config


@pytest.fixture(scope="session")
def cfg():
    return load_config()


@pytest.fixture(scope="session")
def smollm2_path(cfg):
    from edgelink.models.resolve import resolve_model

    return resolve_model("smollm2-135m", cfg, pull=True)


@pytest.fixture(scope="session")
def gemma3_path(cfg):
    from edgelink.models.resolve import resolve_model

    return resolve_model("gemma3-270m", cfg, pull=True)


@pytest.fixture(scope="session")
def model_paths(smollm2_path, gemma3_path):
    return {"smollm2-135m": smollm2_path, "gemma3-270m": gemma3_path}


@pytest.fixture(scope="module")
def pair(smollm2_path, cfg):
    """Two SmolLM2 runtimes (a sender and a receiver in one process), one per test module."""
    from edgelink.runtime.llama import LlamaRuntime

    a, b = LlamaRuntime(smollm2_path, cfg), LlamaRuntime(smollm2_path, cfg)
    yield a, b
    a.close()
    b.close()
