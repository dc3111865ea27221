"""The `edgelink` command: parse flags, call edgelink.api, print (text, or JSON with --json)."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time

import click

from edgelink import api
from edgelink.api import latent as api_latent
from edgelink.api.doctor import FAIL
from edgelink.api.doctor import doctor as run_doctor
from edgelink.api.inspect import inspect_file
from edgelink.cli.common import (  # noqa: F401
    _Ctx,
    _emit,
    _progress,
    client_token,
    json_option,
    model_and_file,
    n_option,
    split_model_file,
    token_ids_option,
    token_options,
    wire_codec,
    wire_option,
)
from edgelink.errors import ChecksumMismatch, EdgelinkError
from edgelink.models.pull import pull_model
from edgelink.models.registry import get_entry, list_models
from edgelink.server import serve_http
from edgelink.server.engine import Engine, Outcome, Params
from edgelink.wire import CODECS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="A config file read on top of edgelink.cfg (or set EDGELINK_CONFIG).")
@click.option("--set", "settings", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override any config value, e.g. --set runtime.n_ctx=2048 (repeatable).")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
@click.version_option(package_name="edgelink")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, settings: tuple[str, ...], verbose: int) -> None:
    """Hand a language model's internal state to another process instead of text."""
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    ctx.obj = _Ctx(config_path, settings, verbose)


@cli.group(invoke_without_command=True)
@json_option
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """List the models edgelink knows (and `models pull NAME`)."""
    if ctx.invoked_subcommand:
        return

    rows = list_models(ctx.obj.cfg())
    if as_json:
        _emit(True, [dataclasses.asdict(r) for r in rows], "")
        return
    for r in rows:
        mark = "cached" if r.cached else "-"
        click.echo(f"{r.entry.name:22} {mark:7} {r.entry.description}")


@models.command("list")
@json_option
@click.pass_context
def models_list(ctx: click.Context, as_json: bool) -> None:
    """List the models edgelink knows and whether each is downloaded."""
    # `models --json list` and `models list --json` say the same
    ctx.invoke(models, as_json=as_json or bool(ctx.parent and ctx.parent.params.get("as_json")))


@models.command("pull")
@click.argument("name")
@click.option("--force", is_flag=True, help="Download again even if cached.")
@json_option
@click.pass_obj
def models_pull(obj: _Ctx, name: str, force: bool, as_json: bool) -> None:
    """Download NAME into the cache directory and verify its sha256."""

    cfg = obj.cfg()
    path = pull_model(get_entry(name, cfg), cfg, progress=None if as_json else _progress(), force=force)
    _emit(as_json, {"name": name, "path": str(path)}, f"{name}: {path}")


@models.command("twins")
@click.argument("name", required=False)
@json_option
@click.pass_obj
def models_twins(obj: _Ctx, name: str | None, as_json: bool) -> None:
    """List the shape twins (tiny GGUFs with a real model's KV geometry; use them as
    `twin:NAME` wherever a MODEL is taken), or write NAME's into the cache and print its path."""
    rows = api.twins(obj.cfg(), name)
    if as_json:
        _emit(True, rows, "")
        return
    for r in rows:
        where = r.get("path") or "(written on first use)"
        click.echo(f"twin:{r['name']:14} {r['kv_bytes_per_token']:>9,} B/token  {r['real']:28} {where}")


@cli.command()
@click.argument("model", required=False)
@json_option
@click.pass_obj
def info(obj: _Ctx, model: str | None, as_json: bool) -> None:
    """Show MODEL's signature (a registry name or a .gguf path)."""
    cfg = obj.cfg()
    sig = api.info(model or cfg.runtime.default_model, cfg, progress=_progress())
    d = sig.to_dict()
    _emit(as_json, d, "\n".join(f"{k:16} {v}" for k, v in d.items()))


bridge_option = click.option(
    "--bridge", default=None, type=click.Path(dir_okay=False),
    help="Also accept sessions bridged from another model through this bridge file (trained "
         "for this model as its target; docs/protocol.md, BRIDGED_PREFIX).")


def _join_list(configured: str, more: tuple[str, ...]) -> str:
    """A comma-separated config list with the flag values added."""
    for value in more:
        if not value or "," in value or value != value.strip():
            raise click.BadParameter(f"{value!r}: one value per flag, without commas or surrounding spaces")
    return ",".join([*(x.strip() for x in configured.split(",") if x.strip()), *more])


def _gen_text(g: api.Generation) -> str:
    lines = [g.text, ""]
    lines.append("  ".join(f"{k}={v * 1e3:.1f}ms" for k, v in g.timings.items()))
    if g.bytes:
        lines.append("  ".join(f"{k}={v:,} B" for k, v in g.bytes.items()))
    for name in ("to", "digest"):
        if getattr(g, name) is not None:
            lines.append(f"{name}: {getattr(g, name)}")
    if g.verified is not None:
        lines.append(f"matches local: {g.verified.matches}")
    for name in ("wire", "cache", "written", "bridged", "steering"):
        part = getattr(g, name)
        if part is not None:  # one line per part: its scalar fields that are set
            shown = {k: v for k, v in dataclasses.asdict(part).items()
                     if v is not None and not isinstance(v, (dict, list))}
            lines.append(f"{name}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    if g.bridged is not None and g.bridged.label is not None:
        lines.append(f"label: {g.bridged.label}  scores: {g.bridged.label_scores}")
    return "\n".join(lines)


@cli.command()
@click.argument("model", required=False)
@click.option("-p", "--prompt", required=True, help="Prompt text.")
@n_option
@click.option("--cache", "use_cache", is_flag=True,
              help="Go through the prefix cache: import the longest cached prefix, store the new "
                   "chunks [config: cache.*].")
@click.option("--cache-from", default=None, metavar="PEERS",
              help="First fetch the chunks this cache lacks from peers' caches: shm:NAME or "
                   "multiaddrs (comma-separated, asked in order), or 'dht' (the holders the DHT "
                   "names among cache.trust); implies --cache [default: cache.peers].")
@click.option("--bootstrap", multiple=True, metavar="MULTIADDR",
              help="A DHT member to join through for --cache-from dht (repeatable; adds to "
                   "cache.bootstrap).")
@click.option("--trust", multiple=True, metavar="PEER_ID",
              help="A peer id whose chunks a DHT lookup may fetch, or * for any (repeatable; adds "
                   "to cache.trust).")
@token_options
@json_option
@click.pass_obj
def generate(obj: _Ctx, model: str | None, prompt: str, n_tokens: int | None, use_cache: bool,
             cache_from: str | None, bootstrap: tuple[str, ...], trust: tuple[str, ...], token: str | None,
             token_file: str | None, as_json: bool) -> None:
    """Greedy generation in this process (the reference a handoff must match)."""
    cfg = obj.cfg()
    cfg = cfg.replace(cache_bootstrap=_join_list(cfg.cache.bootstrap, bootstrap),
                      cache_trust=_join_list(cfg.cache.trust, trust))
    g = api.generate(model or cfg.runtime.default_model, prompt, n_tokens, cfg, progress=_progress(),
                     cache=use_cache, cache_from=cache_from, token=client_token(token, token_file))
    _emit(as_json, g, _gen_text(g) + _fetch_text(g))


def _fetch_text(g: api.Generation) -> str:
    f = g.fetch
    if f is None:
        return ""
    line = (f"\nfetched {f.chunks} of the {f.lacking} chunk(s) this cache lacked"
            + (f" from {', '.join(f.sources)}" if f.sources else ""))
    if f.untrusted:
        line += (f"\nthe DHT names holders not in cache.trust (not asked): {', '.join(f.untrusted)}; "
                 "add one with --trust PEER_ID if you accept its cells")
    for err in f.errors:
        line += f"\nskipped {err}"
    return line


@cli.group()
def cache() -> None:
    """The prefix cache: chunks of KV cells keyed by the prompt prefix they continue."""


@cache.command("stats")
@json_option
@click.pass_obj
def cache_stats(obj: _Ctx, as_json: bool) -> None:
    """Entries and bytes per tier, and the bounds (cache.ram_bytes, cache.disk_bytes)."""
    st = api.cache_stats(obj.cfg())
    disk = st["tiers"]["disk"]
    _emit(as_json, st, f"disk tier {st['dir']}: {disk['entries']} chunk(s), {disk['bytes']:,} of "
          f"{disk['capacity']:,} bytes; {st['chunk_tokens']} tokens per chunk")


@cache.command("ls")
@json_option
@click.pass_obj
def cache_ls(obj: _Ctx, as_json: bool) -> None:
    """Every chunk on disk, most recently used first."""
    rows = api.cache_list(obj.cfg())
    lines = [f"{len(rows)} chunk(s)"] + [f"  {r['key'][:16]}  {r['bytes']:>12,} B  "
                                         f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r['last_used']))}"
                                         for r in rows]
    _emit(as_json, {"entries": rows}, "\n".join(lines))


@cache.command("clear")
@json_option
@click.pass_obj
def cache_clear(obj: _Ctx, as_json: bool) -> None:
    """Remove every chunk from the disk tier."""
    n = api.cache_clear(obj.cfg())
    _emit(as_json, {"removed": n}, f"removed {n} chunk(s)")


@cli.command()
@click.argument("model", required=False)
@click.option("-p", "--prompt", required=True, help="Prompt text.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Message file.")
@click.option("--as", "kind", type=click.Choice(api.EXPORT_KINDS), default="snapshot", show_default=True,
              help="snapshot: KV_CACHE; memory: the same cells as KV_MEMORY; prefix: the prompt's "
                   "embedding rows as a VIRTUAL_PREFIX.")
@click.option("--format", "file_format", type=click.Choice(["edgelink", "llama"]), default="edgelink",
              show_default=True, help="edgelink: a verified message file (resume, inspect); llama: a "
                                      "llama.cpp sequence-state file (llama_state_seq_load_file, "
                                      "llama-server slots).")
@wire_option
@json_option
@click.pass_obj
def export(obj: _Ctx, model: str | None, prompt: str, output: str, kind: str, file_format: str,
           wire: str | None, as_json: bool) -> None:
    """Write the handshake and one tensor message about PROMPT to a file (its K/V tensors
    encoded with --wire when that names a codec; auto and raw write them raw), or with
    --format llama the sequence as llama.cpp saves one."""
    cfg = obj.cfg(wire_codec=wire_codec(wire))
    g = api.export(model or cfg.runtime.default_model, prompt, output, cfg, progress=_progress(),
                   kind=kind, file_format=file_format)
    _emit(as_json, g, f"wrote {output}\n" + _gen_text(g).lstrip())

    codec = CODECS.get(cfg.wire.codec)
    if codec is not None and codec.lossy:
        click.echo(f"note: {cfg.wire.codec} is lossy; a reader applies this file only with "
                   "wire.allow_lossy = on (edgelink --set wire.allow_lossy=on resume ...)", err=True)


@cli.command("import-llama")
@model_and_file
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="Write the state as an edgelink message file.")
@click.option("--to", default=None, help="Hand the state off to this receiver (shm:NAME or a multiaddr).")
@n_option
@token_options
@json_option
@click.pass_obj
def import_llama(obj: _Ctx, model_file: tuple[str, ...], output: str | None, to: str | None,
                 n_tokens: int | None, token: str | None, token_file: str | None, as_json: bool) -> None:
    """Read a llama.cpp sequence-state FILE (llama_state_seq_save_file; llama-server's
    --slot-save-path slots), verify it against MODEL, and write it as an edgelink message
    (-o) and/or hand it off (--to)."""
    if output is None and to is None:
        raise click.UsageError("give -o FILE (an edgelink message file) and/or --to PEER (a handoff)")
    cfg = obj.cfg()
    model, file = split_model_file(model_file, cfg.runtime.default_model)
    token = client_token(token, token_file)
    g = api.import_llama(model, file, output=output, to=to, n_tokens=n_tokens,
                         token=token, cfg=cfg, progress=_progress())
    _emit(as_json, g, f"read {g.prompt_tokens} tokens from {file}\n" + _gen_text(g).lstrip())


@cli.command()
@model_and_file
@click.option("-p", "--prompt", default=None, help="Text to read after the file's messages.")
@n_option
@json_option
@click.pass_obj
def resume(obj: _Ctx, model_file: tuple[str, ...], prompt: str | None, n_tokens: int | None,
           as_json: bool) -> None:
    """Apply a message FILE to MODEL (verified), optionally read PROMPT, continue greedily."""
    cfg = obj.cfg()
    model, file = split_model_file(model_file, cfg.runtime.default_model)
    g = api.resume(model, file, n_tokens, cfg, progress=_progress(), prompt=prompt)
    _emit(as_json, g, _gen_text(g))


@cli.command()
@click.argument("model", required=False)
@click.option("--shm", "shm_name", default=None, help="Shared-memory name to serve on.")
@click.option("--http", "http_listen", is_flag=False, flag_value="", default=None, metavar="[HOST:PORT]",
              help="Serve the OpenAI API instead (needs edgelink[server]), on HOST:PORT "
                   "[config: http.listen, 127.0.0.1:8080].")
@click.option("--api-key-file", type=click.Path(dir_okay=False), default=None,
              help="With --http: API keys clients must send, one per line [config: http.api_key_file].")
@click.option("--max-sessions", type=int, default=None, help="Exit after this many sessions.")
@bridge_option
@json_option
@click.pass_obj
def serve(obj: _Ctx, model: str | None, shm_name: str | None, http_listen: str | None, api_key_file: str | None,
          max_sessions: int | None, bridge: str | None, as_json: bool) -> None:
    """Receive KV snapshots on shm:NAME and continue them, or (--http) serve the OpenAI API
    with every prompt through the prefix cache (until Ctrl-C)."""
    cfg = obj.cfg(http_api_key_file=api_key_file)
    if (shm_name is None) == (http_listen is None):
        raise click.UsageError("give --shm NAME (handoffs) or --http [HOST:PORT] (the OpenAI API)")
    if http_listen is not None:
        def http_ready(ev: dict) -> None:
            _emit(as_json, ev, f"serving {ev['model']} on {ev['url']} (OpenAI API; Ctrl-C to stop): "
                  f"{ev['contexts']} context(s) of {ev['n_ctx']} tokens, {ev['threads_per_context']} "
                  f"thread(s) each (http.parallel, runtime.n_threads); prefix cache at {ev['cache_dir']}, "
                  f"{ev['reuse']} reuse (http.reuse)"
                  + ("" if ev["api_key"] else "; no API key (loopback only)"), compact=True)
            sys.stdout.flush()

        serve_http(model, cfg, listen=http_listen or None, on_ready=http_ready, progress=_progress())
        return

    def ready(ep: str) -> None:
        _emit(as_json, {"event": "ready", "endpoint": ep}, f"serving on {ep} (Ctrl-C to stop)", compact=True)
        sys.stdout.flush()

    def session(report) -> None:
        _emit(as_json, {"event": "session", **dataclasses.asdict(report)},
              f"session: applied={report.applied} rejected={report.rejected} "
              f"generated={report.generated} ended_by={report.ended_by}"
              + (" (bridged)" if report.bridged else ""), compact=True)
        sys.stdout.flush()

    api.serve(model or cfg.runtime.default_model, f"shm:{shm_name}", cfg, max_sessions=max_sessions,
              on_ready=ready, on_session=session, progress=_progress(), bridge=bridge, handle_signals=True)


@cli.command()
@click.argument("model", required=False)
@click.option("-p", "--prompt", required=True, help="Prompt text.")
@click.option("--to", "to", required=True,
              help="Receiver endpoint: shm:NAME, a node's /ip4/HOST/tcp/PORT/p2p/PEERID, or "
                   "/p2p/PEERID alone (found through the DHT with cache.bootstrap, or on the LAN with mDNS).")
@n_option
@click.option("--verify", is_flag=True, help="Also continue locally and report whether both match.")
@token_ids_option
@token_options
@click.option("--bridge", default=None, type=click.Path(dir_okay=False),
              help="Hand PROMPT to a receiver running the bridge's target model: ship the bridge's "
                   "output (BRIDGED_PREFIX) instead of the KV state; MODEL is the bridge's source.")
@wire_option
@json_option
@click.pass_obj
def handoff(obj: _Ctx, model: str | None, prompt: str, to: str, n_tokens: int | None,
            verify: bool, no_token_ids: bool, token: str | None, token_file: str | None, bridge: str | None,
            wire: str | None, as_json: bool) -> None:
    """Prefill here, ship the KV state to a receiver, print its continuation (with --bridge:
    a bridge's reading of PROMPT to a receiver running another model, and its label scores)."""
    cfg = obj.cfg(wire_codec=wire_codec(wire))
    token = client_token(token, token_file)
    if bridge:
        if verify:
            raise click.UsageError("--verify compares with this model's own continuation; a bridged "
                                   "receiver runs another model")

        g = api_latent.bridged_handoff(bridge, prompt, to, model, n_tokens, cfg, token=token)
    else:
        g = api.handoff(model or cfg.runtime.default_model, prompt, to, n_tokens, cfg, verify=verify,
                        token=token, progress=_progress(), token_ids=not no_token_ids)
    _emit(as_json, g, _gen_text(g))


@cli.command()
@click.argument("model", required=False)
@click.option("-p", "--prompt", default="Alice and Bob are two robots who share a workshop. One morning,",
              show_default=True, help="Prompt the sender reads.")
@n_option
@json_option
@click.pass_obj
def demo(obj: _Ctx, model: str | None, prompt: str, n_tokens: int | None, as_json: bool) -> None:
    """A real two-process handoff: start a receiver, ship it our KV state, compare continuations."""
    cfg = obj.cfg()
    d = api.demo(model or cfg.runtime.default_model, prompt, n_tokens, cfg,
                 progress=None if as_json else _progress(),
                 log=None if as_json else lambda m: click.echo(m, err=True))
    g = d.handoff
    human = "\n".join([
        f"process A (pid {d.sender_pid}) read the prompt: {prompt!r}",
        f"process B (pid {d.receiver_pid}) did not read it; it received {g.bytes['payload']:,} bytes of KV state "
        "(cells and token ids)",
        f"  over shm in {g.timings['snapshot_roundtrip_s'] * 1e3:.1f} ms "
        f"(re-reading the prompt would take {g.timings['prefill_s'] * 1e3:.1f} ms here)",
        "",
        f"B continued: {g.text!r}",
        f"A would say: {d.local_text!r}",
        f"identical: {g.verified.matches}",
    ])
    _emit(as_json, d, human)
    if not g.verified.matches:
        sys.exit(1)


@cli.command()
@json_option
@click.pass_obj
def doctor(obj: _Ctx, as_json: bool) -> None:
    """Check this machine and install: llama.cpp's build against the CPU, AMX, the native
    helpers, dependencies and extras, cache, identity and shared-memory paths. Exits 1 if
    anything would fail, and says what to change."""

    report = run_doctor(obj.cfg())
    marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
    lines = []
    for c in report.checks:
        lines.append(f"{marks[c.status]}  {c.area:9} {c.name:20} {c.detail}")
        if c.fix:
            lines.append(f"      {'':9} {'':20} -> {c.fix}")
    lines.append(f"llama.cpp: {report.system_info}")
    _emit(as_json, {"ok": report.ok, "status": report.worst(), "system_info": report.system_info,
                    "checks": [dataclasses.asdict(c) for c in report.checks]}, "\n".join(lines))
    if any(c.status == FAIL for c in report.checks):
        sys.exit(1)


@cli.command("id")
@json_option
@click.pass_obj
def id_(obj: _Ctx, as_json: bool) -> None:
    """Show this machine's libp2p peer id (creating its key file, mode 0600, if missing)."""
    d = api.identity(obj.cfg())
    _emit(as_json, d, f"{d['peer_id']}\n  key file: {d['key_file']}" + ("  (created)" if d["created"] else ""))


@cli.command()
@click.option("--timeout", "timeout_s", type=float, default=None,
              help="Seconds to listen [config: p2p.discover_timeout_s].")
@click.option("--peer", "peer_id", default=None, help="Stop as soon as this peer id is heard.")
@json_option
@click.pass_obj
def discover(obj: _Ctx, timeout_s: float | None, peer_id: str | None, as_json: bool) -> None:
    """List libp2p peers (edgelink nodes started with --mdns) announcing on the LAN via mDNS."""
    cfg = obj.cfg()
    limit = cfg.p2p.discover_timeout_s if timeout_s is None else timeout_s
    peers = api.discover(cfg, limit, peer_id=peer_id)
    lines = [f"{len(peers)} peer(s) heard in {limit:g} s"]
    for p in peers:
        lines += [f"  {p.peer_id}"] + [f"    {a}" for a in p.addrs]
    _emit(as_json, {"timeout_s": limit, "peers": [dataclasses.asdict(p) for p in peers]}, "\n".join(lines))
    if peer_id is not None and not peers:
        sys.exit(1)


@cli.command()
@click.argument("model", required=False)
@click.option("--listen", default=None, help="Multiaddr to listen on [config: p2p.listen].")
@click.option("--mdns", is_flag=True, default=False,
              help="Announce this node on the LAN with mDNS [config: p2p.mdns].")
@click.option("--token", "tokens", multiple=True, metavar="TOKEN",
              help="A bearer token a client must present (repeatable; adds to node.tokens).")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="Bearer tokens, one per line (node.token_file): unlike --token, not visible in "
                   "the process list.")
@click.option("--open", "open_", is_flag=True, default=False,
              help="Serve any peer that reaches a non-loopback address, with neither allowlist nor "
                   "token [config: node.open].")
@click.option("--allow-peer", "allow_peers", multiple=True, metavar="PEER_ID",
              help="A peer id allowed to start sessions (repeatable; adds to node.allow_peers; "
                   "with none anywhere, any peer may).")
@click.option("--dht", is_flag=True, default=False,
              help="Join the cache DHT and announce the chunks of this node's prefix cache "
                   "[config: cache.dht].")
@click.option("--via", "via", multiple=True, metavar="RELAY",
              help="Reserve a slot on this relay (/ip4/H/tcp/P/p2p/ID, repeatable) and be reachable "
                   "through it at the /p2p-circuit address printed [config: p2p.relays].")
@click.option("--bootstrap", multiple=True, metavar="MULTIADDR",
              help="A DHT member to join through (repeatable; adds to cache.bootstrap).")
@bridge_option
@json_option
@click.pass_obj
def node(obj: _Ctx, model: str | None, listen: str | None, mdns: bool, tokens: tuple[str, ...],
         token_file: str | None, open_: bool, allow_peers: tuple[str, ...], dht: bool, via: tuple[str, ...],
         bootstrap: tuple[str, ...], bridge: str | None, as_json: bool) -> None:
    """Accept encrypted handoffs over libp2p until SIGINT/SIGTERM."""
    cfg = obj.cfg(p2p_mdns=1 if mdns else None, cache_dht="on" if dht else None,
                  node_token_file=token_file, node_open="on" if open_ else None)
    if bootstrap:
        cfg = cfg.replace(cache_bootstrap=_join_list(cfg.cache.bootstrap, bootstrap))
    if via:
        cfg = cfg.replace(p2p_relays=_join_list(cfg.p2p.relays, via))
    if tokens or allow_peers:
        cfg = cfg.replace(node_tokens=_join_list(cfg.node.tokens, tokens),
                          node_allow_peers=_join_list(cfg.node.allow_peers, allow_peers))

    def ready(ev: dict) -> None:
        per = ev["kv_bytes_per_context"] / 1e6
        _emit(as_json, ev, "node ready (Ctrl-C to stop); dial one of:\n  " + "\n  ".join(ev["addrs"])
              + (f"\nthis node is {ev['reachability']['said']}" if "reachability" in ev else "")
              + f"\nmemory: each client's context holds a KV cache of {per:,.0f} MB (n_ctx x KV bytes "
              f"per token); {ev['contexts']} now, up to {ev['max_clients']} ({ev['max_clients'] * per:,.0f} MB) "
              "as clients arrive (node.max_clients)", compact=True)
        sys.stdout.flush()

    def session(ev: dict) -> None:
        if ev.get("event") == "cache_announced":
            _emit(as_json, ev, f"announced {ev['keys']} key(s) to the DHT (its own, for /p2p/ID lookups, and its chunks'; "
                  f"{ev['total']} in all, "
                  f"{ev['pending']} waiting for a member to take them; {ev['peers']} DHT peer(s) known)",
                  compact=True)
            sys.stdout.flush()
            return
        if ev.get("event") == "refused":
            more = f" (and {ev['not_reported']} more not shown)" if ev.get("not_reported") else ""
            _emit(as_json, ev, f"refused a stream from {ev['peer']} ({ev['ip']}): {ev['reason']}{more}",
                  compact=True)
            sys.stdout.flush()
            return
        if ev.get("event") == "stopping":
            _emit(as_json, ev, f"stopping: {ev['active_sessions']} session(s) may finish within "
                  f"{ev['grace_s']} s; new sessions are refused", compact=True)
            sys.stdout.flush()
            return
        _emit(as_json, ev, f"session {ev['session']} from {ev['peer']}: applied={ev['applied']} "
              f"rejected={ev['rejected']} generated={ev['generated']} ended_by={ev['ended_by']}",
              compact=True)
        sys.stdout.flush()

    api.node(model or cfg.runtime.default_model, cfg, listen=listen, on_ready=ready,
             on_session=session, progress=None if as_json else _progress(), bridge=bridge, handle_signals=True)


@cli.command()
@click.option("--listen", "listen", multiple=True, metavar="MULTIADDR",
              help="Where to listen (repeatable) [config: relay.listen]. Peers on both sides must reach it.")
@json_option
@click.pass_obj
def relay(obj: _Ctx, listen: tuple[str, ...], as_json: bool) -> None:
    """Relay encrypted sessions to nodes behind NAT (circuit relay v2) until SIGINT/SIGTERM."""
    cfg = obj.cfg()

    def event(ev: dict) -> None:
        if ev["event"] == "reservation":
            text = (f"reserved a slot for {ev['peer']}" if ev["ok"]
                    else f"refused a reservation from {ev['peer']}: {ev['reason']}")
        else:
            text = (f"circuit {' <-> '.join(ev['peers'])} ended ({ev['ended_by']}): {ev['bytes']:,} B "
                    f"in {ev['seconds']} s")
        _emit(as_json, ev, text, compact=True)
        sys.stdout.flush()

    r = api.relay(cfg, listen=listen, on_event=event)
    r_cfg = cfg.relay
    _emit(as_json, {"event": "ready", "peer_id": r.peer_id, "addrs": r.addrs},
          "relay ready (Ctrl-C to stop); nodes reserve with `edgelink node --via ADDR`, one of:\n  "
          + "\n  ".join(r.addrs)
          + f"\nlimits: {r_cfg.max_reservations} reservations of {r_cfg.reservation_ttl_s:g} s, "
            f"{r_cfg.max_circuits} circuits per node, {r_cfg.circuit_bytes:,} B and "
            f"{r_cfg.circuit_duration_s:g} s per circuit (relay.*; 0: none)", compact=True)
    sys.stdout.flush()
    r.run(handle_signals=True)
    if not as_json:
        t = r.totals
        click.echo(f"relayed {t['circuits']} circuit(s), {t['bytes']:,} B; {t['reservations']} reservation(s)",
                   err=True)


@cli.command()
@click.argument("model", required=False)
@click.option("-p", "--prompt", default=None,
              help="One user message, answered, then exit; without it, an interactive chat (an empty "
                   "line or Ctrl-D ends it).")
@click.option("--system", default=None, help="A system message first.")
@click.option("-n", "--max-tokens", type=click.IntRange(1), default=512, show_default=True,
              help="Most tokens per reply.")
@click.option("--temperature", type=click.FloatRange(0.0, 2.0), default=0.0, show_default=True,
              help="0: greedy.")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Repeat a sampled reply.")
@click.option("--stop", multiple=True, help="A string that ends a reply (repeatable).")
@json_option
@click.pass_obj
def chat(obj: _Ctx, model: str | None, prompt: str | None, system: str | None, max_tokens: int,
         temperature: float, top_p: float, seed: int | None, stop: tuple[str, ...], as_json: bool) -> None:
    """Chat with MODEL through its own chat template, streamed, every turn through the prefix
    cache (the next turn reuses the previous turn's cells)."""

    cfg = obj.cfg(http_parallel=1)
    engine = Engine(model or cfg.runtime.default_model, cfg, progress=None if as_json else _progress())
    params = Params(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop)
    messages = [{"role": "system", "content": system}] if system else []
    interactive = prompt is None
    try:
        while True:
            if interactive:
                try:
                    text = click.prompt("you", prompt_suffix="> ", default="", show_default=False, err=True)
                except (click.Abort, EOFError):
                    break
                if not text.strip():
                    break
            else:
                text = prompt
            messages.append({"role": "user", "content": text})
            parts: list[str] = []
            out = None
            for item in engine.run(engine.chat_tokens(messages), params):
                if isinstance(item, Outcome):
                    out = item
                else:
                    parts.append(item)
                    if not as_json:
                        click.echo(item, nl=False)
                        sys.stdout.flush()
            reply = "".join(parts)
            messages.append({"role": "assistant", "content": reply})
            tps = out.completion_tokens / out.decode_s if out.decode_s > 0 else 0.0
            if as_json:
                _emit(True, {"reply": reply, "prompt_tokens": out.prompt_tokens, "cached_tokens": out.cached_tokens,
                             "completion_tokens": out.completion_tokens, "finish_reason": out.finish_reason,
                             "prefill_s": out.prefill_s, "decode_s": out.decode_s, "tokens_per_s": tps}, "",
                      compact=True)
            else:
                click.echo("")
                click.echo(f"[{out.completion_tokens} tokens, {tps:.1f} tokens/s; prompt {out.prompt_tokens} tokens, "
                           f"{out.cached_tokens} from the cache, {out.prefill_s * 1e3:.0f} ms; {out.finish_reason}]",
                           err=True)
            if not interactive:
                break
    finally:
        engine.close()


@cli.command()
@click.argument("model", required=False)
@click.option("-p", "--prompt", "turns", multiple=True, required=True,
              help="A turn this process adds (repeat for several turns).")
@click.option("--to", "to", required=True, help="The peer's endpoint, e.g. shm:demo.")
@n_option
@click.option("--run-on", is_flag=True, help="Let each reply run past the model's end-of-turn token "
                                              "(by default a reply ends there).")
@token_ids_option
@wire_option
@json_option
@click.pass_obj
def converse(obj: _Ctx, model: str | None, turns: tuple[str, ...], to: str, n_tokens: int | None,
             run_on: bool, no_token_ids: bool, wire: str | None, as_json: bool) -> None:
    """Take turns with a peer on one sequence, each side shipping only the KV cells it added."""
    cfg = obj.cfg(wire_codec=wire_codec(wire))
    conv = api.converse(model or cfg.runtime.default_model, list(turns), to, n_tokens, cfg,
                        progress=None if as_json else _progress(), stop_at_eog=not run_on,
                        token_ids=not no_token_ids)
    lines = []
    for r in conv.rounds:
        lines.append(f"turn {r.turn}: +{r.sent_tokens} tokens, sent {r.sent_bytes:,} B ({r.sent_kind}); "
                     f"peer replied {len(r.reply_tokens)} tokens, pulled back {r.pulled_bytes:,} B; "
                     f"a full snapshot would be {r.full_snapshot_bytes:,} B at {r.context_tokens} tokens")
        lines.append(f"  peer: {r.reply_text!r}")
    lines.append("both sides hold the same state: " + (
        "not checked (sent without token ids: the peer holds -1 for ours)" if conv.same_state is None
        else str(conv.same_state)))
    _emit(as_json, conv, "\n".join(lines))
    if conv.same_state is False:
        sys.exit(1)


@cli.command()
@click.argument("model", required=False)
@click.option("--text", required=True, help="Text whose token-embedding rows are sent as the prefix.")
@click.option("--to", "to", required=True, help="The peer's endpoint, e.g. shm:demo.")
@click.option("--keep", is_flag=True, help="Append to the peer's sequence instead of resetting it.")
@click.option("--energy-match", is_flag=True, help="Rescale rows to the peer's mean embedding norm.")
@n_option
@json_option
@click.pass_obj
def prefix(obj: _Ctx, model: str | None, text: str, to: str, keep: bool, energy_match: bool,
           n_tokens: int | None, as_json: bool) -> None:
    """Send a VIRTUAL_PREFIX (embedding rows, not tokens) and print the peer's continuation."""
    cfg = obj.cfg()
    g = api.send_prefix(model or cfg.runtime.default_model, to, text=text, n_tokens=n_tokens,
                        reset=not keep, energy_match=energy_match, cfg=cfg,
                        progress=None if as_json else _progress())
    _emit(as_json, g, _gen_text(g))


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@json_option
@click.pass_obj
def inspect(obj: _Ctx, file: str, as_json: bool) -> None:
    """Describe a message file: each frame's kind, layers, positions, apply mode, tensors."""

    frames = inspect_file(file, obj.cfg())
    lines = []
    for f in frames:
        if f["frame"] == "HELLO":
            m = f["model"]
            lines.append(f"HELLO from a {f['role']}: {m['architecture']} {m['name']!r}, "
                         f"{m['n_layer']} layers x {m['n_embd']}, weights {str(m['weights_digest'])[:16]}..., "
                         f"kinds {', '.join(f['kinds'])}")
        elif f["frame"] == "TENSOR":
            lines.append(f"TENSOR #{f['message_id']} {f['kind']}/{f['apply']} slot {f['seq_slot']} "
                         f"layers {f['layers']} tokens {f['tokens']}: {len(f['tensors'])} tensors, "
                         f"{f['payload_bytes']:,} B, checksums {'verified' if f['verified'] else 'FAIL'}")
            shown = [t for i, t in enumerate(f["tensors"]) if i < 8 or not t["verified"]]
            for t in shown:
                lines.append(f"  {t['name']:14} {t['dtype']:5} {str(t['shape']):16} "
                             f"{t['checksum'][:16]} {'ok' if t['verified'] else 'CORRUPT'}")
            if len(f["tensors"]) > len(shown):
                lines.append(f"  ... {len(f['tensors']) - len(shown)} more, all ok (use --json)")
        else:
            lines.append(f"{f['frame']} #{f['message_id']}")
    _emit(as_json, frames, "\n".join(lines))
    if any(f["frame"] == "TENSOR" and not f["verified"] for f in frames):
        click.echo("error (checksum): the file's tensors do not verify (CORRUPT above)", err=True)
        sys.exit(ChecksumMismatch.exit_code)  # a corrupt file fails, as resume and import treat it


@cli.command()
@click.argument("model", required=False)
@click.option("--text", required=True, help="Text read here; its KV cells become the peer's memory.")
@click.option("--question", default=None, help="Text the peer reads after the memory, then answers.")
@click.option("--to", "to", required=True, help="The peer's endpoint, e.g. shm:demo.")
@n_option
@json_option
@click.pass_obj
def memory(obj: _Ctx, model: str | None, text: str, question: str | None, to: str,
           n_tokens: int | None, as_json: bool) -> None:
    """Hand the peer KV_MEMORY (another text's K/V cells, placed after its own context)."""
    cfg = obj.cfg()
    g = api.send_memory(model or cfg.runtime.default_model, to, text, question=question,
                        n_tokens=n_tokens, cfg=cfg, progress=None if as_json else _progress())
    _emit(as_json, g, _gen_text(g))


@cli.group()
def latent() -> None:
    """Hidden slices and residual patches (docs/latent.md)."""


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of layers") from None


@latent.command("capture")
@click.argument("model", required=False)
@click.option("-p", "--prompt", required=True, help="Prompt text.")
@click.option("--layers", required=True, help="Comma-separated layer indices.")
@click.option("--to", "to", default=None, help="Send the slice to a serving peer (shm:NAME).")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False), help="Write the slice to a file.")
@json_option
@click.pass_obj
def latent_capture(obj: _Ctx, model: str | None, prompt: str, layers: str, to: str | None,
                   output: str | None, as_json: bool) -> None:
    """Capture a HIDDEN_SLICE of PROMPT; print norms, or send it (--to) or write it (-o)."""
    import numpy as np

    cfg = obj.cfg()
    model = model or cfg.runtime.default_model
    out: object
    if to:
        out = api_latent.send_hidden(model, prompt, to, _layers(layers), cfg=cfg)
    elif output:
        out = api_latent.export_hidden(model, prompt, output, _layers(layers), cfg=cfg)
    else:
        sl = api_latent.capture_hidden(model, prompt, _layers(layers), cfg=cfg)
        out = {"positions": sl.positions.tolist(),
               "mean_row_norm": {str(k): float(np.linalg.norm(v, axis=1).mean()) for k, v in sl.rows.items()}}
    shown = dataclasses.asdict(out) if dataclasses.is_dataclass(out) else out
    _emit(as_json, out, json.dumps(shown, indent=2, default=str))


@latent.command("steer")
@click.argument("model", required=False)
@click.option("-p", "--prompt", required=True, help="Prompt the peer decodes with the patch.")
@click.option("--to", "to", required=True, help="A serving peer with runtime.eval_hook=on (shm:NAME).")
@click.option("--layer", type=int, required=True, help="Layer whose residual is patched.")
@click.option("--positive", multiple=True, required=True, help="Text for the positive side (repeatable).")
@click.option("--negative", multiple=True, required=True, help="Text for the negative side (repeatable).")
@click.option("--gain", type=float, default=2.0, show_default=True, help="Gain (capped by the peer's max_gain).")
@n_option
@json_option
@click.pass_obj
def latent_steer(obj: _Ctx, model: str | None, prompt: str, to: str, layer: int, positive: tuple[str, ...],
                 negative: tuple[str, ...], gain: float, n_tokens: int | None, as_json: bool) -> None:
    """Send a RESIDUAL_PATCH (positive minus negative mean activations) and show the continuation."""

    cfg = obj.cfg()
    g = api_latent.steer(model or cfg.runtime.default_model, prompt, to, layer, list(positive), list(negative),
                         gain=gain, n_tokens=n_tokens, cfg=cfg)
    _emit(as_json, g, _gen_text(g))


@latent.command("apply")
@model_and_file
@n_option
@json_option
@click.pass_obj
def latent_apply(obj: _Ctx, model_file: tuple[str, ...], n_tokens: int | None, as_json: bool) -> None:
    """Verify and apply a file of KV_CACHE / HIDDEN_SLICE / RESIDUAL_PATCH frames, then continue."""

    cfg = obj.cfg()
    model, file = split_model_file(model_file, cfg.runtime.default_model)
    out = api_latent.apply_file(model, file, n_tokens=n_tokens, cfg=cfg)
    _emit(as_json, out, f"applied {', '.join(out.applied) or 'nothing'}\n{out.text}")


from edgelink.cli.bench import bench  # noqa: E402  (registers `edgelink bench ...`)
from edgelink.cli.bridge import bridge  # noqa: E402  (registers `edgelink bridge ...`)

cli.add_command(bench)
cli.add_command(bridge)


_GLOBAL_WITH_VALUE = ("--set", "--config")
_GLOBAL_FLAGS = ("-v", "-vv", "-vvv", "--verbose")


def hoist_global_options(argv: list[str]) -> list[str]:
    """``--set``/``--config``/``-v`` given after the subcommand (``generate ... --set k=v``) move
    in front of it, so they work in either place: one grammar, whatever the order."""
    front, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            rest += argv[i:]
            break
        if a in _GLOBAL_WITH_VALUE and i + 1 < len(argv):
            front += argv[i:i + 2]
            i += 2
            continue
        if a.startswith(tuple(f"{o}=" for o in _GLOBAL_WITH_VALUE)) or a in _GLOBAL_FLAGS:
            front.append(a)
        else:
            rest.append(a)
        i += 1
    return front + rest


def main() -> None:
    try:
        cli.main(args=hoist_global_options(sys.argv[1:]), standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except EdgelinkError as exc:
        click.echo(f"error ({exc.code}): {exc}", err=True)
        if "--json" in sys.argv[1:]:  # a reader of JSON gets its error as JSON too
            click.echo(json.dumps({"error": {"code": exc.code, "type": type(exc).__name__, "message": str(exc),
                                             "exit_code": exc.exit_code}}))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
