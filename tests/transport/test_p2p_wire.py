"""How edgelink drives py-libp2p's byte path: read-ahead under Noise and one Noise message
per yamux frame. Each is a speed measure (see
docs/benchmarks.md); these tests pin down that it changes nothing on the wire a stock
py-libp2p peer can see, and that it does what it claims."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import pytest
import trio

from edgelink.transport import p2p
from edgelink.transport.identity import load_identity
from edgelink.transport.readahead import ReadAhead, stock_noise_option


class _Scripted:
    """An inner stream that hands out ``data`` in the chunk sizes given, recording requests."""

    def __init__(self, data: bytes, chunks: list[int]):
        self.data, self.chunks, self.pos, self.asked = data, list(chunks), 0, []

    async def read(self, n=None):
        self.asked.append(n)
        if self.pos >= len(self.data):
            return b""
        k = self.chunks.pop(0) if self.chunks else len(self.data)
        k = min(k, len(self.data) - self.pos, n if n else len(self.data))
        out = self.data[self.pos:self.pos + k]
        self.pos += k
        return out


def test_read_ahead_returns_the_same_bytes_for_any_read_pattern():
    rng = random.Random(7)
    data = os.urandom(300_000)
    for _ in range(20):
        inner = _Scripted(data, [rng.randint(1, 90_000) for _ in range(50)])
        ra = ReadAhead(inner, 65_536)

        async def drain(ra=ra):
            out = bytearray()
            while True:
                n = rng.choice([None, 0, 1, 2, 12, 1000, 65_519, 200_000])
                chunk = await ra.read(n)
                if n == 0:
                    assert chunk == b""
                    continue
                if not chunk:
                    return bytes(out)
                assert n is None or len(chunk) <= n
                out += chunk

        assert trio.run(drain) == data
        # the socket is always asked for at least the read-ahead size
        assert all(a is None or a >= 65_536 for a in inner.asked)


def test_read_ahead_serves_small_reads_from_memory():
    inner = _Scripted(bytes(range(256)) * 1000, [256_000])
    ra = ReadAhead(inner, 262_144)

    async def small_reads():
        return [await ra.read(2) for _ in range(1000)]

    parts = trio.run(small_reads)
    assert b"".join(parts) == (bytes(range(256)) * 1000)[:2000]
    assert len(inner.asked) == 1  # one socket read for a thousand small reads


@pytest.fixture(scope="module")
def wire_hosts(tmp_path_factory, cfg):
    """A tuned edgelink host and a host with py-libp2p's stock Noise, both echoing frames."""
    d = tmp_path_factory.mktemp("wire")

    def echo(ch):
        while True:
            try:
                f = ch.recv(1 << 26)
            except Exception:  # noqa: BLE001
                return
            ch.send(f)

    listen = ["/ip4/127.0.0.1/tcp/0"]
    tuned = p2p.P2PHost(cfg, load_identity(d / "tuned.key"), listen=listen, on_channel=echo)
    sid = load_identity(d / "stock.key")
    stock = p2p.P2PHost(cfg, sid, listen=listen, on_channel=echo, sec_opt=stock_noise_option(sid))
    tuned_cli = p2p.P2PHost(cfg, load_identity(d / "tuned-cli.key"))
    cid = load_identity(d / "stock-cli.key")
    stock_cli = p2p.P2PHost(cfg, cid, sec_opt=stock_noise_option(cid))
    yield tuned, stock, tuned_cli, stock_cli
    for h in (tuned_cli, stock_cli, tuned, stock):
        h.close()


@pytest.mark.parametrize("pair", ["stock client -> tuned node", "tuned client -> stock node"])
def test_stock_py_libp2p_noise_peer_interoperates(wire_hosts, pair):
    tuned, stock, tuned_cli, stock_cli = wire_hosts
    cli, srv = (stock_cli, tuned) if pair.startswith("stock") else (tuned_cli, stock)
    ch = cli.open_channel(srv.addrs[0])
    try:
        for size in (0, 17, 65_507, 65_508, 3 << 20):
            data = os.urandom(size)
            ch.send(data)
            assert bytes(ch.recv(1 << 26)) == data
    finally:
        ch.close()


def test_one_noise_message_per_yamux_frame(wire_hosts, monkeypatch):
    from libp2p.security.noise.io import NoiseTransportReadWriter

    tuned, _, tuned_cli, _ = wire_hosts
    ch = tuned_cli.open_channel(tuned.addrs[0])
    try:
        sizes: list[int] = []
        orig = NoiseTransportReadWriter.encrypt

        def counting(self, data):
            sizes.append(len(data))
            return orig(self, data)

        monkeypatch.setattr(NoiseTransportReadWriter, "encrypt", counting)
        payload = os.urandom(8 << 20)
        ch.send(payload)
        assert bytes(ch.recv(1 << 26)) == payload
    finally:
        ch.close()
    sent = [n for n in sizes if n > 1000]  # this process encrypts both hosts' messages
    # 8 MiB each way, sealed in 1 MiB records: without the fix every 65,536-byte yamux
    # frame became two Noise messages, one of 17 bytes.
    assert sum(1 for n in sizes if n == 17) == 0
    need = 2 * math.ceil((8 << 20) * 1.001 / p2p.NOISE_PIECE)
    assert len(sent) <= need + 40, (len(sent), need)


@pytest.mark.slow
def test_bench_transport_reports_every_column(tmp_path):
    env = {**os.environ, "EDGELINK_P2P_IDENTITY_KEY": str(tmp_path / "id.key")}
    out = subprocess.run([sys.executable, "-m", "edgelink", "bench", "transport", "--sizes", "1",
                          "--repeats", "1", "--json"], capture_output=True, text=True, env=env,
                         timeout=120, check=True)
    report = json.loads(out.stdout)
    (row,) = report["rows"]
    assert row["bytes"] == 1 << 20
    for key in ("tcp_mbps", "libp2p_stock_mbps", "libp2p_mbps", "libp2p_nacl_mbps"):
        assert row[key] > 0, key
    assert report["read_ahead_bytes"] == 262_144


def test_an_address_answering_for_another_peer_id_is_refused(wire_hosts, cfg, tmp_path):
    """What an mDNS impostor would achieve: announce peer A's id with its own address."""
    from edgelink.errors import TransportError

    tuned, stock, _, _ = wire_hosts
    transport_addr, _ = p2p.split_multiaddr(tuned.addrs[0])
    # A fresh client: one already connected to the real peer would simply reuse that
    # connection (libp2p dials peer ids; an address is only a hint).
    with p2p.P2PHost(cfg, load_identity(tmp_path / "fresh.key")) as cli:
        with pytest.raises(TransportError):
            cli.open_channel(f"{transport_addr}/p2p/{stock.peer_id}", timeout=10)
        ch = cli.open_channel(tuned.addrs[0])  # the host is still fine for honest dials
        ch.send(b"ok")
        assert bytes(ch.recv(10)) == b"ok"
        ch.close()
