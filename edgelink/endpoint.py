"""Where a peer lives: ``shm:NAME`` today (same machine); network addresses come with libp2p."""

from __future__ import annotations

import dataclasses

from edgelink.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Endpoint:
    scheme: str
    address: str

    def __str__(self) -> str:
        return f"{self.scheme}:{self.address}"


def parse_endpoint(text: str) -> Endpoint:
    scheme, sep, address = text.partition(":")
    if not sep or not address:
        raise ConfigError(f"endpoint {text!r} is not SCHEME:ADDRESS (for example shm:demo)")
    if scheme != "shm":
        raise ConfigError(f"unsupported endpoint scheme {scheme!r} (supported: shm)")
    return Endpoint(scheme, address)
