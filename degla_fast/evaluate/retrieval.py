"""Image-text retrieval recall@k on a Karpathy test split (COCO 5k, Flickr30k 1k).

Two file layouts are accepted:

* a JSON list ``[{"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["...", ...]}, ...]``
  (the Karpathy test files shipped with BLIP / ALBEF / ARO: ``coco_karpathy_test.json``, ``flickr30k_test.json``);
* Karpathy's own ``dataset_coco.json`` / ``dataset_flickr30k.json``: ``{"images": [{"filepath"?, "filename",
  "split", "sentences": [{"raw": "..."}]}]}``, of which the records of ``split`` (default "test") are used.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DataError
from .compositional import default_image_root
from .encode import Encoder, ImageRef
from .files import field, image_path, read_json, require_file
from .metrics import mean, retrieval_recalls
from .report import Result


def load_retrieval(data: str | Path, image_root: str | Path | None = None, split: str = "test"
                   ) -> tuple[list[ImageRef], list[str], torch.Tensor]:
    """(images, captions, caption -> image index long [num_captions]) of a retrieval test file."""
    path = require_file(data)
    root = Path(image_root) if image_root else default_image_root(path)
    content = read_json(path)
    pairs: list[tuple[str, str, list[str]]] = []  # (record key, relative image path, captions)
    if isinstance(content, dict) and isinstance(content.get("images"), list):
        for index, record in enumerate(content["images"]):
            key = str(index)
            if not isinstance(record, dict) or record.get("split") != split:
                continue
            relative = str(Path(record.get("filepath", "")) / field(record, "filename", path, key))
            sentences = field(record, "sentences", path, key, list)
            pairs.append((key, relative, [field(s, "raw", path, key) for s in sentences]))
    elif isinstance(content, list):
        for index, record in enumerate(content):
            key = str(index)
            if not isinstance(record, dict):
                raise DataError(f"{path}: record {key}: expected an object")
            captions = field(record, "caption", path, key, (str, list))
            captions = [captions] if isinstance(captions, str) else captions
            if not captions or not all(isinstance(c, str) for c in captions):
                raise DataError(f"{path}: record {key}: field 'caption' must be a string or a non-empty list of strings")
            pairs.append((key, field(record, "image", path, key), captions))
    else:
        raise DataError(f"{path}: expected a list of {{'image', 'caption'}} records or Karpathy's {{'images': [...]}}")
    if not pairs:
        raise DataError(f"{path}: no records (of split '{split}')")
    images, captions, owner = [], [], []
    for image_index, (key, relative, texts) in enumerate(pairs):
        images.append(ImageRef(image_path(root, relative, path, key)))
        captions.extend(texts)
        owner.extend([image_index] * len(texts))
    return images, captions, torch.tensor(owner, dtype=torch.long)


def evaluate_retrieval(encoder: Encoder, data: str | Path, image_root: str | Path | None = None,
                       split: str = "test", ks: tuple[int, ...] = (1, 5, 10)) -> Result:
    """Image retrieval (caption -> image) and text retrieval (image -> any of its captions) recall@k in %,
    plus their mean over all k (``mean_recall``, the "RSUM / 6" style summary)."""
    images, captions, owner = load_retrieval(data, image_root, split)
    scores = encoder.texts(captions, "captions") @ encoder.images(images, "images").T
    result = Result("retrieval", info={"data": str(data), "split": split})
    result.metrics.update(retrieval_recalls(scores, owner, ks))
    for name in list(result.metrics):
        result.counts[name] = len(captions) if name.startswith("image_") else len(images)
    result.metrics["mean_recall"] = mean(result.metrics.values())
    return result
