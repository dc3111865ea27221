"""Threads when llama.cpp processes share a machine (edgelink/runtime/threads.py): the plan,
the per-call fit to what other processes are running, and the OpenMP wait default."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

from edgelink.runtime import threads
from edgelink.runtime.llama import LlamaRuntime


def test_the_plan_follows_the_settings(cfg):
    rc = cfg.runtime
    auto = threads.thread_plan(dataclasses.replace(rc, n_threads=0, n_threads_batch=0), cores=8)
    assert auto.adaptive and (auto.threads, auto.threads_batch) == (8, 8) and "fewer" in auto.describe()
    fixed = threads.thread_plan(dataclasses.replace(rc, n_threads=3, n_threads_batch=0), cores=8)
    assert not fixed.adaptive and (fixed.threads, fixed.threads_batch) == (3, 3) and fixed.now() == 3


def test_an_adaptive_plan_leaves_cores_to_other_processes(monkeypatch):
    plan = threads.ThreadPlan(8, 8, "test", adaptive=True)
    for others, want in ((None, 8), (0, 8), (3, 5), (7, 1), (40, 1)):
        monkeypatch.setattr(threads, "others_running", lambda o=others: o)
        assert plan.now() == want and plan.now(batch=True) == want


def test_a_busy_process_beside_a_runtime_takes_its_threads_down(smollm2_path, cfg):
    """A real second process that keeps a core busy: the runtime's next call uses fewer threads
    than it has cores, and all of them again once that process is gone."""
    cores = threads.cpu_count()
    with LlamaRuntime(smollm2_path, cfg.replace(runtime_n_threads=0, runtime_n_threads_batch=0)) as rt:
        assert rt.threads.adaptive
        spin = subprocess.Popen([sys.executable, "-c", "print('spinning', flush=True)\nwhile True: pass"],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert spin.stdout.readline().strip() == "spinning"
            seen = [rt.fit_threads()[0] for _ in range(50)]  # instants: the spinner is running in most
            assert min(seen) <= max(1, cores - 1), seen
            rt.prefill(rt.tokenize("The spinning wheel"))  # and a call still works at that count
        finally:
            spin.kill()
            spin.wait()
        seen = [rt.fit_threads()[0] for _ in range(50)]
        assert max(seen) == cores or cores == 1 or threads.others_running() != 0, seen


def test_importing_edgelink_sets_a_short_openmp_spin_unless_the_user_chose():
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = "import os, edgelink, llama_cpp; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == threads.SPIN_DEFAULT, out.stderr
    mine = subprocess.run([sys.executable, "-c", code], env={**env, "GOMP_SPINCOUNT": "77"},
                          capture_output=True, text=True, timeout=120)
    assert mine.stdout.strip() == "77"
    late = subprocess.run([sys.executable, "-c", "import os, llama_cpp, edgelink; "
                           "print(os.environ.get('GOMP_SPINCOUNT'))"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert late.stdout.strip() == "None"  # too late to matter once libgomp is loaded: left alone
