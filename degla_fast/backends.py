"""Which implementation runs: the backend names and the one rule that resolves them.

The loss (``degla_fast.functional``) and the EMA updates (``degla_fast.ema``,
``degla_fast.optim_ema``) both take ``backend="auto" | "torch" | "triton"`` (the loss also
``"reference"``) and resolve it here, per call and device:

* ``triton`` needs Triton to import and CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
  (Triton's interpreter, how the tests run the kernels); otherwise it is a ConfigError.
* ``auto`` is ``triton`` for CUDA tensors when Triton imports (never the interpreter, which is
  for tests), and for the loss only from :data:`AUTO_TRITON_MIN_LOGITS` logits on; ``torch``
  otherwise.
"""
from __future__ import annotations

import functools
import os

import torch

from .errors import ConfigError

LOSS_BACKENDS = ("auto", "reference", "torch", "triton")
EMA_BACKENDS = ("auto", "torch", "triton")
#: The loss's ``auto`` picks the Triton kernels from this many image-to-text logits (R x C) on:
#: below it the kernels cannot give every SM of a current GPU a tile of their own (2^22 logits
#: are 256 of the 128 x 128 forward tiles, about 2 per SM of a 132-SM H100), and the torch
#: backend's few cuBLAS calls on one row block cost about the same launches. A modelled rule,
#: to be replaced by measurements from `make gpu-check`.
AUTO_TRITON_MIN_LOGITS = 1 << 22


@functools.cache
def triton_importable() -> bool:
    """Whether ``import triton`` succeeds (an import, not a lookup: a broken install counts as absent)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``: CUDA tensors, or CPU tensors
    under the interpreter, and Triton imports."""
    device = torch.device(device)
    interpret = device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"
    return (device.type == "cuda" or interpret) and triton_importable()


def check_backend(backend: str, choices: tuple[str, ...] = EMA_BACKENDS) -> str:
    """``backend`` if it is one of ``choices``, else a ConfigError naming them."""
    if backend not in choices:
        raise ConfigError(f"backend must be one of {', '.join(choices)}; got {backend!r}")
    return backend


def resolve_backend(backend: str, device: torch.device, *, choices: tuple[str, ...] = EMA_BACKENDS,
                    logits: int | None = None) -> str:
    """The concrete backend for ``backend`` on ``device`` (see the module doc).

    ``logits``: the loss's image-to-text logits, for ``auto``'s size threshold (None: the EMA,
    which has none). Raises ConfigError for a name not in ``choices`` or an unusable ``triton``.
    """
    check_backend(backend, choices)
    device = torch.device(device)
    if backend == "auto":
        large = logits is None or logits >= AUTO_TRITON_MIN_LOGITS
        return "triton" if device.type == "cuda" and large and triton_importable() else "torch"
    if backend == "triton" and not triton_usable(device):
        raise ConfigError(f"backend='triton' needs Triton and CUDA tensors (or TRITON_INTERPRET=1 for CPU "
                          f"tensors); got {device} tensors")
    return backend
