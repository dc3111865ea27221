#!/usr/bin/env python3
"""`edgelink bench transport` across a veth link instead of loopback.

The receiving child runs in its own network namespace joined to this one by a veth pair
(1,500-byte MTU, its own address), so every byte crosses a (virtual) Ethernet link as it would
between two machines, minus the wire. Needs root (unshare, ip, nsenter).

    python tools/bench_transport_veth.py --sizes 1,16,64,256 --repeats 5 [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgelink.bench.netns import remote_host  # noqa: E402
from edgelink.bench.transport import format_transport_table, run_transport_bench  # noqa: E402
from edgelink.config import load_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,16,64,256", help="payload sizes in MB")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cfg = load_config()
    sizes = tuple(int(x) for x in args.sizes.split(",") if x.strip())
    with remote_host() as remote:
        report = run_transport_bench(cfg, sizes, args.repeats, ip=remote.ip, wrapper=remote.wrapper,
                                     log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(report, indent=2) if args.json else format_transport_table(report))


if __name__ == "__main__":
    main()
