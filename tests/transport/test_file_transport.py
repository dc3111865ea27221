"""Frames in a file: round trip, truncation and size limits checked before allocating."""

from __future__ import annotations

import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from edgelink.errors import MessageTooLarge, PeerGone, TransportError, TruncatedMessage
from edgelink.transport.file import FileChannelReader, FileChannelWriter


def test_round_trip(tmp_path):
    path = tmp_path / "frames.bin"
    big = np.arange(1_000_000, dtype=np.float32)
    with FileChannelWriter(path) as w:
        w.send(b"hello", bytearray(b" "), memoryview(b"world"))
        w.send()
        w.send(b"tensor:", big, big[:10].reshape(2, 5))
    assert path.stat().st_size == 3 * 8 + 11 + 7 + big.nbytes + 40
    with FileChannelReader(path) as r:
        assert bytes(r.recv(100)) == b"hello world"
        assert bytes(r.recv(0)) == b""
        frame = r.recv(8 << 20)
        assert bytes(frame[:7]) == b"tensor:"
        assert np.array_equal(np.frombuffer(frame[7 : 7 + big.nbytes], dtype=np.float32), big)
        assert np.array_equal(np.frombuffer(frame[7 + big.nbytes :], dtype=np.float32), big[:10])
        with pytest.raises(PeerGone, match="end of file after 3 frame"):
            r.recv(100)
    with FileChannelReader(path) as r:
        assert [len(f) for f in r] == [11, 0, 7 + big.nbytes + 40]
    with FileChannelWriter(path, append=True) as w:
        w.send(b"more")
    with FileChannelReader(path) as r:
        assert bytes(list(r)[-1]) == b"more"


def test_receive_buffer_is_reused(tmp_path):
    path = tmp_path / "frames.bin"
    with FileChannelWriter(path) as w:
        w.send(b"a" * 1000)
        w.send(b"b" * 10)
    with FileChannelReader(path) as r:
        first = r.recv(1000)
        second = r.recv(1000)
        assert bytes(second) == b"b" * 10
        assert bytes(first[:10]) == b"b" * 10  # same memory: valid until the next recv


def test_truncated_file(tmp_path):
    path = tmp_path / "frames.bin"
    with FileChannelWriter(path) as w:
        w.send(b"x" * 100)
    data = path.read_bytes()
    for cut in (3, 8, 50, len(data) - 1):
        path.write_bytes(data[:cut])
        with FileChannelReader(path) as r, pytest.raises(TruncatedMessage):
            r.recv(1000)
    # A huge declared length in a tiny file is refused before any allocation.
    path.write_bytes(struct.pack("<Q", 1 << 33) + b"tiny")
    with FileChannelReader(path) as r:
        tracemalloc.start()
        try:
            with pytest.raises(TruncatedMessage, match="holds only 4 more"):
                r.recv(1 << 40)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 1 << 20


def test_oversize_frame(tmp_path):
    path = tmp_path / "frames.bin"
    path.write_bytes(struct.pack("<Q", 1 << 60))
    with FileChannelReader(path) as r, pytest.raises(MessageTooLarge, match=r"accepts \(4,096 bytes: protocol.max_message_bytes"):
        r.recv(4096)
    with FileChannelWriter(path) as w:
        w.send(b"z" * 5000)
    with FileChannelReader(path) as r, pytest.raises(MessageTooLarge):
        r.recv(4999)


def test_errors_are_typed(tmp_path):
    with pytest.raises(TransportError, match="cannot open"):
        FileChannelReader(tmp_path / "missing.bin")
    w = FileChannelWriter(tmp_path / "f.bin")
    with pytest.raises(TransportError, match="not C-contiguous"):
        w.send(np.arange(10)[::2])
    w.close()
    with pytest.raises(TransportError, match="closed"):
        w.send(b"x")


def test_a_file_that_is_not_an_edgelink_file_says_so(tmp_path):
    """Not "a frame of 8,031,924,123,371.1 MB": the first bytes of some other file."""
    from edgelink.errors import ProtocolError
    from edgelink.protocol.codec import MAGIC

    path = tmp_path / "garbage.elk"
    path.write_bytes(b"hello, this is a text file and not a message\n" * 20)
    with pytest.raises(ProtocolError, match="not an edgelink message file"):
        FileChannelReader(path, magic=MAGIC)
    with FileChannelWriter(path) as w:  # a real frame passes the check
        w.send(MAGIC + b"rest")
    with FileChannelReader(path, magic=MAGIC) as r:
        assert bytes(r.recv(100)) == MAGIC + b"rest"
    path.write_bytes(b"hello, this is a text file and not a message\n" * 20)
    done = subprocess.run([sys.executable, "-m", "edgelink", "inspect", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "not an edgelink message file" in done.stdout + done.stderr
