"""Shims into ``torch.optim`` internals.

Written against torch 2.4 to 2.14 (``Optimizer._step_supports_amp_scaling`` exists since torch
1.13's fused Adam, and with it the ``found_inf``/``grad_scale`` attributes GradScaler sets for
such an optimiser's ``step``; ``LRScheduler._last_lr`` backs ``get_last_lr()`` in every 2.x release).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

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


@contextlib.contextmanager
def found_inf_set(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> Iterator[None]:
    """Within: ``optimizer.found_inf`` is ``found_inf`` (a 0-d device tensor, 1.0 = skip) and
    ``optimizer.grad_scale`` None, so that a ``step()`` of an optimiser for which
    :func:`step_supports_amp_scaling` holds skips on the device (state and step count untouched).

    This is the protocol ``GradScaler.step`` speaks to such optimisers (it sets both attributes
    around ``step()`` and deletes them after); torch documents it only in GradScaler's source.
    Both attributes are removed on the way out, as GradScaler does.
    """
    optimizer.found_inf, optimizer.grad_scale = found_inf, None
    try:
        yield
    finally:
        del optimizer.found_inf, optimizer.grad_scale


def set_last_lr(scheduler: torch.optim.lr_scheduler.LRScheduler, lrs: list[float]) -> None:
    """Make ``scheduler.get_last_lr()`` return ``lrs`` (after the caller rewrote the groups' lr).

    Writes ``LRScheduler._last_lr``: torch recomputes it only inside ``step()``, and a rewound
    schedule must not step. A scheduler without it is a RuntimeError naming the torch version.
    """
    if not hasattr(scheduler, "_last_lr"):
        raise missing("torch", torch.__version__, "torch_optim.set_last_lr", f"{type(scheduler).__name__}._last_lr")
    scheduler._last_lr = list(lrs)
