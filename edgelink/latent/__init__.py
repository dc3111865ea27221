"""Latent messages: HIDDEN_SLICE (residual stream captured during the sender's forward pass)
and RESIDUAL_PATCH (rows added to, or written over, the receiver's residual stream).

``hidden`` and ``patch`` build, check and apply them; ``calibrate`` measures the per-layer
residual norms the patch norm gate compares against; ``receive`` registers the appliers and
the ``latent_caps`` request with a Receiver. The runtime side is ``runtime/evalhook.py``.
"""
