"""Reading captions (COCO captions JSON, a JSON list, CSV/TSV) and writing DeGLA records."""
from __future__ import annotations

import codecs
import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..io import decode_utf8

_IMAGE_FIELDS = ("image", "filepath", "file_name", "filename", "image_path")
_CAPTION_FIELDS = ("caption", "title", "text", "original")


@dataclass(frozen=True)
class Caption:
    """One input caption. ``id`` is unique within the input and keys the LLM cache.

    Exactly one of ``image`` (a path, lists and CSV) and ``image_id`` (COCO) is set.
    """

    id: str
    caption: str
    image: str | None = None
    image_id: Any = None


def _pick(record: dict, fields: tuple[str, ...], where: str) -> str:
    for field in fields:
        if field in record:
            value = record[field]
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: field {field!r} must be a non-empty string, got {value!r}")
            return value.strip()
    raise DataError(f"{where}: missing field; expected one of {', '.join(fields)}")


def _from_coco(data: dict, path: Path) -> list[Caption]:
    out = []
    for index, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{index}]"
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise DataError(f"{where}: expected an object with image_id and caption")
        key = ann.get("id", index)
        out.append(Caption(f"coco:{key}", _pick(ann, ("caption",), where), image_id=ann["image_id"]))
    return out


def _from_list(data: list, path: Path) -> list[Caption]:
    out = []
    for index, record in enumerate(data):
        where = f"{path}: record {index}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object with image and caption, got {type(record).__name__}")
        out.append(Caption(str(index), _pick(record, _CAPTION_FIELDS, where), _pick(record, _IMAGE_FIELDS, where)))
    return out


def read_text(path: Path) -> str:
    """The file's text; a one-line DataError naming the file and byte offset when it is not UTF-8
    (a leading byte-order mark is dropped)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    return decode_utf8(path, data, DataError, "; save it as UTF-8", skip=bom)


def _from_csv(path: Path) -> list[Caption]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
    try:
        if not reader.fieldnames:
            raise DataError(f"{path}: empty CSV; expected a header with image and caption columns")
        for fields, what in ((_CAPTION_FIELDS, "caption"), (_IMAGE_FIELDS, "image")):
            if not any(f in reader.fieldnames for f in fields):
                raise DataError(f"{path}: line 1: no {what} column; expected one of {', '.join(fields)} "
                                f"(columns: {', '.join(reader.fieldnames)})")
        out = []
        for index, row in enumerate(reader):
            where = f"{path}: line {reader.line_num}"
            out.append(Caption(str(index), _pick(row, _CAPTION_FIELDS, where), _pick(row, _IMAGE_FIELDS, where)))
    except csv.Error as err:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({err})") from None
    return out


def read_captions(path: str | os.PathLike) -> list[Caption]:
    """Captions from ``path``: COCO captions JSON (``{"annotations": [{image_id, id, caption}]}``),
    a JSON list of ``{image, caption}`` objects, or a CSV/TSV with image and caption columns.

    Returns one :class:`Caption` per input caption, in input order. Raises DataError
    naming the file and record when the input is malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() in (".csv", ".tsv"):
        captions = _from_csv(path)
    else:
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            captions = _from_coco(data, path)
        elif isinstance(data, list):
            captions = _from_list(data, path)
        else:
            raise DataError(f"{path}: expected COCO captions JSON (with 'annotations') or a JSON list of records")
    if not captions:
        raise DataError(f"{path}: no captions found")
    ids = [c.id for c in captions]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: caption ids repeat; COCO annotation ids must be unique")
    return captions


def build_records(captions: list[Caption], negatives: dict[str, list[str]]) -> list[dict]:
    """DeGLA records ``{"image" or "image_id", "original", "enhanced": [...]}`` for every
    caption with at least one negative in ``negatives`` (caption id -> texts)."""
    records = []
    for caption in captions:
        enhanced = negatives.get(caption.id)
        if not enhanced:
            continue
        record: dict[str, Any] = {"image_id": caption.image_id} if caption.image is None else {"image": caption.image}
        record["original"] = caption.caption
        record["enhanced"] = list(enhanced)
        records.append(record)
    return records
