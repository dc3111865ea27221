"""The machine and the llama.cpp build: extra buffer types (AMX), `edgelink doctor`."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest

import edgelink
from edgelink.api import doctor as doctor_mod
from edgelink.errors import ConfigError, EdgelinkWarning
from edgelink.runtime import system
from edgelink.runtime.llama import LlamaRuntime

AMX_BUILD = {"AVX512": "1", "AMX_INT8": "1", "REPACK": "1"}
PLAIN_BUILD = {"AVX2": "1", "AMX_INT8": "0", "REPACK": "1"}
XEON = frozenset({"avx2", "avx512f", "amx_tile", "amx_int8", "amx_bf16"})
EPYC = frozenset({"avx2", "avx512f"})


@pytest.mark.parametrize("setting,features,flags,use", [
    ("auto", AMX_BUILD, XEON, False),    # the faulting case: off
    ("auto", AMX_BUILD, EPYC, False),    # a build with AMX kernels, flags unknown or missing: off
    ("auto", PLAIN_BUILD, XEON, True),   # no AMX kernels compiled in: nothing to avoid
    ("auto", PLAIN_BUILD, EPYC, True),
    ("auto", {}, frozenset(), True),     # a build that lists no features
    ("on", AMX_BUILD, XEON, True),
    ("off", PLAIN_BUILD, EPYC, False),
])
def test_extra_buffers_are_off_exactly_where_the_build_has_amx_kernels(setting, features, flags, use):
    got = system.choose_extra_buffers(setting, features, flags)
    assert got.use is use
    assert got.setting == setting
    if setting == "on" and features is AMX_BUILD:
        assert "unsafe" in got.reason and "26954" in got.reason
    if setting == "auto" and not use:
        assert "AMX" in got.reason


def test_a_bad_extra_buffers_setting_is_a_config_error():
    with pytest.raises(ConfigError, match="auto, on, off"):
        system.choose_extra_buffers("maybe", PLAIN_BUILD, EPYC)


def test_system_info_parses_into_this_builds_features():
    feats = system.parse_features("CPU : SSE3 = 1 | AVX512 = 0 | AMX_INT8 = 1 | OPENMP = 1 | ")
    assert feats == {"SSE3": "1", "AVX512": "0", "AMX_INT8": "1", "OPENMP": "1"}
    real = system.build_features()
    assert real and all(isinstance(v, str) for v in real.values()), system.system_info()


def test_extra_buffers_off_generates_the_same_tokens(smollm2_path, cfg):
    """Off decodes exactly as on. "On" runs in a child process: on a build with AMX kernels on a
    CPU with AMX it is the path that faults (SIGSEGV or SIGILL in ggml_backend_amx_mul_mat, seen
    on this workplace's Xeons), which is what ``auto`` avoids; the child's death is the expected
    outcome there, and any other failure is not."""
    import signal

    child = subprocess.run([sys.executable, "-m", "edgelink", "--set", "runtime.extra_buffers=on", "generate",
                            str(smollm2_path), "-p", "The capital of France is", "-n", "16", "--json"],
                           capture_output=True, text=True, timeout=300)
    with LlamaRuntime(smollm2_path, cfg.replace(runtime_extra_buffers="off")) as off:
        assert off.extra_buffers.use is False
        off.prefill(off.tokenize("The capital of France is"))
        want = off.generate(16)
    faulting = system.build_features().get("AMX_INT8") == "1" and "amx_int8" in system.cpu_flags()
    if faulting and child.returncode < 0:
        assert -child.returncode in (signal.SIGSEGV, signal.SIGILL), child.returncode
        return
    assert child.returncode == 0, child.stderr[-2000:]
    assert json.loads(child.stdout)["tokens"] == want


@pytest.fixture
def amx_build(monkeypatch):
    """This process believes its llama.cpp build has AMX kernels (the Xeon case)."""
    monkeypatch.setattr(system, "build_features", lambda: dict(AMX_BUILD))
    monkeypatch.setattr(system, "cpu_flags", lambda: XEON)


def test_on_an_amx_build_edgelink_loads_without_extra_buffers(amx_build, smollm2_path, cfg):
    with LlamaRuntime(smollm2_path, cfg) as rt:
        assert rt.extra_buffers.use is False and "AMX" in rt.extra_buffers.reason
        rt.prefill(rt.tokenize("Hello"))
        assert len(rt.generate(4)) == 4


def test_from_llama_warns_about_a_llama_that_would_run_the_amx_kernels(amx_build, smollm2_path):
    import llama_cpp

    llm = llama_cpp.Llama(str(smollm2_path), n_ctx=256, verbose=False, flash_attn=True)
    try:
        with pytest.warns(EdgelinkWarning, match="AMX.*edgelink.load"):
            m = edgelink.from_llama(llm)
        m.close()
        llm.model_params.use_extra_bufts = False  # what a rebuilt or safe Llama looks like
        with warnings.catch_warnings():
            warnings.simplefilter("error", EdgelinkWarning)
            edgelink.from_llama(llm).close()
    finally:
        llm.close()


def test_doctor_reports_a_build_that_uses_what_the_cpu_lacks(monkeypatch, cfg):
    monkeypatch.setattr(system, "build_features", lambda: {"AVX2": "1", "AVX512": "1"})
    monkeypatch.setattr(system, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    report = doctor_mod.doctor(cfg)
    bad = [c for c in report.checks if c.status == doctor_mod.FAIL]
    assert not report.ok and [c.name for c in bad] == ["build vs CPU"]
    assert "AVX512" in bad[0].detail and "SIGILL" in bad[0].detail
    assert "pip install --force-reinstall" in bad[0].fix


def test_doctor_cli_json_and_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "edgelink", "doctor", "--json"], capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    rep = json.loads(ok.stdout)
    names = {(c["area"], c["name"]) for c in rep["checks"]}
    assert {("cpu", "AMX"), ("native", "edgelink._native"), ("python", "dependencies"),
            ("paths", "shared memory")} <= names
    assert "CPU" in rep["system_info"]
    # root may write anywhere, so point shm.dir at a file instead of a folder
    not_dir = tmp_path / "file"
    not_dir.write_text("")
    bad = subprocess.run([sys.executable, "-m", "edgelink", "--set", f"shm.dir={not_dir}", "doctor"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "FAIL" in bad.stdout and "not a writable folder" in bad.stdout and "set shm.dir" in bad.stdout


def test_make_llama_loads_the_way_edgelink_does(amx_build, smollm2_path):
    """llama-cpp-python's Llama takes no use_extra_bufts; make_llama sets it from
    runtime.extra_buffers for its own call only, and from_llama then has nothing to warn of."""
    import llama_cpp
    import llama_cpp.llama_cpp as raw

    from edgelink.api.interop import make_llama

    default = raw.llama_model_default_params
    llm = make_llama(smollm2_path, n_ctx=256, verbose=False, flash_attn=True)
    try:
        assert llm.model_params.use_extra_bufts is False
        assert raw.llama_model_default_params is default
        assert raw.llama_model_default_params().use_extra_bufts is True
        with warnings.catch_warnings():
            warnings.simplefilter("error", EdgelinkWarning)
            m = edgelink.from_llama(llm)
        m.prefill("The capital of France is")
        assert len(m.generate(4, stop_at_eog=False).tokens) == 4
        m.close()
        assert isinstance(llm, llama_cpp.Llama)
    finally:
        llm.close()
