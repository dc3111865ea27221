"""`edgelink bridge ...`: train, evaluate, export and inspect heterogeneous bridges."""

from __future__ import annotations

import click

from edgelink.bridge import load_bridge
from edgelink.cli.common import _Ctx, _emit, json_option
from edgelink.train.evaluate import evaluate
from edgelink.train.ridge import train_ridge


def pair_options(f):
    """--source and --target: the two models a bridge joins."""
    f = click.option("--target", default="gemma3-270m", show_default=True,
                     help="Target model (registry name or .gguf; llama or gemma3).")(f)
    return click.option("--source", default="smollm2-135m", show_default=True,
                        help="Source model (registry name or .gguf; llama or gemma3).")(f)


@click.group()
def bridge() -> None:
    """Bridges that let one model read another model's hidden states (docs/bridges.md)."""


@bridge.command("info")
@click.argument("file")
@json_option
@click.pass_obj
def bridge_info(obj: _Ctx, file: str, as_json: bool) -> None:
    """Verify a bridge (manifest + npz sha256) and describe it."""

    br = load_bridge(file)
    out = br.describe()
    lines = [f"{k}: {v}" for k, v in out.items() if not isinstance(v, dict)]
    _emit(as_json, out, "\n".join(lines))


@bridge.command("eval")
@click.option("--bridge", "bridges", multiple=True, required=True,
              help="A bridge file (.json or .npz); repeat for more seeds or kinds.")
@click.option("--task", default="sentiment", show_default=True, help="Task (edgelink.train.tasks).")
@click.option("--n", "n", type=int, default=400, show_default=True,
              help="Test examples (the first n of the test split).")
@click.option("--out", type=click.Path(file_okay=False), default="bridge-eval", show_default=True,
              help="Directory for eval.json, eval.md and eval.svg.")
@click.option("--relay-tokens", type=int, default=24, show_default=True,
              help="Most tokens the sender may write in the text relay.")
@click.option("--n-dev", type=int, default=500, show_default=True,
              help="Dev examples (the first n of the dev split) that fit the calibrated "
                   "baselines' offsets, the probe's C and the mean control.")
@click.option("--soft-prompt", "soft_prompts", multiple=True,
              type=click.Path(exists=True, dir_okay=False),
              help="A prompt-tuning baseline (python -m edgelink.train.prompt_tuning); repeat for seeds.")
@click.option("--threads", type=int, default=1, show_default=True,
              help="llama.cpp threads for every model and numpy's BLAS threads "
                   "(0: leave both as configured).")
@click.option("--label-head/--full-head", default=True, show_default=True,
              help="Compute only the labels' logits in every read (the classification a "
                   "receiver answers) or the whole vocabulary's, as a generating reader does.")
@pair_options
@json_option
@click.pass_obj
def bridge_eval(obj: _Ctx, bridges: tuple[str, ...], task: str, n: int, out: str,
                relay_tokens: int, n_dev: int, soft_prompts: tuple[str, ...], threads: int,
                label_head: bool, source: str, target: str, as_json: bool) -> None:
    """Score bridges on the test split against text relay, calibrated text baselines, the
    sender alone, controls and a linear probe."""

    report = evaluate(list(bridges), obj.cfg(), task=task, n=n, out=out,
                      relay_tokens=relay_tokens, n_dev=n_dev, threads=threads or None,
                      source=source, target=target, soft_prompts=list(soft_prompts),
                      label_head=label_head)
    human = (f"{report.table_md()}\n\n{report.checks_text()}\n\n{report.paired_md()}\n\n"
             f"wrote {out}/eval.json, eval.md, eval.svg ({report.wall_s:.0f} s)")
    _emit(as_json, report.to_dict() if as_json else None, human)


@bridge.command("train")
@click.option("--kind", type=click.Choice(["perceiver", "lip", "ridge"]), default="perceiver",
              show_default=True, help="perceiver: trained through the frozen target on the "
              "answer's LM loss; lip: bottleneck adapter regressed on the target's token rows; "
              "ridge: closed-form baseline.")
@click.option("--task", default="sentiment", show_default=True, help="sentiment or topic.")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated training seeds.")
@click.option("--k", "k", type=int, default=8, show_default=True, help="Soft tokens per message.")
@click.option("--layer", type=int, default=15, show_default=True, help="Source layer (l_out).")
@click.option("--n-train", type=int, default=2000, show_default=True, help="First n train examples.")
@click.option("--n-dev", type=int, default=300, show_default=True, help="First n dev examples.")
@click.option("--steps", type=int, default=300, show_default=True, help="Optimizer steps.")
@click.option("--batch", type=int, default=16, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--direct", is_flag=True,
              help="Read the answer at the last bridged vector, without the prompt's tail "
                   "(a shorter receiver read; perceiver only).")
@click.option("--teacher", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Distil from this trained bridge of the same task: also match its answer "
                   "distribution (perceiver only).")
@click.option("--distill", type=float, default=0.5, show_default=True,
              help="Weight of the teacher's term (the gold label's is 1 minus this).")
@click.option("--out", type=click.Path(file_okay=False), default="bridges-out", show_default=True)
@pair_options
@json_option
@click.pass_obj
def bridge_train(obj: _Ctx, kind: str, task: str, seeds: str, k: int, layer: int, n_train: int,
                 n_dev: int, steps: int, batch: int, lr: float, direct: bool, teacher: str | None,
                 distill: float, out: str, source: str, target: str, as_json: bool) -> None:
    """Train bridges from SmolLM2-135M's hidden states into Gemma-3-270M (needs '.[train]')."""
    try:
        from edgelink.train.train import TrainSpec, train_bridge
    except ImportError as exc:
        raise click.ClickException(f"training needs torch: pip install -e '.[train]' ({exc})") from exc
    cfg = obj.cfg()
    if (direct or teacher) and kind != "perceiver":
        raise click.UsageError("--direct and --teacher train perceiver bridges only (they need "
                               "the receiver in the loss)")
    if not 0.0 <= distill <= 1.0:
        raise click.BadParameter("must lie in [0, 1]", param_hint="--distill")
    results = []
    for seed in (int(s) for s in seeds.split(",") if s.strip()):
        if kind == "ridge":
            r = train_ridge(out, cfg, task=task, n=n_train, n_dev=n_dev, k=k, layer=layer,
                            source=source, target=target)
        else:
            r = train_bridge(TrainSpec(kind=kind, task=task, k=k, layer=layer, seed=seed,
                                       n_train=n_train, n_dev=n_dev, steps=steps, batch=batch,
                                       lr=lr, source=source, target=target, tail=not direct,
                                       teacher=teacher or "", distill=distill),
                               out, cfg)
            r.pop("model", None)
        results.append({key: (str(v) if hasattr(v, "__fspath__") else v) for key, v in r.items()})
    human = "\n".join(f"{r['manifest']}: dev " + ", ".join(
        f"{key[4:]} {r[key]:.3f}" for key in sorted(r) if key.startswith("dev_")
        and isinstance(r[key], float)) for r in results)
    _emit(as_json, results, human)


@bridge.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "stem", type=click.Path(), default=None,
              help="Output stem (default: the checkpoint's path without .pt).")
@json_option
@click.pass_obj
def bridge_export(obj: _Ctx, checkpoint: str, stem: str | None, as_json: bool) -> None:
    """Turn a training checkpoint (.pt) into the numpy bridge (.json + .npz) and verify it."""
    from pathlib import Path

    from edgelink.train.train import export_checkpoint  # torch (the train extra)

    manifest, npz = export_checkpoint(checkpoint, stem or Path(checkpoint).with_suffix(""))
    br = load_bridge(manifest)
    _emit(as_json, {"manifest": str(manifest), "npz": str(npz), "digest": br.digest},
          f"wrote {manifest} and {npz.name} (digest {br.digest[:16]})")
