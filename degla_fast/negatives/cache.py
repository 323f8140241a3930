"""Append-only JSONL cache of LLM results, so an interrupted run resumes where it stopped.

One line per finished (caption id, type) request:
``{"id", "type", "caption", "status": "ok", "kept": [...], "rejected": [[text, reason], ...]}``
or ``{"id", "type", "caption", "status": "failed", "reason": str}`` when the request gave up
(network errors after all retries). "ok" lines are never requested again (their answer was
paid for); "failed" lines are retried by the next run. Each line is flushed as written; a
line cut short by a kill, or one that is not UTF-8 or lacks ``id``, is skipped (and counted) on reading.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import DataError
from ..io import cannot_write


def _strings(value, size: int | None = None) -> bool:
    return isinstance(value, list) and (size is None or len(value) == size) and all(isinstance(v, str) for v in value)


def _entry(raw: bytes) -> dict | None:
    """One cache line -> its entry, or None when it cannot be used."""
    try:
        entry = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), (str, int)) \
            or not isinstance(entry.get("type"), str):
        return None
    if entry.get("status") == "ok" and not (isinstance(entry.get("caption"), str) and _strings(entry.get("kept"))
                                            and isinstance(entry.get("rejected"), list)
                                            and all(_strings(r, 2) for r in entry["rejected"])):
        return None
    return entry


class NegativeCache:
    """The cache file at ``path``; use as a context manager around :meth:`append` calls.

    :meth:`load` skips lines it cannot use (cut short by a kill, not UTF-8, not a JSON object,
    or without ``id`` / ``type`` or the fields of their status) and counts them in ``skipped``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._handle = None
        self.skipped = 0

    def load(self) -> dict[tuple[str, str], dict]:
        """(caption id, type) -> its latest "ok" entry; failed and unusable lines are skipped
        (the unusable ones counted in :attr:`skipped`)."""
        done: dict[tuple[str, str], dict] = {}
        self.skipped = 0
        if not self.path.exists():
            return done
        if self.path.is_dir():
            raise DataError(f"{self.path}: the LLM cache is a folder, expected a JSONL file (set --cache FILE)")
        try:
            handle = self.path.open("rb")
        except OSError as err:
            raise DataError(f"{self.path}: cannot read the LLM cache ({err.strerror or err})") from None
        with handle:
            for raw in handle:
                if not raw.strip():
                    continue
                entry = _entry(raw)
                if entry is None:
                    self.skipped += 1  # e.g. the last line of a killed run
                elif entry["status"] == "ok":
                    done[(str(entry["id"]), str(entry["type"]))] = entry
        return done

    def __enter__(self) -> "NegativeCache":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("a", encoding="utf-8")
        except OSError as err:
            raise cannot_write(self.path, err) from None
        if self._handle.tell() > 0:
            # A killed run may have left half a line; start ours on a fresh one.
            with self.path.open("rb") as reader:
                reader.seek(-1, os.SEEK_END)
                if reader.read(1) != b"\n":
                    self._handle.write("\n")
        return self

    def append(self, entry: dict) -> None:
        """Write one entry as a line and flush it to the operating system."""
        try:
            self._handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            self._handle.flush()
        except OSError as err:  # a full disk: what is already cached stays usable
            raise cannot_write(self.path, err) from None

    def __exit__(self, *exc) -> None:
        self._handle.close()
        self._handle = None
