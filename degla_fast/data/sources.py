"""Training records from DeGLA JSON, CSV/TSV tables and WebDataset tar shards.

Every source is read into a list of :class:`Record` up front (captions are small), so that the
epoch order, the rank split and the chosen negatives are a pure function of (seed, epoch). Image
bytes stay on disk: a record names a file, or a member of a tar shard by byte offset and size.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError

DEFAULT_IMAGE_PATTERN = "COCO_train2014_%012d.jpg"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")


@dataclass(frozen=True)
class Record:
    """One training sample: where its image lives, its caption and its hard negatives.

    ``image`` is a file path; for a tar shard it is the shard path and ``offset``/``size`` locate
    the member's bytes inside it (``offset`` is None for plain files). ``where`` names the record in
    error messages (``file: record N`` or ``file:line N``).
    """

    image: str
    caption: str
    negatives: tuple[str, ...]
    where: str
    offset: int | None = None
    size: int | None = None
    extra: dict = field(default_factory=dict, compare=False)


# The most bytes read for one image: an uncompressed 4-channel image at PIL's MAX_IMAGE_PIXELS
# (89.5 Mpx, the size above which PIL warns of a decompression bomb) is 358 MB; real photos (JPEG,
# PNG, WebP) are far smaller. A larger file is an unreadable image, never read into memory.
MAX_IMAGE_BYTES = 512 * 2**20


def read_image_file(path: str | os.PathLike, offset: int | None = None, size: int | None = None) -> bytes:
    """The bytes of the image file ``path`` (or its ``size`` bytes at ``offset``: a tar-shard
    member); raises ``OSError`` naming why when it is missing, not a regular file, larger than
    :data:`MAX_IMAGE_BYTES` or shorter than ``size``.

    Only a regular file is read: a FIFO would block the reader forever, ``/dev/zero`` would
    fill its memory. The file is opened without blocking and checked on its descriptor (no
    window between the check and the read), and at most ``MAX_IMAGE_BYTES + 1`` bytes are read,
    whatever the file claims."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{_file_kind(info.st_mode)}, not a regular file")
        want = info.st_size - (offset or 0) if size is None else size
        if want > MAX_IMAGE_BYTES:
            raise OSError(f"{want} bytes, over the {MAX_IMAGE_BYTES}-byte cap of one image (MAX_IMAGE_BYTES)")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as fh:
        if offset is not None:
            fh.seek(offset)
        data = fh.read(MAX_IMAGE_BYTES + 1 if size is None else size)
    if len(data) > MAX_IMAGE_BYTES:  # the file grew after the check
        raise OSError(f"over the {MAX_IMAGE_BYTES}-byte cap of one image (MAX_IMAGE_BYTES)")
    if size is not None and len(data) != size:
        raise OSError(f"short read of {size} bytes at offset {offset}")
    return data


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "a special file"


def read_image_bytes(record: Record) -> bytes:
    """The encoded bytes of a record's image (:func:`read_image_file`); raises ``OSError`` when
    missing or unreadable."""
    return read_image_file(record.image, record.offset, record.size if record.offset is not None else None)


def open_rgb_image(read, name: str):
    """The RGB PIL image in the bytes ``read()`` returns (:func:`read_image_file` or
    :func:`read_image_bytes`); a file it cannot read (a FIFO, over the size cap) or PIL cannot
    decode is a :class:`DataError` naming ``name``."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(read())) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # A decompression bomb (more than twice PIL's MAX_IMAGE_PIXELS) is an unreadable image too.
        detail = ("not a known image format" if isinstance(e, Image.UnidentifiedImageError)
                  else f"{type(e).__name__}: {e}")
        raise DataError(f"{name}: cannot read image ({detail})") from None


def image_name(record: Record) -> str:
    """Human name of a record's image for messages (``shard.tar:member`` inside shards)."""
    return record.image if record.offset is None else f"{record.image}:{record.extra.get('member')}"


def load_records(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                 image_pattern: str = DEFAULT_IMAGE_PATTERN, csv_img_key: str = "filepath",
                 csv_caption_key: str = "title", csv_hard_captions_key: str = "neg_caption",
                 csv_separator: str | None = None, csv_negatives_separator: str = "|") -> list[Record]:
    """Read every record of a DeGLA ``.json``, a ``.csv``/``.tsv`` or WebDataset ``.tar`` shards.

    ``path`` may be a brace pattern for shards (``shards-{000..009}.tar``). ``image_root`` defaults
    to the data file's folder. Returns records in file order; raises :class:`DataError` naming the
    file and line or record on malformed input.
    """
    text = str(path)
    if text.endswith(".tar") or "{" in text:
        return load_webdataset(text)
    p = Path(text)
    if not p.is_file():
        raise DataError(f"data path {p} does not exist (expected a DeGLA .json, a .csv/.tsv or .tar shards)")
    root = Path(image_root) if image_root is not None else p.parent
    suffix = p.suffix.lower()
    if suffix == ".json":
        return load_degla_json(p, root, image_pattern)
    if suffix in (".csv", ".tsv"):
        sep = csv_separator or ("\t" if suffix == ".tsv" else ",")
        return load_csv(p, root, img_key=csv_img_key, caption_key=csv_caption_key,
                        negatives_key=csv_hard_captions_key, separator=sep,
                        negatives_separator=csv_negatives_separator)
    raise DataError(f"data path {p}: unknown format {suffix!r} (allowed: .json, .csv, .tsv, .tar)")


def _negatives(value, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: negatives must be a list of strings, got {type(value).__name__}")
    return tuple(value)


def load_degla_json(path: Path, image_root: Path, image_pattern: str = DEFAULT_IMAGE_PATTERN) -> list[Record]:
    """Records of a DeGLA JSON list ``[{"image_id"|"image", "original", "enhanced"}]``."""
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(items).__name__}")
    records = []
    for i, item in enumerate(items):
        where = f"{path}: record {i}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected an object, got {type(item).__name__}")
        caption = item.get("original", item.get("caption"))
        if not isinstance(caption, str):
            raise DataError(f"{where}: missing string field 'original'")
        if "image" in item:
            image = str(item["image"])
        elif "image_id" in item:
            try:
                image = image_pattern % int(item["image_id"])
            except (TypeError, ValueError):
                raise DataError(f"{where}: image_id {item['image_id']!r} is not an integer") from None
        else:
            raise DataError(f"{where}: missing field 'image' or 'image_id'")
        records.append(Record(str(image_root / image), caption, _negatives(item.get("enhanced"), where), where))
    return records


def load_csv(path: Path, image_root: Path, *, img_key: str, caption_key: str, negatives_key: str,
             separator: str, negatives_separator: str) -> list[Record]:
    """Records of a CSV/TSV table; the negatives column holds captions joined by ``negatives_separator``."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter=separator, strict=True)
            missing = [k for k in (img_key, caption_key) if k not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}:1: missing column(s) {missing} (columns: {reader.fieldnames})")
            has_negatives = negatives_key in reader.fieldnames
            # Shared by the records: check_negatives names the missing column, not "fewer than K".
            extra = {} if has_negatives else {"missing_column": negatives_key, "columns": list(reader.fieldnames)}
            records = []
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row or any(row[k] is None for k in (img_key, caption_key)):
                    raise DataError(f"{where}: expected {len(reader.fieldnames)} fields")
                raw = row.get(negatives_key) if has_negatives else None
                negs = tuple(n.strip() for n in raw.split(negatives_separator) if n.strip()) if raw else ()
                records.append(Record(str(image_root / row[img_key]), row[caption_key], negs, where, extra=extra))
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return records


def expand_shards(pattern: str) -> list[str]:
    """Shard paths of a brace pattern (``a-{000..009}.tar``), a glob, or a single path."""
    import braceexpand

    paths = []
    for p in braceexpand.braceexpand(pattern):
        paths.extend(sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p])
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"WebDataset shard {missing[0]} does not exist ({len(missing)} of {len(paths)} missing)")
    return paths


def load_webdataset(pattern: str) -> list[Record]:
    """Records of WebDataset shards: per key an image member and a ``.json`` with the caption
    (``caption`` or ``original``) and negatives (``negatives`` or ``enhanced``)."""
    records = []
    for shard in expand_shards(pattern):
        groups: dict[str, dict] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, ext = member.name.partition(".")
                    group = groups.setdefault(key, {})
                    if ext.lower() == "json":
                        group["json"] = tar.extractfile(member).read()
                    elif ext.lower() in IMAGE_EXTENSIONS:
                        group["image"] = member
        except tarfile.TarError as e:
            raise DataError(f"{shard}: not a readable tar shard ({e})") from None
        for key, group in groups.items():
            where = f"{shard}: sample {key}"
            if "json" not in group or "image" not in group:
                raise DataError(f"{where}: needs an image and a .json member")
            try:
                meta = json.load(io.BytesIO(group["json"]))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{where}.json: invalid JSON ({e})") from None
            caption = meta.get("caption", meta.get("original")) if isinstance(meta, dict) else None
            if not isinstance(caption, str):
                raise DataError(f"{where}.json: missing string field 'caption'")
            negs = _negatives(meta.get("negatives", meta.get("enhanced")), where)
            member = group["image"]
            records.append(Record(shard, caption, negs, where, offset=member.offset_data, size=member.size,
                                  extra={"member": member.name}))
    return records
