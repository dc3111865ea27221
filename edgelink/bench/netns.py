"""A second network host for tests: a network namespace joined to this one by a veth pair.

Traffic between the two crosses a real (virtual) Ethernet link with a 1,500-byte MTU and
its own addresses, not loopback. Needs root or CAP_NET_ADMIN + CAP_SYS_ADMIN (``unshare``,
``ip``, ``nsenter``), which the project's machines and CI have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import subprocess
from collections.abc import Iterator


@dataclasses.dataclass
class RemoteHost:
    pid: int  # a process that holds the namespace open
    ip: str  # its address on the link
    local_ip: str  # ours
    local_iface: str = ""  # our end of the veth pair (the remote end is eth0 in its namespace)

    @property
    def wrapper(self) -> tuple[str, ...]:
        """Prefix a command with this to run it on the remote host."""
        return ("nsenter", "-t", str(self.pid), "-n", "--")


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()} (these tests need root "
                           "or CAP_NET_ADMIN and CAP_SYS_ADMIN)")


def shape(host: RemoteHost, mbit: float) -> None:
    """Both directions of the link at ``mbit`` Mbit/s (tc tbf; this kernel has no netem)."""
    for prefix, dev in (((), host.local_iface), (host.wrapper, "eth0")):
        subprocess.run([*prefix, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)
        _run(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
             "burst", "64kb", "latency", "200ms")


def shape_iface(host, iface: str, mbit: float) -> None:
    """What leaves ``iface`` in ``host``'s namespace at ``mbit`` Mbit/s (tc tbf)."""
    subprocess.run([*host.wrapper, "tc", "qdisc", "del", "dev", iface, "root"], capture_output=True)
    _run(*host.wrapper, "tc", "qdisc", "add", "dev", iface, "root", "tbf", "rate", f"{mbit}mbit",
         "burst", "64kb", "latency", "200ms")


def tx_bytes(host, iface: str) -> int:
    """Bytes ``iface`` in ``host``'s namespace has sent."""
    # /proc/net/dev is the reading process's namespace's (/sys/class/net is the mount's)
    out = subprocess.run([*host.wrapper, "cat", "/proc/net/dev"], capture_output=True, text=True,
                         timeout=10, check=True)
    for line in out.stdout.splitlines():
        name, sep, counters = line.partition(":")
        if sep and name.strip() == iface:
            return int(counters.split()[8])
    raise RuntimeError(f"no interface {iface} in that namespace")


def _free_subnet() -> int:
    """A 10.X.0.0/30 that no interface here uses yet (several hosts may be up at once)."""
    used = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    for x in range(231, 255):
        if f" 10.{x}.0." not in used:
            return x
    raise RuntimeError("no free 10.X.0.0/30 subnet for a test host")


_HOSTS = itertools.count()


@contextlib.contextmanager
def remote_host(subnet: int | None = None) -> Iterator[RemoteHost]:
    holder = subprocess.Popen(["unshare", "-n", "--", "sh", "-c", "echo up; exec cat"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    # unique per host, also for several hosts of one process (an interface name has 15 bytes)
    ours = f"elh{os.getpid() % 100000}x{next(_HOSTS) % 1000}"
    try:
        assert holder.stdout.readline().strip() == "up", "unshare -n did not start"
        theirs = "eth0"
        subnet = _free_subnet() if subnet is None else subnet
        local_ip, ip = f"10.{subnet}.0.1", f"10.{subnet}.0.2"
        _run("ip", "link", "add", ours, "type", "veth", "peer", "name", theirs, "netns", str(holder.pid))
        _run("ip", "addr", "add", f"{local_ip}/30", "dev", ours)
        _run("ip", "link", "set", ours, "up")
        host = RemoteHost(holder.pid, ip, local_ip, ours)
        _run(*host.wrapper, "sh", "-c", f"ip addr add {ip}/30 dev {theirs} && ip link set {theirs} up "
                                         "&& ip link set lo up")
        yield host
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", ours, "root"], capture_output=True)
        subprocess.run(["ip", "link", "del", ours], capture_output=True)
        holder.stdin.close()
        holder.wait(timeout=10)


@dataclasses.dataclass
class LanHost:
    pid: int  # a process that holds the host's namespace open
    ip: str  # its address on the LAN

    @property
    def wrapper(self) -> tuple[str, ...]:
        return ("nsenter", "-t", str(self.pid), "-n", "--")


def _holder() -> subprocess.Popen:
    p = subprocess.Popen(["unshare", "-n", "--", "sh", "-c", "echo up; exec cat"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "up", "unshare -n did not start"
    return p


@contextlib.contextmanager
def lan(n: int) -> Iterator[list[LanHost]]:
    """``n`` hosts, each in its own network namespace, on one Ethernet segment: a bridge in a
    switch namespace of its own, one veth pair per host, addresses 10.X.1.1 .. 10.X.1.n/24.
    Nothing is attached to this (the root) namespace: a host's traffic reaches only the others."""
    holders: list[subprocess.Popen] = []
    try:
        switch = _holder()
        holders.append(switch)
        sw = ("nsenter", "-t", str(switch.pid), "-n", "--")
        _run(*sw, "sh", "-c", "ip link add br0 type bridge && ip link set br0 up")
        subnet = _free_subnet()
        hosts = []
        for i in range(n):
            h = _holder()
            holders.append(h)
            port = f"elp{os.getpid() % 100000}x{next(_HOSTS) % 1000}"
            _run("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", str(h.pid))
            _run("ip", "link", "set", port, "netns", str(switch.pid))
            _run(*sw, "sh", "-c", f"ip link set {port} master br0 && ip link set {port} up")
            host = LanHost(h.pid, f"10.{subnet}.1.{i + 1}")
            _run(*host.wrapper, "sh", "-c", f"ip addr add {host.ip}/24 dev eth0 && ip link set eth0 up "
                                             "&& ip link set lo up")
            hosts.append(host)
        yield hosts
    finally:
        for h in reversed(holders):  # a namespace goes, with its interfaces, when its holder exits
            if h.stdin:
                h.stdin.close()
            h.wait(timeout=10)


@dataclasses.dataclass
class NatWorld:
    """A public segment and two home networks behind masquerading routers (``nat_world``)."""

    public: LanHost  # on the public segment (the relay's host)
    home: list[LanHost]  # one host on each private LAN, behind its router
    routers: list[LanHost]  # each router's public side (its ``ip`` is the address peers see)
    subnet: int


def ensure_nft() -> str | None:
    """nft's path, installing Debian's nftables when it is missing (root, package mirror);
    None, with the reason logged by the caller, where that fails."""
    import shutil

    found = shutil.which("nft")
    if found:
        return found
    subprocess.run(["apt-get", "install", "-y", "-q", "nftables"], capture_output=True, timeout=300)
    return shutil.which("nft")


@contextlib.contextmanager
def nat_world(*, random_ports: bool = False) -> Iterator[NatWorld]:
    """A public Ethernet segment 10.X.0.0/24 (the public host at .1, routers at .11 and .12)
    and two private LANs 10.X.1.0/24 and 10.X.2.0/24, each with one host (.2) behind a router
    (.1) that masquerades what leaves for the public side and silently drops what arrives
    from it unasked (forwarded or for itself), as a home router does. No route leads from the public side into a LAN.
    ``random_ports``: the routers pick a random source port for every connection (nftables
    ``fully-random``), the NAT that defeats hole punching."""
    if ensure_nft() is None:
        raise RuntimeError("nft (Debian's nftables) is missing and could not be installed")
    holders: list[subprocess.Popen] = []

    def host() -> LanHost:
        h = _holder()
        holders.append(h)
        return LanHost(h.pid, "")

    def link(a: LanHost, a_if: str, b: LanHost, b_if: str) -> None:
        tmp = f"eln{os.getpid() % 100000}x{next(_HOSTS) % 1000}"
        _run("ip", "link", "add", tmp, "type", "veth", "peer", "name", b_if, "netns", str(b.pid))
        _run("ip", "link", "set", tmp, "netns", str(a.pid))
        _run(*a.wrapper, "ip", "link", "set", tmp, "name", a_if)

    try:
        subnet = _free_subnet()
        net = f"10.{subnet}"
        switch = host()
        _run(*switch.wrapper, "sh", "-c", "ip link add br0 type bridge && ip link set br0 up")
        public = host()
        public.ip = f"{net}.0.1"
        routers, home = [], []
        for i in (1, 2):
            r, h = host(), host()
            r.ip, h.ip = f"{net}.0.{10 + i}", f"{net}.{i}.2"
            routers.append(r)
            home.append(h)
        for n, (who, ip) in enumerate([(public, public.ip)] + [(r, r.ip) for r in routers]):
            port = f"p{n}"
            link(switch, port, who, "wan")
            _run(*switch.wrapper, "sh", "-c", f"ip link set {port} master br0 && ip link set {port} up")
            _run(*who.wrapper, "sh", "-c", f"ip addr add {ip}/24 dev wan && ip link set wan up && ip link set lo up")
        nat = "masquerade fully-random" if random_ports else "masquerade"
        for i, (r, h) in enumerate(zip(routers, home, strict=True), start=1):
            link(r, "lan", h, "eth0")
            _run(*r.wrapper, "sh", "-c", f"ip addr add {net}.{i}.1/24 dev lan && ip link set lan up "
                                         "&& sysctl -qw net.ipv4.ip_forward=1")
            _run(*h.wrapper, "sh", "-c", f"ip addr add {h.ip}/24 dev eth0 && ip link set eth0 up "
                                         f"&& ip link set lo up && ip route add default via {net}.{i}.1")
            rules = "\n".join([
                "table ip nat {", "  chain outward {", "    type nat hook postrouting priority 100;",
                f'    oifname "wan" {nat}', "  }", "}",
                "table ip filter {", "  chain through {", "    type filter hook forward priority 0; policy drop;",
                "    ct state established,related accept", '    iifname "lan" accept', "  }",
                # what reaches the router itself from outside unasked is dropped, not refused
                # (no RST), as a home router's firewall does: hole punching depends on it
                "  chain inbound {", "    type filter hook input priority 0; policy accept;",
                '    iifname "wan" ct state established,related accept', '    iifname "wan" drop', "  }",
                "}", ""])
            r_nft = subprocess.run([*r.wrapper, "nft", "-f", "-"], input=rules, capture_output=True, text=True,
                                   timeout=30)
            if r_nft.returncode != 0:
                raise RuntimeError(f"nft could not set up NAT in a namespace: {r_nft.stderr.strip()}")
        yield NatWorld(public, home, routers, subnet)
    finally:
        for h in reversed(holders):
            if h.stdin:
                h.stdin.close()
            h.wait(timeout=10)
