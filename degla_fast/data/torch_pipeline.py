"""Torch DataLoader pipeline: PIL decode and open_clip's training transforms, one batch per worker task.

Each sample's augmentation runs under a torch generator seeded from (seed, epoch, index), so a
batch is the same whichever worker builds it and whether or not the epoch was resumed midway.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DataError, from_worker
from ..stop_signals import held, leave_to_parent
from .sampling import _rng
from .image_cache import open_image
from .sources import image_name
from .text import batch_tokens


def seed_cpu_rng(seed: int) -> None:
    """Seed torch's CPU generator as ``torch.manual_seed`` does, without its cost where CUDA has not
    started: there ``torch.manual_seed`` queues a lazy seed for CUDA, XPU and MTIA, each recording
    ``traceback.format_stack()`` (1-2 ms a call at the trainer's depth: 30-60 ms of a CPU step of
    32 images). Where CUDA has started (a GPU trainer reading in its own process), it seeded the
    CUDA generators too: kept, so a run draws the same numbers as before."""
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
    torch.default_generator.manual_seed(seed)


def train_transform(image_size: int, mean, std, *, uint8: bool = False):
    """open_clip's training transform (random resized crop, to tensor, normalise) for the model.

    ``uint8``: the same crop as a uint8 ``[3,S,S]`` tensor, without ToTensor's scaling and the
    normalisation (:func:`normalize` does both on the device, on a quarter of the bytes); None when
    open_clip's transform does not end in to-tensor + normalise."""
    from open_clip import image_transform
    from torchvision import transforms as T

    full = image_transform(image_size, is_train=True, mean=tuple(mean), std=tuple(std))
    if not uint8:
        return full
    steps = list(full.transforms)
    if len(steps) < 2 or not isinstance(steps[-1], T.Normalize) or \
            type(steps[-2]).__name__ not in ("MaybeToTensor", "ToTensor"):
        return None
    return T.Compose([*steps[:-2], T.PILToTensor()])


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """float32 ``(images / 255 - mean) / std`` of uint8 ``[B,3,S,S]`` images, on their device;
    ``mean``/``std``: float32 ``[1,3,1,1]`` there (ToTensor then Normalize, op for op)."""
    return images.to(torch.float32).div_(255).sub_(mean).div_(std)


@dataclass
class _Loaded:
    images: torch.Tensor
    tokens: torch.Tensor
    indices: torch.Tensor
    bad: list[str]

    def pin_memory(self):
        # DataLoader's pin_memory thread calls this on custom batch types.
        return _Loaded(self.images.pin_memory(), self.tokens.pin_memory(), self.indices, self.bad)


class BatchDataset(torch.utils.data.Dataset):
    """Item ``b`` = batch ``b`` of this epoch: images ``[B',3,S,S]`` (uint8 with the uint8 transform),
    tokens, indices and the names of images skipped as unreadable (``B' < B`` only when
    ``skip_bad_images``)."""

    def __init__(self, records, batches, *, tokenizer, transform, num_negatives, seed, epoch,
                 skip_bad_images=False, sample_with_replacement=False, trim_text=True, token_cache=None,
                 image_cache=None):
        self.records, self.batches, self.tokenizer, self.transform = records, batches, tokenizer, transform
        self.token_cache, self.image_cache = token_cache, image_cache
        self.num_negatives, self.seed, self.epoch = num_negatives, seed, epoch
        self.skip_bad_images, self.with_replacement, self.trim = skip_bad_images, sample_with_replacement, trim_text

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> _Loaded:
        images, kept, bad = [], [], []
        for i in self.batches[b]:
            try:
                record = self.records[i]
                pil = open_image(record) if self.image_cache is None else self.image_cache.get(i, record)
            except DataError:
                if not self.skip_bad_images:
                    raise
                bad.append(image_name(self.records[i]))
                continue
            with torch.random.fork_rng(devices=[]):
                seed_cpu_rng(int(_rng(self.seed, self.epoch, i, 0xC0B).integers(2**62)))
                images.append(self.transform(pil))
            kept.append(i)
        if self.token_cache is not None:
            tokens = self.token_cache.batch(kept, self.num_negatives, seed=self.seed, epoch=self.epoch,
                                            with_replacement=self.with_replacement, trim=self.trim)
        else:
            tokens = batch_tokens(self.records, kept, self.tokenizer, self.num_negatives, seed=self.seed,
                                  epoch=self.epoch, with_replacement=self.with_replacement, trim=self.trim)
        stacked = torch.stack(images) if images else torch.empty(0, dtype=torch.uint8)
        return _Loaded(stacked, tokens, torch.tensor(kept, dtype=torch.long), bad)


def torch_batches(dataset: BatchDataset, start_batch: int, num_workers: int, pin_memory: bool):
    """Iterate ``dataset`` from ``start_batch`` with a DataLoader of ``num_workers`` processes."""
    import sys

    subset = torch.utils.data.Subset(dataset, range(start_batch, len(dataset)))
    # Forking a process in which DALI has run threads can hang the child: spawn workers then.
    context = "spawn" if num_workers > 0 and "nvidia.dali.backend" in sys.modules else None
    # Workers leave SIGTERM/SIGINT to the trainer (a scheduler signals the whole process group):
    # they start with the signals held and stop only when the loader ends them.
    loader = torch.utils.data.DataLoader(subset, batch_size=None, shuffle=False, num_workers=num_workers,
                                         multiprocessing_context=context, worker_init_fn=leave_to_parent,
                                         pin_memory=pin_memory, persistent_workers=False,
                                         prefetch_factor=2 if num_workers > 0 else None)
    try:
        with held():  # the workers start here
            batches = iter(loader)
        yield from batches
    except DataError as err:  # from a worker: its message is the worker's traceback
        raise from_worker(err) from None
