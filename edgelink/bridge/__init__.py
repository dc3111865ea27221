"""Heterogeneous bridges at runtime (issue #5): the export format and a numpy-only ``apply``.

A bridge maps one model's (the source's) hidden rows at one layer to ``K`` vectors in another
model's (the target's) token-embedding space, rows as ``token_embd.weight`` stores them, i.e.
before the target's own input scale (sqrt(n_embd) for Gemma). That is the space of a
VIRTUAL_PREFIX message (edgelink/kinds/prefix.py), so the output of :meth:`Bridge.apply` can be
sent or fed unchanged: ``rt.prefill_embeddings(out, embeddings.input_scale)``.

On disk a bridge is two files with one stem:

``<stem>.json``  the manifest (format version, kind, both model signatures, source layer,
                 dimensions, K, pooling, the normalizer's mean/std, the training data, the
                 edgelink version, and the npz's file name and sha256)
``<stem>.npz``   the arrays of the kind (names and shapes: ``bridge_forward.expected_shapes``)

:func:`load_bridge` verifies the npz against the manifest's sha256 before reading it; any
mismatch, missing field or wrong shape is a :class:`~edgelink.errors.ModelError`.
:meth:`Bridge.check_pair` refuses models the bridge was not trained for (weights digests).

Kinds: ``ridge`` (mean-pool the source rows over positions, standardize, then an affine map to
K*d_tgt, reshaped to [K, d_tgt]); ``perceiver`` (Telepathy-style: K learned queries
cross-attend to the standardized rows) and ``lip`` (LIP-style bottleneck adapter over K
segment means); both end with energy matching. Their forward passes are in
``edgelink/bridge/forward.py``, mirrored in torch by ``edgelink/train/modules.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edgelink import __version__
from edgelink.bridge import forward as fwd
from edgelink.bridge.blas import blas_threads
from edgelink.config import load_config
from edgelink.errors import ModelError
from edgelink.protocol.untrusted import Int, Json, Nullable, Num, Obj, Seq, Str, load_json

FORMAT_VERSION = 1
KINDS = ("ridge", "perceiver", "lip")
SIGNATURE_FIELDS = ("architecture", "n_embd", "weights_digest")  # at least these, per model
NORM_EPS = 1e-6
POOLS = {"ridge": "mean", "perceiver": "none", "lip": "segments"}  # how each kind reads rows
MAX_MANIFEST_BYTES = 1 << 22  # a manifest holds two signatures and a normalizer: well under this


def _paths(path: str | os.PathLike[str], find: bool = False) -> tuple[Path, Path]:
    """(manifest, npz) for a stem, or for either file of the pair. With ``find`` (reading), a
    relative name that is not there from the current directory is looked up among the shipped
    bridges (the registry's folder, ``models/``): ``--bridge models/x.json`` works from anywhere."""
    p = Path(path).expanduser()
    if p.suffix in (".json", ".npz"):
        p = p.with_suffix("")
    if find and not p.is_absolute() and not p.with_name(p.name + ".json").exists():
        shipped = load_config().paths.registry.parent
        for cand in (shipped / p, shipped / p.name):
            if cand.with_name(cand.name + ".json").exists():
                p = cand
                break
    return p.with_name(p.name + ".json"), p.with_name(p.name + ".npz")


def _sig(sig: Any) -> dict[str, Any]:
    d = sig.to_dict() if hasattr(sig, "to_dict") else dict(sig)
    missing = [f for f in SIGNATURE_FIELDS if f not in d]
    if missing:
        raise ModelError(f"model signature lacks {missing}")
    return d


@dataclasses.dataclass(frozen=True)
class BridgePrompt:
    """How the target reads a bridged prefix (context priming): ``primer + before``, then the K
    bridged vectors, then ``after``; the answer is the label whose verbalizer's first token has
    the highest logit at the last position. Text conditions read ``primer + before + " " + text
    + after`` instead."""

    primer: str
    before: str
    after: str
    labels: dict[str, str]  # label -> verbalizer, e.g. {"positive": " positive"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BridgePrompt:
        try:
            labels = {str(k): str(v) for k, v in dict(d["labels"]).items()}
            return cls(str(d["primer"]), str(d["before"]), str(d["after"]), labels)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"bridge prompt is malformed: {exc!r}") from exc

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def text_prompt(self, text: str) -> str:
        """The prompt that puts ``text`` where the bridged vectors would go."""
        return f"{self.primer}{self.before} {text}{self.after}"


@dataclasses.dataclass
class Bridge:
    """A loaded bridge: the manifest (``meta``) and the arrays of its kind."""

    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]
    mean: np.ndarray  # f32 [d_src], normalizer
    std: np.ndarray  # f32 [d_src]
    path: Path | None = None
    # sha256 of the manifest file as read (it pins the weights' sha256 too): what a handshake
    # names so that both peers provably hold the same bridge
    digest: str = ""

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    @property
    def d_src(self) -> int:
        return int(self.meta["d_src"])

    @property
    def d_tgt(self) -> int:
        return int(self.meta["d_tgt"])

    @property
    def source_layer(self) -> int:
        return int(self.meta["source_layer"])

    @property
    def prompt(self) -> BridgePrompt | None:
        """The context priming the bridge was trained with (``None`` for bridges without one)."""
        d = self.meta.get("prompt")
        return BridgePrompt.from_dict(d) if d else None

    def describe(self) -> dict[str, Any]:
        """A summary for `edgelink bridge info`."""
        m, tr = self.meta, self.meta.get("training") or {}
        return {
            "path": str(self.path), "kind": self.kind, "digest": self.digest,
            "source": f"{m['source'].get('name', '?')} ({m['source']['architecture']}, "
                      f"{self.d_src} wide, weights {m['source']['weights_digest'][:16]})",
            "target": f"{m['target'].get('name', '?')} ({m['target']['architecture']}, "
                      f"{self.d_tgt} wide, weights {m['target']['weights_digest'][:16]})",
            "source_layer": self.source_layer, "k": self.k,
            "parameters": int(sum(a.size for a in self.arrays.values())),
            "task": tr.get("task"), "seed": tr.get("seed"), "dev_acc": tr.get("dev_acc"),
            "edgelink": m.get("edgelink"), "weights_sha256": m["weights_sha256"],
            "prompt": m.get("prompt"), "training": tr,
        }

    @property
    def arch(self) -> dict[str, Any]:
        return self.meta.get("arch") or {}

    def rows(self, features: np.ndarray) -> np.ndarray:
        """The rows a bridge reads: f32 [n, d_src] minus the first ``pool.skip`` rows (the BOS
        position) when more rows than that are given."""
        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != self.d_src:
            raise ModelError(f"bridge input must be f32[n, {self.d_src}], got {list(x.shape)}")
        skip = int(self.meta["pool"].get("skip", 0))
        return x[skip:] if x.shape[0] > skip else x

    def pool(self, features: np.ndarray) -> np.ndarray:
        """f32 [d_src]: the mean of :meth:`rows` (what a ridge bridge reads)."""
        return self.rows(features).mean(axis=0)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std

    def apply(self, features: np.ndarray) -> np.ndarray:
        """Source hidden rows f32 [n, d_src] (the residual after ``source_layer``) -> f32 [K, d_tgt].
        Runs with one BLAS thread (``edgelink.bridge.blas``: faster for these small matrices, and no
        spinning workers left to slow the next llama.cpp decode)."""
        with blas_threads(1):
            return self._apply(features)

    def _apply(self, features: np.ndarray) -> np.ndarray:
        if self.kind == "ridge":
            y = self.normalize(self.pool(features)) @ self.arrays["W"] + self.arrays["b"]
        elif self.kind == "perceiver":
            y = fwd.perceiver(self.arrays, self.arch, self.normalize(self.rows(features)))
        elif self.kind == "lip":
            y = fwd.lip(self.arrays, self.arch, self.normalize(self.rows(features)), self.k)
        else:  # pragma: no cover - load_bridge refuses other kinds
            raise ModelError(f"bridge kind {self.kind!r} has no apply")
        out = np.ascontiguousarray(y.reshape(self.k, self.d_tgt), dtype=np.float32)
        if not np.isfinite(out).all():
            raise ModelError("bridge output holds NaN or infinite values")
        return out

    def check_pair(self, source_sig: Any, target_sig: Any) -> None:
        """Raise ModelError unless the source and target are exactly the trained models."""
        for role, given in (("source", source_sig), ("target", target_sig)):
            want = self.meta[role]
            got = _sig(given)
            for field in SIGNATURE_FIELDS:
                if got[field] != want[field]:
                    raise ModelError(f"bridge was trained for {role} {want.get('name', '?')} with "
                                     f"{field}={want[field]!r}, this model has {got[field]!r}")


def export_bridge(path: str | os.PathLike[str], *, kind: str, arrays: dict[str, np.ndarray],
                  source_sig: Any, target_sig: Any, source_layer: int, k: int,
                  norm_mean: np.ndarray, norm_std: np.ndarray, pool: dict[str, Any] | None = None,
                  training: dict[str, Any] | None = None,
                  prompt: BridgePrompt | None = None,
                  arch: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.npz`` then ``<stem>.json``; returns (manifest, npz). Signatures are
    ``ModelSignature`` objects or their ``to_dict()``."""
    if kind not in KINDS:
        raise ModelError(f"unknown bridge kind {kind!r} (one of {KINDS})")
    src, tgt = _sig(source_sig), _sig(target_sig)
    d_src, d_tgt = int(src["n_embd"]), int(tgt["n_embd"])
    arrs = {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in arrays.items()}
    mean = np.asarray(norm_mean, dtype=np.float32)
    std = np.asarray(norm_std, dtype=np.float32)
    _check_arrays(kind, arrs, d_src, d_tgt, k, arch or {})
    if mean.shape != (d_src,) or std.shape != (d_src,) or (std <= 0).any():
        raise ModelError(f"normalizer must be two f32[{d_src}] arrays with std > 0")
    manifest_path, npz_path = _paths(path)
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    blob = _npz_bytes(arrs)
    npz_path.write_bytes(blob)
    manifest = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "source": src,
        "target": tgt,
        "source_layer": int(source_layer),
        "source_site": "l_out",
        "d_src": d_src,
        "d_tgt": d_tgt,
        "k": int(k),
        "output_space": "token_embd",  # rows as stored; the target applies its input scale
        "pool": pool or {"kind": POOLS[kind], "skip": 0},
        "arch": arch or {},
        "normalizer": {"kind": "standardize", "mean": mean.tolist(), "std": std.tolist()},
        "training": training or {},
        "prompt": prompt.to_dict() if prompt else None,
        "edgelink": __version__,
        "weights_file": npz_path.name,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
    }
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    tmp.replace(manifest_path)
    return manifest_path, npz_path


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An npz with sorted members and fixed timestamps: the same arrays give the same bytes
    (and the same sha256), which ``np.savez`` does not promise."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            member = io.BytesIO()
            np.lib.format.write_array(member, arrays[name], allow_pickle=False)
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def _check_arrays(kind: str, arrays: dict[str, np.ndarray], d_src: int, d_tgt: int, k: int,
                  arch: dict[str, Any]) -> None:
    if k < 1:
        raise ModelError(f"K must be >= 1, got {k}")
    try:
        want = fwd.expected_shapes(kind, d_src, d_tgt, k, arch)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"a {kind} bridge's arch {arch} is incomplete or invalid: {exc!r}") from exc
    if kind != "ridge" and float(arch.get("target_norm", 0)) <= 0:
        raise ModelError(f"a {kind} bridge needs a positive arch.target_norm")
    if sorted(arrays) != sorted(want):
        missing, extra = sorted(set(want) - set(arrays)), sorted(set(arrays) - set(want))
        raise ModelError(f"a {kind} bridge's arrays do not match its kind: missing {missing}, "
                         f"unexpected {extra}")
    for name, shape in want.items():
        if arrays[name].shape != shape:
            raise ModelError(f"{kind} {name} must be {list(shape)}, got {list(arrays[name].shape)}")
    for name, a in arrays.items():
        if not np.isfinite(a).all():
            raise ModelError(f"bridge array {name} holds NaN or infinite values")


_DIM = Int(1, 1 << 16)
_MANIFEST = Obj(
    {"format": Int(), "kind": Str(32, choices=KINDS),
     "source": Obj({"architecture": Str(64), "n_embd": _DIM, "weights_digest": Str(128)},
                   extra=Json(), max_keys=128),
     "target": Obj({"architecture": Str(64), "n_embd": _DIM, "weights_digest": Str(128)},
                   extra=Json(), max_keys=128),
     "weights_file": Str(255, min_len=1), "weights_sha256": Str(64, min_len=64),
     "d_src": _DIM, "d_tgt": _DIM, "k": Int(1, 4096), "source_layer": Int(0, 4096),
     "normalizer": Obj({"mean": Seq(Num(), max_items=1 << 16), "std": Seq(Num(), max_items=1 << 16)},
                       extra=Json()),
     "pool": Obj({"kind": Str(32)}, {"skip": Int(0, 1 << 16)}, extra=Json())},
    {"arch": Obj(optional={"d_model": _DIM, "n_heads": Int(1, 1024), "d_ff": Int(1, 1 << 18),
                  "n_layers": Int(1, 64), "bottleneck": _DIM, "target_norm": Num(0)},
                 extra=Json()),
     "prompt": Nullable(Obj({"primer": Str(1 << 16), "before": Str(1 << 16), "after": Str(1 << 16),
                             "labels": Obj(extra=Str(256, min_len=1), max_keys=64)})),
     "training": Nullable(Obj(extra=Json()))},
    extra=Json(),
)
# Largest expansion of a deflated npz member over its stored bytes (deflate's ratio is ~1032:1).
_MAX_INFLATE = 1032
_FLOAT_KINDS = "f"


def _read_npz(blob: bytes, want: dict[str, tuple[int, ...]], where: Path) -> dict[str, np.ndarray]:
    """The arrays of an npz, each checked against its expected shape from its npy header
    before any data is read, so a header never makes numpy allocate what the file lacks."""
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            infos = {i.filename: i for i in zf.infolist()}
            names = {n[:-4] for n in infos if n.endswith(".npy")}
            if names != set(want) or len(infos) != len(names):
                missing, extra = sorted(set(want) - names), sorted(set(infos) - {f"{n}.npy" for n in want})
                raise ModelError(f"bridge weights {where.name}: arrays do not match the kind: "
                                 f"missing {missing}, unexpected {extra[:8]}")
            for name, shape in want.items():
                info = infos[f"{name}.npy"]
                if info.file_size > _MAX_INFLATE * max(info.compress_size, 1):
                    raise ModelError(f"bridge weights {where.name}: member {name} claims {info.file_size} bytes")
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                              else np.lib.format.read_array_header_2_0)
                    got_shape, fortran, dtype = header(f, max_header_size=1 << 12)
                    if tuple(got_shape) != shape or fortran or dtype.kind not in _FLOAT_KINDS \
                            or dtype.hasobject:
                        raise ModelError(f"bridge array {name}: {dtype}{list(got_shape)} in the file, "
                                         f"expected a float array of shape {list(shape)}")
                    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                    if nbytes > info.file_size:
                        raise ModelError(f"bridge array {name}: {nbytes} bytes of data, the file holds "
                                         f"{info.file_size}")
                    data = f.read(nbytes)
                    if len(data) != nbytes:
                        raise ModelError(f"bridge array {name} is truncated")
                    arrays[name] = np.ascontiguousarray(
                        np.frombuffer(data, dtype=dtype).reshape(shape), dtype=np.float32)
    except ModelError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError,
            NotImplementedError, RuntimeError) as exc:
        raise ModelError(f"cannot read bridge weights {where}: {type(exc).__name__}: {exc}") from None
    return arrays


def load_bridge(path: str | os.PathLike[str]) -> Bridge:
    """Read a bridge from its stem or either file, verifying the npz's sha256 and shapes.
    Both files are untrusted input: anything wrong is a ModelError, and nothing is allocated
    beyond what the manifest's bounded fields and the files' real bytes allow."""
    try:
        manifest_path, _ = _paths(path, find=True)
        raw = manifest_path.read_bytes()
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read bridge manifest {str(path)[:200]!r}: {exc}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ModelError(f"bridge manifest {manifest_path} is {len(raw)} bytes (at most {MAX_MANIFEST_BYTES})")
    meta = load_json(raw, f"bridge manifest {manifest_path}", error=ModelError)
    _MANIFEST(meta, f"bridge manifest {manifest_path}", ModelError)  # checked; used as read
    if meta["format"] != FORMAT_VERSION:
        raise ModelError(f"bridge format {meta['format']} is not {FORMAT_VERSION}")
    kind = meta["kind"]
    weights_file = meta["weights_file"]
    if Path(weights_file).name != weights_file or weights_file in (".", "..") or "\0" in weights_file:
        raise ModelError(f"bridge manifest {manifest_path}: weights_file must be a file name beside it, "
                         f"got {weights_file[:80]!r}")
    npz_path = manifest_path.with_name(weights_file)
    want_sha = meta["weights_sha256"]
    d_src, d_tgt, k = meta["d_src"], meta["d_tgt"], meta["k"]
    mean = np.asarray(meta["normalizer"]["mean"], dtype=np.float32)
    std = np.asarray(meta["normalizer"]["std"], dtype=np.float32)
    if meta["pool"]["kind"] != POOLS[kind]:
        raise ModelError(f"a {kind} bridge reads rows by {POOLS[kind]!r}, the manifest says "
                         f"{meta['pool']['kind']!r}")
    if d_src != meta["source"]["n_embd"] or d_tgt != meta["target"]["n_embd"]:
        raise ModelError("bridge dimensions disagree with its model signatures")
    if mean.shape != (d_src,) or std.shape != (d_src,) or not (std > 0).all():
        raise ModelError("bridge normalizer has the wrong shape or a non-positive std")
    arch = meta.get("arch") or {}
    try:
        want = fwd.expected_shapes(kind, d_src, d_tgt, k, arch)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"a {kind} bridge's arch is incomplete or invalid: {exc!r}") from None
    try:
        blob = npz_path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read bridge weights {npz_path}: {exc.strerror or exc}") from exc
    got_sha = hashlib.sha256(blob).hexdigest()
    if got_sha != want_sha:
        raise ModelError(f"bridge weights {npz_path.name}: sha256 {got_sha[:16]}... does not match "
                         f"the manifest's {str(want_sha)[:16]}...")
    arrays = _read_npz(blob, want, npz_path)
    _check_arrays(kind, arrays, d_src, d_tgt, k, arch)
    if meta.get("prompt"):
        BridgePrompt.from_dict(meta["prompt"])
    return Bridge(meta=meta, arrays=arrays, mean=mean, std=std, path=manifest_path,
                  digest=hashlib.sha256(raw).hexdigest())
