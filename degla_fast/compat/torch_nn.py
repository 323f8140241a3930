"""Shims into ``torch.nn`` internals.

Written against torch 2.4 to 2.14 (``Module.compile()`` stores its compiled callable in
``Module._compiled_call_impl`` since torch 2.2).
"""
from __future__ import annotations

import torch


def drop_compiled_forward(module: torch.nn.Module) -> None:
    """Forget an in-place ``Module.compile()`` in ``module`` and every submodule (they run eagerly).

    ``Module.compile()`` keeps its callable in ``_compiled_call_impl``, bound to the module it
    was called on: a deep copy (the EMA teacher) would call the *original* module's forward.
    torch has no public "uncompile". Without the attribute there is nothing to drop.
    """
    for sub in module.modules():
        if getattr(sub, "_compiled_call_impl", None) is not None:
            sub._compiled_call_impl = None
