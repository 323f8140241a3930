"""The one cache of launch plans (block tables, per-tensor tables, prepared launches).

A plan is keyed by everything it depends on (tensor sizes, dtypes, addresses), so an entry is
never stale, only unused: a reallocated gradient or a loaded state gives new keys, and the
least recently used plans make room for them.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable


class PlanCache:
    """At most ``size`` plans; :meth:`get` builds a missing one and evicts the least recently used."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"PlanCache needs a size >= 1; got {size}")
        self.size = size
        self._plans: OrderedDict = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The plan cached under ``key``, or ``build()``'s, cached."""
        if key in self._plans:
            self._plans.move_to_end(key)
            return self._plans[key]
        if len(self._plans) >= self.size:
            self._plans.popitem(last=False)
        plan = self._plans[key] = build()
        return plan

    def __len__(self) -> int:
        return len(self._plans)
