"""Shared-memory transport: one segment per server name, two SPSC rings, one client at a time.

The segment is a file ``<cfg.shm.dir>/edgelink-<NAME>`` mapped with mmap by both processes
(not multiprocessing.shared_memory: on 3.11 its resource tracker unlinks segments that a
process merely attached to). Layout:

    page 0    control block (below)
    page 1..  ring client -> server, then ring server -> client (edgelink.transport.ring)

    control  +0 magic, +8 version, +16 ring bytes, +24 segment bytes
             +64 server pid, +72 server start ticks, +80 state (listening / closed)
             +128 client pid  (0 = slot free; a client claims it with a CAS)
             +136 client start ticks, +144 client state (attached / detached)
             +152 session generation (bumped by every accept)
             +192 control futex word (bumped on every claim, detach, slot release, close)

Ownership: the listener holds an exclusive flock on the segment file for its lifetime. The
kernel drops it when the process dies, however it dies, so a new listener tells a stale
segment (lock free: recover it) from a live one (lock held: SegmentBusy) without trusting pids.
Peers watch each other by pid plus kernel start time (pid reuse and unreaped zombies do not
fool the check).

Sessions: a client claims the slot and may start sending at once. Only the listener frees the
slot, after the client detached or died and the rings were reset, so a new client never sees
bytes of the previous session.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import logging
import math
import mmap
import os
import re
import signal
import stat
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgelink.config import Config
from edgelink.errors import (
    EdgelinkError,
    MessageTooLarge,
    PeerGone,
    SegmentBusy,
    SegmentUntrusted,
    TransportError,
    TransportTimeout,
)
from edgelink.transport.framing import (
    HEADER,
    HEADER_BYTES,
    FrameSink,
    RecvBuffer,
    WholeFrame,
    byte_views,
    check_length,
)
from edgelink.transport.ring import (
    Ring,
    footprint,
    native,
    pid_alive,
    process_start_ticks,
    waiter,
)

log = logging.getLogger(__name__)

PREFIX = "edgelink-"
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAGIC = 0x3130_4D48_534C_4745  # b"EGLSHM01" little-endian
VERSION = 1
PAGE = mmap.PAGESIZE
CONTROL_BYTES = 4096
MIN_RING_BYTES = 4096

_C_MAGIC = 0
_C_VERSION = 8
_C_RING_BYTES = 16
_C_SIZE = 24
_C_SERVER_PID = 64
_C_SERVER_TICKS = 72
_C_STATE = 80
_C_CLIENT_PID = 128
_C_CLIENT_TICKS = 136
_C_CLIENT_STATE = 144
_C_GENERATION = 152
_C_SEQ = 192

_STATE_LISTENING = 1
_STATE_CLOSED = 2
_CLIENT_ATTACHED = 1
_CLIENT_DETACHED = 2
_WAKE_ALL = 2**31 - 1

# Listeners and client channels of this process, closed at exit / on SIGTERM.
_LIVE_LISTENERS: weakref.WeakSet[ShmListener] = weakref.WeakSet()
_LIVE_CHANNELS: weakref.WeakSet[ShmChannel] = weakref.WeakSet()


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise TransportError(
            f"invalid shm name {name!r}: use 1-64 characters from A-Z a-z 0-9 _ . -"
        )
    return name


def segment_dir(cfg: Config) -> Path:
    """``shm.dir``, with ``auto`` resolved: /dev/shm where it exists (Linux: memory-backed),
    else the system's temporary directory (macOS has no /dev/shm; a mapped file there is
    shared between processes the same way, with the page cache behind it)."""
    if cfg.shm.dir != "auto":
        return Path(cfg.shm.dir).expanduser()
    dev = Path("/dev/shm")
    if dev.is_dir() and os.access(dev, os.W_OK | os.X_OK):
        return dev
    return Path(tempfile.gettempdir())


def segment_path(name: str, cfg: Config) -> Path:
    """The file that backs server ``name``: ``<shm.dir>/edgelink-<name>``."""
    return segment_dir(cfg) / f"{PREFIX}{validate_name(name)}"


def _layout(ring_bytes: int) -> tuple[int, int, int]:
    """Offsets of the two rings and the total segment size, all page-aligned."""
    span = -(-footprint(ring_bytes) // PAGE) * PAGE
    c2s = CONTROL_BYTES
    s2c = c2s + span
    return c2s, s2c, s2c + span


def _bump(mm: mmap.mmap) -> None:
    nat = native()
    nat.fetch_add_u32(mm, _C_SEQ, 1)
    nat.wake_u32(mm, _C_SEQ, _WAKE_ALL)


def _wait_ctrl(mm: mmap.mmap, ready, deadline: float, slice_s: float, on_slice=None, *,
               wait: str = "auto") -> bool:
    """Wait on the control word until ``ready()``; False once ``deadline`` passes."""
    nat = native()
    wait_u32 = waiter(wait)
    while True:
        seq = nat.load_acquire_u32(mm, _C_SEQ)
        if ready():
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if not wait_u32(mm, _C_SEQ, seq, min(slice_s, left)) and on_slice is not None:
            on_slice()


def _check_own(fd: int, path: Path) -> None:
    """The segment file must be a regular file of this user, open to nobody else: a name that
    another local user created first would otherwise receive the prompt's state."""
    st = os.fstat(fd)
    me = os.geteuid()
    fix = f"remove {path} if it is not yours to keep, or serve another name"
    if not stat.S_ISREG(st.st_mode):
        raise SegmentUntrusted(f"{path} is not a regular file; {fix}")
    if st.st_uid != me:
        raise SegmentUntrusted(f"{path} belongs to uid {st.st_uid}, not to you (uid {me}): another "
                               f"local user created this name first; {fix}")
    if st.st_mode & 0o077:
        raise SegmentUntrusted(f"{path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}, "
                               f"not 600); {fix}")


def _open_segment(path: Path) -> int:
    """Open an existing segment file without following a link; typed errors for a foreign one."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SegmentUntrusted(f"{path} is a symbolic link; remove it, or serve another name") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise SegmentUntrusted(f"{path} exists and is not yours (cannot open it: {exc.strerror}); "
                                   "another local user created this name first: serve another name") from None
        raise
    try:
        _check_own(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_pid(fd: int) -> int:
    try:
        raw = os.pread(fd, 8, _C_SERVER_PID)
    except OSError:
        return 0
    return int.from_bytes(raw, "little") if len(raw) == 8 else 0


def _allocate(fd: int, size: int) -> None:
    """Give the segment its size. Allocate the blocks now where the system can (a full /dev/shm
    is an error here, not a SIGBUS mid-transfer); macOS has no posix_fallocate, and there the
    file is only sized."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
    else:  # pragma: no cover - macOS
        os.ftruncate(fd, size)


def _map(fd: int, size: int) -> mmap.mmap:
    # MAP_POPULATE fills the page tables up front: the first transfer then runs at memory
    # speed instead of taking one fault per 4 KiB page.
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def _close_map(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:
        # A native call is mid-flight on this mapping (a signal handler interrupted it). The
        # process is on its way out; the kernel unmaps at exit.
        pass


class ShmChannel:
    """One end of a shared-memory session; implements edgelink.transport.base.Channel.

    Not thread-safe: one thread sends and receives on a channel at a time.
    """

    def __init__(self, *, mm: mmap.mmap, tx: Ring, rx: Ring, role: str, name: str,
                 cfg: Config, generation: int, listener: ShmListener | None = None):
        self._mm = mm
        self._tx = tx
        self._rx = rx
        self.role = role
        self.name = name
        self.generation = generation
        self._timeout_s = cfg.shm.timeout_s
        self._listener = listener
        self._hdr = bytearray(HEADER_BYTES)
        self._rbuf = RecvBuffer()
        self._closed = False
        self._broken: str | None = None
        self._rx_broken: str | None = None  # set when a frame was refused unread
        self._tx_broken: str | None = None  # set when the peer stopped reading our frames
        self._rings_down = False
        self._owner_pid = os.getpid()
        if listener is None:
            _LIVE_CHANNELS.add(self)

    # --- Channel ---

    def send(self, *parts) -> None:
        """Send one frame: u64 length, then ``parts`` back to back (streamed if > ring)."""
        self._check()
        if self._tx_broken:
            raise TransportError(f"shm:{self.name}: sending is over after: {self._tx_broken}")
        views, total = byte_views(parts)
        before = self._tx.write_index
        try:
            self._tx.write([memoryview(HEADER.pack(total)), *views], self._timeout_s)
        except TransportTimeout as exc:
            if self._tx.write_index != before:
                self._fail(f"send timed out mid-frame: {exc}")
            raise
        except PeerGone as exc:
            if self._tx.reader_closed:
                # The peer stopped reading (it refused a frame), but its last words (a refusal)
                # may be in our receive ring even if it has closed since: keep receiving.
                self._tx_broken = str(exc)
                self._tx.close_writer()
            else:
                self._fail(str(exc))
            raise
        except EdgelinkError as exc:
            self._fail(str(exc))
            raise

    def recv(self, max_bytes: int, timeout: float | None = None) -> memoryview:
        """Receive one frame into the channel's reusable buffer; valid until the next recv."""
        sink = WholeFrame(self._rbuf)
        self.recv_into(sink, max_bytes, timeout)
        return sink.view

    def recv_into(self, sink: FrameSink, max_bytes: int, timeout: float | None = None) -> int:
        """Receive one frame into the buffers ``sink`` hands out; returns the frame's length.

        ``timeout`` (default cfg.shm.timeout_s; ``math.inf`` for none) bounds the wait for
        the frame to start; every later stall is bounded by cfg.shm.timeout_s. A timeout before the first byte leaves the
        channel usable; any failure after it leaves the channel closed.
        """
        self._check()
        if self._rx_broken:
            raise TransportError(f"shm:{self.name}: receiving is over after: {self._rx_broken}")
        limit = self._timeout_s if timeout is None else timeout
        rx = self._rx
        try:
            rx.wait_readable(limit)
        except TransportTimeout:
            raise
        except EdgelinkError as exc:
            self._fail(str(exc))
            raise
        try:
            # ``timeout`` covered the wait for the frame to start (an idle peer); once it has
            # started, a stall means a stuck or dying sender: the transport's own limit applies.
            limit = self._timeout_s
            hdr = memoryview(self._hdr)
            rx.read_into(hdr, limit)
            (length,) = HEADER.unpack(self._hdr)
            try:
                check_length(length, max_bytes, f"shm:{self.name}")
            except MessageTooLarge as exc:
                # Refused before reading (or allocating) a byte of it. The incoming stream is
                # out of step, so stop reading (the peer's writer gets PeerGone), but keep our
                # sending side so the refusal itself can still reach the peer.
                self._rx_broken = str(exc)
                rx.close_reader()
                raise
            buf = sink.start(length)
            while buf is not None:
                rx.read_into(buf, limit)
                buf = sink.filled()
        except MessageTooLarge:
            raise
        except EdgelinkError as exc:
            # Partial frame: the stream position is lost, so the channel is finished;
            # closing our side tells the peer at once.
            self._fail(str(exc))
            raise
        return length

    def close(self) -> None:
        """Close this end: the peer's blocked or next call raises PeerGone. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _LIVE_CHANNELS.discard(self)
        if os.getpid() != self._owner_pid:
            return  # inherited across fork: the session belongs to the parent
        self._shutdown_rings()
        if self._listener is not None:
            self._listener._session_over(self)
        else:
            _close_map(self._mm)

    def __del__(self) -> None:
        # A client dropped without close() still detaches, so the server can take the next one.
        if getattr(self, "_listener", True) is None and not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:  # noqa: BLE001 - never raise from a finaliser
                pass

    # --- extras ---

    @property
    def closed(self) -> bool:
        return self._closed

    def peer_gone(self) -> bool:
        """Whether the other side closed or died: a few atomic loads and a pid check, cheap
        enough to ask between decoded tokens (a receiver stops generating for nobody)."""
        if self._closed:
            return True
        alive = self._rx.peer_alive
        if alive is not None and not alive():
            return True
        if self._listener is not None:
            return native().load_acquire_u64(self._mm, _C_CLIENT_STATE) == _CLIENT_DETACHED
        return False

    @property
    def peer_pid(self) -> int:
        off = _C_CLIENT_PID if self.role == "server" else _C_SERVER_PID
        return native().load_acquire_u64(self._mm, off)

    def __enter__(self) -> ShmChannel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("broken" if self._broken else "open")
        return f"<ShmChannel shm:{self.name} {self.role} gen={self.generation} {state}>"

    # --- internals ---

    def _check(self) -> None:
        if self._closed:
            raise TransportError(f"shm:{self.name}: channel is closed")
        if self._broken:
            raise TransportError(f"shm:{self.name}: channel is unusable after: {self._broken}")

    def _fail(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
            self._shutdown_rings()
            if self._listener is not None:
                self._listener._session_over(self)

    def _shutdown_rings(self) -> None:
        if self._rings_down:
            return
        self._rings_down = True
        self._tx.close_writer()
        self._rx.close_reader()
        if self._listener is None:
            nat = native()
            nat.store_release_u64(self._mm, _C_CLIENT_STATE, _CLIENT_DETACHED)
            _bump(self._mm)


class ShmListener:
    """Serves shm:NAME: creates the segment and accepts one client at a time.

    Raises SegmentBusy when a live process serves NAME; a segment left by a dead process is
    removed and recreated (logged at INFO). The segment is removed by ``close()``, at normal
    interpreter exit, and on SIGTERM/SIGHUP once ``install_cleanup_handlers()`` was called.
    """

    def __init__(self, name: str, cfg: Config, *, chunk_bytes: int | None = None):
        nat = native()
        self.name = validate_name(name)
        self.cfg = cfg
        self.path = segment_path(name, cfg)
        ring_bytes = int(cfg.shm.ring_bytes)
        if ring_bytes < MIN_RING_BYTES:
            raise TransportError(f"shm.ring_bytes must be at least {MIN_RING_BYTES}, got {ring_bytes}")
        self._chunk = chunk_bytes
        self._closed = True
        self._channel: ShmChannel | None = None
        self._in_session = False  # a client was handed a channel and its slot is not freed yet
        self._generation = 0
        self._owner_pid = os.getpid()
        c2s, s2c, size = _layout(ring_bytes)
        self._lock_fd = self._claim_path()
        try:
            # Separate open file description for the mapping: mmap keeps a dup of its fd, and a
            # dup would share (and keep alive) the flock if it were the same description.
            map_fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                try:
                    _allocate(map_fd, size)
                except OSError as exc:
                    raise TransportError(
                        f"cannot allocate {size} bytes for {self.path}: {exc.strerror}"
                    ) from exc
                self._mm = _map(map_fd, size)
            finally:
                os.close(map_fd)
            # Touch every page once so that neither the first transfer nor the client's
            # populate pays for page allocation.
            arr = np.frombuffer(self._mm, dtype=np.uint8)
            arr[::PAGE] = 0
            del arr
            mm = self._mm
            self._c2s = Ring.create(mm, c2s, ring_bytes, name=f"shm:{name} client->server")
            self._s2c = Ring.create(mm, s2c, ring_bytes, name=f"shm:{name} server->client")
            for off, value in (
                (_C_VERSION, VERSION), (_C_RING_BYTES, ring_bytes), (_C_SIZE, size),
                (_C_SERVER_PID, os.getpid()), (_C_SERVER_TICKS, process_start_ticks(os.getpid())),
                (_C_STATE, _STATE_LISTENING), (_C_CLIENT_PID, 0), (_C_CLIENT_TICKS, 0),
                (_C_CLIENT_STATE, 0), (_C_GENERATION, 0),
            ):
                nat.store_release_u64(mm, off, value)
            nat.store_release_u64(mm, _C_MAGIC, MAGIC)  # last: the segment is now valid
        except BaseException:
            self._unlink()
            os.close(self._lock_fd)
            if getattr(self, "_mm", None) is not None:
                _close_map(self._mm)
            raise
        self._closed = False
        _LIVE_LISTENERS.add(self)
        log.debug("serving shm:%s at %s (%d-byte rings)", name, self.path, ring_bytes)

    def _claim_path(self) -> int:
        """Create the segment file holding its flock; recover it if its owner is dead."""
        path = self.path
        for _ in range(8):
            created = True
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
                os.fchmod(fd, 0o600)
            except FileExistsError:
                created = False
                try:
                    fd = _open_segment(path)
                except FileNotFoundError:
                    continue
            except OSError as exc:
                raise TransportError(f"cannot create {path}: {exc.strerror}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                who = f"pid {pid}" if pid else "another process (starting up)"
                raise SegmentBusy(f"{PREFIX}{self.name} is served by {who}") from None
            # We hold the lock; make sure the path still names the file we locked (another
            # listener may have recovered and replaced it between our open and flock).
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            if created:
                return fd
            pid = _read_pid(fd)
            log.info("recovered stale shared-memory segment %s (left by pid %s, which is gone)",
                     path, pid or "unknown")
            os.unlink(path)
            os.close(fd)
        raise TransportError(f"could not claim {path}: it keeps being replaced by other processes")

    # --- accepting ---

    def accept(self, timeout: float | None = None) -> ShmChannel:
        """Wait for a client and return the server end of its session.

        Ends the previous session first: closes its server channel and waits until that client
        detached or died, then resets the rings and frees the slot. ``timeout`` None waits for
        ever (in slices, so signals are handled); TransportTimeout when it passes.
        """
        self._check()
        nat = native()
        mm = self._mm
        deadline = time.monotonic() + (math.inf if timeout is None else max(0.0, timeout))
        if self._in_session:
            self._end_session(deadline)
        slice_s = self.cfg.shm.liveness_interval_s

        def claimed() -> bool:
            self._check()  # closed meanwhile (by a signal handler)
            return nat.load_acquire_u64(mm, _C_CLIENT_PID) != 0

        if not _wait_ctrl(mm, claimed, deadline, slice_s, wait=self.cfg.shm.wait):
            raise TransportTimeout(f"shm:{self.name}: no client connected within {timeout:g}s")
        self._generation += 1
        self._in_session = True
        nat.store_release_u64(mm, _C_GENERATION, self._generation)
        interval = self.cfg.shm.liveness_interval_s
        rx = Ring(mm, self._c2s.offset, peer_alive=self._client_alive,
                  liveness_interval_s=interval, timeout_s=self.cfg.shm.timeout_s,
                  name=f"shm:{self.name} client->server", **self._ring_kw())
        tx = Ring(mm, self._s2c.offset, peer_alive=self._client_alive,
                  liveness_interval_s=interval, timeout_s=self.cfg.shm.timeout_s,
                  name=f"shm:{self.name} server->client", **self._ring_kw())
        self._channel = ShmChannel(mm=mm, tx=tx, rx=rx, role="server", name=self.name,
                                   cfg=self.cfg, generation=self._generation, listener=self)
        log.debug("shm:%s: accepted client pid %d (session %d)", self.name,
                  self._channel.peer_pid, self._generation)
        return self._channel

    def _ring_kw(self) -> dict:
        kw = {"wait": self.cfg.shm.wait}
        return kw if self._chunk is None else {**kw, "chunk_bytes": self._chunk}

    def _client_alive(self) -> bool:
        nat = native()
        pid = nat.load_acquire_u64(self._mm, _C_CLIENT_PID)
        ticks = nat.load_acquire_u64(self._mm, _C_CLIENT_TICKS)
        return pid_alive(pid, ticks)

    def _client_done(self) -> bool:
        self._check()
        state = native().load_acquire_u64(self._mm, _C_CLIENT_STATE)
        return state == _CLIENT_DETACHED or not self._client_alive()

    def _end_session(self, deadline: float) -> None:
        if self._channel is not None:
            self._channel._shutdown_rings()  # tells a still-attached client to go
        if not _wait_ctrl(self._mm, self._client_done, deadline, self.cfg.shm.liveness_interval_s,
                          wait=self.cfg.shm.wait):
            pid = native().load_acquire_u64(self._mm, _C_CLIENT_PID)
            raise TransportTimeout(
                f"shm:{self.name}: previous client pid {pid} is still attached"
            )
        self._free_slot()

    def _free_slot(self) -> None:
        nat = native()
        mm = self._mm
        if self._channel is not None:
            # The old server channel must never touch the rings of the next session.
            self._channel._rings_down = True
            self._channel._broken = self._channel._broken or "the session ended"
            self._channel = None
        for ring in (self._c2s, self._s2c):
            ring.scrub()
            ring.reset()
        nat.store_release_u64(mm, _C_CLIENT_TICKS, 0)
        nat.store_release_u64(mm, _C_CLIENT_STATE, 0)
        nat.store_release_u64(mm, _C_CLIENT_PID, 0)  # last: the slot is claimable again
        self._in_session = False
        _bump(mm)

    def _session_over(self, channel: ShmChannel) -> None:
        # The server end closed or failed. If the client is gone too, free the slot now, so a
        # waiting connect() need not wait for the next accept().
        if channel is self._channel and not self._closed and self._client_done():
            self._free_slot()

    def __del__(self) -> None:
        # Dropped without close(): still remove the segment (atexit only sees live objects).
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:  # noqa: BLE001 - never raise from a finaliser
                pass

    # --- closing ---

    def _check(self) -> None:
        if self._closed:
            raise TransportError(f"shm:{self.name}: listener is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def _unlink(self) -> None:
        try:
            if os.stat(self.path).st_ino == os.fstat(self._lock_fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass

    def close(self) -> None:
        """End any session (the client gets PeerGone), remove the segment, unmap. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _LIVE_LISTENERS.discard(self)
        if os.getpid() != self._owner_pid:
            return  # a forked child's copy: the segment belongs to the parent
        nat = native()
        # Unlink first: if this runs from a signal handler and something below fails, the
        # name is already gone.
        self._unlink()
        if self._channel is not None:
            self._channel._rings_down = True
            self._channel._closed = True
            self._channel = None
        self._c2s.close_reader()
        self._s2c.close_writer()
        nat.store_release_u64(self._mm, _C_STATE, _STATE_CLOSED)
        _bump(self._mm)
        os.close(self._lock_fd)
        _close_map(self._mm)
        log.debug("closed shm:%s", self.name)

    def __enter__(self) -> ShmListener:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ShmListener shm:{self.name} {'closed' if self._closed else 'open'}>"


def connect(name: str, cfg: Config, timeout: float | None = None, *,
            chunk_bytes: int | None = None) -> ShmChannel:
    """Attach to the server on shm:NAME and claim its client slot.

    TransportError when no server serves NAME; TransportTimeout when another client keeps the
    slot for longer than ``timeout`` (default cfg.shm.connect_timeout_s).
    """
    nat = native()
    path = segment_path(name, cfg)
    limit = cfg.shm.connect_timeout_s if timeout is None else timeout
    deadline = time.monotonic() + max(0.0, limit)
    nobody = f"no edgelink server on shm:{name}"
    mm = _map_server_segment(path, deadline, nobody)
    try:
        c2s, s2c = _client_layout(mm, name)
        server_pid = nat.load_acquire_u64(mm, _C_SERVER_PID)
        server_ticks = nat.load_acquire_u64(mm, _C_SERVER_TICKS)
        _claim_client_slot(mm, name, cfg, server_pid, server_ticks, deadline, limit, nobody)
        generation = nat.load_acquire_u64(mm, _C_GENERATION)
        kw = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
        common = dict(peer_alive=_server_alive(mm, server_pid, server_ticks),
                      liveness_interval_s=cfg.shm.liveness_interval_s,
                      timeout_s=cfg.shm.timeout_s, wait=cfg.shm.wait, **kw)
        tx = Ring(mm, c2s, name=f"shm:{name} client->server", **common)
        rx = Ring(mm, s2c, name=f"shm:{name} server->client", **common)
    except BaseException:
        _close_map(mm)
        raise
    log.debug("connected to shm:%s (server pid %d)", name, server_pid)
    return ShmChannel(mm=mm, tx=tx, rx=rx, role="client", name=name, cfg=cfg,
                      generation=generation)


def _map_server_segment(path: Path, deadline: float, nobody: str) -> mmap.mmap:
    """Map the server's segment once its header is valid (the listener writes the magic last)."""
    nat = native()
    mm = None
    while mm is None:
        try:
            fd = _open_segment(path)
        except FileNotFoundError:
            raise TransportError(f"{nobody} ({path} does not exist)") from None
        except OSError as exc:
            raise TransportError(f"{nobody}: cannot open {path}: {exc.strerror}") from exc
        try:
            size = os.fstat(fd).st_size
            if size >= CONTROL_BYTES:
                mm = _map(fd, size)
        finally:
            os.close(fd)
        if mm is not None and nat.load_acquire_u64(mm, _C_MAGIC) != MAGIC:
            _close_map(mm)
            mm = None
        if mm is None:
            # The listener creates the file before it fills in the header; give it a moment.
            if time.monotonic() >= deadline:
                raise TransportError(f"{nobody} ({path} is not an initialised edgelink segment)")
            time.sleep(0.005)
    return mm


def _client_layout(mm: mmap.mmap, name: str) -> tuple[int, int]:
    """The two rings' offsets, after checking the header's version and layout against ours."""
    nat = native()
    version = nat.load_acquire_u64(mm, _C_VERSION)
    if version != VERSION:
        raise TransportError(f"shm:{name} speaks segment version {version}, we speak {VERSION}")
    ring_bytes = nat.load_acquire_u64(mm, _C_RING_BYTES)
    c2s, s2c, size = _layout(ring_bytes)
    if size != nat.load_acquire_u64(mm, _C_SIZE) or size > len(mm):
        raise TransportError(f"shm:{name}: segment layout does not match its header")
    return c2s, s2c


def _server_alive(mm: mmap.mmap, server_pid: int, server_ticks: int) -> Callable[[], bool]:
    """The rings' liveness check: the server still listens and its process is the same one."""
    nat = native()

    def server_alive() -> bool:
        return (nat.load_acquire_u64(mm, _C_STATE) == _STATE_LISTENING
                and pid_alive(server_pid, server_ticks))

    return server_alive


def _claim_client_slot(mm: mmap.mmap, name: str, cfg: Config, server_pid: int, server_ticks: int,
                       deadline: float, limit: float, nobody: str) -> None:
    """CAS our pid into the client slot (waiting while another client holds it), then attach."""
    nat = native()
    me = os.getpid()
    told: list[int] = []

    def claimed() -> bool:
        if not pid_alive(server_pid, server_ticks):
            raise TransportError(f"{nobody} (segment left by pid {server_pid}, which is gone)")
        if nat.load_acquire_u64(mm, _C_STATE) != _STATE_LISTENING:
            raise TransportError(f"{nobody} (pid {server_pid} stopped listening)")
        if nat.cas_u64(mm, _C_CLIENT_PID, 0, me):
            return True
        if not told:  # a server takes one client at a time: say why this one waits
            told.append(nat.load_acquire_u64(mm, _C_CLIENT_PID))
            log.warning("shm:%s is serving client pid %d; waiting up to %g s for it to finish "
                        "(shm.connect_timeout_s)", name, told[0], limit)
        return False

    if not _wait_ctrl(mm, claimed, deadline, cfg.shm.liveness_interval_s, wait=cfg.shm.wait):
        holder = nat.load_acquire_u64(mm, _C_CLIENT_PID)
        raise TransportTimeout(
            f"shm:{name} is busy with client pid {holder}; gave up after {limit:g} s "
            "(wait longer with shm.connect_timeout_s, or serve another name for a second client)"
        )
    nat.store_release_u64(mm, _C_CLIENT_TICKS, process_start_ticks(me))
    nat.store_release_u64(mm, _C_CLIENT_STATE, _CLIENT_ATTACHED)
    _bump(mm)


# --- cleanup at exit ---------------------------------------------------------------------


def close_all() -> None:
    """Close every listener and client channel this process opened (removes segments)."""
    for listener in list(_LIVE_LISTENERS):
        try:
            listener.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            log.debug("closing %r failed", listener, exc_info=True)
    for channel in list(_LIVE_CHANNELS):
        try:
            channel.close()
        except Exception:  # noqa: BLE001
            log.debug("closing %r failed", channel, exc_info=True)


atexit.register(close_all)


def _after_fork_in_child() -> None:
    # A forked child shares the parent's flock through the inherited descriptor; dropping it
    # keeps "lock held" meaning "the parent is alive". The child never unlinks the segment.
    for listener in list(_LIVE_LISTENERS):
        try:
            os.close(listener._lock_fd)
        except OSError:
            pass
    _LIVE_LISTENERS.clear()
    _LIVE_CHANNELS.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)

_INSTALLED: dict[int, object] = {}


def install_cleanup_handlers(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> None:
    """Remove this process's segments when it is told to terminate.

    Normal exit is covered by atexit already. For each signal this chains to the handler that
    was there: a Python handler is called after cleanup; the default action is re-raised after
    cleanup (so the exit status still says "killed by SIGTERM"); an ignored signal stays
    ignored. Call from the main thread; calling again is harmless.
    """
    for sig in signals:
        if sig in _INSTALLED:
            continue
        previous = signal.getsignal(sig)
        if previous is signal.SIG_IGN:
            log.debug("%s is ignored in this process; no cleanup handler installed",
                      signal.Signals(sig).name)
            continue
        if callable(previous):
            log.debug("cleanup handler for %s chains to %r", signal.Signals(sig).name, previous)

        def handler(signum, frame, previous=previous):
            close_all()
            if callable(previous):
                previous(signum, frame)
            else:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        signal.signal(sig, handler)
        _INSTALLED[sig] = previous
