"""`edgelink bench transport`: what each layer of the network path costs, side by side.

One run, two processes (this one sends, a child receives and acknowledges each payload),
per payload size: (a) raw TCP; (b) stock py-libp2p (its own Noise transport, yamux, one
stream, 1 MiB writes), what a user would get from ``new_host``; (c) the same libp2p stack
as edgelink's hosts run it (read-ahead under Noise, one Noise message per yamux frame);
(d) an edgelink P2PChannel: (c) plus the end-to-end NaCl layer and flow control. Each
figure is the median over repeats of: first byte sent to the receiver's 8-byte
acknowledgement read, after one untimed warm-up run. Loopback by default; see
`edgelink bench transport --veth` for a veth link to another network namespace.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import multiaddr
from libp2p.peer.peerinfo import info_from_p2p_addr

from edgelink.bench.timing import median_seconds
from edgelink.config import Config, to_env
from edgelink.transport.identity import load_identity
from edgelink.transport.p2p import P2PHost, write_in_noise_pieces
from edgelink.transport.readahead import stock_noise_option

RAW_PROTO = "/edgelink-bench/raw/1.0.0"
SIZES_MB = (1, 16, 64, 256)
WRITE = 1 << 20


def _recv_exactly_tcp(conn: socket.socket, n: int, buf: bytearray) -> None:
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view[: min(len(view), n - got)])
        if not k:
            raise EOFError
        got += k


def _serve(cfg: Config, ip: str) -> None:
    """The child: a TCP sink, and a libp2p host with a raw sink and an edgelink channel sink."""

    srv = socket.create_server((ip, 0))

    def tcp_loop() -> None:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(WRITE)
        while True:
            hdr = bytearray(8)
            try:
                _recv_exactly_tcp(conn, 8, hdr)
                n = int.from_bytes(hdr, "little")
                _recv_exactly_tcp(conn, n, buf)
            except EOFError:
                return
            conn.sendall(n.to_bytes(8, "little"))

    threading.Thread(target=tcp_loop, daemon=True).start()

    def on_channel(ch) -> None:
        while True:
            try:
                f = ch.recv(1 << 30)
            except Exception:  # noqa: BLE001
                return
            ch.send(len(f).to_bytes(8, "little"))

    listen = [f"/ip4/{ip}/tcp/0"]
    host = P2PHost(cfg, load_identity(cfg.p2p.identity_key), listen=listen, on_channel=on_channel)
    stock_id = load_identity(cfg.p2p.identity_key.with_suffix(".stock"))
    stock = P2PHost(cfg, stock_id, listen=listen, sec_opt=stock_noise_option(stock_id))

    async def raw_handler(stream) -> None:
        while True:
            hdr = b""
            while len(hdr) < 8:
                hdr += await stream.read(8 - len(hdr))
            n = int.from_bytes(hdr, "little")
            got = 0
            while got < n:
                got += len(await stream.read(min(n - got, 16 << 20)))
            await stream.write(n.to_bytes(8, "little"))

    for h in (host, stock):
        async def install(h=h) -> None:
            h.libp2p_host.set_stream_handler(RAW_PROTO, raw_handler)
        h.call(install)
    print(json.dumps({"tcp_port": srv.getsockname()[1], "addr": host.addrs[0],
                      "stock_addr": stock.addrs[0]}), flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    host.close()
    stock.close()


def _median_rate(fn: Callable[[], None], nbytes: int, repeats: int) -> float:
    """Payload MB/s, median of ``repeats`` timed runs after one untimed run that lets both
    sides allocate their buffers (a long-lived node has them already)."""
    return nbytes / median_seconds(fn, repeats, warmup=1) / 1e6


def _open_raw(h: P2PHost, addr: str):
    """A bare libp2p stream to the child's raw sink (no edgelink channel on it)."""
    async def go():
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        await h.libp2p_host.connect(info)
        return await h.libp2p_host.new_stream(info.peer_id, [RAW_PROTO])
    return h.call(go)


def _libp2p_send(h: P2PHost, stream, n: int, chunks: list[bytes], tuned: bool) -> None:
    """One payload over a raw stream, written as stock libp2p does or as edgelink's hosts do."""
    async def go():
        await stream.write(n.to_bytes(8, "little"))
        for c in chunks:
            if tuned:
                await write_in_noise_pieces(stream, c)
            else:
                await stream.write(c)
        ack = b""
        while len(ack) < 8:
            ack += await stream.read(8 - len(ack))
    h.call(go)


@dataclasses.dataclass
class _Paths:
    """The four open paths to the child, one per column."""

    tcp: socket.socket
    host: P2PHost
    raw: Any
    stock: P2PHost
    raw_stock: Any
    channel: Any


def _measure_size(paths: _Paths, mb: int, repeats: int) -> dict[str, Any]:
    """One row: ``mb`` MB of random bytes each way, MB/s per column."""
    n = mb << 20
    payload = memoryview(bytearray(os.urandom(1 << 20)) * mb)
    chunks = [bytes(payload[i:i + WRITE]) for i in range(0, n, WRITE)]

    def do_tcp() -> None:
        paths.tcp.sendall(n.to_bytes(8, "little"))
        paths.tcp.sendall(payload)
        _recv_exactly_tcp(paths.tcp, 8, bytearray(8))

    def do_e2e() -> None:
        paths.channel.send(payload)
        paths.channel.recv(64)

    return {"mb": mb, "bytes": n,
            "tcp_mbps": _median_rate(do_tcp, n, repeats),
            "libp2p_stock_mbps": _median_rate(
                lambda: _libp2p_send(paths.stock, paths.raw_stock, n, chunks, False), n, repeats),
            "libp2p_mbps": _median_rate(lambda: _libp2p_send(paths.host, paths.raw, n, chunks, True), n, repeats),
            "libp2p_nacl_mbps": _median_rate(do_e2e, n, repeats)}


def _start_child(cfg: Config, tmp: Path, ip: str, wrapper: tuple[str, ...]) -> subprocess.Popen:
    child_cfg = cfg.replace(p2p_identity_key=tmp / "server.key")
    env = {**os.environ, **to_env(child_cfg)}
    return subprocess.Popen([*wrapper, sys.executable, "-m", "edgelink.bench.transport", "--serve", ip],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def _stop_child(proc: subprocess.Popen) -> None:
    if proc.stdin:
        proc.stdin.close()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_transport_bench(cfg: Config, sizes_mb: tuple[int, ...] = SIZES_MB, repeats: int | None = None,
                        log: Callable[[str], None] | None = None, *, ip: str = "127.0.0.1",
                        wrapper: tuple[str, ...] = ()) -> dict[str, Any]:
    """The table above, in one run. The receiving child listens on ``ip`` and is started
    through ``wrapper`` (for example ``nsenter -t PID -n --``: another network namespace, see
    `edgelink bench transport --veth`); the default is loopback."""
    say = log or (lambda s: None)
    repeats = repeats or cfg.bench.repeats
    tmp = Path(tempfile.mkdtemp(prefix="edgelink-bench-"))
    proc = _start_child(cfg, tmp, ip, wrapper)
    rows = []
    try:
        ready = json.loads(proc.stdout.readline())
        host = P2PHost(cfg, load_identity(tmp / "client.key"))
        stock_id = load_identity(tmp / "client-stock.key")
        stock = P2PHost(cfg, stock_id, sec_opt=stock_noise_option(stock_id))
        try:
            tcp = socket.create_connection((ip, ready["tcp_port"]))
            tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t0 = time.perf_counter()
            ch = host.open_channel(ready["addr"])
            connect_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            second = host.open_channel(ready["addr"])
            warm_stream_s = time.perf_counter() - t0
            second.close()
            paths = _Paths(tcp, host, _open_raw(host, ready["addr"]), stock,
                           _open_raw(stock, ready["stock_addr"]), ch)
            for mb in sizes_mb:
                say(f"{mb} MB: tcp, libp2p stock, libp2p tuned, libp2p+nacl x{repeats}")
                rows.append(_measure_size(paths, mb, repeats))
            ch.close()
            tcp.close()
        finally:
            host.close()
            stock.close()
    finally:
        _stop_child(proc)
    return {"repeats": repeats, "link": "loopback" if ip.startswith("127.") else f"to {ip}",
            "connect_ms": 1e3 * connect_s, "warm_stream_ms": 1e3 * warm_stream_s,
            "chunk_bytes": cfg.p2p.chunk_bytes, "window_bytes": cfg.p2p.window_bytes,
            "read_ahead_bytes": cfg.p2p.read_ahead_bytes,
            "machine": f"{platform.machine()} {os.cpu_count()} cpu, {platform.system()} {platform.release()}",
            "rows": rows}


def format_transport_table(report: dict[str, Any]) -> str:
    lines = [f"{report['link']}, median of {report['repeats']}; {report['machine']}; "
             f"connect {report['connect_ms']:.0f} ms, new stream on a warm connection "
             f"{report['warm_stream_ms']:.1f} ms",
             f"{'MB':>5} {'TCP MB/s':>10} {'stock libp2p':>13} {'libp2p MB/s':>12} "
             f"{'+NaCl MB/s':>11} {'+NaCl/stock':>12}"]
    for r in report["rows"]:
        lines.append(f"{r['mb']:>5} {r['tcp_mbps']:>10.0f} {r['libp2p_stock_mbps']:>13.0f} "
                     f"{r['libp2p_mbps']:>12.0f} {r['libp2p_nacl_mbps']:>11.0f} "
                     f"{r['libp2p_nacl_mbps'] / r['libp2p_stock_mbps']:>11.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        from edgelink.config import load_config

        _serve(load_config(), sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1")
