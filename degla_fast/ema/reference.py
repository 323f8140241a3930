"""The release's EMA update, a Python loop over parameters: the baseline of the EMA benchmarks
and an independent check of the fused update in the tests (the loss's own reference is
:mod:`degla_fast.loss.reference`)."""
from __future__ import annotations

from typing import Iterable

import torch


@torch.no_grad()
def ema_update_loop_(teacher_params: Iterable[torch.Tensor], student_params: Iterable[torch.Tensor], decay: float) -> None:
    """The release's EMA: for each parameter, ``t.mul_(decay)`` then ``t.add_((1 - decay) * s)``."""
    for teacher, student in zip(teacher_params, student_params):
        teacher.mul_(decay).add_(student.detach(), alpha=1.0 - decay)
