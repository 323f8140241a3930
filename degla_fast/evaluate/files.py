"""Reading benchmark files: JSON / JSON-lines, required fields, image paths, one-line errors."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..io import decode_utf8


def require_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path if it is an existing file, else a one-line :class:`DataError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return path


def read_json(path: str | os.PathLike) -> Any:
    """Parsed content of a ``.json`` file, or a list of records for ``.jsonl`` (one object a line)."""
    path = require_file(path)
    text = decode_utf8(path, path.read_bytes(), DataError)
    if path.suffix == ".jsonl":
        records = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
        return records
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


def records_of(data: Any, path: Path) -> list[tuple[str, dict]]:
    """(id, record) pairs of a file holding either an object keyed by id or a list of records."""
    if isinstance(data, dict):
        pairs = [(str(key), value) for key, value in data.items()]
    elif isinstance(data, list):
        pairs = [(str(index), value) for index, value in enumerate(data)]
    else:
        raise DataError(f"{path}: expected a JSON object keyed by id or a list of records, got {type(data).__name__}")
    if not pairs:  # scored, an empty file would be a table of NaN
        raise DataError(f"{path}: no records (an empty benchmark file)")
    for key, value in pairs:
        if not isinstance(value, dict):
            raise DataError(f"{path}: record {key}: expected an object, got {type(value).__name__}")
    return pairs


def field(record: dict, name: str, path: Path, key: str, kind: type | tuple[type, ...] = str) -> Any:
    """``record[name]`` checked to be of type ``kind``; a one-line DataError naming file, record and field."""
    if name not in record:
        raise DataError(f"{path}: record {key}: missing field '{name}'")
    value = record[name]
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(f"{path}: record {key}: field '{name}' must be {expected}, got {type(value).__name__}")
    return value


def string_list(record: dict, name: str, path: Path, key: str, min_len: int = 1) -> list[str]:
    """``record[name]`` checked to be a list of at least ``min_len`` strings."""
    values = field(record, name, path, key, list)
    if len(values) < min_len or not all(isinstance(v, str) for v in values):
        raise DataError(f"{path}: record {key}: field '{name}' must be a list of at least {min_len} strings")
    return values


def image_path(root: Path, name: str, path: Path, key: str) -> Path:
    """``root / name``, checked to exist, so a missing image fails before any model work, naming it."""
    image = root / name
    if not image.is_file():
        raise DataError(f"{image}: image file not found (record {key} of {path})")
    return image

