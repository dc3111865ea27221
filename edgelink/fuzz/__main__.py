"""``python -m edgelink.fuzz``: the long fuzz run before a release (see edgelink/fuzz/__init__.py)."""

from __future__ import annotations

import argparse
import json
import sys

from edgelink.config import load_config
from edgelink.fuzz import FuzzReport, real_export, run, seed_frames, synthetic_signature
from edgelink.fuzz import targets as T
from edgelink.fuzz.live import fuzz_live


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgelink.fuzz", description=__doc__)
    ap.add_argument("--cases", type=int, default=20000, help="mutated inputs per target")
    ap.add_argument("--seed", type=int, default=0, help="reproduces a run exactly")
    ap.add_argument("--live", metavar="ENDPOINT", help="also send --cases frames to a running receiver "
                    "(shm:NAME or a node's multiaddr), then check it still answers")
    ap.add_argument("--model", default=None, help="the live receiver's model (its signature opens "
                    "the sessions, and a real export of it seeds the tensor frames); default: "
                    "runtime.default_model")
    ap.add_argument("--token", default="", help="bearer token for a node that requires one")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    cfg = load_config()
    seeds = seed_frames(limits=cfg.protocol)
    reports: dict[str, FuzzReport] = {}
    reports["decode"] = run(T.decode(cfg.protocol), "decode", seeds, args.cases, args.seed)
    reports["frame_reader"] = run(T.frame_reader(cfg.protocol, args.seed), "frame_reader", seeds,
                                  args.cases, args.seed)
    session = T.session(synthetic_signature(), cfg.protocol)
    reports["session"] = run(lambda f: session([seeds[0], f]), "session", seeds[1:], args.cases, args.seed)
    reports["hello"] = run(lambda f: session([f]), "hello", seeds[:1], args.cases // 4, args.seed)
    reports["message_file"] = run(lambda f: T.message_file(len(f).to_bytes(8, "little") + f),
                                  "message_file", seeds, args.cases // 20, args.seed)
    if args.live:
        sig, extra = real_export(args.model or cfg.runtime.default_model, cfg)
        reports["live"] = fuzz_live(args.live, cfg, sig, cases=args.cases, seed=args.seed,
                                    token=args.token or None, extra_tensor_messages=extra)
    failures = [f for r in reports.values() for f in r.failures]
    if args.json:
        print(json.dumps({k: {"cases": r.cases, "typed": r.typed, "accepted": r.accepted,
                              "seconds": round(r.seconds, 2), "by_code": r.by_code,
                              "failures": [f.__dict__ for f in r.failures]} for k, r in reports.items()},
                         indent=2))
    else:
        for k, r in reports.items():
            print(f"{k:13s} {r.cases:8d} cases  {r.typed:8d} refused (typed)  {r.accepted:7d} accepted  "
                  f"{len(r.failures)} failures  {r.seconds:6.1f} s")
        for f in failures[:20]:
            print(f"\nFAILURE {f.target} seed={f.seed} case={f.case} ({f.mutator}): {f.error}\n{f.trace}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
