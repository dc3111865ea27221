"""`edgelink bridge ...`: train, evaluate, export and inspect heterogeneous bridges."""

from __future__ import annotations

import click

from edgelink.cli_common import _Ctx, _emit, json_option


@click.group()
def bridge() -> None:
    """Bridges that let one model read another model's hidden states (docs/bridges.md)."""


@bridge.command("info")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@json_option
@click.pass_obj
def bridge_info(obj: _Ctx, file: str, as_json: bool) -> None:
    """Verify a bridge (manifest + npz sha256) and describe it."""
    from edgelink.bridge import load_bridge

    br = load_bridge(file)
    out = br.describe()
    lines = [f"{k}: {v}" for k, v in out.items() if not isinstance(v, dict)]
    _emit(as_json, out, "\n".join(lines))
