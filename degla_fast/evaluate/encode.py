"""Batched, no-grad feature extraction and multiple-choice scoring for every benchmark.

Each distinct image (file + optional crop box) and each distinct caption is encoded once, however
many items share it; scores are cosine similarities of L2-normalised features, computed in fp32.
On a GPU the encoders run under bf16 autocast by default (``Encoder(precision=...)``,
``degla_fast.precision``'s rule).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..console import progress_bar
from ..errors import DataError, from_worker
from ..precision import autocast, check_precision


@dataclass(frozen=True)
class ImageRef:
    """One image to encode: a file, optionally cropped to ``box`` = (x, y, width, height) in pixels."""

    path: Path
    box: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice test: one image and >= 2 captions, the true caption first."""

    image: ImageRef
    captions: tuple[str, ...]


def load_image(ref: ImageRef):
    """The RGB PIL image of ``ref``, cropped to its box when it has one. The file is read as the
    trainer reads images (:func:`degla_fast.data.sources.read_image_file`: a regular file of at
    most ``MAX_IMAGE_BYTES``; a FIFO or a device is an unreadable image, not a hang)."""
    from ..data.sources import open_rgb_image, read_image_file

    image = open_rgb_image(lambda: read_image_file(ref.path), str(ref.path))
    if ref.box is not None:
        x, y, w, h = ref.box
        image = image.crop((x, y, x + w, y + h))
    return image


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, refs: Sequence[ImageRef], transform):
        self.refs = list(refs)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(load_image(self.refs[index]))


class Encoder:
    """Encodes images and captions with one model bundle (``degla_fast.model.ModelBundle``).

    ``device``: where the model runs ("cpu", "cuda", ...); ``batch_size``: images or captions per forward;
    ``num_workers``: image-decoding worker processes (0 = in this process); ``progress``: show bars;
    ``precision``: the forwards' autocast (``degla_fast.precision.PRECISIONS``; None: ``bf16`` on
    CUDA, ``fp32`` elsewhere). The bundle's model is put in eval mode.
    """

    def __init__(self, bundle, *, device: str | torch.device = "cpu", batch_size: int = 64,
                 num_workers: int = 0, progress: bool = False, precision: str | None = None):
        self.bundle = bundle
        self.device = torch.device(device)
        self.precision = check_precision(precision or ("bf16" if self.device.type == "cuda" else "fp32"))
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.progress = progress
        bundle.model.eval()

    @torch.no_grad()
    def images(self, refs: Sequence[ImageRef], desc: str = "images") -> torch.Tensor:
        """Features of ``refs``: float32 [len(refs), D], L2-normalised, on the CPU."""
        from ..model import encode_image

        loader = torch.utils.data.DataLoader(
            _ImageDataset(refs, self.bundle.preprocess_val), batch_size=self.batch_size,
            num_workers=self.num_workers, shuffle=False, pin_memory=self.device.type == "cuda")
        chunks = []
        with progress_bar(len(refs), desc=desc, enabled=self.progress, unit="img") as bar:
            try:
                for pixels in loader:
                    with autocast(self.precision, self.device):
                        feats = encode_image(self.bundle.model, pixels.to(self.device, non_blocking=True))
                    chunks.append(feats.float().cpu())
                    bar.update(len(pixels))
            except DataError as err:  # from a worker: its message is the worker's traceback
                raise from_worker(err) from None
        return torch.cat(chunks) if chunks else torch.empty(0, 0)

    @torch.no_grad()
    def texts(self, texts: Sequence[str], desc: str = "captions") -> torch.Tensor:
        """Features of ``texts``: float32 [len(texts), D], L2-normalised, on the CPU."""
        from ..data.text import trim_tokens
        from ..model import encode_text

        if not texts:
            return torch.empty(0, 0)
        tokens = self.bundle.tokenizer(list(texts))
        # Batches of similar length, each trimmed to its longest caption on the host: little padding.
        order = (tokens != 0).sum(dim=1).argsort(stable=True)
        feats = None
        with progress_bar(len(texts), desc=desc, enabled=self.progress, unit="txt") as bar:
            for start in range(0, len(texts), self.batch_size):
                rows = order[start:start + self.batch_size]
                with autocast(self.precision, self.device):
                    out = encode_text(self.bundle.model, trim_tokens(tokens[rows]).to(self.device, non_blocking=True))
                if feats is None:
                    feats = torch.empty(len(texts), out.shape[1])
                feats[rows] = out.float().cpu()
                bar.update(len(rows))
        return feats

    def choice_scores(self, items: Sequence[ChoiceItem], desc: str = "") -> torch.Tensor:
        """Image-caption similarities of multiple-choice ``items``.

        Returns float32 [N, C_max]: row i holds item i's captions in order (true first); rows with fewer
        captions are padded with -inf, which never beats a real score.
        """
        refs = list(dict.fromkeys(item.image for item in items))
        texts = list(dict.fromkeys(caption for item in items for caption in item.captions))
        image_feats = self.images(refs, f"{desc} images".strip())
        text_feats = self.texts(texts, f"{desc} captions".strip())
        image_row = {ref: i for i, ref in enumerate(refs)}
        text_row = {text: i for i, text in enumerate(texts)}
        width = max((len(item.captions) for item in items), default=2)
        text_index = torch.full((len(items), width), -1, dtype=torch.long)
        for i, item in enumerate(items):
            text_index[i, :len(item.captions)] = torch.tensor([text_row[c] for c in item.captions])
        image_index = torch.tensor([image_row[item.image] for item in items], dtype=torch.long)
        scores = torch.empty(len(items), width)
        for start in range(0, len(items), 4096):  # chunks bound the [chunk, C, D] gather
            t_idx, i_idx = text_index[start:start + 4096], image_index[start:start + 4096]
            sims = (text_feats[t_idx.clamp(min=0)] * image_feats[i_idx].unsqueeze(1)).sum(dim=-1)
            scores[start:start + 4096] = sims.masked_fill(t_idx < 0, float("-inf"))
        return scores
