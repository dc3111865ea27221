"""The native helper built the way macOS and other POSIX systems build it (no futex), used by
two real processes through a shared-memory channel.

``EDGELINK_NATIVE_PORTABLE=1 pip install -e .`` makes the installed module this build; here it
is compiled into a temporary folder and put in place of ``edgelink._native`` in both processes,
so the rest of the suite keeps the futex build it was installed with.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import sysconfig
import textwrap
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "native" / "edgelink_native.c"

PRELUDE = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("edgelink._native", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["edgelink._native"] = mod
    import edgelink
    edgelink._native = mod
    assert mod.WAIT_BACKEND == "poll", mod.WAIT_BACKEND
    from edgelink.config import load_config
    from edgelink.errors import TransportError
    from edgelink.transport import ring
    try:
        ring.waiter("futex")
    except TransportError as exc:
        assert "no futex" in str(exc)
    else:
        raise AssertionError("futex accepted by a portable build")
    cfg = load_config().replace(shm_ring_bytes=1 << 20, shm_timeout_s=20, shm_liveness_interval_s=0.05,
                                shm_connect_timeout_s=20)
    name, n = sys.argv[2], int(sys.argv[3])
""")

SERVER = PRELUDE + textwrap.dedent("""
    import hashlib
    from edgelink.transport.shm import ShmListener
    with ShmListener(name, cfg) as lst:
        print("listening", flush=True)
        ch = lst.accept(timeout=20)
        got = bytes(ch.recv(n + 1024, timeout=20))
        ch.send(hashlib.sha256(got).hexdigest().encode())
        print("served", len(got), flush=True)
        ch.close()
""")

CLIENT = PRELUDE + textwrap.dedent("""
    import numpy as np
    from edgelink.transport.shm import connect
    data = np.random.default_rng(7).integers(0, 256, n, dtype=np.uint8)
    with connect(name, cfg, timeout=20) as ch:
        ch.send(memoryview(data))
        print(bytes(ch.recv(128, timeout=20)).decode(), flush=True)
""")


@pytest.fixture(scope="module")
def portable_module(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("portable") / ("_native" + sysconfig.get_config_var("EXT_SUFFIX"))
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    cmd = [*cc, "-shared", "-fPIC", "-O2", "-std=c11", "-Wall", "-Werror",
           "-DEDGELINK_PORTABLE_WAIT=1", f"-I{sysconfig.get_paths()['include']}", str(SOURCE), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


def test_portable_build_moves_a_large_frame_between_processes(portable_module, tmp_path):
    n = 48 << 20  # 48 MiB through a 1 MiB ring: thousands of waits on each side
    name = f"port-{uuid.uuid4().hex[:8]}"
    server_py, client_py = tmp_path / "server.py", tmp_path / "client.py"
    server_py.write_text(SERVER)
    client_py.write_text(CLIENT)
    args = [str(portable_module), name, str(n)]
    server = subprocess.Popen([sys.executable, str(server_py), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert server.stdout.readline().strip() == "listening", server.stderr.read()
        client = subprocess.run([sys.executable, str(client_py), *args], capture_output=True,
                                text=True, timeout=120, cwd=REPO)
        assert client.returncode == 0, client.stderr
        out, err = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0, err
    import numpy as np

    want = hashlib.sha256(np.random.default_rng(7).integers(0, 256, n, dtype=np.uint8).tobytes()).hexdigest()
    assert client.stdout.strip() == want
    assert out.strip() == f"served {n}"
