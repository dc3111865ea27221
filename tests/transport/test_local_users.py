"""Other local users (issue 25, part 4): a name another user created first is never trusted,
a file edgelink writes is private whatever the umask, and a planted link is never followed.

The second user is real: a child process that drops to uid 65534 (nobody), which needs root
(CI runs as root). The checks that need no second user run everywhere.
"""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

import pytest

from edgelink.errors import SegmentUntrusted
from edgelink.files import private_dir, write_atomic
from edgelink.transport import shm
from edgelink.transport.file import FileChannelWriter

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a second local user needs root to become one")


def _as_nobody(fn) -> None:
    """Run ``fn`` in a child process as uid/gid 65534; fail if it fails."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            fn()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture()
def name():
    n = f"squat-{uuid.uuid4().hex[:8]}"
    yield n


@needs_root
@pytest.mark.parametrize("mode", [0o600, 0o666])
def test_a_name_another_user_created_first_is_refused_by_both_ends(cfg, name, mode):
    path = shm.segment_path(name, cfg)

    def squat() -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        os.fchmod(fd, mode)
        os.ftruncate(fd, 1 << 20)  # big enough to look like a segment
        os.close(fd)

    _as_nobody(squat)
    try:
        assert os.stat(path).st_uid == NOBODY
        with pytest.raises(SegmentUntrusted, match="belongs to uid 65534|not yours"):
            shm.connect(name, cfg, timeout=1.0)
        with pytest.raises(SegmentUntrusted, match="belongs to uid 65534|not yours"):
            shm.ShmListener(name, cfg)
        assert os.stat(path).st_uid == NOBODY  # nothing of theirs was removed or changed
    finally:
        path.unlink()


def test_a_segment_open_to_others_or_a_link_is_refused(cfg, name, tmp_path):
    path = shm.segment_path(name, cfg)
    path.write_bytes(b"\0" * (1 << 16))
    os.chmod(path, 0o644)
    try:
        with pytest.raises(SegmentUntrusted, match="open to other users"):
            shm.connect(name, cfg, timeout=1.0)
    finally:
        path.unlink()
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep me")
    path.symlink_to(target)
    try:
        with pytest.raises(SegmentUntrusted, match="symbolic link"):
            shm.connect(name, cfg, timeout=1.0)
        with pytest.raises(SegmentUntrusted, match="symbolic link"):
            shm.ShmListener(name, cfg)
        assert target.read_bytes() == b"keep me"
    finally:
        path.unlink()


def test_the_real_listener_and_client_still_meet(cfg, name):
    """The checks refuse only what is not ours: a listener's own segment is 0600 and serves."""
    with shm.ShmListener(name, cfg) as lst:
        assert _mode(lst.path) == 0o600 and os.stat(lst.path).st_uid == os.geteuid()
        ch = shm.connect(name, cfg, timeout=5.0)
        srv = lst.accept(timeout=5.0)
        ch.send(b"hello")
        assert bytes(srv.recv(1 << 10, timeout=5.0)) == b"hello"
        ch.close()
        srv.close()


def test_files_are_private_under_umask_022_and_plants_are_not_followed(tmp_path, cfg, monkeypatch):
    old = os.umask(0o022)
    try:
        shared = tmp_path / "shared"
        shared.mkdir(mode=0o1777)
        os.chmod(shared, 0o1777)
        victim = tmp_path / "victim"
        victim.write_bytes(b"untouched")
        out = shared / "state.elk"
        # what the old writers used as their temporary names, planted as links to the victim
        for planted in (f".{out.name}.tmp", f".{out.name}.{os.getpid()}.tmp"):
            (shared / planted).symlink_to(victim)
        with FileChannelWriter(out) as w:
            w.send(b"frame")
        assert _mode(out) == 0o600 and victim.read_bytes() == b"untouched"
        write_atomic(shared / "chunk.elk", b"cells")
        assert _mode(shared / "chunk.elk") == 0o600
        # a link planted at the output itself is replaced, never written through
        (shared / "out2.elk").symlink_to(victim)
        write_atomic(shared / "out2.elk", b"new")
        assert not (shared / "out2.elk").is_symlink() and victim.read_bytes() == b"untouched"
        # a failed write leaves the old file and no temporary file behind
        with pytest.raises(RuntimeError):
            with FileChannelWriter(out) as w:
                w.send(b"half")
                raise RuntimeError("cut")
        from edgelink.transport.file import FileChannelReader

        with FileChannelReader(out, magic=None) as r:
            assert bytes(r.recv(1 << 10)) == b"frame"
        assert not [p for p in shared.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()]
        # directories edgelink creates, the cache's and the identity's
        d = private_dir(tmp_path / "a" / "b" / "c")
        assert _mode(d) == 0o700 and _mode(d.parent) == 0o700
        from edgelink.cache.store import ChunkStore
        from edgelink.transport.identity import load_identity

        store = ChunkStore(tmp_path / "cache" / "kv", 1 << 20, 1 << 20)
        store.put("ab" * 32, b"chunk")
        assert _mode(tmp_path / "cache" / "kv") == 0o700
        assert _mode(tmp_path / "cache" / "kv" / "ab" / f"{'ab' * 32}.elk") == 0o600
        ident = load_identity(tmp_path / "keys" / "node.key")
        assert _mode(ident.path) == 0o600 and _mode(ident.path.parent) == 0o700
    finally:
        os.umask(old)


def test_an_export_is_private_and_the_llama_file_writer_too(smollm2_path, cfg, tmp_path):
    import edgelink
    from edgelink.kinds.llama_file import save_seq_file

    old = os.umask(0o022)
    try:
        with edgelink.load(str(smollm2_path), cfg) as m:
            m.prefill("A private prompt about a lighthouse.")
            snap = m.snapshot().save(tmp_path / "x.elk")
            assert _mode(snap) == 0o600
            seq = tmp_path / "slot.bin"
            (tmp_path / f".{seq.name}.tmp").symlink_to(tmp_path / "victim")
            save_seq_file(seq, m.runtime)
            assert _mode(seq) == 0o600 and not (tmp_path / "victim").exists()
    finally:
        os.umask(old)
