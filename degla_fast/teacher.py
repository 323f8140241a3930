"""What the trainer needs of an EMA teacher: :class:`Teacher`.

:class:`~degla_fast.ema.EMATeacher` (a replica) and :class:`~degla_fast.ema.ShardedEMATeacher`
(ZeRO-3 shards) both satisfy it; the trainer and its checkpoint use nothing else of them.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Teacher(Protocol):
    """An EMA teacher of a student model.

    ``module``: the teacher model, for its forward. ``decay``: the EMA decay. ``forward_dtype``:
    the autocast dtype its forward needs (its weights are a 16-bit copy of the fp32 state), or None.
    """

    module: torch.nn.Module
    decay: float
    forward_dtype: torch.dtype | None

    def update(self, student_module: torch.nn.Module, apply: torch.Tensor | None = None) -> None:
        """Move the teacher toward ``student_module``; ``apply`` (0-d device tensor): 0 skips."""

    def state_dict(self) -> dict:
        """What a training checkpoint stores of it: the keys of ``module.state_dict()`` (no
        non-persistent buffers), the fp32 EMA state as full tensors on the CPU."""

    def load_state_dict(self, state: dict) -> None:
        """Load a dict :meth:`state_dict` wrote."""

    def close(self) -> None:
        """Release what it holds beyond its tensors (hooks, library caches); a no-op where nothing is."""
