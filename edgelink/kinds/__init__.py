"""Message kinds: what each tensor message carries, how it is built from a runtime's state, and
how a receiver checks and applies it (every applier leaves the state as it was when it refuses).

* ``snapshot``: KV_CACHE, a sequence's whole state; ``delta``: KV_CACHE_DELTA, the cells added
  since both sides were in step; ``memory``: KV_MEMORY, cells appended after the receiver's own;
  ``llama_file``: a snapshot as llama.cpp's own sequence-state file.
* ``prefix``: VIRTUAL_PREFIX, input embeddings; ``bridged``: BRIDGED_PREFIX, a bridge's output
  for a receiver running another model.
* Latent kinds: ``hidden`` (HIDDEN_SLICE, the residual stream captured in the sender's forward
  pass) and ``patch`` (RESIDUAL_PATCH, rows added to or written over the receiver's); ``calibrate``
  measures the residual norms the patch gate compares against. The runtime side is
  ``runtime/evalhook.py``.
* ``specs``: every kind declared once (how a receiver accepts it, a valid example); receivers,
  file readers, the HELLO's kinds and the fuzz seeds are built from it.

A new kind: an entry in ``protocol/kinds.py``, a builder and an applier here, and its
``KindSpec`` in ``specs`` (docs/architecture.md, "Where to add things").
"""
