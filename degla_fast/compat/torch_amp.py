"""Shims into ``torch.amp`` internals.

Written against torch 2.4 to 2.14 (``GradScaler._per_optimizer_states`` has had this shape, a
``{id(optimizer): {"stage": ..., "found_inf_per_device": {device: tensor}}}`` dict, since the
CUDA scaler of torch 1.x; the shared ``torch.amp.GradScaler`` keeps it).
"""
from __future__ import annotations

import torch

from ._versions import missing


def found_inf_flags(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The scaler's per-device ``found_inf`` tensors for ``optimizer`` after ``scaler.unscale_``
    (``scaler.step`` skips the step when any is non-zero): writable, so a caller can join a flag
    of its own into them.

    Reads ``GradScaler._per_optimizer_states``: the scaler has no public way to add a reason to
    skip a step (its ``found_inf`` is only filled by its own unscale). A missing state (no
    ``unscale_`` yet for this optimiser, or a torch that moved it) is a RuntimeError naming the
    torch version.
    """
    states = getattr(scaler, "_per_optimizer_states", None)
    per_device = (states.get(id(optimizer)) or {}).get("found_inf_per_device") if isinstance(states, dict) else None
    if not isinstance(per_device, dict) or not per_device:
        raise missing("torch", torch.__version__, "torch_amp.found_inf_flags",
                      "GradScaler._per_optimizer_states[id(optimizer)]['found_inf_per_device'] after unscale_")
    return list(per_device.values())
