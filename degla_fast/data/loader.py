"""``build_train_data``: records + epoch order + image pipeline -> an iterable of :class:`Batch`."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from . import PIPELINES, dali
from .dali import DaliEpochs, dali_available, text_pool
from .image_cache import ImageCache
from .sampling import check_negatives, epoch_batches
from .sources import load_records
from .text import cached_tokens
from .torch_pipeline import BatchDataset, normalize, torch_batches, train_transform

#: The default bound of the decoded-image cache: 256 MiB of pixels holds the synthetic world's
#: 6,000 pre-training scenes (64 x 64: 16 KiB each) or about 1,300 images of 224 x 224.
IMAGE_CACHE_BYTES = 256 * 2**20


@dataclass
class Batch:
    """One training batch.

    images: float32 ``[B,3,H,W]``, normalised with the model's mean/std; with the torch pipeline on
        CUDA already on the device (copied from pinned uint8 without blocking, normalised there),
        so the trainer's ``.to(device, non_blocking=True)`` is a no-op.
    tokens: int64 ``[B*(1+K), L]``: ``B`` positives then ``B*K`` negatives, sample-major; ``L`` is the
        longest caption of this batch incl. end-of-text (``context_length`` when not trimming).
    indices: int64 ``[B]``, the records' positions in the data file.
    position: the batch's index in its epoch (what a resume point counts).
    """

    images: torch.Tensor
    tokens: torch.Tensor
    indices: torch.Tensor
    position: int = -1


class TrainData:
    """This rank's training batches; ``len()`` = batches per epoch (the last partial one dropped).

    Call :meth:`set_epoch` before iterating; order, negatives and each sample's crop (both pipelines)
    are a pure function of (seed, epoch, index), so ``set_epoch(e, start_batch=n)`` resumes exactly.
    ``bad_images`` counts images skipped in the current epoch (``skip_bad_images``).
    """

    def __init__(self, records, *, source, tokenizer, image_size, mean, std, batch_size, num_negatives, seed,
                 rank, world_size, num_workers, pipeline, device, skip_bad_images, sample_with_replacement,
                 trim_text, text_workers=2, token_cache=None, image_cache_bytes=0):
        self.records, self.source = records, source
        self.tokenizer, self.image_size, self.mean, self.std = tokenizer, image_size, tuple(mean), tuple(std)
        self.batch_size, self.num_negatives, self.seed = batch_size, num_negatives, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.pipeline, self.device = pipeline, torch.device(device)
        self.skip_bad_images, self.sample_with_replacement, self.trim_text = (
            skip_bad_images, sample_with_replacement, trim_text)
        self.epoch, self.start_batch, self.bad_images = 0, 0, 0
        self.text_workers, self._pool, self._dali = text_workers, None, None
        self.token_cache = token_cache
        # Images decoded in this process are kept across epochs; DataLoader workers (a fresh set
        # each epoch) would each fill a copy and drop it at the epoch's end, so they decode.
        self.image_cache = (ImageCache(image_cache_bytes) if pipeline == "torch" and num_workers == 0
                            and image_cache_bytes > 0 else None)
        # The torch pipeline's workers ship uint8 crops (a quarter of fp32's bytes through shared
        # memory and PCIe); they are copied from pinned memory without blocking and normalised on
        # the device (:meth:`_on_device`).
        self._transform, self._norm = None, None
        if pipeline == "torch":
            self._transform = train_transform(image_size, mean, std, uint8=True)
            if self._transform is None:  # an open_clip whose transform has another shape: fp32 from workers
                self._transform = train_transform(image_size, mean, std)

    @property
    def num_samples(self) -> int:
        """Number of records in the data source (all ranks)."""
        return len(self.records)

    def __len__(self) -> int:
        return len(self.records) // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch to iterate next, starting at batch ``start_batch`` of it."""
        if not 0 <= start_batch <= len(self):
            raise ConfigError(f"start_batch {start_batch} outside [0, {len(self)}]")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def _batches(self):
        batches = epoch_batches(len(self.records), self.batch_size, seed=self.seed, epoch=self.epoch,
                                rank=self.rank, world_size=self.world_size)
        common = dict(tokenizer=self.tokenizer, num_negatives=self.num_negatives, seed=self.seed, epoch=self.epoch,
                      skip_bad_images=self.skip_bad_images, sample_with_replacement=self.sample_with_replacement,
                      trim_text=self.trim_text, token_cache=self.token_cache)
        if self.pipeline == "dali":
            if self._dali is None:
                device_id = (self.device.index or 0) if self.device.type == "cuda" else None
                if self._pool is None and self.text_workers > 0:
                    self._pool = text_pool(self.records, self.tokenizer, self.num_negatives,
                                           self.sample_with_replacement, self.trim_text, self.text_workers,
                                           token_cache=self.token_cache)
                self._dali = DaliEpochs(
                    self.records, tokenizer=self.tokenizer, image_size=self.image_size, mean=self.mean,
                    std=self.std, batch_size=self.batch_size, num_negatives=self.num_negatives, seed=self.seed,
                    rank=self.rank, world_size=self.world_size, device_id=device_id,
                    num_threads=max(1, self.num_workers), skip_bad_images=self.skip_bad_images,
                    sample_with_replacement=self.sample_with_replacement, trim_text=self.trim_text,
                    pool=self._pool, token_cache=self.token_cache)
            yield from self._dali.iterate(self.epoch, self.start_batch)
            return
        dataset = BatchDataset(self.records, batches, transform=self._transform, image_cache=self.image_cache,
                               **common)
        for item in torch_batches(dataset, self.start_batch, self.num_workers, self.device.type == "cuda"):
            yield self._on_device(item.images), self._on_device(item.tokens), item.indices, item.bad

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on this data's device (an asynchronous copy from pinned memory, no sync), uint8
        images normalised there."""
        if self.device.type == "cuda":
            tensor = tensor.to(self.device, non_blocking=True)
        if tensor.dtype != torch.uint8 or tensor.numel() == 0:  # empty: a batch of unreadable images only
            return tensor
        if self._norm is None or self._norm[0].device != tensor.device:
            self._norm = tuple(torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(tensor.device)
                               for v in (self.mean, self.std))
        return normalize(tensor, *self._norm)

    def close(self) -> None:
        """Stop the DALI pipeline, its reader processes and the token-batch processes (also done at
        garbage collection)."""
        if getattr(self, "_dali", None) is not None:
            self._dali.close()
            self._dali = None
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __del__(self):
        self.close()

    def batches(self):
        """Every batch of the epoch from ``start_batch`` on, with its ``position``, including those
        whose images were all unreadable (``skip_bad_images``: no rows); counts ``bad_images``."""
        self.bad_images = 0
        for position, (images, tokens, indices, bad) in enumerate(self._batches(), start=self.start_batch):
            self.bad_images += len(bad)
            yield Batch(images, tokens, indices, position)

    def __iter__(self):
        """The epoch's batches that hold images; a warning at its end counts the skipped images."""
        for batch in self.batches():
            if len(batch.indices):
                yield batch
        if self.bad_images:
            warnings.warn(f"epoch {self.epoch}: skipped {self.bad_images} unreadable image(s) in {self.source}",
                          stacklevel=2)


def build_train_data(path, *, tokenizer, image_size, mean, std, batch_size, num_negatives, image_root=None, seed=0,
                     rank=0, world_size=1, num_workers=2, pipeline="auto", device="cpu", skip_bad_images=False,
                     sample_with_replacement=False, trim_text=True, text_workers=2, token_cache=True,
                     image_cache_bytes=IMAGE_CACHE_BYTES, **source_options) -> TrainData:
    """Training data of a DeGLA ``.json``, a ``.csv``/``.tsv`` or WebDataset shards (``a-{000..009}.tar``).

    ``tokenizer``: ``list[str] -> LongTensor[N, context_length]``; ``image_size``/``mean``/``std``: the
    model's preprocessing. ``num_negatives`` = K (0: plain CLIP, ``B`` text rows). ``pipeline``:
    ``"dali"`` (GPU decode when ``device`` is CUDA, CPU threads otherwise; ``num_workers`` threads),
    ``"torch"`` (DataLoader with ``num_workers`` processes) or ``"auto"`` (DALI on CUDA when installed,
    else torch). ``text_workers``: processes building token batches ahead for DALI (0: in the loop).
    ``token_cache``: tokenise every caption once per data set into a cache next to the data
    (:func:`.text.cached_tokens`, keyed by the file's hash and the tokenizer; a path puts it there;
    False or ``DEGLA_TOKEN_CACHE=0``: tokenise each batch). ``image_cache_bytes``: the torch pipeline
    decoding in this process (``num_workers=0``) keeps decoded images up to this many bytes of
    pixels (:class:`.image_cache.ImageCache`; 0: decode every read). ``source_options`` go to
    :func:`.sources.load_records` (``image_pattern``, ``csv_*``).
    Raises :class:`DataError` on malformed files or records short of negatives.
    """
    if pipeline not in PIPELINES:
        raise ConfigError(f"pipeline {pipeline!r} not in {PIPELINES}")
    if batch_size < 1 or num_negatives < 0:
        raise ConfigError(f"batch_size must be >= 1 and num_negatives >= 0 (got {batch_size}, {num_negatives})")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} outside [0, world_size={world_size})")
    cuda = torch.device(device).type == "cuda"
    if pipeline == "auto":
        pipeline = "dali" if cuda and dali_available() else "torch"
        if pipeline == "dali":
            # A DALI wheel for a newer CUDA than this driver (cuda130 on an R535-R570 driver) imports
            # but cannot start: then the torch pipeline, with one line saying why.
            device_index = torch.device(device).index or 0
            reason = dali.dali_start_error(device_index)
            if reason is not None:
                warnings.warn(f"pipeline 'auto': DALI cannot start on cuda:{device_index} ({reason}); using the "
                              f"torch pipeline (for this torch's CUDA {torch.version.cuda}: pip install "
                              f"{dali.dali_package()})", RuntimeWarning, stacklevel=2)
                pipeline = "torch"
    elif pipeline == "dali" and not dali_available():
        raise ConfigError(f"pipeline 'dali' needs nvidia-dali (pip install {dali.dali_package()}, the build for "
                          f"this torch's CUDA {torch.version.cuda or '(CPU torch)'}); use 'torch' or 'auto'")
    records = load_records(path, image_root=image_root, **source_options)
    check_negatives(records, num_negatives, source=os.fspath(path), with_replacement=sample_with_replacement)
    cache = None
    if token_cache and os.environ.get("DEGLA_TOKEN_CACHE", "1") != "0":
        cache = cached_tokens(records, tokenizer, path, source_options=source_options,
                              workers=min(8, os.cpu_count() or 1),
                              path=None if token_cache is True else token_cache)
    return TrainData(records, source=os.fspath(path), tokenizer=tokenizer, image_size=image_size, mean=mean,
                     std=std, batch_size=batch_size, num_negatives=num_negatives, seed=seed, rank=rank,
                     world_size=world_size, num_workers=num_workers, pipeline=pipeline, device=device,
                     skip_bad_images=skip_bad_images, sample_with_replacement=sample_with_replacement,
                     trim_text=trim_text, text_workers=text_workers, token_cache=cache,
                     image_cache_bytes=image_cache_bytes)
