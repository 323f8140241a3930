"""The DeGLA loss: its options, its public forms, and its backends.

Public::

    from degla_fast.loss import DeGLALoss, degla_loss, LossOutput, LossSpec, resolve_backend
    from degla_fast.loss import clip_loss, igc_loss, tgc_loss, distill_loss

Modules, from the options down to the kernels:

* :mod:`~degla_fast.loss.spec`: :class:`LossSpec`, every option declared and checked once (no
  torch, no backend: the trainer's configuration holds it);
* :mod:`~degla_fast.loss.module` (:class:`DeGLALoss`) and :mod:`~degla_fast.loss.functional`
  (:func:`degla_loss` and the single terms): the public forms;
* :mod:`~degla_fast.loss.dispatch`: one call (checks, :class:`~degla_fast.loss.dispatch.LossPlan`,
  the backend's autograd Function); :mod:`~degla_fast.loss.auto`: which backend ``auto`` runs
  (:func:`resolve_backend`); :mod:`~degla_fast.loss.gather`: features across processes;
* the backends: :mod:`~degla_fast.loss.reference`, :mod:`~degla_fast.loss.torch_backend`,
  :mod:`~degla_fast.loss.gemm_backend` and :mod:`~degla_fast.loss.triton_backend` (what the two
  fused ones share: :mod:`~degla_fast.loss.fused`), over the Triton kernels of
  ``degla_fast.kernels`` (the project's top-level ``kernels/`` folder, installed under that
  name by setup.py);
* :mod:`~degla_fast.loss.count`: what the fused backends ask of a GPU, counted from their plans.

Imported lazily: ``degla_fast.loss.spec`` loads without torch.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "LossSpec": "spec",
    "DeGLALoss": "module",
    "LossOutput": "dispatch",
    "degla_loss": "functional",
    "clip_loss": "functional",
    "igc_loss": "functional",
    "tgc_loss": "functional",
    "distill_loss": "functional",
    "resolve_backend": "auto",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
