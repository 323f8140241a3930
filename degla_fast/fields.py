"""Dataclass fields that carry their one-line doc, for configuration dataclasses.

The trainer's configuration (:mod:`degla_fast.train.config`) prints these docs with
``degla-fast train --help-config`` and generates its flags and checks from this metadata; the
loss's :class:`~degla_fast.loss_spec.LossSpec` declares its fields with it, so the trainer's
``loss:`` section is the spec itself.
"""
from __future__ import annotations

from dataclasses import field
from typing import Any


def doc_field(default: Any, doc: str, choices: tuple | None = None, minimum: float | None = None, *,
              flag: str | bool = False, in_config: bool = True):
    """A dataclass field with its one-line doc and optional allowed values / lower bound.
    ``flag``: the field is also a ``degla-fast train`` flag, named after the field (True) or as
    given (``"data"`` for ``--data``). ``in_config=False``: not a key of the trainer's
    configuration (a setting the trainer fixes itself)."""
    meta = {"doc": doc, "choices": choices, "minimum": minimum, "flag": flag, "in_config": in_config}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def yaml_value(value: Any) -> str:
    """``value`` as a YAML file writes it (``null``, ``true``, ``1.0e-06``, ``''``): how help texts
    show defaults, since they are written back into YAML configuration files."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip()
    return text[:-len("...")].strip() if text.endswith("\n...") else text
