"""``edgelink doctor``: what this machine and this install can do, and what to change where not.

Every check is a ``Check`` with a status (ok, warn, fail) and, unless it is ok, a ``fix`` that
says what to run or set. Nothing here loads a model: llama.cpp's system info and the build's
compiled features are read from the library itself, so the report is fast and safe on a
machine where computation would fault.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import stat
import sys
from pathlib import Path

from edgelink.config import Config, load_config
from edgelink.runtime import system
from edgelink.runtime.threads import SPIN_DEFAULT, thread_plan, wait_policy
from edgelink.transport.ring import native, wait_backend
from edgelink.transport.shm import segment_dir

OK, WARN, FAIL = "ok", "warn", "fail"

# llama.cpp's name for a compiled x86 feature -> the flag /proc/cpuinfo gives a CPU that has it.
X86_FLAGS = {
    "SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX2": "avx2", "F16C": "f16c", "FMA": "fma",
    "BMI2": "bmi2", "AVX_VNNI": "avx_vnni", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
}
# The same for arm64 Linux (the kernel's hwcap names).
ARM_FLAGS = {"NEON": "asimd", "DOTPROD": "asimddp", "FP16_VA": "asimdhp", "SVE": "sve",
             "MATMUL_INT8": "i8mm", "SME": "sme"}

# Imported by edgelink at run time: a missing one is a broken install, not an option.
REQUIRED_MODULES = ("llama_cpp", "gguf", "numpy", "click", "blake3", "xxhash", "libp2p", "nacl",
                    "zstandard")
# Extras: module -> (extra, what it enables).
OPTIONAL_MODULES = {
    "torch": ("train", "bridge training (edgelink bridge train)"),
    "huggingface_hub": ("hf", "Hugging Face registry entries (TinyLlama, Llama-3-8B)"),
    "pytest": ("test", "the test suite"),
}


@dataclasses.dataclass(frozen=True)
class Check:
    """One finding: ``area`` groups it, ``fix`` says what to do when it is not ok."""

    area: str
    name: str
    status: str
    detail: str
    fix: str = ""


@dataclasses.dataclass(frozen=True)
class DoctorReport:
    checks: tuple[Check, ...]
    system_info: str

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def worst(self) -> str:
        states = {c.status for c in self.checks}
        return FAIL if FAIL in states else WARN if WARN in states else OK


def _platform_checks() -> list[Check]:
    return [
        Check("platform", "system", OK, f"{platform.system()} {platform.release()} {platform.machine()}"),
        Check("platform", "python", OK, f"{sys.version.split()[0]} at {sys.executable}"),
    ]


def _llama_checks(cfg: Config) -> tuple[list[Check], str]:
    out: list[Check] = []
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    info = system.system_info()
    out.append(Check("llama.cpp", "llama-cpp-python", OK, version))
    gpu = system.gpu_offload()
    out.append(Check("llama.cpp", "GPU offload", OK,
                     f"yes: runtime.n_gpu_layers = {cfg.runtime.n_gpu_layers} (-1: all); a CPU peer "
                     "must match runtime.flash_attn" if gpu else "no (a CPU build)"))
    feats = system.build_features()
    flags = system.cpu_flags()
    machine = platform.machine().lower()
    table = X86_FLAGS if machine in ("x86_64", "amd64", "i686") else ARM_FLAGS if machine in (
        "aarch64", "arm64") else {}
    out.append(Check("cpu", "model", OK, system.cpu_model()))
    compiled = sorted(k for k, v in feats.items() if v == "1" and k in table)
    if not flags:
        out.append(Check("cpu", "features", WARN, "the CPU's feature flags could not be read; the "
                         f"build uses {', '.join(compiled) or 'no listed extensions'}"))
    else:
        missing = [k for k in compiled if table[k] not in flags]
        if missing:
            out.append(Check(
                "cpu", "build vs CPU", FAIL,
                f"this llama.cpp build uses {', '.join(missing)}, which this CPU lacks: any "
                "computation will die with SIGILL",
                "rebuild llama-cpp-python on this machine: pip install --force-reinstall "
                f"--no-cache-dir --no-deps llama-cpp-python=={version}"))
        else:
            out.append(Check("cpu", "build vs CPU", OK,
                             f"every compiled feature is present ({', '.join(compiled) or 'none listed'})"))
        unused = sorted(k for k, f in table.items() if f in flags and feats.get(k) == "0")
        if unused:
            out.append(Check("cpu", "unused CPU features", OK,
                             f"the CPU has {', '.join(unused)}, which this build does not use"))
    amx_build = feats.get("AMX_INT8") == "1"
    amx_cpu = "amx_int8" in flags or "amx_tile" in flags
    choice = system.extra_buffers(cfg.runtime.extra_buffers)
    detail = (f"build {'has' if amx_build else 'has no'} AMX kernels, CPU "
              f"{'has' if amx_cpu else 'has no'} AMX; extra buffer types "
              f"{'on' if choice.use else 'off'} ({choice.reason})")
    unsafe = choice.use and amx_build and amx_cpu
    out.append(Check("cpu", "AMX", FAIL if unsafe else OK, detail,
                     "set runtime.extra_buffers = auto (or off)" if unsafe else ""))

    policy = wait_policy()
    spinning = "OMP_WAIT_POLICY=ACTIVE" in policy.upper() or "300,000" in policy or (
        "GOMP_SPINCOUNT=" in policy and SPIN_DEFAULT not in policy)
    out.append(Check("cpu", "threads", WARN if spinning and feats.get("OPENMP") == "1" else OK,
                     f"{thread_plan(cfg.runtime).describe()}; OpenMP waits: {policy}",
                     f"with several llama.cpp processes on this machine, threads that spin while they wait "
                     f"slow each other down many times over: unset the variable, or GOMP_SPINCOUNT={SPIN_DEFAULT} "
                     "(import edgelink before llama_cpp)" if spinning else ""))
    return out, info


def _native_checks(cfg: Config) -> list[Check]:
    out: list[Check] = []
    try:
        nat = native()
        out.append(Check("native", "edgelink._native", OK,
                         f"built, waits by {nat.WAIT_BACKEND}; shm.wait = {cfg.shm.wait} -> "
                         f"{wait_backend(cfg.shm.wait)}"))
    except Exception as exc:  # a broken install is what this reports  # noqa: BLE001
        out.append(Check("native", "edgelink._native", FAIL, str(exc),
                         "reinstall edgelink: python -m pip install -e . (needs a C compiler)"))
    try:
        importlib.import_module("edgelink._evalhook")
        out.append(Check("native", "edgelink._evalhook", OK, "built (latent capture, steering)"))
    except ImportError as exc:
        out.append(Check("native", "edgelink._evalhook", WARN, str(exc),
                         "reinstall edgelink: python -m pip install -e ."))
    return out


def _module_checks() -> list[Check]:
    out: list[Check] = []
    for mod in REQUIRED_MODULES:
        if importlib.util.find_spec(mod) is None:
            out.append(Check("python", mod, FAIL, "not installed (a required dependency)",
                             "python -m pip install -e . (pyproject.toml declares it)"))
    if not any(c.status == FAIL for c in out):
        out.append(Check("python", "dependencies", OK, f"all {len(REQUIRED_MODULES)} import"))
    for mod, (extra, what) in OPTIONAL_MODULES.items():
        have = importlib.util.find_spec(mod) is not None
        out.append(Check("extras", f"[{extra}]", OK if have else WARN,
                         f"{mod} {'installed' if have else 'missing'}: {what}",
                         "" if have else f"python -m pip install -e '.[{extra}]'"))
    return out


def _path_checks(cfg: Config) -> list[Check]:
    out: list[Check] = []
    cache = Path(cfg.paths.cache_dir)
    probe = cache if cache.exists() else next((p for p in cache.parents if p.exists()), Path("/"))
    if os.access(probe, os.W_OK):
        free = shutil.disk_usage(probe).free
        out.append(Check("paths", "cache", OK, f"{cache} ({'exists' if cache.exists() else 'created on first use'}, "
                         f"{free / 2**30:.1f} GiB free)"))
    else:
        out.append(Check("paths", "cache", FAIL, f"{cache} is not writable",
                         "set paths.cache_dir (or EDGELINK_PATHS_CACHE_DIR) to a writable folder"))
    key = Path(cfg.p2p.identity_key)
    if key.exists():
        mode = stat.S_IMODE(key.stat().st_mode)
        bad = mode & 0o077
        out.append(Check("paths", "identity key", WARN if bad else OK, f"{key} (mode {oct(mode)})",
                         f"chmod 600 {key}" if bad else ""))
    else:
        out.append(Check("paths", "identity key", OK, f"{key} (created, mode 0600, by `edgelink id` or a node)"))
    shm = segment_dir(cfg)
    if shm.is_dir() and os.access(shm, os.W_OK):
        free = shutil.disk_usage(shm).free
        need = 2 * cfg.shm.ring_bytes
        status = OK if free >= need else WARN
        out.append(Check("paths", "shared memory", status,
                         f"{shm} (shm.dir = {cfg.shm.dir}, {free / 2**20:,.0f} MiB free, a listener needs "
                         f"{need / 2**20:,.0f} MiB)",
                         "" if status == OK else "lower shm.ring_bytes or free space in shm.dir"))
    else:
        out.append(Check("paths", "shared memory", FAIL, f"{shm} is not a writable folder",
                         "set shm.dir to a writable folder (auto: /dev/shm, else the temp folder)"))
    return out


def doctor(cfg: Config | None = None) -> DoctorReport:
    """Check this machine and install; see the module docstring."""
    cfg = cfg if cfg is not None else load_config()
    llama, info = _llama_checks(cfg)
    checks = [*_platform_checks(), *llama, *_native_checks(cfg), *_module_checks(), *_path_checks(cfg)]
    return DoctorReport(tuple(checks), info)
