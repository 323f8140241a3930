"""Shims into ``torch.optim`` internals.

Written against torch 2.4 to 2.14 (``Optimizer._step_supports_amp_scaling`` exists since torch
1.13's fused Adam; ``LRScheduler._last_lr`` backs ``get_last_lr()`` in every 2.x release).
"""
from __future__ import annotations

import torch

from ._versions import missing


def step_supports_amp_scaling(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` reads a device ``found_inf`` (and ``grad_scale``) attribute
    and skips on it, as torch's fused Adam/AdamW declare with ``_step_supports_amp_scaling``.

    No public API says so: GradScaler reads the same private flag. An optimiser without it
    (any other class, or a torch that renamed it) answers False: the documented fallback is
    the host-side skip, slower but the same result.
    """
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def set_last_lr(scheduler: torch.optim.lr_scheduler.LRScheduler, lrs: list[float]) -> None:
    """Make ``scheduler.get_last_lr()`` return ``lrs`` (after the caller rewrote the groups' lr).

    Writes ``LRScheduler._last_lr``: torch recomputes it only inside ``step()``, and a rewound
    schedule must not step. A scheduler without it is a RuntimeError naming the torch version.
    """
    if not hasattr(scheduler, "_last_lr"):
        raise missing("torch", torch.__version__, "torch_optim.set_last_lr", f"{type(scheduler).__name__}._last_lr")
    scheduler._last_lr = list(lrs)
