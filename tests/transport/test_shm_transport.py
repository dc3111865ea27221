"""Shared-memory channels between real processes: framing, limits, crashes, cleanup."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import uuid
from pathlib import Path

import numpy as np
import pytest

import edgelink
from edgelink.config import load_config
from edgelink.errors import (
    MessageTooLarge,
    PeerGone,
    SegmentBusy,
    TransportError,
    TransportTimeout,
)
from edgelink.transport import ring as ringmod
from edgelink.transport.shm import ShmListener, connect, segment_dir, segment_path

CTX = multiprocessing.get_context("spawn")
RING = 1 << 20
REPO = Path(edgelink.__file__).resolve().parent.parent
nat = ringmod.native()


@pytest.fixture(params=["auto", "poll"])
def shm_cfg(request):
    """Every test here runs twice: with this build's wait (a futex on Linux) and with the
    portable polling path that macOS and other POSIX systems take."""
    return load_config().replace(shm_ring_bytes=RING, shm_timeout_s=5, shm_connect_timeout_s=5,
                                 shm_liveness_interval_s=0.05, shm_wait=request.param)


@pytest.fixture
def name(shm_cfg):
    name = f"t-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    leftovers = list(segment_dir(shm_cfg).glob(f"edgelink-{name}*"))
    for path in leftovers:
        path.unlink()
    assert not leftovers, f"segment files left behind: {leftovers}"


def _files(cfg, name) -> list[Path]:
    return list(segment_dir(cfg).glob(f"edgelink-{name}*"))


def _payload(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


# --- child processes (module level: spawn imports them by name) ---------------------------


def _echo_client(name, cfg, count):
    with connect(name, cfg) as chan:
        for _ in range(count):
            frame = chan.recv(16 << 20)
            chan.send(b"echo:", frame)


def _stuck_sender(name, cfg, nbytes):
    with connect(name, cfg) as chan:
        chan.send(np.ones(nbytes, dtype=np.uint8))  # blocks: nobody drains the ring


def _run_server_script(name: str, mode: str) -> subprocess.Popen:
    """A separate interpreter serving ``name``; prints "ready" once the segment exists."""
    script = textwrap.dedent(f"""
        import sys
        from edgelink.config import load_config
        from edgelink.transport.shm import ShmListener, install_cleanup_handlers
        cfg = load_config().replace(shm_ring_bytes={RING})
        listener = ShmListener({name!r}, cfg)
        install_cleanup_handlers()
        print("ready", flush=True)
        if {mode!r} == "accept":
            listener.accept()  # blocks until a signal
        else:
            sys.stdin.readline()  # returns, then the interpreter exits normally
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _wait_ring_full(ring) -> None:
    """Block on the ring's data futex until its writer has filled it."""
    seq_at = ring._off + ringmod._OFF_DATA_SEQ
    deadline = time.monotonic() + 10
    while True:
        seq = nat.load_acquire_u32(ring._buf, seq_at)
        if ring.readable() >= ring.capacity:
            return
        assert time.monotonic() < deadline, "the client never filled the ring"
        nat.wait_u32(ring._buf, seq_at, seq, 0.5)


# --- tests ---------------------------------------------------------------------------------


def test_round_trip_both_directions(shm_cfg, name):
    sizes = [0, 1, 4096, 3 * RING + 17]  # the last one streams through the 1 MiB ring
    with ShmListener(name, shm_cfg) as listener:
        proc = CTX.Process(target=_echo_client, args=(name, shm_cfg, len(sizes)))
        proc.start()
        chan = listener.accept(timeout=30)
        for i, n in enumerate(sizes):
            data = _payload(n, i)
            chan.send(b"head", data[: n // 2], memoryview(data)[n // 2 :])
            back = chan.recv(16 << 20)
            assert bytes(back[:9]) == b"echo:head"
            assert np.array_equal(np.frombuffer(back[9:], dtype=np.uint8), data)
        proc.join(10)
        assert proc.exitcode == 0
        chan.close()
    assert not _files(shm_cfg, name)


def test_message_too_large_raised_before_allocation(shm_cfg, name):
    with ShmListener(name, shm_cfg) as listener:
        client = connect(name, shm_cfg)
        server = listener.accept(timeout=1)
        # A hostile header: 1 TiB declared, no body.
        client._tx.write([memoryview(struct.pack("<Q", 1 << 40))])
        tracemalloc.start()
        try:
            with pytest.raises(MessageTooLarge, match=r"1,099,511,627,776 bytes\).*protocol.max_message_bytes"):
                server.recv(max_bytes=1 << 20)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20
        assert server._rbuf.capacity == 0  # the receive buffer never grew
        # The incoming stream is out of step: receiving is over, and the peer's writer is told
        # so at once; sending still works, so the refusal itself can reach the peer.
        with pytest.raises(TransportError, match="receiving is over"):
            server.recv(max_bytes=1 << 20)
        with pytest.raises(PeerGone):
            client.send(b"more")
        server.send(b"refused: too large")  # the client can still read the refusal
        assert bytes(client.recv(max_bytes=1 << 20, timeout=1)) == b"refused: too large"
        with pytest.raises(TransportError, match="sending is over"):
            client.send(b"more")
        client.close()
        server.close()
        # A declared length just over the bound is refused the same way.
        client = connect(name, shm_cfg)
        server = listener.accept(timeout=1)
        client.send(b"x" * 1001)
        with pytest.raises(MessageTooLarge):
            server.recv(max_bytes=1000)
        client.close()


def test_client_killed_mid_frame_then_next_client(shm_cfg, name):
    with ShmListener(name, shm_cfg) as listener:
        proc = CTX.Process(target=_stuck_sender, args=(name, shm_cfg, 8 * RING))
        proc.start()
        chan = listener.accept(timeout=30)
        _wait_ring_full(chan._rx)  # the client is now blocked inside its 8 MiB frame
        os.kill(proc.pid, signal.SIGKILL)  # not reaped yet: a zombie must count as dead
        t0 = time.monotonic()
        with pytest.raises(PeerGone, match="died"):
            chan.recv(16 << 20)
        assert time.monotonic() - t0 < shm_cfg.shm.timeout_s / 2
        proc.join(10)
        with pytest.raises(TransportError):
            chan.recv(16 << 20)
        chan.close()
        # The same listener serves the next client on clean rings.
        client = connect(name, shm_cfg, timeout=2)
        chan = listener.accept(timeout=2)
        client.send(b"after")
        assert bytes(chan.recv(100)) == b"after"
        chan.send(b"reply")
        assert bytes(client.recv(100)) == b"reply"
        client.close()


def test_closing_either_end_reaches_the_peer(shm_cfg, name):
    with ShmListener(name, shm_cfg) as listener:
        client = connect(name, shm_cfg)
        server = listener.accept(timeout=1)
        client.send(b"last words")
        client.close()
        assert bytes(server.recv(100)) == b"last words"  # data sent before close survives
        with pytest.raises(PeerGone, match="closed"):
            server.recv(100)
        server.close()
        with pytest.raises(TransportError, match="closed"):
            client.send(b"x")
        # The slot was freed as soon as both ends were done; the listener closing ends a
        # session from the server side.
        client = connect(name, shm_cfg, timeout=1)
        listener.accept(timeout=1)
    with pytest.raises(PeerGone):
        client.recv(100, timeout=1)
    client.close()


def test_connect_errors(shm_cfg, name, caplog):
    with pytest.raises(TransportError, match=f"no edgelink server on shm:{name}"):
        connect(name, shm_cfg)
    with pytest.raises(TransportError, match="invalid shm name"):
        connect("../etc/passwd", shm_cfg)
    with pytest.raises(TransportError, match="invalid shm name"):
        ShmListener("x" * 65, shm_cfg)
    with ShmListener(name, shm_cfg) as listener:
        first = connect(name, shm_cfg)
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="edgelink.transport.shm"), \
                pytest.raises(TransportTimeout, match="busy.*shm.connect_timeout_s"):
            connect(name, shm_cfg, timeout=0.3)
        assert time.monotonic() - t0 < 3
        told = [r.getMessage() for r in caplog.records if "waiting up to" in r.getMessage()]
        assert told == [f"shm:{name} is serving client pid {os.getpid()}; waiting up to 0.3 s for it "
                        "to finish (shm.connect_timeout_s)"]
        listener.accept(timeout=0.1)  # `first` claimed the slot already
        with pytest.raises(TransportTimeout, match="still attached"):
            listener.accept(timeout=0.1)  # ends that session, but `first` never lets go
        first.close()
        with pytest.raises(TransportTimeout, match="no client connected"):
            listener.accept(timeout=0.1)


def test_stale_segment_of_killed_server_is_recovered(shm_cfg, name, caplog):
    proc = _run_server_script(name, "stdin")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert _files(shm_cfg, name), "SIGKILL should leave the segment behind"
    with pytest.raises(TransportError, match="no edgelink server"):
        connect(name, shm_cfg)
    with caplog.at_level(logging.INFO, logger="edgelink.transport.shm"):
        listener = ShmListener(name, shm_cfg)
    assert any("recovered stale" in r.getMessage() for r in caplog.records)
    client = connect(name, shm_cfg)
    chan = listener.accept(timeout=1)
    client.send(b"fresh")
    assert bytes(chan.recv(10)) == b"fresh"
    client.close()
    listener.close()
    assert not _files(shm_cfg, name)


def test_segment_busy_while_a_live_server_holds_it(shm_cfg, name):
    proc = _run_server_script(name, "stdin")
    try:
        with pytest.raises(SegmentBusy, match=f"edgelink-{name} is served by pid {proc.pid}"):
            ShmListener(name, shm_cfg)
    finally:
        proc.stdin.write("\n")
        proc.stdin.close()
        proc.wait(10)
    with ShmListener(name, shm_cfg), pytest.raises(SegmentBusy, match=f"pid {os.getpid()}"):
        ShmListener(name, shm_cfg)


def test_no_segment_left_after_close_exit_or_sigterm(shm_cfg, name):
    listener = ShmListener(name, shm_cfg)
    assert segment_path(name, shm_cfg).exists()
    listener.close()
    listener.close()
    assert not _files(shm_cfg, name)

    proc = _run_server_script(name, "stdin")  # exits normally without calling close()
    proc.stdin.write("\n")
    proc.stdin.close()
    assert proc.wait(10) == 0
    assert not _files(shm_cfg, name)

    proc = _run_server_script(name, "accept")  # SIGTERM while blocked in accept()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == -signal.SIGTERM  # default action still happens, after cleanup
    assert not _files(shm_cfg, name)
