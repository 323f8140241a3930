"""The fp32 EMA state both teachers keep: its dtype rules and its flat, aligned buffers.

The EMA state is always fp32. With decay 0.9996 the step ``4e-4 * (s - t)`` is below half a
bf16 ulp of ``t`` for almost every element, so a bf16 state would stay where it started
(measured: 0.33 % of the elements had changed after 2,000 updates). 16-bit teacher weights are
therefore only a forward copy of the fp32 state (``forward_dtype``), written by the same pass.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..backends import check_backend
from ..errors import ConfigError
from .update import check_decay

#: Teacher parameters start on multiples of this many elements in the flat buffer (128 bytes
#: in fp32): every view is aligned for vector loads whatever the preceding tensor's size.
_FLAT_ALIGN = 32

#: The dtypes a teacher's forward copy may have (None: the module's weights are the fp32 state).
FORWARD_DTYPES = (torch.bfloat16, torch.float16)


def teacher_settings(decay: float, backend: str,
                     forward_dtype: torch.dtype | None) -> tuple[float, str, torch.dtype | None]:
    """Checked ``(decay, backend, forward copy dtype or None)`` of a teacher whose state is fp32
    (``forward_dtype=torch.float32`` is the state itself: None)."""
    if forward_dtype == torch.float32:
        forward_dtype = None
    if forward_dtype is not None and forward_dtype not in FORWARD_DTYPES:
        raise ConfigError(f"forward_dtype must be torch.bfloat16, torch.float16 or None (the EMA state is always "
                          f"fp32); got {forward_dtype}")
    return check_decay(decay), check_backend(backend), forward_dtype


def flat_views(shapes: Sequence[torch.Size], dtype: torch.dtype, device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One zeroed buffer and a view of it per shape, each starting on a multiple of ``_FLAT_ALIGN``."""
    starts, total = [], 0
    for shape in shapes:
        starts.append(total)
        total += -(-shape.numel() // _FLAT_ALIGN) * _FLAT_ALIGN
    flat = torch.zeros(total, dtype=dtype, device=device)
    return flat, [flat.narrow(0, start, shape.numel()).view(shape) for start, shape in zip(starts, shapes)]
