"""Start and stop an `edgelink serve` child process (for the demo, benchmarks and tests)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Any

from edgelink.config import Config, to_env
from edgelink.errors import EdgelinkError


class Receiver(subprocess.Popen):
    """A serving child; ``next_event()`` reads its JSON event lines (ready, session).

    A thread reads stdout into a queue, so a wait for an event that never comes ends with an
    error after ``timeout`` seconds instead of hanging its caller, and ``drain_events()`` can
    take what is already there without blocking."""

    EVENT_TIMEOUT_S = 300.0

    def _start_reading(self) -> None:
        self._events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read_events, daemon=True, name="receiver-events").start()

    def _read_events(self) -> None:
        assert self.stdout is not None
        for line in self.stdout:
            line = line.strip()
            if line.startswith("{"):
                try:
                    self._events.put(json.loads(line))
                except ValueError:
                    continue
        self._events.put(None)  # end of output: the child exited

    def next_event(self, timeout: float | None = None) -> dict[str, Any]:
        """The next JSON event; EdgelinkError if the child exits or none comes in ``timeout`` s."""
        limit = self.EVENT_TIMEOUT_S if timeout is None else timeout
        try:
            ev = self._events.get(timeout=limit)
        except queue.Empty:
            raise EdgelinkError(f"no event from the child within {limit:g} s: {self.stderr_tail(800)}") from None
        if ev is None:
            self._events.put(None)
            raise EdgelinkError(f"receiver exited (code {self.wait()}): {self.stderr_tail()}")
        return ev

    def drain_events(self) -> list[dict[str, Any]]:
        """Every event already received, without waiting for more."""
        out = []
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                return out
            if ev is None:
                self._events.put(None)
                return out
            out.append(ev)

    def stderr_tail(self, n: int = 4000) -> str:
        f = self._err_file
        f.flush()
        f.seek(0)
        return f.read().decode(errors="replace")[-n:]


def _spawn(what: str, args: list[str], cfg: Config, extra_env: dict[str, str] | None,
           wrapper: tuple[str, ...] = ()) -> Receiver:
    """Run ``edgelink ARGS`` with exactly this configuration (as EDGELINK_* variables) and
    return once its first JSON event says it is ready (kept as ``proc.ready``). ``wrapper``
    is a command that execs the rest (``nsenter -t PID -n --``: run it in another netns)."""
    env = {**os.environ, **to_env(cfg), **(extra_env or {})}
    err = tempfile.TemporaryFile()
    proc = Receiver([*wrapper, sys.executable, "-m", "edgelink", *args], stdout=subprocess.PIPE,
                    stderr=err, text=True, env=env)
    proc._err_file = err
    proc._start_reading()
    event = proc.next_event()
    if event.get("event") != "ready":
        stop_receiver(proc)
        raise EdgelinkError(f"unexpected first event from the {what}: {event}")
    proc.ready = event
    return proc


def start_receiver(model: str, cfg: Config, shm_name: str, extra_env: dict[str, str] | None = None,
                   extra_args: tuple[str, ...] = (), serve_args: tuple[str, ...] = ()) -> Receiver:
    """`edgelink serve MODEL --shm NAME --json` in a child; returns once it is ready.
    ``extra_args`` go before `serve` (global options), ``serve_args`` after it (`--bridge F`)."""
    return _spawn("receiver", [*extra_args, "serve", model, "--shm", shm_name, "--json", *serve_args],
                  cfg, extra_env)


def start_node(model: str, cfg: Config, listen: str = "/ip4/127.0.0.1/tcp/0",
               extra_env: dict[str, str] | None = None, extra_args: tuple[str, ...] = (),
               node_args: tuple[str, ...] = (), wrapper: tuple[str, ...] = ()) -> Receiver:
    """`edgelink node MODEL --listen ADDR --json` in a child; returns once it is ready. Its ready
    event is ``proc.ready`` (``addrs`` are full multiaddrs with /p2p/<peer id>)."""
    return _spawn("node", [*extra_args, "node", model, "--listen", listen, "--json", *node_args],
                  cfg, extra_env, wrapper)


def start_relay(cfg: Config, listen: str, extra_env: dict[str, str] | None = None,
                wrapper: tuple[str, ...] = ()) -> Receiver:
    """`edgelink relay --listen ADDR --json` in a child; returns once it is ready (``proc.ready``
    has its ``addrs``); its later events are reservations and ended circuits."""
    return _spawn("relay", ["relay", "--listen", listen, "--json"], cfg, extra_env, wrapper)


def stop_receiver(proc: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM (the receiver removes its segments on it), then wait; SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()
