"""What this machine and this llama.cpp build can do, and the choices that follow from it.

llama.cpp compiles its CPU kernels for the build machine (``GGML_NATIVE``), so the same pip
install behaves differently on an AMD EPYC, an Intel Xeon with AMX and an Apple laptop. This
module reads both sides, the build's compiled-in features (``llama_print_system_info``) and the
CPU's (``/proc/cpuinfo``, ``sysctl`` on macOS), and decides the one setting where a build is
known to be unsafe: llama.cpp's AMX kernels (an "extra buffer type" for weights) fault with
SIGILL on current Xeons (llama.cpp pull request #26954, open), killing the process on its first
matrix multiply. ``runtime.extra_buffers = auto`` keeps weights out of extra buffer types
exactly when the build has those kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import re
import subprocess
import threading
from pathlib import Path
from typing import Any

import llama_cpp

from edgelink.errors import ConfigError

EXTRA_BUFFER_MODES = ("auto", "on", "off")
_AMX_ISSUE = ("llama.cpp's AMX kernels fault (SIGILL, or SIGSEGV in ggml_backend_amx_mul_mat) on current "
              "Xeons (llama.cpp PR #26954)")


@functools.cache
def system_info() -> str:
    """llama.cpp's one-line description of the build: backends and compiled CPU features."""
    raw = llama_cpp.llama_print_system_info()
    return (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)).strip()


def gpu_offload() -> bool:
    """Whether this llama.cpp build has a GPU backend (CUDA, Metal, Vulkan, ...)."""
    return bool(llama_cpp.llama_supports_gpu_offload())


def parse_features(info: str) -> dict[str, str]:
    """``"CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 1 | ..."`` as {"SSE3": "1", ...}."""
    return {m.group(1): m.group(2) for m in re.finditer(r"([A-Za-z0-9_]+) = ([^|\s]+)", info)}


@functools.cache
def build_features() -> dict[str, str]:
    """The features this llama.cpp build was compiled with (what ``system_info`` names)."""
    return parse_features(system_info())


def _read_cpu_flags(cpuinfo: str) -> frozenset[str]:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / arm64 Linux
            return frozenset(value.split())
    return frozenset()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel names them (lower case), empty if unknown."""
    try:
        return _read_cpu_flags(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        pass
    if platform.system() == "Darwin":  # pragma: no cover - macOS
        out = []
        for key in ("machdep.cpu.features", "machdep.cpu.leaf7_features"):
            try:
                out += subprocess.run(["sysctl", "-n", key], capture_output=True, text=True,
                                      timeout=5).stdout.lower().split()
            except (OSError, subprocess.SubprocessError):
                pass
        return frozenset(out)
    return frozenset()


@functools.cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclasses.dataclass(frozen=True)
class ExtraBuffers:
    """Whether weights may live in llama.cpp's extra buffer types (AMX, CPU repacking), and why."""

    use: bool
    setting: str
    reason: str


def choose_extra_buffers(setting: str, features: dict[str, str], flags: frozenset[str]) -> ExtraBuffers:
    """``runtime.extra_buffers`` resolved against a build's ``features`` and the CPU's ``flags``.

    ``auto`` turns them off when the build has AMX kernels (they would be used, and they fault);
    a build without them loses nothing by keeping the default (the repacked x86 and arm kernels
    are safe and faster)."""
    if setting not in EXTRA_BUFFER_MODES:
        raise ConfigError(
            f"runtime.extra_buffers must be one of {', '.join(EXTRA_BUFFER_MODES)}, not {setting!r}"
        )
    amx_build = features.get("AMX_INT8") == "1"
    amx_cpu = "amx_int8" in flags or "amx_tile" in flags
    if setting == "on":
        why = "runtime.extra_buffers = on"
        if amx_build and amx_cpu:
            why += f" (unsafe here: {_AMX_ISSUE})"
        return ExtraBuffers(True, setting, why)
    if setting == "off":
        return ExtraBuffers(False, setting, "runtime.extra_buffers = off")
    if amx_build:
        return ExtraBuffers(False, setting, f"auto: the build has AMX kernels, and {_AMX_ISSUE}")
    return ExtraBuffers(True, setting, "auto: the build has no AMX kernels")


def extra_buffers(setting: str) -> ExtraBuffers:
    """``choose_extra_buffers`` for this machine and this build."""
    return choose_extra_buffers(setting, build_features(), cpu_flags())


def amx_unsafe_model(model_params) -> bool:
    """Whether a model loaded with these llama_model_params would run the faulting AMX path."""
    return bool(getattr(model_params, "use_extra_bufts", False)) and build_features().get("AMX_INT8") == "1"


_PARAMS_LOCK = threading.Lock()


def new_llama(model_path: str | Path, *, use_extra_bufts: bool, **kwargs: Any) -> Any:
    """``llama_cpp.Llama(model_path, **kwargs)`` with ``use_extra_bufts`` set. The ``Llama``
    constructor has no argument for it and builds its model parameters from
    ``llama_model_default_params()``, so that function is wrapped for this call only."""
    import llama_cpp.llama_cpp as raw

    with _PARAMS_LOCK:
        default = raw.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = use_extra_bufts
            return p

        raw.llama_model_default_params = params
        try:
            return llama_cpp.Llama(str(model_path), **kwargs)
        finally:
            raw.llama_model_default_params = default
