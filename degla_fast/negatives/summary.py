"""Per-type counts of kept, rejected and failed negatives, printed at the end of a run."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Summary:
    """Counts per negative type: ``kept`` negatives, ``rejected`` candidates (with reasons),
    ``failed`` requests (LLM, given up after retries) and ``missing`` captions that got none."""

    types: tuple[str, ...]
    kept: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    missing: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    records: int = 0
    captions: int = 0
    requests: int = 0  # LLM requests sent by this run (those the cache did not answer)
    cache_skipped: int = 0  # LLM cache lines skipped: torn, not UTF-8, not JSON or without id/type

    @property
    def total_failed(self) -> int:
        """Requests (all types) that gave up after their retries."""
        return sum(self.failed.values())

    def reject(self, neg_type: str, reason: str) -> None:
        """Count one rejected candidate of ``neg_type`` for ``reason``."""
        self.rejected[neg_type] += 1
        self.reasons[reason] += 1

    def format(self) -> str:
        """A small text table, one row per type, then the reject reasons."""
        rows = [f"{'type':<18} {'kept':>8} {'rejected':>9} {'failed':>7} {'missing':>8}"]
        for name in self.types:
            rows.append(
                f"{name:<18} {self.kept[name]:>8} {self.rejected[name]:>9} {self.failed[name]:>7} {self.missing[name]:>8}"
            )
        rows.append(f"records written: {self.records} of {self.captions} captions")
        if self.reasons:
            rows.append("reject reasons: " + ", ".join(f"{k}={v}" for k, v in sorted(self.reasons.items())))
        if self.total_failed:
            rows.append(f"failed requests: {self.total_failed} of {self.requests}")
        if self.cache_skipped:
            rows.append(f"cache lines skipped (torn, not UTF-8, not JSON or without id): {self.cache_skipped}")
        return "\n".join(rows)

    def as_dict(self) -> dict:
        """Plain dict of the counts (JSON-serialisable)."""
        return {
            "records": self.records,
            "captions": self.captions,
            "types": {
                name: {
                    "kept": self.kept[name],
                    "rejected": self.rejected[name],
                    "failed": self.failed[name],
                    "missing": self.missing[name],
                }
                for name in self.types
            },
            "reasons": dict(self.reasons),
            "requests": self.requests,
            "failed": self.total_failed,
            "cache_skipped": self.cache_skipped,
        }
