"""ARO's Visual Genome Relation and Attribution tests: crop to the box, true vs false caption, macro accuracy.

File formats are those of the ARO release: ``visual_genome_relation.json`` / ``visual_genome_attribution.json``,
a JSON list of records with ``image_path`` (relative to the image folder), ``bbox_x``, ``bbox_y``, ``bbox_w``,
``bbox_h``, ``true_caption``, ``false_caption`` and ``relation_name`` (Relation) or ``attributes``
(Attribution, two strings).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .compositional import default_image_root
from .encode import ChoiceItem, Encoder, ImageRef
from .files import field, image_path, read_json, records_of, string_list
from .metrics import accuracy, choice_correct, group_accuracies, mean
from .report import Result

RELATION_FILE = "visual_genome_relation.json"
ATTRIBUTION_FILE = "visual_genome_attribution.json"

# ARO's evaluation script drops these relations from the VG-Relation macro average (it names the list
# "symmetric"); the list is reproduced as published so that numbers compare with the literature.
ARO_DROPPED_RELATIONS = frozenset([
    "adjusting", "attached to", "between", "bigger than", "biting", "boarding", "brushing", "chewing", "cleaning",
    "climbing", "close to", "coming from", "coming out of", "contain", "crossing", "dragging", "draped over",
    "drinking", "drinking from", "driving", "driving down", "driving on", "eating from", "eating in", "enclosing",
    "exiting", "facing", "filled with", "floating in", "floating on", "flying", "flying above", "flying in",
    "flying over", "flying through", "full of", "going down", "going into", "going through", "grazing in",
    "growing in", "growing on", "guiding", "hanging from", "hanging in", "hanging off", "hanging over",
    "higher than", "holding onto", "hugging", "in between", "jumping off", "jumping on", "jumping over", "kept in",
    "larger than", "leading", "leaning over", "leaving", "licking", "longer than", "looking in", "looking into",
    "looking out", "looking over", "looking through", "lying next to", "lying on top of", "making", "mixed with",
    "mounted on", "moving", "on the back of", "on the edge of", "on the front of", "on the other side of",
    "opening", "painted on", "parked at", "parked beside", "parked by", "parked in", "parked in front of",
    "parked near", "parked next to", "perched on", "petting", "piled on", "playing", "playing in", "playing on",
    "playing with", "pouring", "reaching for", "reading", "reflected on", "riding on", "running in", "running on",
    "running through", "seen through", "sitting behind", "sitting beside", "sitting by", "sitting in front of",
    "sitting near", "sitting next to", "sitting under", "skiing down", "skiing on", "sleeping in", "sleeping on",
    "smiling at", "sniffing", "splashing", "sprinkled on", "stacked on", "standing against", "standing around",
    "standing behind", "standing beside", "standing in front of", "standing near", "standing next to",
    "staring at", "stuck in", "surrounding", "swimming in", "swinging", "talking to", "topped with", "touching",
    "traveling down", "traveling on", "tying", "typing on", "underneath", "wading in", "waiting for",
    "walking across", "walking by", "walking down", "walking next to", "walking through", "working in",
    "working on", "worn on", "wrapped around", "wrapped in", "by", "of", "near", "next to", "with", "beside",
    "on the side of", "around",
])
# ARO's VG-Attribution average skips attribute pairs with fewer than 25 test cases.
ARO_MIN_ATTRIBUTE_COUNT = 25


def _annotation_file(data: Path, default_name: str) -> Path:
    if data.is_dir():
        data = data / default_name
    if not data.is_file():
        raise DataError(f"{data}: file not found")
    return data


def load_vg(path: Path, image_root: Path, group_field: str) -> tuple[list[ChoiceItem], list[str]]:
    """Items of an ARO Visual Genome file (image cropped to the record's box) and each item's group:
    its ``relation_name`` (``group_field="relation_name"``) or its two attributes joined by "_"."""
    items, groups = [], []
    for key, record in records_of(read_json(path), path):
        image = image_path(image_root, field(record, "image_path", path, key), path, key)
        box = tuple(float(field(record, f"bbox_{c}", path, key, (int, float))) for c in "xywh")
        captions = (field(record, "true_caption", path, key), field(record, "false_caption", path, key))
        items.append(ChoiceItem(ImageRef(image, box), captions))
        if group_field == "attributes":
            groups.append("_".join(string_list(record, "attributes", path, key, 2)[:2]))
        else:
            groups.append(field(record, group_field, path, key))
    return items, groups


def evaluate_aro(encoder: Encoder, data: str | Path, image_root: str | Path | None = None,
                 kind: str = "relation", min_group_count: int | None = None) -> Result:
    """ARO VG-Relation (``kind="relation"``) or VG-Attribution (``kind="attribution"``).

    ``data``: the annotation file or the ARO folder holding it; ``image_root``: the folder the records'
    ``image_path`` is relative to (default ``<folder>/images``). Reports ``macro_accuracy`` (mean over
    relations, ARO's dropped list excluded, or over attribute pairs with >= ``min_group_count`` items,
    25 by default as in ARO) and the pooled ``all_items`` accuracy.
    """
    if kind not in ("relation", "attribution"):
        raise ValueError(f"kind must be 'relation' or 'attribution', got {kind!r}")
    path = _annotation_file(Path(data), RELATION_FILE if kind == "relation" else ATTRIBUTION_FILE)
    root = Path(image_root) if image_root else default_image_root(path)
    items, groups = load_vg(path, root, "relation_name" if kind == "relation" else "attributes")
    correct = choice_correct(encoder.choice_scores(items, f"aro-{kind}"))
    if kind == "relation":
        exclude, min_count = ARO_DROPPED_RELATIONS, 1 if min_group_count is None else min_group_count
    else:
        exclude, min_count = (), ARO_MIN_ATTRIBUTE_COUNT if min_group_count is None else min_group_count
    per_group = group_accuracies(correct, groups, exclude=exclude, min_count=min_count)
    result = Result(f"aro-{kind}", info={"data": str(path), "image_root": str(root), "min_group_count": min_count})
    result.metrics["macro_accuracy"] = mean(acc for acc, _ in per_group.values())
    result.counts["macro_accuracy"] = sum(n for _, n in per_group.values())
    result.metrics["all_items"] = accuracy(correct)
    result.counts["all_items"] = len(correct)
    result.info["groups"] = {str(g): {"accuracy": acc, "items": n} for g, (acc, n) in per_group.items()}
    left_out = len(set(groups)) - len(per_group)
    if left_out:
        result.notes.append(f"{left_out} of {len(set(groups))} {'relations' if kind == 'relation' else 'attribute pairs'}"
                            " left out of the macro average (ARO's rules)")
    return result
