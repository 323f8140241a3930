"""Training and inference precision: one name, one autocast rule, fp32 weights always.

``precision`` names what a forward runs under; the weights (and optimiser state, and the
EMA state) stay fp32 in every precision:

* ``fp32``: no autocast.
* ``bf16``: bf16 autocast (the features reach the loss in bf16; it accumulates in fp32).
* ``amp``: fp16 autocast on CUDA, with loss scaling by the caller (a GradScaler); bf16 autocast
  on other devices and under DeepSpeed, whose own loss scaling belongs to its ``fp16`` config
  section, which autocast does not need.

16-bit *weights* exist only as the EMA teacher's forward copy (``EMATeacher(forward_dtype=)``),
never as a precision.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:  # imported where used: the configuration's choices load without torch (train --help)
    import torch

PRECISIONS = ("fp32", "bf16", "amp")


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a ConfigError naming the choices."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


def autocast_dtype(precision: str, device: str | torch.device, *, deepspeed: bool = False) -> torch.dtype | None:
    """The forward's autocast dtype at ``precision`` on ``device`` (None: no autocast), which is
    also the dtype of the features the loss gets. ConfigError for a name not in :data:`PRECISIONS`."""
    import torch

    if check_precision(precision) == "fp32":
        return None
    if precision == "amp" and torch.device(device).type == "cuda" and not deepspeed:
        return torch.float16
    return torch.bfloat16


def autocast(precision: str, device: str | torch.device, *, deepspeed: bool = False) -> torch.autocast:
    """``torch.autocast`` for a forward at ``precision`` on ``device`` (disabled for ``fp32``)."""
    import torch

    dtype = autocast_dtype(precision, device, deepspeed=deepspeed)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)
