"""A benchmark's result: metrics, item counts and notes, printed as a table and saved as JSON."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io import write_json_atomic


@dataclass
class Result:
    """Outcome of one benchmark run.

    ``metrics``: name -> value in % (ordered as they should be shown; summary rows last);
    ``counts``: name -> number of items scored for that metric (absent for averages of averages);
    ``notes``: one-line remarks (items filtered, groups dropped); ``info``: model, data paths, settings.
    """

    benchmark: str
    metrics: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    info: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (NaN written as null)."""
        data = asdict(self)
        data["metrics"] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.metrics.items()}
        return data

    def table(self) -> str:
        """A markdown table of the metrics with their item counts, then the notes."""
        name_width = max([len("metric")] + [len(name) for name in self.metrics])
        lines = [f"| {'metric':<{name_width}} | {'value':>7} | {'items':>7} |",
                 f"|{'-' * (name_width + 2)}|{'-' * 8}:|{'-' * 8}:|"]
        for name, value in self.metrics.items():
            count = self.counts.get(name)
            lines.append(f"| {name:<{name_width}} | {value:>7.2f} | {'' if count is None else count:>7} |")
        return "\n".join([f"{self.benchmark}:"] + lines + [f"note: {note}" for note in self.notes])

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON to ``path`` atomically."""
        return write_json_atomic(path, self.to_dict())
