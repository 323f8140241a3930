"""Importing Hugging Face transformers next to this checkout (written against transformers 5.25).

transformers 5 requires, and imports at start-up where installed, the ``kernels`` distribution
(Hugging Face's hub kernels). This checkout keeps its Triton kernels in a top-level ``kernels/``
folder (installed as ``degla_fast.kernels``), so wherever the checkout's root is on ``sys.path``
(``python -m ...`` or pytest started in it, a script run from it) ``import kernels`` finds that
folder and transformers stops with ``cannot import name 'CUDAProperties' from 'kernels'``.
:func:`import_transformers` imports the installed ``kernels`` first, with the checkout's root left
out of ``sys.path`` for that one import, so that the name is bound to the real package.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

_CHECKOUT_KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def _shadows(entry: str) -> bool:
    """Whether ``sys.path`` entry ``entry`` is this checkout's root (its ``kernels/`` is ours)."""
    try:
        return (Path(entry or ".").resolve() / "kernels") == _CHECKOUT_KERNELS
    except OSError:
        return False


def bind_hub_kernels() -> None:
    """``sys.modules["kernels"]`` = the installed hub-kernels package where one is installed and this
    checkout's folder would shadow it; nothing otherwise (no such package, or already imported)."""
    if "kernels" in sys.modules or not any(_shadows(entry) for entry in sys.path):
        return
    try:
        from importlib.metadata import distribution

        distribution("kernels")
    except Exception:  # not installed (transformers 4): nothing to bind, transformers finds no kernels
        return
    saved = list(sys.path)
    sys.path[:] = [entry for entry in saved if not _shadows(entry)]
    try:
        importlib.import_module("kernels")
    finally:
        sys.path[:] = saved


def import_transformers():
    """``transformers``, imported with :func:`bind_hub_kernels` first."""
    bind_hub_kernels()
    return importlib.import_module("transformers")
