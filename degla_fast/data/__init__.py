"""Training data: DeGLA JSON / CSV / WebDataset sources, K-negative batches, DALI or torch image pipelines.

Heavy dependencies (torch, open_clip, nvidia.dali) load only when a name below is first used (the
training configuration reads :data:`PIPELINES` without them: ``degla-fast train --help``).
"""
from __future__ import annotations

import importlib

#: The image pipelines ``data.pipeline`` names (:func:`build_train_data` resolves ``auto``).
PIPELINES = ("auto", "dali", "torch")

_LAZY = {"Batch": "loader", "TrainData": "loader", "build_train_data": "loader", "Record": "sources",
         "load_records": "sources", "tokenize_captions": "text", "trim_tokens": "text"}

__all__ = ["PIPELINES", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
