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

def _our_kernels() -> list[Path]:
    """Where ``degla_fast.kernels`` lives: the checkout's ``kernels/`` in an editable install,
    ``site-packages/degla_fast/kernels`` in a plain one (which shadows nothing)."""
    spec = importlib.util.find_spec("degla_fast.kernels")
    return [Path(p).resolve() for p in (spec.submodule_search_locations or [])] if spec else []


def _shadows(entry: str, ours: list[Path]) -> bool:
    """Whether ``sys.path`` entry ``entry`` holds our kernels as a top-level ``kernels/``."""
    try:
        return (Path(entry or ".").resolve() / "kernels") in ours
    except OSError:
        return False


def bind_hub_kernels() -> None:
    """``sys.modules["kernels"]`` = the installed hub-kernels package where one is installed and this
    checkout's folder would shadow it; nothing otherwise (no such package, or already imported)."""
    ours = _our_kernels() if "kernels" not in sys.modules else []
    if not any(_shadows(entry, ours) for entry in sys.path):
        return
    try:
        from importlib.metadata import distribution

        distribution("kernels")
    except Exception:  # not installed (transformers 4): nothing to bind, transformers finds no kernels
        return
    saved = list(sys.path)
    sys.path[:] = [entry for entry in saved if not _shadows(entry, ours)]
    try:
        importlib.import_module("kernels")
    finally:
        sys.path[:] = saved


def import_transformers():
    """``transformers``, imported with :func:`bind_hub_kernels` first."""
    bind_hub_kernels()
    return importlib.import_module("transformers")
