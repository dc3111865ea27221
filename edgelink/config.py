"""Configuration: edgelink.cfg, then EDGELINK_* environment variables, then explicit overrides.

The values live in ``edgelink.cfg`` only; this module holds the schema (names and types), so a
setting cannot be baked into code by accident: a key missing from every layer is an error.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_type_hints

from edgelink.errors import ConfigError, EdgelinkWarning

ENV_PREFIX = "EDGELINK_"
CONFIG_ENV = "EDGELINK_CONFIG"



def config_list(text: str) -> list[str]:
    """A comma-separated setting as its items (blanks and surrounding spaces dropped)."""
    return [x.strip() for x in text.split(",") if x.strip()]

@dataclasses.dataclass(frozen=True)
class PathsConfig:
    cache_dir: Path
    registry: Path


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    default_model: str
    n_ctx: int
    n_batch: int
    n_ubatch: int
    n_threads: int
    n_threads_batch: int
    flash_attn: str
    type_k: str
    type_v: str
    seq_id: int
    eval_hook: bool
    extra_buffers: str
    n_gpu_layers: int


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
    max_message_bytes: int
    max_handshake_bytes: int
    max_tensors: int
    max_name_bytes: int
    max_ndim: int
    max_control_bytes: int
    reply_timeout_s: float
    idle_timeout_s: float
    max_json_depth: int
    checksums: str
    session_state: str


@dataclasses.dataclass(frozen=True)
class ShmConfig:
    dir: str
    wait: str
    ring_bytes: int
    timeout_s: float
    connect_timeout_s: float
    liveness_interval_s: float


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    n_tokens: int


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    tokens: tuple[int, ...]
    repeats: int


@dataclasses.dataclass(frozen=True)
class LatentConfig:
    norm_gate_multiple: float
    norm_gate_mode: str
    max_gain: float
    hidden_store_slices: int


@dataclasses.dataclass(frozen=True)
class P2PConfig:
    identity_key: Path
    listen: str
    chunk_bytes: int
    window_bytes: int
    read_ahead_bytes: int
    rekey_bytes: int
    rekey_s: float
    connect_timeout_s: float
    handshake_timeout_s: float
    stream_timeout_s: float
    mdns: int
    discover_timeout_s: float
    discover_listen: str
    relays: str
    hole_punch: bool
    punch_listen: str
    reserve_retry_s: float
    reachability: str


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    dir: str
    chunk_tokens: int
    ram_bytes: int
    disk_bytes: int
    share: bool
    keep_prefills: bool
    peers: str
    dht: bool
    bootstrap: str
    trust: str
    reshare: str
    salt: str
    announce_burst: int
    announce_retry_s: float
    dht_timeout_s: float
    dht_max_providers: int
    dht_max_addrs: int
    dht_dial: str
    fetch_window: int


@dataclasses.dataclass(frozen=True)
class WireConfig:
    codec: str
    allow_lossy: bool
    zstd_level: int
    threads: int
    split: str
    probe_bytes: int
    link_mbit: float
    prefill_tps: float


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    max_clients: int
    max_message_bytes: int
    messages_per_s: float
    messages_burst: int
    bytes_per_s: float
    bytes_burst: int
    allow_peers: str
    tokens: str
    token_file: str
    open: bool
    shutdown_grace_s: float
    max_pending: int
    max_pending_per_ip: int


@dataclasses.dataclass(frozen=True)
class RelayConfig:
    listen: str
    allow_peers: str
    max_reservations: int
    reservation_ttl_s: float
    max_circuits: int
    circuit_bytes: int
    circuit_duration_s: float
    dialback_timeout_s: float


@dataclasses.dataclass(frozen=True)
class HttpConfig:
    listen: str
    parallel: int
    queue: int
    retry_after_s: float
    reuse: str
    api_keys: str
    api_key_file: str
    cors_origins: str
    max_body_bytes: int
    max_tokens: int
    model_name: str
    prefill_peer: str
    prefill_token: str
    prefill_min_tokens: int


@dataclasses.dataclass(frozen=True)
class Config:
    paths: PathsConfig
    runtime: RuntimeConfig
    protocol: ProtocolConfig
    shm: ShmConfig
    generate: GenerateConfig
    bench: BenchConfig
    latent: LatentConfig
    p2p: P2PConfig
    node: NodeConfig
    relay: RelayConfig
    wire: WireConfig
    cache: CacheConfig
    http: HttpConfig
    source: tuple[Path, ...] = ()

    def replace(self, **overrides: Any) -> Config:
        """Return a copy with ``section_key=value`` overrides applied (CLI flags use this)."""
        return _apply_overrides(self, overrides)


_SECTIONS: dict[str, type] = {
    name: typ for name, typ in get_type_hints(Config).items() if name != "source"
}


def default_config_paths() -> list[Path]:
    """Where the base edgelink.cfg may live: a source checkout, then an installed copy."""
    here = Path(__file__).resolve().parent
    return [here.parent / "edgelink.cfg", Path(sys.prefix) / "share" / "edgelink" / "edgelink.cfg"]


def _find_base() -> Path:
    for candidate in default_config_paths():
        if candidate.is_file():
            return candidate
    raise ConfigError(
        "no edgelink.cfg found (looked in: "
        + ", ".join(str(p) for p in default_config_paths())
        + "); set EDGELINK_CONFIG to its path"
    )


_TRUE = ("on", "true")
_FALSE = ("off", "false")


def _convert(raw: str, typ: Any, where: str, base_dir: Path) -> Any:
    raw = raw.strip()
    if typ is bool or typ == "bool":  # checked here, once: code reads a real bool
        word = raw.lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise ConfigError(f"{where}: {raw!r} is not on or off")
    try:
        if typ is int or typ == "int":
            return int(raw.replace("_", ""))
        if typ is float or typ == "float":
            return float(raw)
        if typ is Path or typ == "Path":
            p = Path(os.path.expanduser(raw))
            return p if p.is_absolute() else (base_dir / p).resolve()
        if typ == tuple[int, ...] or typ == "tuple[int, ...]":
            return tuple(int(x) for x in raw.split(",") if x.strip())
        if typ is str or typ == "str":
            return raw
    except ValueError as exc:
        raise ConfigError(f"{where}: cannot read {raw!r} as {getattr(typ, '__name__', typ)}") from exc
    raise ConfigError(f"{where}: unsupported type {typ}")


def _section_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def load_config(path: str | os.PathLike[str] | None = None,
                env: Mapping[str, str] | None = None,
                **overrides: Any) -> Config:
    """Load the layered configuration.

    ``path`` (or $EDGELINK_CONFIG) names a file read on top of the base edgelink.cfg, so a user
    file only needs the keys it changes. ``overrides`` are ``section_key=value`` pairs (flag wins).
    """
    env = os.environ if env is None else env
    files = [_find_base()]
    extra = path or env.get(CONFIG_ENV)
    if extra:
        extra_path = Path(extra).expanduser()
        if not extra_path.is_file():
            raise ConfigError(f"config file not found: {extra_path}")
        files.append(extra_path)

    values: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for file in files:
        parser = configparser.ConfigParser(inline_comment_prefixes=(";",))
        try:
            parser.read(file, encoding="utf-8")
        except configparser.Error as exc:
            raise ConfigError(f"{file}: {exc}") from exc
        for section in parser.sections():
            if section not in _SECTIONS:
                raise ConfigError(f"{file}: unknown section [{section}]")
            types = _section_types(_SECTIONS[section])
            for key, raw in parser.items(section):
                if key not in types:
                    raise ConfigError(f"{file}: unknown key {section}.{key}")
                values[section][key] = _convert(raw, types[key], f"{file} [{section}] {key}", file.parent)

    for section, cls in _SECTIONS.items():
        for key, typ in _section_types(cls).items():
            name = f"{ENV_PREFIX}{section}_{key}".upper()
            if name in env:
                values[section][key] = _convert(env[name], typ, f"${name}", Path.cwd())
    _check_env_names(env)

    sections = {}
    for section, cls in _SECTIONS.items():
        missing = [k for k in _section_types(cls) if k not in values[section]]
        if missing:
            raise ConfigError(f"missing config keys in [{section}]: {', '.join(missing)}")
        sections[section] = cls(**values[section])
    cfg = Config(**sections, source=tuple(files))
    return _apply_overrides(cfg, overrides) if overrides else cfg


# EDGELINK_* variables that are not config keys.
OTHER_ENV = frozenset({CONFIG_ENV, "EDGELINK_TOKEN", "EDGELINK_NATIVE_PORTABLE", "EDGELINK_CI_PYTHON"})


def config_keys() -> list[str]:
    """Every key as SECTION.KEY."""
    return [f"{s}.{k}" for s, cls in _SECTIONS.items() for k in _section_types(cls)]


def _suggest(wrong: str, known: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(wrong, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _check_env_names(env: Mapping[str, str]) -> None:
    """A misspelt EDGELINK_<SECTION>_<KEY> would otherwise be ignored without a word."""
    known = {f"{ENV_PREFIX}{k.replace('.', '_')}".upper() for k in config_keys()}
    sections = tuple(f"{ENV_PREFIX}{s}_".upper() for s in _SECTIONS)
    for name in env:
        if not name.startswith(ENV_PREFIX) or name in known or name in OTHER_ENV:
            continue
        hint = _suggest(name, sorted(known | OTHER_ENV))
        if name.startswith(sections):
            raise ConfigError(f"${name} is not a config variable{hint} (edgelink config keys: docs/configuration.md)")
        warnings.warn(f"${name} is not a variable edgelink reads{hint}", EdgelinkWarning, stacklevel=3)


def _apply_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    by_section: dict[str, dict[str, Any]] = {}
    for name, value in overrides.items():
        if value is None:
            continue
        section, _, key = name.partition("_")
        if section not in _SECTIONS or key not in _section_types(_SECTIONS[section]):
            dotted = f"{section}.{key}"
            raise ConfigError(f"unknown config key {dotted}{_suggest(dotted, config_keys())}")
        typ = _section_types(_SECTIONS[section])[key]
        if isinstance(value, str) and typ is not str:
            value = _convert(value, typ, f"override {name}", Path.cwd())
        by_section.setdefault(section, {})[key] = value
    changes = {
        section: dataclasses.replace(getattr(cfg, section), **kv) for section, kv in by_section.items()
    }
    return dataclasses.replace(cfg, **changes)


def to_env(cfg: Config) -> dict[str, str]:
    """Every value as EDGELINK_* variables, so a child process sees exactly this configuration."""
    env: dict[str, str] = {}
    for section in _SECTIONS:
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            if isinstance(value, tuple):
                value = ",".join(str(v) for v in value)
            elif isinstance(value, bool):
                value = "on" if value else "off"
            env[f"{ENV_PREFIX}{section}_{key}".upper()] = str(value)
    return env
