"""DALI image pipeline: encoded bytes from an external source -> decode the random resized crop
window -> resize -> normalise, on the GPU (``mixed`` decoder) or on CPU threads (``device_id=None``).

The external source feeds this rank's batches in the epoch order of :mod:`.sampling`, so files and
tar-shard members are read the same way and captions stay aligned by sample index; the caption and
negative tokens of each batch are built in step with its images. The crop's random numbers are drawn
in Python per sample from a generator keyed by (seed, epoch, sample index) (:func:`crop_draws`) and
fed with the encoded bytes; the graph turns them into a pixel window once it knows the image size
(:func:`crop_windows`) and decodes only that window. So the crops, like the order, negatives and
text, are a pure function of (seed, epoch, index): ``start_batch`` resumes an epoch exactly, whatever
the rank or batch a sample lands in.
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


def dali_package() -> str:
    """The DALI wheel for this torch's CUDA: ``nvidia-dali-cuda120`` for CUDA 12 (drivers >= 525),
    ``nvidia-dali-cuda130`` otherwise (CUDA 13, drivers >= 580; its CPU pipeline runs anywhere)."""
    return "nvidia-dali-cuda120" if (torch.version.cuda or "").startswith("12.") else "nvidia-dali-cuda130"


def dali_start_error(device_id: int) -> str | None:
    """None when DALI can run a GPU pipeline on ``cuda:device_id``, else why not in one line (a
    DALI built for a newer CUDA than the driver supports, no device, ...): a one-sample pipeline
    through the ``mixed`` decoder is built and run once."""
    try:
        from nvidia.dali import fn, pipeline_def, types

        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, "JPEG")
        jpeg = np.frombuffer(buf.getvalue(), dtype=np.uint8)

        @pipeline_def(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1)
        def probe():
            data = fn.external_source(source=lambda: [jpeg], batch=True, dtype=types.UINT8)
            return fn.decoders.image(data, device="mixed")

        pipe = probe()
        pipe.build()
        pipe.run()
        del pipe
    except Exception as e:  # noqa: BLE001 - every failure means "cannot start"; the reason is reported
        return " ".join(f"{type(e).__name__}: {e}".split())[:300]
    return None


# open_clip's training transform (RandomResizedCrop, scale (0.9, 1.0)): both pipelines augment alike.
CROP_SCALE = (0.9, 1.0)           # area fraction of the random resized crop
CROP_RATIO = (3 / 4, 4 / 3)       # its width / height
CROP_ATTEMPTS = 10                # candidates per sample; the first one that fits the image is used


def crop_draws(seed: int, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The random numbers of sample ``index``'s random resized crop in ``epoch``, as quantities that do
    not depend on the image size: for each of ``CROP_ATTEMPTS`` candidates an area fraction
    ``s ~ U(CROP_SCALE)`` and an aspect ratio ``r`` (width/height, log-uniform in ``CROP_RATIO``),
    passed as ``candidates`` float32 ``[CROP_ATTEMPTS, 2]`` = ``(s/r, s*r)`` (the squared height and
    width of the window relative to ``sqrt(H*W)``), and ``position`` float32 ``[2]`` (y, x in ``[0, 1)``).
    A pure function of (seed, epoch, index), so a resumed epoch crops each sample as the full one."""
    rng = _rng(seed, epoch, index, 0xDA11)
    area = rng.uniform(*CROP_SCALE, size=CROP_ATTEMPTS)
    ratio = np.exp(rng.uniform(np.log(CROP_RATIO[0]), np.log(CROP_RATIO[1]), size=CROP_ATTEMPTS))
    return np.stack([area / ratio, area * ratio], axis=1).astype(np.float32), rng.random(2, dtype=np.float32)


def crop_windows(image_shapes, candidates, positions) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The crop windows ``(anchors, shapes)`` (float32 pixels, HW order) of a batch, as torchvision's
    RandomResizedCrop places them, from each decoded image's ``H x W`` (``image_shapes``: HWC) and the
    draws of :func:`crop_draws`: the first candidate whose window ``h, w = round(sqrt((s/r)*H*W)),
    round(sqrt((s*r)*H*W))`` fits in the image, at ``floor(v*(H-h+1)), floor(u*(W-w+1))``; when none
    fits, the centred window ``min(H, round(W/CROP_RATIO[0])) x min(W, round(H*CROP_RATIO[1]))``.
    Runs inside the DALI graph (``fn.python_function``, once per batch)."""
    hw = np.stack([np.asarray(x)[:2] for x in image_shapes]).astype(np.float32)        # [B, 2]
    cand, pos = np.stack(candidates), np.stack(positions)                              # [B, T, 2], [B, 2]
    dims = np.floor(np.sqrt(cand * (hw[:, 0] * hw[:, 1])[:, None, None]) + np.float32(0.5))
    fits = ((dims <= hw[:, None]) & (dims >= 1)).all(-1)                               # [B, T]
    found = fits.any(1)[:, None]
    shape = dims[np.arange(len(hw)), fits.argmax(1)]
    limits = np.float32([1 / CROP_RATIO[0], CROP_RATIO[1]])            # h <= W/min_ratio, w <= H*max_ratio
    fallback = np.minimum(hw, np.floor(hw[:, ::-1] * limits + np.float32(0.5)))
    shape = np.where(found, shape, fallback)
    free = hw - shape
    anchor = np.where(found, np.minimum(np.floor(pos * (free + 1)), free), np.floor(free * np.float32(0.5)))
    return list(anchor.astype(np.float32)), list(shape.astype(np.float32))


def _build_pipeline(source, *, batch_size, image_size, mean, std, device_id, num_threads):
    from nvidia.dali import fn, pipeline_def, types

    # No random operator in the graph: the crop draws come with each sample from the external source.
    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0,
                  prefetch_queue_depth=2, exec_dynamic=True)
    def pipe():
        encoded, candidates, position = fn.external_source(
            source=source, num_outputs=3, dtype=[types.UINT8, types.FLOAT, types.FLOAT], batch=True,
            no_copy=False)
        # The window needs the decoded size (EXIF orientation applied); one numpy call per batch.
        anchor, shape = fn.python_function(fn.peek_image_shape(encoded), candidates, position,
                                           function=crop_windows, batch_processing=True, num_outputs=2)
        decoder = "mixed" if device_id is not None else "cpu"
        images = fn.decoders.image_slice(encoded, anchor, shape, device=decoder, output_type=types.RGB,
                                         axis_names="HW", normalized_anchor=False, normalized_shape=False)
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


def _init_text_worker(records, tokenizer, num_negatives, with_replacement, trim, token_cache=None):
    _WORKER_STATE.update(records=records, tokenizer=tokenizer, k=num_negatives, rep=with_replacement, trim=trim,
                         cache=token_cache)


def _text_job(indices, seed, epoch):
    st = _WORKER_STATE
    if st["cache"] is not None:
        return st["cache"].batch(indices, st["k"], seed=seed, epoch=epoch, with_replacement=st["rep"],
                                 trim=st["trim"])
    return batch_tokens(st["records"], indices, st["tokenizer"], st["k"], seed=seed, epoch=epoch,
                        with_replacement=st["rep"], trim=st["trim"])


def text_pool(records, tokenizer, num_negatives, with_replacement, trim, workers, token_cache=None):
    """Processes that tokenise batches off the training process (BPE on ``B*(1+K)`` captions costs
    tens of ms of Python per batch). Spawned, not forked: forking next to DALI's threads can hang."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_text_worker,
                               initargs=(None if token_cache is not None else records, tokenizer, num_negatives,
                                         with_replacement, trim, token_cache))


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
    if batches.token_cache is not None:
        return batches.token_cache.batch(indices, batches.num_negatives, seed=batches.seed, epoch=batches.epoch,
                                         with_replacement=batches.with_replacement, trim=batches.trim)
    return batch_tokens(batches.records, indices, batches.tokenizer, batches.num_negatives, seed=batches.seed,
                        epoch=batches.epoch, with_replacement=batches.with_replacement, trim=batches.trim)


class DaliBatches:
    """Iterator over one epoch of this rank's batches as ``(images, tokens, indices, bad_names)``.

    ``images``: float32 ``[B',3,S,S]`` on ``cuda:device_id`` (or CPU when ``device_id`` is None).
    Unreadable images (missing file, empty or non-image bytes) raise :class:`DataError` naming the
    file, or are dropped from their batch and reported in ``bad_names`` with ``skip_bad_images``.
    """

    def __init__(self, records, batches, *, tokenizer, image_size, mean, std, num_negatives, seed, epoch,
                 start_batch=0, device_id=None, num_threads=4, skip_bad_images=False,
                 sample_with_replacement=False, trim_text=True, pool=None, token_cache=None):
        self.records, self.batches = records, batches[start_batch:]
        self.num_negatives = num_negatives
        self.skip_bad_images, self.with_replacement, self.trim = skip_bad_images, sample_with_replacement, trim_text
        self.device_id, self._pending = device_id, []
        self.batch_size = max((len(b) for b in batches), default=1)
        self.tokenizer, self.seed, self.epoch, self.pool = tokenizer, seed, epoch, pool
        self.token_cache = token_cache
        self._source_iter = iter(self.batches)
        self.pipe = _build_pipeline(self._next_encoded, batch_size=self.batch_size, image_size=image_size,
                                    mean=mean, std=std, device_id=device_id, num_threads=num_threads)
        self.pipe.build()

    def _next_encoded(self):
        # Called by DALI ahead of consumption (prefetch); the matching text goes through a queue.
        try:
            indices = next(self._source_iter)
        except StopIteration:
            raise StopIteration from None
        data, candidates, positions, kept, bad = [], [], [], [], []
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
            cand, pos = crop_draws(self.seed, self.epoch, i)
            candidates.append(cand)
            positions.append(pos)
            kept.append(i)
        if not data:
            raise DataError(f"every image of a batch is unreadable (first: {bad[0]})")
        self._pending.append((kept, bad))
        return data, candidates, positions

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
