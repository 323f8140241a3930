"""Append-only JSONL cache of LLM results, so an interrupted run resumes where it stopped.

One line per finished (caption id, type) request:
``{"id", "type", "caption", "status": "ok", "kept": [...], "rejected": [[text, reason], ...]}``
or ``{"id", "type", "caption", "status": "failed", "reason": str}`` when the request gave up
(network errors after all retries). "ok" lines are never requested again (their answer was
paid for); "failed" lines are retried by the next run. Each line is flushed as written; a
line cut short by a kill is ignored on reading.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


class NegativeCache:
    """The cache file at ``path``; use as a context manager around :meth:`append` calls."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._handle = None

    def load(self) -> dict[tuple[str, str], dict]:
        """(caption id, type) -> its latest "ok" entry; failed and unreadable lines are skipped."""
        done: dict[tuple[str, str], dict] = {}
        if not self.path.exists():
            return done
        with self.path.open(encoding="utf-8") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last line of a killed run
                if isinstance(entry, dict) and entry.get("status") == "ok":
                    done[(str(entry["id"]), str(entry["type"]))] = entry
        return done

    def __enter__(self) -> "NegativeCache":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("a", encoding="utf-8")
        if self._handle.tell() > 0:
            # A killed run may have left half a line; start ours on a fresh one.
            with self.path.open("rb") as reader:
                reader.seek(-1, os.SEEK_END)
                if reader.read(1) != b"\n":
                    self._handle.write("\n")
        return self

    def append(self, entry: dict) -> None:
        """Write one entry as a line and flush it to the operating system."""
        self._handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._handle.flush()

    def __exit__(self, *exc) -> None:
        self._handle.close()
        self._handle = None
