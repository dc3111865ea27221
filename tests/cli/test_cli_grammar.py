"""One grammar for every command (docs/cli.md): the table there is the command tree, MODEL is
optional and first wherever it is taken, FILE follows it, and every command answers --help."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from edgelink.cli import cli, hoist_global_options
from edgelink.errors import (
    ConfigError,
    EdgelinkError,
    ModelError,
    ProtocolError,
    SessionError,
    StateError,
    TransportError,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def _commands(cmd=cli, prefix=()):
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _commands(sub, (*prefix, name))
    else:
        yield prefix, cmd


def _synopsis(prefix, cmd) -> str:
    args = []
    for p in cmd.params:
        if isinstance(p, click.Argument):
            args.append(p.metavar or (p.name.upper() if p.required else f"[{p.name.upper()}]"))
    return " ".join(["edgelink", *prefix, *args])


def test_the_docs_table_is_the_command_tree():
    documented = re.findall(r"^\| `(edgelink [^`]+)` \|", DOCS.read_text(), flags=re.M)
    actual = [_synopsis(p, c) for p, c in _commands()]
    assert sorted(documented) == sorted(actual)


@pytest.mark.parametrize("prefix", [p for p, _ in _commands()], ids=lambda p: " ".join(p))
def test_every_command_answers_help_and_takes_model_first_and_optional(prefix):
    cmd = dict(_commands())[prefix]
    args = [p for p in cmd.params if isinstance(p, click.Argument)]
    names = [p.name for p in args]
    if "model" in names:
        assert names[0] == "model" and not args[0].required, names
    if "model_file" in names:
        assert args[0].metavar == "[MODEL] FILE"
    assert "file" not in names or names == ["file"], f"{prefix}: FILE with MODEL is [MODEL] FILE"
    out = CliRunner().invoke(cli, [*prefix, "--help"])
    assert out.exit_code == 0 and "Usage:" in out.output, out.output


def test_global_options_go_anywhere():
    assert hoist_global_options(["generate", "-p", "x", "--set", "a.b=1", "-v"]) == \
        ["--set", "a.b=1", "-v", "generate", "-p", "x"]
    assert hoist_global_options(["resume", "--", "--set"]) == ["resume", "--", "--set"]


def test_exit_codes_are_distinct_per_family():
    fams = [EdgelinkError, ConfigError, ModelError, ProtocolError, StateError, SessionError, TransportError]
    codes = [f.exit_code for f in fams]
    assert len(set(codes)) == len(codes) and 0 not in codes and 130 not in codes
    table = DOCS.read_text()
    for f in fams:
        assert re.search(rf"^\| {f.exit_code} \|.*`{f.__name__}`", table, flags=re.M), f


def _run(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "edgelink", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def test_files_and_models_in_either_order_and_paths_from_anywhere(smollm2_path, tmp_path):
    """resume [MODEL] FILE with MODEL left out; the old import-llama FILE MODEL order still
    read; a shipped bridge named from another directory; a missing FILE is a usage error."""
    snap = tmp_path / "s.elk"
    assert _run("export", str(smollm2_path), "-p", "The capital of France is", "-o", str(snap)).returncode == 0
    env = {**os.environ, "EDGELINK_RUNTIME_DEFAULT_MODEL": str(smollm2_path)}
    out = _run("resume", str(snap), "-n", "3", "--json", env=env)
    assert out.returncode == 0 and len(json.loads(out.stdout)["tokens"]) == 3, out.stderr
    missing = _run("resume", str(smollm2_path), str(tmp_path / "nope.elk"))
    assert missing.returncode == 2 and "is not a file" in missing.stderr
    llama = tmp_path / "slot.bin"
    assert _run("export", str(smollm2_path), "-p", "Hello there", "-o", str(llama), "--format", "llama").returncode == 0
    old = _run("import-llama", str(llama), str(smollm2_path), "-o", str(tmp_path / "x.elk"))
    assert old.returncode == 0 and "the order is [MODEL] FILE" in old.stderr, old.stderr
    info = _run("bridge", "info", "models/sentiment-perceiver-k8-l15.json", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    stem = _run("bridge", "info", "sentiment-perceiver-k8-l15", cwd=tmp_path)
    assert stem.returncode == 0 and stem.stdout == info.stdout
    gone = _run("bridge", "info", "no-such-bridge", cwd=tmp_path)
    assert gone.returncode == ModelError.exit_code and "no-such-bridge" in gone.stderr
