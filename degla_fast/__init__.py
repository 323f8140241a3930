"""degla-fast: fused DeGLA losses, EMA teacher, data and trainer for open_clip models.

Public surface (imported lazily so that ``import degla_fast`` stays cheap)::

    from degla_fast import DeGLALoss, LossOutput, LossSpec, degla_loss, EMATeacher, ema_update_

The loss lives in :mod:`degla_fast.loss`. The Triton kernels are ``degla_fast.kernels``: the
project's top-level ``kernels/`` folder, installed under this package by setup.py's
``package_dir`` (a top-level module named ``kernels`` already exists on PyPI).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "DeGLALoss": "degla_fast.loss",
    "LossOutput": "degla_fast.loss",
    "LossSpec": "degla_fast.loss",
    "degla_loss": "degla_fast.loss",
    "EMATeacher": "degla_fast.ema",
    "ema_update_": "degla_fast.ema",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'degla_fast' has no attribute {name!r}")
