"""`edgelink bench threads`: what each process should take when edgelink processes share a machine.

A handoff on one machine is two llama.cpp processes (a sender and a receiver), and a busy machine
has more. llama.cpp's CPU backend runs each graph on an OpenMP team whose threads meet at a
barrier after every node; a thread that waits there spins before it sleeps, so when the cores are
shared, a waiting thread burns the time slice that the thread it waits for needs. This benchmark
measures, side by side in one run, the two things a user runs (`edgelink demo`, and a 1,024-token
handoff to a `serve` receiver with a short reply) under each candidate setting, on an idle machine
and while a second edgelink pair hands off in a loop, and reports each setting against the best.

Every measured process, and the busy pair, runs with the setting under test: a default is what all
edgelink processes on a machine use at once. Rounds alternate the order of the settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from edgelink.config import Config, to_env
from edgelink.errors import ConfigError
from edgelink.models.resolve import resolve_model
from edgelink.roles.launcher import start_receiver, stop_receiver
from edgelink.runtime.system import cpu_model
from edgelink.runtime.threads import omp_env, thread_plan


@dataclasses.dataclass(frozen=True)
class ThreadSetting:
    """One candidate: ``threads`` for runtime.n_threads (0: edgelink's default) and
    ``wait`` for runtime.omp_wait (None: the configured value)."""

    threads: int
    wait: str | None = None

    @property
    def label(self) -> str:
        t = "default" if self.threads == 0 else f"{self.threads} thread{'s' * (self.threads > 1)}"
        return t + (f", wait {self.wait}" if self.wait else "")

    def env(self) -> dict[str, str]:
        env = {"EDGELINK_RUNTIME_N_THREADS": str(self.threads)}
        if self.wait:
            env.update(omp_env(self.wait))
        return env


def parse_settings(text: str) -> list[ThreadSetting]:
    """``"0,1,2,2:passive"``: thread counts (0 = the default), each optionally with a wait policy."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        n, _, wait = item.partition(":")
        try:
            threads = int(n)
        except ValueError:
            raise ConfigError(f"--settings: {item!r} is not THREADS or THREADS:WAIT (e.g. 0,1,2:passive)") from None
        if threads < 0:
            raise ConfigError(f"--settings: a thread count cannot be negative ({item!r})")
        out.append(ThreadSetting(threads, wait or None))
    if not out:
        raise ConfigError("--settings names no setting")
    return out


_LOOP = """
import sys, edgelink
from edgelink.bench import context_tokens
with edgelink.load(sys.argv[1]) as m, m.connect(sys.argv[2]) as peer:
    prompt = context_tokens(m.runtime, int(sys.argv[3]))
    print("looping", flush=True)
    while True:
        m.reset()
        m.prefill(prompt)
        peer.handoff(int(sys.argv[4]))
"""

_HANDOFF = """
import json, sys, time, edgelink
from edgelink.bench import context_tokens
t0 = time.perf_counter()
with edgelink.load(sys.argv[1]) as m:
    load_s = time.perf_counter() - t0
    prompt = context_tokens(m.runtime, int(sys.argv[3]))
    t0 = time.perf_counter()
    m.prefill(prompt)
    prefill_s = time.perf_counter() - t0
    with m.connect(sys.argv[2]) as peer:
        t1 = time.perf_counter()
        g = peer.handoff(int(sys.argv[4]), stop_at_eog=False)
        handoff_s = time.perf_counter() - t1
print(json.dumps({"load_s": load_s, "prefill_s": prefill_s, "handoff_s": handoff_s,
                  "work_s": prefill_s + handoff_s, "tokens": g.tokens[:8], "threads": m.runtime.threads.describe()}))
"""


class _BusyPair:
    """A second edgelink pair that hands off in a loop: a `serve` receiver and a client."""

    def __init__(self, path: str, cfg: Config, env: dict[str, str], prompt_tokens: int, n_tokens: int):
        name = f"busy-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.receiver = start_receiver(path, cfg, name, extra_env=env)
        self.client = subprocess.Popen(
            [sys.executable, "-c", _LOOP, path, f"shm:{name}", str(prompt_tokens), str(n_tokens)],
            env={**os.environ, **to_env(cfg), **env}, stdout=subprocess.PIPE, text=True)
        line = self.client.stdout.readline() if self.client.stdout else ""
        if "looping" not in line:
            self.close()
            raise RuntimeError("the busy pair's client did not start")

    def close(self) -> None:
        self.client.kill()
        self.client.wait()
        stop_receiver(self.receiver)


def _run_child(argv: list[str], env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"failed": f"no answer in {timeout_s:g} s"}
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        return {"failed": f"exit code {done.returncode}: {done.stderr.strip()[-300:]}"}
    text = done.stdout.strip()
    try:
        out = json.loads(text)  # `edgelink demo --json` prints one indented document
    except ValueError:
        out = json.loads(text.splitlines()[-1])
    return {"wall_s": wall, **out}


def _measure(workload: str, path: str, model: str, cfg: Config, setting: ThreadSetting,
             prompt_tokens: int, n_tokens: int, timeout_s: float) -> dict[str, Any]:
    env = {**os.environ, **to_env(cfg), **setting.env()}
    if workload == "demo":
        res = _run_child([sys.executable, "-m", "edgelink", "demo", model, "--json"], env, timeout_s)
        if "failed" not in res:
            res["work_s"] = res["wall_s"]
        return res
    name = f"bt-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    rx = start_receiver(path, cfg, name, extra_env=setting.env())
    try:
        return _run_child([sys.executable, "-c", _HANDOFF, path, f"shm:{name}", str(prompt_tokens),
                           str(n_tokens)], env, timeout_s)
    finally:
        stop_receiver(rx)


def run_threads_bench(model: str, cfg: Config, settings: list[ThreadSetting], prompt_tokens: int = 1024,
                      n_tokens: int = 32, repeats: int | None = None, loads: tuple[str, ...] = ("idle", "busy"),
                      workloads: tuple[str, ...] = ("demo", "handoff"),
                      log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Median seconds of each workload under each setting and load, and each against the best."""

    say = log or (lambda s: None)
    reps = repeats or cfg.bench.repeats
    path = str(resolve_model(model, cfg, pull=True))
    timeout_s = max(cfg.protocol.reply_timeout_s, 600.0)
    results: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    for load in loads:
        results[load] = {w: {s.label: [] for s in settings} for w in workloads}
        for r in range(reps):
            order = settings if r % 2 == 0 else list(reversed(settings))
            for s in order:
                busy = _BusyPair(path, cfg, s.env(), prompt_tokens, n_tokens) if load == "busy" else None
                try:
                    for w in workloads:
                        res = _measure(w, path, model, cfg, s, prompt_tokens, n_tokens, timeout_s)
                        results[load][w][s.label].append(res)
                        say(f"{load}, round {r + 1}/{reps}, {s.label}, {w}: "
                            + (res["failed"] if "failed" in res else f"{res['work_s']:.2f} s"))
                finally:
                    if busy:
                        busy.close()
    table: dict[str, Any] = {}
    for load, per_w in results.items():
        for w, per_s in per_w.items():
            med = {lab: statistics.median(x["work_s"] for x in rs if "failed" not in x)
                   for lab, rs in per_s.items() if any("failed" not in x for x in rs)}
            best = min(med.values()) if med else None
            table[f"{load}/{w}"] = {
                lab: {"median_s": m, "vs_best": m / best, "runs": sum("failed" not in x for x in per_s[lab]),
                      "failed": [x["failed"] for x in per_s[lab] if "failed" in x][:1]}
                for lab, m in med.items()}
    plan = thread_plan(cfg.runtime)
    return {"model": model, "prompt_tokens": prompt_tokens, "n_tokens": n_tokens, "rounds": reps,
            "settings": [s.label for s in settings], "table": table, "default_plan": plan.describe(),
            "cpu": _cpu(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                                      f"{platform.system()} {platform.release()}"}


def _cpu() -> str:
    return cpu_model()


def format_threads_table(rep: dict[str, Any]) -> str:
    lines = [f"{rep['model']}: `edgelink demo`, and a {rep['prompt_tokens']}-token handoff with a "
             f"{rep['n_tokens']}-token reply (prefill + ship + reply), median of {rep['rounds']} rounds; "
             f"{rep['cpu']} ({rep['machine']})", f"default: {rep['default_plan']}"]
    labels = rep["settings"]
    w = max(max(len(s) for s in labels), 16) + 2
    lines.append(f"{'':<18}" + "".join(f"{s:>{w}}" for s in labels))
    for key, row in rep["table"].items():
        cells = [f"{row[s]['median_s']:.2f} s ({row[s]['vs_best']:.2f}x)" if s in row else "failed"
                 for s in labels]
        lines.append(f"{key:<18}" + "".join(f"{c:>{w}}" for c in cells))
    return "\n".join(lines)
