"""Dataclass fields that carry their one-line doc, for configuration dataclasses.

The trainer's configuration (:mod:`degla_fast.train.config`) prints these docs with
``degla-fast train --help-config`` and generates its flags and checks from this metadata; the
loss's :class:`~degla_fast.loss.spec.LossSpec` declares its fields with it, so the trainer's
``loss:`` section is the spec itself. :func:`check_value` is the one rule both apply to a value:
the configuration after reading its strings (``"0.1"`` from a flag), the spec to what a Python
caller passes as it is.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import field
from typing import Any

from .errors import ConfigError


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


def check_value(name: str, value: Any, base: type, meta: dict) -> Any:
    """``value`` checked against a field of type ``base`` (bool, int, float or str) and its
    ``choices`` and ``minimum``: an int is an integer that is not a bool (not a float, not a
    string), a float a finite real number that is not a bool, a bool a bool, a str a str. Returns
    it as ``base`` (a NumPy scalar as the Python number); else a one-line ConfigError naming
    ``name``."""
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: must be true or false, got {value!r}")
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{name}: must be an integer, got {value!r}")
        value = int(value)
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{name}: must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{name}: must be a finite number, got {value!r}")
    elif base is str and not isinstance(value, str):
        raise ConfigError(f"{name}: must be a string, got {value!r}")
    choices, minimum = meta.get("choices"), meta.get("minimum")
    if choices is not None and value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}: must be >= {minimum}, got {value!r}")
    return value
