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


# A test that loads a model (a real one, a shape twin, or a bridge trained on one) is marked
# `model`: it uses a model fixture, or its code or its fixtures' code names a model or a model
# loader. `pytest -m "not model"` then runs the rest (the sans-IO core, config, wire, layout,
# transports, fuzzers) in about a minute.
MODEL_FIXTURES = frozenset({"smollm2_path", "gemma3_path", "model_paths"})
MODEL_WORDS = ("smollm2", "gemma3", "resolve_model", "LlamaRuntime", "twin", "edgelink.load(", "api.load(",
               "start_receiver", "real_export", "load_runtime", "\"demo\"", "tiny_gguf")


def _loads_a_model(item) -> bool:
    import inspect

    if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    funcs = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info else ()):
        funcs += [d.func for d in defs]
    for f in funcs:
        try:
            text = inspect.getsource(f)
        except (OSError, TypeError):
            continue
        if any(w in text for w in MODEL_WORDS):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _loads_a_model(item):
            item.add_marker(pytest.mark.model)
