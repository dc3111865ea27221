"""A js-libp2p Kademlia DHT node (tests/interop/js_dht/node.mjs) beside edgelink's py-libp2p
DHT, to check that a foreign implementation can be a member of the cache DHT; with
``relay=True`` also a js-libp2p circuit relay v2 server, for edgelink's nodes to reserve on.

The npm packages are installed once per machine, from the committed lock, into the edgelink
cache dir (``<cache_dir>/interop/js_dht``); a later call skips ``npm ci`` while node_modules
is there for the same package.json + lock. ``JsDhtNode`` runs node.mjs as a context manager.

Run ``python -m tests.interop.js_dht`` to start one by hand (it prints its address; Ctrl-C
stops it); ``DEBUG='libp2p:kad-dht*'`` makes js-libp2p log each DHT message to stderr.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

SRC = Path(__file__).with_name("js_dht")
LOCKED = ("package.json", "package-lock.json")
SCRIPT = "node.mjs"
STAMP = ".installed"


def default_dir() -> Path:
    """Where the packages go: the edgelink cache dir, so that every checkout shares them."""
    from edgelink.config import load_config

    return load_config().paths.cache_dir / "interop" / "js_dht"


def lock_hash() -> str:
    """What the installed node_modules must have been made from."""
    h = hashlib.sha256()
    for name in LOCKED:
        h.update((SRC / name).read_bytes())
    return h.hexdigest()


def tool(name: str) -> str:
    """The path of ``node`` or ``npm``; a clear error rather than a FileNotFoundError later."""
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not on PATH: the js-libp2p DHT node needs Node.js 20+ and npm")
    return path


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """One installer at a time per directory (parallel test runs share the cache dir)."""
    with open(dest / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def install(dest: Path | None = None, *, timeout: float = 900) -> Path:
    """Install the pinned packages into ``dest`` (``npm ci``) unless they are there already for
    this lock; always refresh node.mjs. Returns ``dest``."""
    dest = dest or default_dir()
    dest.mkdir(parents=True, exist_ok=True)
    want = lock_hash()
    with _locked(dest):
        shutil.copyfile(SRC / SCRIPT, dest / SCRIPT)
        stamp = dest / STAMP
        if (dest / "node_modules").is_dir() and stamp.is_file() and stamp.read_text() == want:
            return dest
        for name in LOCKED:
            shutil.copyfile(SRC / name, dest / name)
        stamp.unlink(missing_ok=True)
        r = subprocess.run([tool("npm"), "ci", "--no-audit", "--no-fund"], cwd=dest,
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"npm ci in {dest} failed ({r.returncode}):\n{r.stderr[-3000:]}")
        stamp.write_text(want)
    return dest


class JsDhtNode:
    """node.mjs as a child process: a js-libp2p DHT server on ``host``, stopped on exit (stdin
    closed, then SIGTERM, then SIGKILL)."""

    def __init__(self, dest: Path | None = None, *, host: str = "127.0.0.1", timeout: float = 30,
                 relay: bool = False):
        self.dest = dest or default_dir()
        self.host = host
        self.relay = relay  # also a circuit relay v2 server
        self.timeout = timeout
        self.peer_id = ""
        self.addrs: list[str] = []
        self._proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._log: IO[str] | None = None

    def start(self) -> JsDhtNode:
        self._log = tempfile.TemporaryFile("w+")
        env = {**os.environ, "JS_DHT_HOST": self.host, "JS_DHT_PORT": "0", "JS_RELAY": "1" if self.relay else "0"}
        self._proc = subprocess.Popen([tool("node"), str(self.dest / SCRIPT)], cwd=self.dest,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._log, text=True, env=env)
        threading.Thread(target=self._read, name="js-dht-stdout", daemon=True).start()
        ready = self._reply()
        self.peer_id, self.addrs = ready["peer_id"], list(ready["addrs"])
        return self

    def _read(self) -> None:
        """Lines of stdout into a queue, so that a reply can be awaited with a timeout."""
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _reply(self) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=self.timeout)
        except queue.Empty:
            raise RuntimeError(f"the js DHT node did not answer in {self.timeout} s{self._stderr()}") from None
        if line is None:
            raise RuntimeError(f"the js DHT node exited{self._stderr()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the js DHT node refused: {reply['error']}")
        return reply

    def _stderr(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        tail = self._log.read()[-3000:]
        return f"; its stderr:\n{tail}" if tail else ""

    def _ask(self, cmd: dict[str, str]) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(cmd) + "\n")
        self._proc.stdin.flush()
        return self._reply()

    def provide(self, multihash_hex: str) -> None:
        """Announce that the js node holds this key (a sha2-256 multihash, hex): ADD_PROVIDER to
        the DHT members closest to it, and a record of its own."""
        self._ask({"provide": multihash_hex})

    def connect(self, addr: str) -> str:
        """Dial a peer (so that it joins the js node's routing table); returns its peer id."""
        return self._ask({"connect": addr})["connected"]

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            proc.stdin.close()  # type: ignore[union-attr]
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> JsDhtNode:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> None:
    """Run one node until SIGINT or SIGTERM (each only asks it to stop, so a repeated Ctrl-C
    cannot cut the shutdown short and leave node running)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with JsDhtNode(install()) as node:
        print(json.dumps({"peer_id": node.peer_id, "addrs": node.addrs}), flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
