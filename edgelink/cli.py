"""The `edgelink` command: parse flags, call edgelink.api, print (text, or JSON with --json)."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from typing import Any

import click

from edgelink import api
from edgelink.config import Config, load_config
from edgelink.errors import EdgelinkError


class _Ctx:
    def __init__(self, config_path: str | None, settings: tuple[str, ...], verbose: int):
        self.config_path = config_path
        self.settings = settings
        self.verbose = verbose

    def cfg(self, **flags: Any) -> Config:
        overrides: dict[str, Any] = {}
        for item in self.settings:
            key, sep, value = item.partition("=")
            if not sep or "." not in key:
                raise click.BadParameter(f"{item!r} is not SECTION.KEY=VALUE", param_hint="--set")
            overrides[key.replace(".", "_", 1)] = value
        overrides.update({k: v for k, v in flags.items() if v is not None})
        return load_config(self.config_path, **overrides)


def _emit(as_json: bool, payload: Any, human: str, *, compact: bool = False) -> None:
    """Human text, or JSON (one line per event when ``compact``, for streams like `serve`)."""
    if as_json:
        if dataclasses.is_dataclass(payload):
            payload = dataclasses.asdict(payload)
        click.echo(json.dumps(payload, indent=None if compact else 2, default=str))
    else:
        click.echo(human)


def _progress():
    """A click progress bar driven by (stage, done, total) callbacks, shown on stderr."""
    state: dict[str, Any] = {}

    def cb(stage: str, done: int, total: int) -> None:
        bar = state.get(stage)
        if bar is None:
            bar = click.progressbar(length=max(total, 1), label=stage, file=sys.stderr)
            bar.__enter__()
            state[stage] = bar
            state.setdefault("_done", {})[stage] = 0
        bar.update(done - state["_done"][stage])
        state["_done"][stage] = done
        if done >= total:
            bar.__exit__(None, None, None)

    return cb


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
n_option = click.option("-n", "--n-tokens", type=int, default=None,
                        help="Greedy tokens to generate [config: generate.n_tokens].")


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
    from edgelink.registry import list_models

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
    ctx.invoke(models, as_json=as_json)


@models.command("pull")
@click.argument("name")
@click.option("--force", is_flag=True, help="Download again even if cached.")
@json_option
@click.pass_obj
def models_pull(obj: _Ctx, name: str, force: bool, as_json: bool) -> None:
    """Download NAME into the cache directory and verify its sha256."""
    from edgelink.pull import pull_model
    from edgelink.registry import get_entry

    cfg = obj.cfg()
    path = pull_model(get_entry(name, cfg), cfg, progress=None if as_json else _progress(), force=force)
    _emit(as_json, {"name": name, "path": str(path)}, f"{name}: {path}")


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


def _gen_text(g: api.Generation) -> str:
    lines = [g.text, ""]
    lines.append("  ".join(f"{k}={v * 1e3:.1f}ms" for k, v in g.timings.items()))
    if g.bytes:
        lines.append("  ".join(f"{k}={v:,} B" for k, v in g.bytes.items()))
    for k, v in g.extra.items():
        if k not in ("local_tokens", "local_text"):
            lines.append(f"{k}: {v}")
    return "\n".join(lines)


@cli.command()
@click.argument("model", required=False)
@click.option("-p", "--prompt", required=True, help="Prompt text.")
@n_option
@json_option
@click.pass_obj
def generate(obj: _Ctx, model: str | None, prompt: str, n_tokens: int | None, as_json: bool) -> None:
    """Greedy generation in this process (the reference a handoff must match)."""
    cfg = obj.cfg()
    g = api.generate(model or cfg.runtime.default_model, prompt, n_tokens, cfg, progress=_progress())
    _emit(as_json, g, _gen_text(g))


@cli.command()
@click.argument("model", required=False)
@click.option("-p", "--prompt", required=True, help="Prompt text.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Snapshot file.")
@json_option
@click.pass_obj
def export(obj: _Ctx, model: str | None, prompt: str, output: str, as_json: bool) -> None:
    """Prefill PROMPT and write the KV snapshot (with the handshake) to a file."""
    cfg = obj.cfg()
    g = api.export(model or cfg.runtime.default_model, prompt, output, cfg, progress=_progress())
    _emit(as_json, g, f"wrote {output}\n" + _gen_text(g).lstrip())


@cli.command()
@click.argument("model")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@n_option
@json_option
@click.pass_obj
def resume(obj: _Ctx, model: str, file: str, n_tokens: int | None, as_json: bool) -> None:
    """Load a snapshot FILE into MODEL and continue greedily."""
    cfg = obj.cfg()
    g = api.resume(model, file, n_tokens, cfg, progress=_progress())
    _emit(as_json, g, _gen_text(g))


@cli.command()
@click.argument("model", required=False)
@click.option("--shm", "shm_name", required=True, help="Shared-memory name to serve on.")
@click.option("--max-sessions", type=int, default=None, help="Exit after this many sessions.")
@json_option
@click.pass_obj
def serve(obj: _Ctx, model: str | None, shm_name: str, max_sessions: int | None, as_json: bool) -> None:
    """Receive KV snapshots on shm:NAME and continue them (until Ctrl-C)."""
    cfg = obj.cfg()

    def ready(ep: str) -> None:
        _emit(as_json, {"event": "ready", "endpoint": ep}, f"serving on {ep} (Ctrl-C to stop)", compact=True)
        sys.stdout.flush()

    def session(report) -> None:
        _emit(as_json, {"event": "session", **dataclasses.asdict(report)},
              f"session: applied={report.applied} rejected={report.rejected} "
              f"generated={report.generated} ended_by={report.ended_by}", compact=True)
        sys.stdout.flush()

    api.serve(model or cfg.runtime.default_model, f"shm:{shm_name}", cfg, max_sessions=max_sessions,
              on_ready=ready, on_session=session, progress=_progress())


@cli.command()
@click.argument("model", required=False)
@click.option("-p", "--prompt", required=True, help="Prompt text.")
@click.option("--to", "to", required=True, help="Receiver endpoint, e.g. shm:demo.")
@n_option
@click.option("--verify", is_flag=True, help="Also continue locally and report whether both match.")
@json_option
@click.pass_obj
def handoff(obj: _Ctx, model: str | None, prompt: str, to: str, n_tokens: int | None,
            verify: bool, as_json: bool) -> None:
    """Prefill here, ship the KV state to a receiver, print its continuation."""
    cfg = obj.cfg()
    g = api.handoff(model or cfg.runtime.default_model, prompt, to, n_tokens, cfg, verify=verify,
                    progress=_progress())
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
        f"process B (pid {d.receiver_pid}) never saw it; it received {g.bytes['payload']:,} bytes of KV state",
        f"  over shm in {g.timings['snapshot_roundtrip_s'] * 1e3:.1f} ms "
        f"(re-reading the prompt would take {g.timings['prefill_s'] * 1e3:.1f} ms here)",
        "",
        f"B continued: {g.text!r}",
        f"A would say: {d.local_text!r}",
        f"identical: {g.extra['matches_local']}",
    ])
    _emit(as_json, d, human)
    if not g.extra["matches_local"]:
        sys.exit(1)


@cli.group()
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
    from edgelink.bench import format_handoff_table, run_handoff_bench

    cfg = obj.cfg(bench_tokens=tokens, bench_repeats=repeats)
    report = run_handoff_bench(model or cfg.runtime.default_model, cfg,
                               log=None if as_json else lambda s: click.echo(s, err=True))
    _emit(as_json, report, format_handoff_table(report))


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except EdgelinkError as exc:
        click.echo(f"error ({exc.code}): {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
