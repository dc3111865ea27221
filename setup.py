"""Builds the small C helpers (ring indices with acquire/release ordering, cross-process waits).

Everything else lives in pyproject.toml; setuptools still needs setup.py for C extensions.
The default config and the model registry are installed as data files so that a
non-editable install finds them under <prefix>/share/edgelink.
"""

import os

from setuptools import Extension, setup

# EDGELINK_NATIVE_PORTABLE=1 builds the shared-memory helper without Linux futexes (the path
# macOS and other POSIX systems always take), so that path can be built and tested on Linux.
_PORTABLE = os.environ.get("EDGELINK_NATIVE_PORTABLE", "") not in ("", "0")

setup(
    ext_modules=[
        Extension(
            "edgelink._native",
            sources=["native/edgelink_native.c"],
            extra_compile_args=["-O2", "-std=c11"],
            define_macros=[("EDGELINK_PORTABLE_WAIT", "1")] if _PORTABLE else [],
        ),
        # The llama.cpp eval callback (capture/patch of l_out-N rows); no link-time dependency
        # on llama.cpp: ggml's functions are handed over as addresses at run time.
        Extension(
            "edgelink._evalhook",
            sources=["native/edgelink_evalhook.c"],
            extra_compile_args=["-O2", "-std=c11"],
        ),
    ],
    data_files=[("share/edgelink", ["edgelink.cfg"]), ("share/edgelink/models", ["models/registry.toml"])],
)
