"""DALI image pipeline: encoded bytes from an external source -> decode with random crop -> resize ->
normalise, on the GPU (``mixed`` decoder) or on CPU threads (``device_id=None``).

The external source feeds this rank's batches in the epoch order of :mod:`.sampling`, so files and
tar-shard members are read the same way and captions stay aligned by sample index; the caption and
negative tokens of each batch are built in step with its images. The random resized crop draws
from DALI's generator seeded by (seed, epoch, rank, start_batch): a run is reproducible and the
order, negatives and text are exact on resume, but a resumed epoch's crops differ from the crops
the uninterrupted run would have drawn (DALI cannot skip its generator ahead).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError
from .sampling import _rng
from .sources import image_name, read_image_bytes
from .text import batch_tokens, trim_tokens

_MAGIC = (b"\xff\xd8", b"\x89PNG", b"BM", b"RIFF", b"GIF8", b"II*\x00", b"MM\x00*")


def dali_available() -> bool:
    """Whether nvidia-dali can be imported."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _build_pipeline(source, *, batch_size, image_size, mean, std, device_id, num_threads, seed):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2, exec_dynamic=True)
    def pipe():
        encoded = fn.external_source(source=source, dtype=types.UINT8, batch=True, no_copy=False, name="jpegs")
        decoder = "mixed" if device_id is not None else "cpu"
        images = fn.decoders.image_random_crop(encoded, device=decoder, output_type=types.RGB,
                                               random_area=[0.08, 1.0],
                                               random_aspect_ratio=[3 / 4, 4 / 3])
        images = fn.resize(images, size=[image_size, image_size], interp_type=types.INTERP_CUBIC, antialias=True)
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                        mean=[255 * m for m in mean], std=[255 * s for s in std])

    return pipe()


def _decode_error(records, indices, error: Exception) -> DataError:
    """A :class:`DataError` naming the image of ``indices`` that PIL cannot decode either."""
    from .torch_pipeline import open_image

    for i in indices:
        try:
            open_image(records[i])
        except DataError as e:
            return e
    detail = " ".join(str(error).split())[:200]
    return DataError(f"DALI failed on a batch starting with {image_name(records[indices[0]]) if indices else '?'}: "
                     f"{detail}")


_WORKER_STATE: dict = {}


def _init_text_worker(records, tokenizer, num_negatives, with_replacement, trim):
    _WORKER_STATE.update(records=records, tokenizer=tokenizer, k=num_negatives, rep=with_replacement, trim=trim)


def _text_job(indices, seed, epoch):
    st = _WORKER_STATE
    return batch_tokens(st["records"], indices, st["tokenizer"], st["k"], seed=seed, epoch=epoch,
                        with_replacement=st["rep"], trim=st["trim"])


def text_pool(records, tokenizer, num_negatives, with_replacement, trim, workers):
    """Processes that tokenise batches off the training process (BPE on ``B*(1+K)`` captions costs
    tens of ms of Python per batch). Spawned, not forked: forking next to DALI's threads can hang."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_text_worker,
                               initargs=(records, tokenizer, num_negatives, with_replacement, trim))


def _keep_rows(tokens: torch.Tensor, batch: list[int], kept: list[int], num_negatives: int, trim: bool):
    """The token rows of the ``kept`` samples of ``batch`` (layout ``[B'; B'*K]``), re-trimmed."""
    if len(kept) == len(batch):
        return tokens
    keep = set(kept)
    pos = [j for j, i in enumerate(batch) if i in keep]
    rows = pos + [len(batch) + j * num_negatives + k for j in pos for k in range(num_negatives)]
    out = tokens[rows]
    return trim_tokens(out) if trim else out


def _text_job_inline(batches, indices):
    return batch_tokens(batches.records, indices, batches.tokenizer, batches.num_negatives, seed=batches.seed,
                        epoch=batches.epoch, with_replacement=batches.with_replacement, trim=batches.trim)


class DaliBatches:
    """Iterator over one epoch of this rank's batches as ``(images, tokens, indices, bad_names)``.

    ``images``: float32 ``[B',3,S,S]`` on ``cuda:device_id`` (or CPU when ``device_id`` is None).
    Unreadable images (missing file, empty or non-image bytes) raise :class:`DataError` naming the
    file, or are dropped from their batch and reported in ``bad_names`` with ``skip_bad_images``.
    """

    def __init__(self, records, batches, *, tokenizer, image_size, mean, std, num_negatives, seed, epoch,
                 rank, start_batch=0, device_id=None, num_threads=4, skip_bad_images=False,
                 sample_with_replacement=False, trim_text=True, pool=None):
        self.records, self.batches = records, batches[start_batch:]
        self.num_negatives = num_negatives
        self.skip_bad_images, self.with_replacement, self.trim = skip_bad_images, sample_with_replacement, trim_text
        self.device_id, self._pending = device_id, []
        self.batch_size = max((len(b) for b in batches), default=1)
        self.tokenizer, self.seed, self.epoch, self.pool = tokenizer, seed, epoch, pool
        dali_seed = int(_rng(seed, epoch, rank, start_batch, 0xDA11).integers(2**31 - 1))
        self._source_iter = iter(self.batches)
        self.pipe = _build_pipeline(self._next_encoded, batch_size=self.batch_size, image_size=image_size,
                                    mean=mean, std=std, device_id=device_id, num_threads=num_threads,
                                    seed=dali_seed)
        self.pipe.build()

    def _next_encoded(self):
        # Called by DALI ahead of consumption (prefetch); the matching text goes through a queue.
        try:
            indices = next(self._source_iter)
        except StopIteration:
            raise StopIteration from None
        data, kept, bad = [], [], []
        for i in indices:
            record = self.records[i]
            try:
                raw = read_image_bytes(record)
                if not raw.startswith(_MAGIC):
                    raise OSError("not an encoded image")
                # A decode error stops the whole DALI pipeline, so when skipping, catch the common
                # corruption (a cut-off JPEG has no end-of-image marker near its end) before it.
                if self.skip_bad_images and raw.startswith(b"\xff\xd8") and b"\xff\xd9" not in raw[-64:]:
                    raise OSError("truncated JPEG (no end-of-image marker)")
            except OSError as e:
                if not self.skip_bad_images:
                    raise DataError(f"{image_name(record)}: cannot read image ({e})") from None
                bad.append(image_name(record))
                continue
            data.append(np.frombuffer(raw, dtype=np.uint8))
            kept.append(i)
        if not data:
            raise DataError(f"every image of a batch is unreadable (first: {bad[0]})")
        self._pending.append((kept, bad))
        return data

    def __len__(self) -> int:
        return len(self.batches)

    def _text(self, indices):
        if self.pool is None:
            return _text_job_inline(self, indices)
        return self.pool.submit(_text_job, indices, self.seed, self.epoch)

    def __iter__(self):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        ahead = []
        for n, batch in enumerate(self.batches):
            while len(ahead) < 4 and n + len(ahead) < len(self.batches):
                ahead.append(self._text(self.batches[n + len(ahead)]))
            tokens = ahead.pop(0)
            tokens = tokens.result() if hasattr(tokens, "result") else tokens
            try:
                (out,) = self.pipe.run()
            except StopIteration:
                return
            except RuntimeError as e:
                if isinstance(e.__cause__, DataError):
                    raise e.__cause__ from None
                raise _decode_error(self.records, [i for kept, _ in self._pending for i in kept], e) from None
            kept, bad = self._pending.pop(0)
            shape = [len(kept), *out.as_tensor().shape()[1:]] if self.device_id is not None else None
            if self.device_id is not None:
                images = torch.empty(shape, dtype=torch.float32, device=f"cuda:{self.device_id}")
                feed_ndarray(out.as_tensor(), images, cuda_stream=torch.cuda.current_stream(self.device_id))
            else:
                images = torch.from_numpy(np.array(out.as_tensor()))
            tokens = _keep_rows(tokens, batch, kept, self.num_negatives, self.trim)
            yield images, tokens, torch.tensor(kept, dtype=torch.long), bad
