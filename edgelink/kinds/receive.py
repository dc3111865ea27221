"""Wire the latent kinds into a Receiver: HIDDEN_SLICE always (it only stores), RESIDUAL_PATCH
and the ``latent_caps`` request when the runtime was created with the eval hook."""

from __future__ import annotations

from edgelink.kinds.hidden import HiddenSliceApplier
from edgelink.protocol.kinds import Kind


def register_latent(receiver) -> None:
    hidden = HiddenSliceApplier(receiver.rt, receiver.cfg)
    receiver.hidden_slices = hidden.store
    receiver.forget.append(hidden.store.clear)
    receiver.appliers[Kind.HIDDEN_SLICE] = hidden.apply
    if getattr(receiver.rt, "eval_hook", None) is not None:
        from edgelink.kinds.patch import PatchApplier

        patch = PatchApplier(receiver.rt, receiver.cfg)
        receiver.appliers[Kind.RESIDUAL_PATCH] = patch.apply
        receiver.ops["latent_caps"] = patch.caps
