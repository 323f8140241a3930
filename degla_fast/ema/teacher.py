"""What the EMA teacher's users need of it: :class:`Teacher` (the trainer and its checkpoint)
and :class:`ReplicaTeacher` (:class:`~degla_fast.optim_ema.AdamWEMA`, which writes the state).

:class:`~degla_fast.ema.EMATeacher` (a replica) satisfies both;
:class:`~degla_fast.ema.ShardedEMATeacher` (ZeRO-3 shards) satisfies :class:`Teacher`: its state
is split over ranks in the optimiser's layout, with no per-parameter view to write.
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


@runtime_checkable
class ReplicaTeacher(Protocol):
    """A teacher whose fp32 EMA state is on this process, one tensor per student parameter:
    what :class:`~degla_fast.optim_ema.AdamWEMA` needs to move it inside its own step."""

    decay: float

    def parameter_views(self) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor] | None]:
        """``(names, states, forwards)`` in parameter order: each parameter's fp32 EMA state
        (written in place) and, where the forward weights are a separate 16-bit copy, those
        (else None)."""
