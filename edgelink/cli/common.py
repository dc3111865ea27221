"""What every `edgelink` command module shares: the context object, output and progress."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from edgelink.config import Config, load_config


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


wire_option = click.option(
    "--wire", default=None, metavar="CODEC",
    help="How the KV state travels [config: wire.codec]: auto (raw over shared memory; over a "
         "network, measure the link and take the soonest exact plan: raw, lossless, or a split in "
         "which the receiver prefills part of the text; wire.split = off forbids splits), raw, "
         "lossless (zstd-shuffle/1), or a lossy codec (q8/1, kivi4/1, kivi4h/1) that the "
         "receiver allows.")


def wire_codec(value: str | None) -> str | None:
    """--wire as a wire.codec value."""
    return "zstd-shuffle/1" if value == "lossless" else value


def token_options(f):
    """--token and --token-file, for commands that dial a node that may require a token."""
    f = click.option("--token-file", type=click.Path(dir_okay=False), default=None,
                     help="Read the bearer token from this file (first line); not visible to "
                          "other users the way --token is. $EDGELINK_TOKEN works too.")(f)
    return click.option("--token", default=None,
                        help="Bearer token for a node that requires one.")(f)


def client_token(token: str | None, token_file: str | None) -> str | None:
    """The token from --token, else --token-file's first line, else $EDGELINK_TOKEN."""
    if token:
        return token
    if token_file:
        try:
            lines = [ln.strip() for ln in Path(token_file).expanduser().read_text().splitlines()]
        except (OSError, UnicodeDecodeError) as exc:
            raise click.BadParameter(f"cannot read {token_file}: {exc}", param_hint="--token-file") from None
        found = [ln for ln in lines if ln and not ln.startswith("#")]
        if not found:
            raise click.BadParameter(f"{token_file} holds no token", param_hint="--token-file")
        return found[0]
    return os.environ.get("EDGELINK_TOKEN") or None


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
token_ids_option = click.option(
    "--no-token-ids", is_flag=True,
    help="Send -1 for every token id: the receiver continues from the cells and logits without "
         "our token ids (no split plans; each turn ships the whole state; the KV cells still "
         "reveal much of the text: docs/security.md).")
n_option = click.option("-n", "--n-tokens", type=click.IntRange(0), default=None,
                        help="Greedy tokens to generate [config: generate.n_tokens].")


def model_and_file(f):
    """``[MODEL] FILE``: the one shape of every command that reads a file into a model. MODEL
    is optional and first, as in every other command that takes one."""
    return click.argument("model_file", nargs=-1, metavar="[MODEL] FILE")(f)


def split_model_file(args: tuple[str, ...], default_model: str) -> tuple[str, str]:
    """(MODEL, FILE) from ``[MODEL] FILE``; FILE must exist. The older ``FILE MODEL`` order
    (``import-llama``'s) is still read, with a note, when only the first is an existing file."""
    if not 1 <= len(args) <= 2:
        raise click.UsageError(f"expected [MODEL] FILE, got {len(args)} argument(s)")
    if len(args) == 1:
        model, file = default_model, args[0]
    else:
        model, file = args
        if Path(model).is_file() and not model.endswith(".gguf") and (
                file.endswith(".gguf") or not Path(file).is_file()):
            click.echo(f"note: reading FILE MODEL as MODEL FILE ({file} {model}); the order is [MODEL] FILE",
                       err=True)
            model, file = file, model
    if not Path(file).is_file():
        raise click.BadParameter(f"{file!r} is not a file", param_hint="FILE")
    return model, file

