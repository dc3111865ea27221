"""`edgelink bench ...`: every measurement, side by side with what a user would do instead."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import click

from edgelink.bench import format_handoff_table, run_handoff_bench
from edgelink.bench.bridge import format_bridge_tables, run_bridge_bench
from edgelink.bench.buffers import format_buffers_table, run_buffers_bench
from edgelink.bench.cache import run_cache_bench
from edgelink.bench.codecs import (
    format_codec_speed,
    format_codecs_table,
    run_codec_speed,
    run_codecs_bench,
)
from edgelink.bench.hook import format_hook_table, run_hook_bench
from edgelink.bench.http import run as run_http_bench
from edgelink.bench.link import run_link_bench
from edgelink.bench.memory import format_memory_table, run_memory_bench
from edgelink.bench.nat import format_nat_table, run_nat_bench
from edgelink.bench.netns import remote_host
from edgelink.bench.remote_prefill import format_remote_prefill_table, run_remote_prefill_bench
from edgelink.bench.report import handoff_report
from edgelink.bench.threads import format_threads_table, parse_settings, run_threads_bench
from edgelink.cli.common import _Ctx, _emit, json_option
from edgelink.wire.codecs import CODECS


def _log(as_json: bool) -> Callable[[str], None] | None:
    """Progress lines on stderr, unless the output is JSON for a program."""
    return None if as_json else lambda s: click.echo(s, err=True)


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers", param_hint=flag) from None


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=flag) from None


def _models(obj: _Ctx, models: tuple[str, ...]) -> list[str]:
    return list(models) or [obj.cfg().runtime.default_model]


@click.group()
def bench() -> None:
    """Benchmarks that compare edgelink with the baseline a user would pick instead."""


@bench.command("handoff")
@click.argument("model", required=False)
@click.option("--tokens", default=None, help="Comma-separated context lengths [config: bench.tokens].")
@click.option("--repeats", type=int, default=None, help="Repetitions per point [config: bench.repeats].")
@json_option
@click.pass_obj
def bench_handoff(obj: _Ctx, model: str | None, tokens: str | None, repeats: int | None,
                  as_json: bool) -> None:
    """Re-prefill vs KV handoff over shared memory vs memcpy, side by side."""

    cfg = obj.cfg(bench_tokens=tokens, bench_repeats=repeats)
    report = run_handoff_bench(model or cfg.runtime.default_model, cfg,
                               log=_log(as_json))
    _emit(as_json, report, format_handoff_table(report))


@bench.command("hook")
@click.argument("model", required=False)
@click.option("-n", "--tokens", "n_tokens", type=int, default=64, show_default=True, help="Tokens decoded per run.")
@click.option("--repeats", type=int, default=None, help="Rounds (best reported) [default: max(bench.repeats, 9)].")
@click.option("--threads", type=int, default=None, help="CPU threads [config: runtime.n_threads].")
@json_option
@click.pass_obj
def bench_hook(obj: _Ctx, model: str | None, n_tokens: int, repeats: int | None, threads: int | None,
               as_json: bool) -> None:
    """Decode speed: no eval hook vs hook installed idle vs hook capturing one layer."""

    cfg = obj.cfg(runtime_n_threads=threads)
    report = run_hook_bench(model or cfg.runtime.default_model, cfg, n_tokens=n_tokens, repeats=repeats,
                            log=_log(as_json))
    _emit(as_json, report, format_hook_table(report))


@bench.command("buffers")
@click.argument("model", required=False)
@click.option("--prompt-tokens", type=int, default=512, show_default=True, help="Tokens prefilled per run.")
@click.option("-n", "--tokens", "n_tokens", type=int, default=64, show_default=True, help="Tokens decoded per run.")
@click.option("--repeats", type=int, default=None, help="Rounds, each variant in a new process [config: bench.repeats].")
@json_option
@click.pass_obj
def bench_buffers(obj: _Ctx, model: str | None, prompt_tokens: int, n_tokens: int, repeats: int | None,
                  as_json: bool) -> None:
    """Prefill and decode speed with llama.cpp's extra weight buffers (AMX, repacking) on vs off."""

    cfg = obj.cfg()
    report = run_buffers_bench(model or cfg.runtime.default_model, cfg, prompt_tokens, n_tokens, repeats,
                               log=_log(as_json))
    _emit(as_json, report, format_buffers_table(report))


@bench.command("remote-prefill")
@click.argument("model", required=False)
@click.option("--prompt-tokens", type=click.IntRange(64), default=2000, show_default=True,
              help="Tokens of each prompt (a new one each round: nothing cached).")
@click.option("--mbit", type=click.FloatRange(0.1), default=100, show_default=True, help="The link's rate.")
@click.option("--laptop-cores", type=click.FloatRange(0.01), default=0.25, show_default=True,
              help="CPU the laptop (the HTTP engine) may use, in cores (a cgroup quota).")
@click.option("--repeats", type=int, default=None, help="Rounds [config: bench.repeats].")
@json_option
@click.pass_obj
def bench_remote_prefill(obj: _Ctx, model: str | None, prompt_tokens: int, mbit: float, laptop_cores: float,
                         repeats: int | None, as_json: bool) -> None:
    """A slow laptop's HTTP engine with and without a desktop's remote prefill (namespaces, cgroup; root)."""

    cfg = obj.cfg()
    report = run_remote_prefill_bench(model or cfg.runtime.default_model, cfg, prompt_tokens, mbit, laptop_cores,
                                      repeats, log=_log(as_json))
    _emit(as_json, report, format_remote_prefill_table(report))


@bench.command("threads")
@click.argument("model", required=False)
@click.option("--settings", default="0,1,2", show_default=True,
              help="Candidates, comma-separated: THREADS (0 = the default) or THREADS:WAIT "
                   "(WAIT: spin, passive, active, spin=N).")
@click.option("--prompt-tokens", type=click.IntRange(1), default=1024, show_default=True,
              help="Tokens the handoff prefills.")
@click.option("-n", "--tokens", "n_tokens", type=click.IntRange(1), default=32, show_default=True,
              help="Tokens the receiver replies with.")
@click.option("--load", "loads", type=click.Choice(["idle", "busy"]), multiple=True,
              help="Measure on an idle machine, with a second pair busy, or both (default).")
@click.option("--repeats", type=int, default=None, help="Rounds [config: bench.repeats].")
@json_option
@click.pass_obj
def bench_threads(obj: _Ctx, model: str | None, settings: str, prompt_tokens: int, n_tokens: int,
                  loads: tuple[str, ...], repeats: int | None, as_json: bool) -> None:
    """Thread settings side by side: `edgelink demo` and a handoff, idle and beside a busy pair."""

    cfg = obj.cfg()
    report = run_threads_bench(model or cfg.runtime.default_model, cfg, parse_settings(settings), prompt_tokens,
                               n_tokens, repeats, loads=loads or ("idle", "busy"),
                               log=_log(as_json))
    _emit(as_json, report, format_threads_table(report))


@bench.command("nat")
@click.argument("model", required=False)
@click.option("--prompt-tokens", type=click.IntRange(1), default=1024, show_default=True,
              help="Tokens the handoff prefills.")
@click.option("--mbit", type=click.FloatRange(0.1), default=100, show_default=True,
              help="Rate of every public link (the relay's and each router's).")
@click.option("--repeats", type=int, default=None, help="Rounds [config: bench.repeats].")
@json_option
@click.pass_obj
def bench_nat(obj: _Ctx, model: str | None, prompt_tokens: int, mbit: float, repeats: int | None,
              as_json: bool) -> None:
    """A handoff to a node behind NAT: direct, relayed, hole-punched (network namespaces; root)."""

    cfg = obj.cfg()
    report = run_nat_bench(model or cfg.runtime.default_model, cfg, prompt_tokens, mbit, repeats,
                           log=_log(as_json))
    _emit(as_json, report, format_nat_table(report))


@bench.command("http")
@click.argument("model", required=False)
@click.option("--prompt-tokens", type=int, default=2000, show_default=True, help="Tokens of the shared system prompt.")
@click.option("--requests", type=int, default=8, show_default=True, help="Questions on the shared prompt.")
@click.option("--turns", type=int, default=6, show_default=True, help="Turns of the chat case.")
@click.option("--max-tokens", type=int, default=16, show_default=True, help="Tokens generated per request.")
@click.option("--threads", type=int, default=None, help="Threads of both servers (default: all cores).")
@click.option("--peer-mbit", type=click.FloatRange(0.1), default=100, show_default=True,
              help="Rate of the link to the node the second server fetches the prefix from.")
@json_option
@click.pass_obj
def bench_http(obj: _Ctx, model: str | None, prompt_tokens: int, requests: int, turns: int, max_tokens: int,
               threads: int | None, peer_mbit: float, as_json: bool) -> None:
    """The OpenAI server against `python -m llama_cpp.server`: shared prompt, chat, restart, concurrency, peer."""
    cfg = obj.cfg()
    report = run_http_bench(model or cfg.runtime.default_model, cfg, prompt_tokens=prompt_tokens,
                            requests=requests, turns=turns, max_tokens=max_tokens, threads=threads,
                            peer_mbit=peer_mbit, say=(lambda s: click.echo(s, err=True)) if as_json else click.echo)
    if as_json:
        _emit(True, report, "")


@bench.command("transport")
@click.option("--sizes", default="1,16,64,256", show_default=True, help="Payload sizes in MB.")
@click.option("--repeats", type=int, default=None, help="Repetitions per point [config: bench.repeats].")
@click.option("--veth", is_flag=True,
              help="The receiver in its own network namespace behind a veth pair, not on loopback (root).")
@json_option
@click.pass_obj
def bench_transport(obj: _Ctx, sizes: str, repeats: int | None, veth: bool, as_json: bool) -> None:
    """Raw TCP vs libp2p (Noise, yamux) vs libp2p + end-to-end NaCl, on loopback or a veth link (`--veth`)."""
    from edgelink.bench.transport import (  # libp2p stacks: 1.6 s
        format_transport_table,
        run_transport_bench,
    )

    cfg = obj.cfg()
    sizes_mb = _ints(sizes, "--sizes")
    with remote_host() if veth else contextlib.nullcontext() as remote:
        where = {"ip": remote.ip, "wrapper": remote.wrapper} if remote else {}
        report = run_transport_bench(cfg, tuple(sizes_mb), repeats, log=_log(as_json), **where)
    _emit(as_json, report, format_transport_table(report))



@bench.command("report")
@click.argument("models", nargs=-1, metavar="[MODEL]...")
@click.option("--tokens", default=None, help="Comma-separated context lengths [config: bench.tokens].")
@click.option("--repeats", type=int, default=None, help="Repetitions per point [config: bench.repeats].")
@click.pass_obj
def bench_report(obj: _Ctx, models: tuple[str, ...], tokens: str | None, repeats: int | None) -> None:
    """`bench handoff` for each model, printed as docs/benchmarks.md's markdown tables."""

    cfg = obj.cfg(bench_tokens=tokens, bench_repeats=repeats)
    click.echo(handoff_report(_models(obj, models), cfg, log=_log(False)))


@bench.command("link")
@click.argument("models", nargs=-1, metavar="[MODEL]...")
@click.option("--tokens", type=click.IntRange(64), default=1024, show_default=True, help="Context length.")
@click.option("--rates", default="1000,100,20", show_default=True, help="Link rates in Mbit/s, comma-separated.")
@click.option("--repeats", type=click.IntRange(1), default=2, show_default=True, help="Handoffs per point.")
@click.option("--twin", is_flag=True, help="Shape twins: bytes, time and the break-even prefill speed.")
@json_option
@click.pass_obj
def bench_link(obj: _Ctx, models: tuple[str, ...], tokens: int, rates: str, repeats: int, twin: bool,
               as_json: bool) -> None:
    """Every way of moving a context across a tc-shaped veth link, side by side (root)."""

    report = run_link_bench(_models(obj, models), obj.cfg(), tokens, _floats(rates, "--rates"), repeats, twin,
                            log=(lambda s: click.echo(s, err=True)) if as_json else click.echo)
    _emit(as_json, report, "\n".join(report["summary"]))


@bench.command("cache")
@click.argument("models", nargs=-1, metavar="[MODEL]...")
@click.option("--prefix", type=click.IntRange(1), default=2000, show_default=True, help="Tokens of the shared prefix.")
@click.option("--question", type=click.IntRange(1), default=50, show_default=True, help="Tokens of the new question.")
@click.option("--chunk", type=click.IntRange(32), default=256, show_default=True, help="Cache chunk, in tokens.")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True, help="Rounds (medians reported).")
@click.option("--peer-rates", default="0,100,dht", show_default=True,
              help="Rows fetched from a node: 0 on loopback, N over a tc-shaped N Mbit/s veth link (root), "
                   "dht a node found through the DHT; empty for none.")
@json_option
@click.pass_obj
def bench_cache(obj: _Ctx, models: tuple[str, ...], prefix: int, question: int, chunk: int, repeats: int,
                peer_rates: str, as_json: bool) -> None:
    """The prefix cache against prefilling: a shared prefix and a new question, RAM, disk and peers."""

    rates = [r.strip() for r in peer_rates.split(",") if r.strip()]
    for r in rates:
        if r != "dht":
            _floats(r, "--peer-rates")
    report = run_cache_bench(_models(obj, models), obj.cfg(), prefix, question, repeats, chunk, rates,
                             log=(lambda s: click.echo(s, err=True)) if as_json else click.echo)
    if as_json:
        _emit(True, report, "")


@bench.command("bridge")
@click.option("--repeats", type=click.IntRange(1), default=50, show_default=True, help="Rounds (medians reported).")
@click.option("--layers", default="0,2,4,8,15", show_default=True, help="Source layers of the stopped captures.")
@json_option
@click.pass_obj
def bench_bridge(obj: _Ctx, repeats: int, layers: str, as_json: bool) -> None:
    """What a bridged handoff costs at run time: bridge apply, the sender's capture, the target's read."""

    report = run_bridge_bench(obj.cfg(), repeats, _ints(layers, "--layers"))
    _emit(as_json, report, format_bridge_tables(report))


@bench.command("codecs")
@click.argument("models", nargs=-1, metavar="[MODEL]...")
@click.option("--prompts", type=click.IntRange(1), default=50, show_default=True, help="Held-out texts per model.")
@click.option("--tokens", type=click.IntRange(16), default=1024, show_default=True, help="Prompt length.")
@click.option("--continue", "cont", type=click.IntRange(1), default=64, show_default=True,
              help="Continuation length compared.")
@click.option("--codecs", default=None, help="Comma-separated codecs [default: all].")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True, help="zstd threads while timing.")
@click.option("--speed", is_flag=True, help="Only encode/decode speed, on one and on two threads.")
@json_option
@click.pass_obj
def bench_codecs(obj: _Ctx, models: tuple[str, ...], prompts: int, tokens: int, cont: int, codecs: str | None,
                 threads: int, speed: bool, as_json: bool) -> None:
    """Each wire codec's quality (identical continuations, top-1, KL), size and speed on real models."""

    names = [c for c in (codecs or ",".join(CODECS)).split(",") if c]
    unknown = sorted(set(names) - set(CODECS))
    if unknown:
        raise click.BadParameter(f"unknown codec(s) {', '.join(unknown)}; known: {', '.join(CODECS)}",
                                 param_hint="--codecs")
    cfg = obj.cfg()
    if speed:
        report = run_codec_speed(_models(obj, models), cfg, tokens, names)
        _emit(as_json, report, format_codec_speed(report))
        return
    report = run_codecs_bench(_models(obj, models), cfg, prompts, tokens, cont, names, threads,
                                               log=_log(as_json))
    _emit(as_json, report, format_codecs_table(report))


@bench.command("memory")
@click.argument("models", nargs=-1, metavar="[MODEL]...")
@json_option
@click.pass_obj
def bench_memory(obj: _Ctx, models: tuple[str, ...], as_json: bool) -> None:
    """KV_MEMORY against re-prefilling the fact's text: answers found, equal tokens, receiver ms."""

    cfg = obj.cfg()
    rows = [run_memory_bench(m, cfg) for m in _models(obj, models)]
    _emit(as_json, rows, format_memory_table(rows))
