"""Where the Triton kernels can run, and the EMA updates' backend rule.

The EMA updates (:mod:`degla_fast.ema`, :mod:`degla_fast.optim_ema`) take ``"auto" | "torch" |
"triton"`` and resolve it with :func:`resolve_backend`, per call and device: ``triton`` needs
Triton to import and CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (Triton's
interpreter, how the tests run the kernels), otherwise a ConfigError; ``auto`` is ``triton`` for
CUDA tensors when Triton imports, ``torch`` otherwise. The loss has a rule of its own, with
measurements and a model of its kernels' costs (:mod:`degla_fast.loss.auto`), built on the
checks here.
"""
from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that take devices: the names and checks here are what
# the training configuration's fields use, and ``degla-fast train --help`` must not pay for
# torch's import (seconds) to list them.

EMA_BACKENDS = ("auto", "torch", "triton")


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
    import torch

    device = torch.device(device)
    interpret = device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"
    return (device.type == "cuda" or interpret) and triton_importable()


def check_backend(backend: str, choices: tuple[str, ...] = EMA_BACKENDS) -> str:
    """``backend`` if it is one of ``choices``, else a ConfigError naming them."""
    if backend not in choices:
        raise ConfigError(f"backend must be one of {', '.join(choices)}; got {backend!r}")
    return backend


def check_usable(backend: str, device: torch.device) -> str:
    """``backend`` if its kernels can run on ``device`` tensors (see :func:`triton_usable`), else a
    ConfigError."""
    if backend in ("triton", "gemm") and not triton_usable(device):
        raise ConfigError(f"backend={backend!r} needs Triton and CUDA tensors (or TRITON_INTERPRET=1 for CPU "
                          f"tensors); got {device} tensors")
    return backend


def resolve_backend(backend: str, device: torch.device, *, choices: tuple[str, ...] = EMA_BACKENDS) -> str:
    """The EMA's concrete backend for ``backend`` on ``device`` (see the module doc)."""
    import torch

    check_backend(backend, choices)
    device = torch.device(device)
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_importable() else "torch"
    return check_usable(backend, device)
