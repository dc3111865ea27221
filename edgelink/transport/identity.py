"""The persistent Ed25519 identity of this machine on the network (its libp2p peer id).

The key file holds one line, ``edgelink-ed25519-v1 <64 hex digits>``: the 32-byte Ed25519
seed. It is created with mode 0600 (exclusively, so two processes starting at once cannot
write two different keys), and a file that group or others can read is refused, as ssh does.
The peer id (``12D3KooW...``) is the identity multihash of the public key, so the same file
always gives the same peer id.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path
from typing import Any

from edgelink.errors import ConfigError
from edgelink.files import create_private

HEADER = "edgelink-ed25519-v1"


@dataclasses.dataclass(frozen=True)
class Identity:
    path: Path
    key_pair: Any  # libp2p.crypto.keys.KeyPair
    peer_id: Any  # libp2p.peer.id.ID
    created: bool = False

    @property
    def peer_id_str(self) -> str:
        return self.peer_id.to_base58()

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self.key_pair.public_key.to_bytes()

    def sign(self, data: bytes) -> bytes:
        return self.key_pair.private_key.sign(data)


MAX_KEY_FILE_BYTES = 4096  # a key file is one short line


def _from_seed(seed: bytes):
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    kp = create_new_key_pair(seed)
    return kp, ID.from_pubkey(kp.public_key)


def _read(path: Path) -> bytes:
    try:
        st = path.stat()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read identity key {str(path)[:200]!r}: {exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"identity key {path} is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(f"identity key {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o}); "
                          f"run: chmod 600 {path}")
    if st.st_size > MAX_KEY_FILE_BYTES:
        raise ConfigError(f"identity key {path} is {st.st_size} bytes: not an edgelink key file")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read identity key {path}: {exc.strerror or exc}") from None
    text = raw.decode("ascii", errors="replace").split()
    if len(text) != 2 or text[0] != HEADER:
        raise ConfigError(f"identity key {path} is not an edgelink key file")
    try:
        seed = bytes.fromhex(text[1])
    except ValueError:
        raise ConfigError(f"identity key {path}: the seed is not hex") from None
    if len(seed) != 32:
        raise ConfigError(f"identity key {path}: the seed is {len(seed)} bytes, not 32")
    return seed


def load_identity(path: str | os.PathLike[str], *, create: bool = True) -> Identity:
    """Load the key at ``path``; create it (mode 0600) first if it does not exist and ``create``."""
    path = Path(path).expanduser()
    created = False
    try:
        exists = path.exists()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot use identity key path {str(path)[:200]!r}: {exc}") from None
    if not exists:
        if not create:
            raise ConfigError(f"no identity key at {path} (run `edgelink id` to create one)")
        from nacl.signing import SigningKey

        seed = bytes(SigningKey.generate())
        # another process that created it just now wins: its key is used
        created = create_private(path, f"{HEADER} {seed.hex()}\n".encode())
    seed = _read(path)
    kp, pid = _from_seed(seed)
    return Identity(path, kp, pid, created)
