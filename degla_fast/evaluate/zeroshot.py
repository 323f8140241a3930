"""Zero-shot classification: class embeddings averaged over prompt templates, logits = 100 x cosine, top-1.

Two layouts are accepted:

* a JSON task file ``{"classnames": [...], "templates": ["a photo of a {}.", ...],
  "items": [{"filename": "000003.jpg", "label": 0}, ...]}`` with images in ``<folder>/images``
  (the synthetic dataset's ``zeroshot/<task>.json``); ``classnames`` / ``templates`` may be omitted
  when ``dataset_name`` names a clip_benchmark dataset that has them;
* an image folder with one sub-folder per class (sorted names = label order), as torchvision's
  ImageFolder; class names and templates come from clip_benchmark for ``dataset_name`` when it has them,
  else the folder names (``_`` read as a space) and clip_benchmark's ImageNet templates.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import DataError
from .compositional import default_image_root
from .encode import Encoder, ImageRef
from .files import field, image_path, read_json, require_file
from .metrics import group_accuracies, mean, topk_accuracy
from .report import Result

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
DEFAULT_TEMPLATE_SET = "imagenet1k"


def clip_benchmark_prompts(dataset_name: str) -> tuple[list[str] | None, list[str] | None]:
    """(class names, templates) that clip_benchmark ships for ``dataset_name`` (None where it has none)."""
    import clip_benchmark.datasets as cb_datasets

    folder = Path(cb_datasets.__file__).parent
    classnames = json.loads((folder / "en_classnames.json").read_text(encoding="utf-8")).get(dataset_name)
    templates = json.loads((folder / "en_zeroshot_classification_templates.json").read_text(encoding="utf-8"))
    return classnames, templates.get(dataset_name)


def fill_template(template: str, classname: str) -> str:
    """A prompt from a template written with ``{}`` (our files) or ``{c}`` (clip_benchmark's)."""
    return template.replace("{c}", classname).replace("{}", classname)


def load_task(data: str | Path, image_root: str | Path | None = None, dataset_name: str | None = None
              ) -> tuple[list[str], list[str], list[ImageRef], torch.Tensor]:
    """(class names, templates, images, labels long [N]) of a zero-shot task in either layout."""
    data = Path(data)
    cb_classnames, cb_templates = clip_benchmark_prompts(dataset_name) if dataset_name else (None, None)
    if data.is_dir():
        class_dirs = sorted(p for p in data.iterdir() if p.is_dir())
        if not class_dirs:
            raise DataError(f"{data}: no class sub-folders (expected one folder of images per class)")
        refs, labels = [], []
        for label, class_dir in enumerate(class_dirs):
            for image in sorted(class_dir.iterdir()):
                if image.suffix.lower() in IMAGE_SUFFIXES:
                    refs.append(ImageRef(image))
                    labels.append(label)
        classnames = cb_classnames or [p.name.replace("_", " ") for p in class_dirs]
        if len(classnames) != len(class_dirs):
            raise DataError(f"{data}: {len(class_dirs)} class folders but clip_benchmark lists "
                            f"{len(classnames)} classes for '{dataset_name}'")
        templates = cb_templates or clip_benchmark_prompts(DEFAULT_TEMPLATE_SET)[1]
        return classnames, templates, refs, torch.tensor(labels, dtype=torch.long)

    path = require_file(data)
    task = read_json(path)
    if not isinstance(task, dict):
        raise DataError(f"{path}: expected an object with 'classnames', 'templates' and 'items'")
    classnames = task.get("classnames", cb_classnames)
    templates = task.get("templates", cb_templates)
    for name, value in (("classnames", classnames), ("templates", templates)):
        if not value or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(f"{path}: field '{name}' must be a non-empty list of strings "
                            "(or give --dataset-name of a clip_benchmark dataset that has them)")
    items = task.get("items")
    if not isinstance(items, list):
        raise DataError(f"{path}: field 'items' must be a list of {{'filename', 'label'}} records")
    root = Path(image_root) if image_root else default_image_root(path)
    refs, labels = [], []
    for index, item in enumerate(items):
        key = str(index)
        if not isinstance(item, dict):
            raise DataError(f"{path}: item {key}: expected an object")
        label = field(item, "label", path, key, int)
        if not 0 <= label < len(classnames):
            raise DataError(f"{path}: item {key}: label {label} outside 0..{len(classnames) - 1}")
        refs.append(ImageRef(image_path(root, field(item, "filename", path, key), path, key)))
        labels.append(label)
    return classnames, templates, refs, torch.tensor(labels, dtype=torch.long)


def class_embeddings(encoder: Encoder, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """Zero-shot classifier [num_classes, D]: per class, the mean of its normalised prompt features,
    normalised again."""
    prompts = [fill_template(t, c) for c in classnames for t in templates]
    feats = encoder.texts(prompts, "class prompts").view(len(classnames), len(templates), -1)
    return torch.nn.functional.normalize(feats.mean(dim=1), dim=-1)


def evaluate_zeroshot(encoder: Encoder, data: str | Path, image_root: str | Path | None = None,
                      dataset_name: str | None = None, name: str | None = None) -> Result:
    """Top-1 (and top-5 with >= 5 classes) accuracy and mean per-class recall of a zero-shot task, in %."""
    classnames, templates, refs, labels = load_task(data, image_root, dataset_name)
    if not refs:
        raise DataError(f"{data}: no images to classify")
    name = name or dataset_name or Path(data).stem
    classifier = class_embeddings(encoder, classnames, templates)
    logits = 100.0 * encoder.images(refs, f"{name} images") @ classifier.T
    result = Result("zeroshot", info={"data": str(data), "task": name, "classes": len(classnames),
                                      "templates": len(templates)})
    result.metrics["top1"] = topk_accuracy(logits, labels, 1)
    result.counts["top1"] = len(labels)
    if len(classnames) >= 5:
        result.metrics["top5"] = topk_accuracy(logits, labels, 5)
        result.counts["top5"] = len(labels)
    hits = logits.argmax(dim=1) == labels
    result.metrics["mean_per_class_recall"] = mean(acc for acc, _ in group_accuracies(hits, labels.tolist()).values())
    return result
