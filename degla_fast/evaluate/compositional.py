"""Caption-choice benchmarks: SugarCrepe, VALSE and the COCO / Flickr30k word-order tests.

Every item is one image with its true caption and one or more wrong captions; an item is correct
when the true caption's similarity is strictly greater than every wrong one's (a tie is wrong).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .encode import ChoiceItem, Encoder, ImageRef
from .files import field, image_path, read_json, records_of, require_file, string_list
from .metrics import accuracy, choice_correct, mean
from .report import Result

SUGARCREPE_CATEGORIES = {
    "replace": ("replace_obj", "replace_att", "replace_rel"),
    "swap": ("swap_obj", "swap_att"),
    "add": ("add_obj", "add_att"),
}
SUGARCREPE_SUBSETS = tuple(s for subsets in SUGARCREPE_CATEGORIES.values() for s in subsets)
VALSE_MIN_VOTES = 2


def default_image_root(data: Path) -> Path:
    """Where images are looked for when no ``--image-root`` is given: ``<folder>/images`` if it exists,
    else the folder itself (``<folder>`` = ``data`` if it is a directory, else its parent)."""
    folder = data if data.is_dir() else data.parent
    return folder / "images" if (folder / "images").is_dir() else folder


def json_files(data: str | Path, preferred: tuple[str, ...] = ()) -> dict[str, Path]:
    """The benchmark files named by ``data``: {stem: path}.

    A file is used alone. In a directory, the files ``<name>.json`` for ``preferred`` names are used
    when any exists (in that order), else every ``*.json`` file, sorted.
    """
    data = Path(data)
    if data.is_file():
        return {data.stem: data}
    if not data.is_dir():
        raise DataError(f"{data}: file not found")
    files = {name: data / f"{name}.json" for name in preferred if (data / f"{name}.json").is_file()}
    if not files:
        files = {path.stem: path for path in sorted(data.glob("*.json"))}
    if not files:
        raise DataError(f"{data}: no .json benchmark files in this folder")
    return files


def _score(encoder: Encoder, items: list[ChoiceItem], desc: str):
    return choice_correct(encoder.choice_scores(items, desc))


# --------------------------------------------------------------------------------------------- SugarCrepe

def load_sugarcrepe(path: str | Path, image_root: Path) -> list[ChoiceItem]:
    """Items of one SugarCrepe file: ``{"<id>": {"filename", "caption", "negative_caption"}}``."""
    path = require_file(path)
    items = []
    for key, record in records_of(read_json(path), path):
        image = image_path(image_root, field(record, "filename", path, key), path, key)
        captions = (field(record, "caption", path, key), field(record, "negative_caption", path, key))
        items.append(ChoiceItem(ImageRef(image), captions))
    return items


def evaluate_sugarcrepe(encoder: Encoder, data: str | Path, image_root: str | Path | None = None) -> Result:
    """SugarCrepe accuracy per file, and the replace / swap / add averages (mean of their files).

    ``data``: one file or a folder holding ``replace_obj.json`` ... ``add_att.json``;
    ``image_root``: folder of the COCO val2017 images (default: see :func:`default_image_root`).
    """
    files = json_files(data, SUGARCREPE_SUBSETS)
    root = Path(image_root) if image_root else default_image_root(Path(data))
    result = Result("sugarcrepe", info={"data": str(data), "image_root": str(root)})
    for name, path in files.items():
        correct = _score(encoder, load_sugarcrepe(path, root), name)
        result.metrics[name] = accuracy(correct)
        result.counts[name] = len(correct)
    for category, subsets in SUGARCREPE_CATEGORIES.items():
        present = [result.metrics[s] for s in subsets if s in result.metrics]
        if present:
            result.metrics[category] = mean(present)
    return result


# --------------------------------------------------------------------------------------------- VALSE

def load_valse(path: str | Path, image_root: Path, min_votes: int = VALSE_MIN_VOTES) -> tuple[list[ChoiceItem], int]:
    """Items of one VALSE piece that at least ``min_votes`` annotators validated, and how many were dropped.

    Records: ``{"<id>": {"image_file", "caption", "foil", "mturk": {"caption": votes, ...}, ...}}``.
    A record without ``mturk`` votes counts as not validated and is dropped; every record must
    have the string fields, and a file none of whose records is validated is a :class:`DataError`
    (a file of another kind, such as a training file, is never scored as an empty benchmark).
    """
    path = require_file(path)
    items, dropped = [], 0
    records = records_of(read_json(path), path)
    for key, record in records:
        captions = (field(record, "caption", path, key), field(record, "foil", path, key))
        name = field(record, "image_file", path, key)
        votes = record.get("mturk") or {}
        if not isinstance(votes, dict) or not isinstance(votes.get("caption", 0), (int, float)):
            raise DataError(f"{path}: record {key}: field 'mturk' must be an object with a numeric 'caption' vote")
        if votes.get("caption", 0) < min_votes:
            dropped += 1
            continue
        items.append(ChoiceItem(ImageRef(image_path(image_root, name, path, key)), captions))
    if not items:
        raise DataError(f"{path}: none of its {len(records)} records has at least {min_votes} annotator votes "
                        "(field 'mturk': {'caption': N}); nothing to score")
    return items, dropped


def evaluate_valse(encoder: Encoder, data: str | Path, image_root: str | Path | None = None,
                   min_votes: int = VALSE_MIN_VOTES) -> Result:
    """VALSE accuracy (caption vs foil) per piece, their mean (``average``) and the pooled ``all_items``.

    ``data``: one piece file or a folder of piece files (every ``*.json``).
    """
    files = json_files(data)
    root = Path(image_root) if image_root else default_image_root(Path(data))
    result = Result("valse", info={"data": str(data), "image_root": str(root), "min_votes": min_votes})
    pooled, pieces = [], []
    for name, path in files.items():
        items, dropped = load_valse(path, root, min_votes)
        correct = _score(encoder, items, name)
        pooled.extend(correct.tolist())
        result.metrics[name] = accuracy(correct)
        result.counts[name] = len(correct)
        pieces.append(result.metrics[name])
        if dropped:
            result.notes.append(f"{name}: {dropped} items with fewer than {min_votes} annotator votes dropped")
    result.metrics["average"] = mean(pieces)
    result.metrics["all_items"] = accuracy(pooled)
    result.counts["all_items"] = len(pooled)
    return result


# --------------------------------------------------------------------------------------------- word order

def load_order(path: str | Path, image_root: Path) -> list[ChoiceItem]:
    """Items of a word-order file: a JSON list (or JSON lines) of
    ``{"image": relative path, "caption_options": [true caption, perturbation, ...]}``."""
    path = require_file(path)
    items = []
    for key, record in records_of(read_json(path), path):
        image = image_path(image_root, field(record, "image", path, key), path, key)
        items.append(ChoiceItem(ImageRef(image), tuple(string_list(record, "caption_options", path, key, 2))))
    return items


def evaluate_order(encoder: Encoder, data: str | Path, image_root: str | Path | None = None,
                   name: str = "coco-order") -> Result:
    """Precision@1 of the true caption against its word-order perturbations (COCO- or Flickr30k-Order)."""
    path = require_file(data)
    root = Path(image_root) if image_root else default_image_root(path)
    correct = _score(encoder, load_order(path, root), name)
    result = Result(name, info={"data": str(path), "image_root": str(root)})
    result.metrics["precision@1"] = accuracy(correct)
    result.counts["precision@1"] = len(correct)
    return result
