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

import os

import numpy as np
import torch

from ..errors import DataError
from ..stop_signals import held, leave_to_parent
from .sampling import _rng
from .sources import Record, image_name, read_image_bytes
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


def _build_pipeline(source, *, batch_size, image_size, mean, std, device_id, num_threads, py_workers):
    from nvidia.dali import fn, pipeline_def, types

    # No random operator in the graph: the crop draws come with each sample from the external source,
    # which runs in ``py_workers`` processes (spawned: the trainer has CUDA initialised), each
    # building whole batches (file reads, crop draws) ahead of the training thread.
    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0,
                  prefetch_queue_depth=2, exec_dynamic=True, py_num_workers=py_workers, py_start_method="spawn")
    def pipe():
        encoded, candidates, position, kept = fn.external_source(
            source=source, num_outputs=4, dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT64], batch=True,
            batch_info=True, parallel=True, prefetch_queue_depth=max(2, py_workers + 1))
        # The window needs the decoded size (EXIF orientation applied); one numpy call per batch.
        anchor, shape = fn.python_function(fn.peek_image_shape(encoded), candidates, position,
                                           function=crop_windows, batch_processing=True, num_outputs=2)
        decoder = "mixed" if device_id is not None else "cpu"
        images = fn.decoders.image_slice(encoded, anchor, shape, device=decoder, output_type=types.RGB,
                                         axis_names="HW", normalized_anchor=False, normalized_shape=False)
        images = fn.resize(images, size=[image_size, image_size], interp_type=types.INTERP_CUBIC, antialias=True)
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                        mean=[255 * m for m in mean], std=[255 * s for s in std]), kept

    return pipe()


_PLAN_SLOTS = 1024


class EpochSource:
    """The external source, run in DALI's worker processes: batch ``iteration`` of DALI epoch
    ``epoch_idx`` is batch ``start + iteration`` of training epoch ``epoch``, where ``(epoch, start)``
    is what the main process wrote into the shared plan file (slot ``epoch_idx % _PLAN_SLOTS``)
    before that DALI epoch began. So one pipeline serves the whole run and is re-seeded per epoch;
    the batches, their files and crop draws stay a pure function of (seed, epoch, index).

    Returns per batch the encoded bytes, the crop draws and each kept sample's index; unreadable
    images are skipped (``skip_bad_images``) or raise :class:`DataError`."""

    def __init__(self, records, plan_path, *, batch_size, seed, rank, world_size, skip_bad_images):
        # Only where the images are: the captions stay in the main process.
        self.records = [Record(r.image, "", (), r.where, r.offset, r.size, r.extra) for r in records]
        self.plan_path, self.batch_size, self.seed = plan_path, batch_size, seed
        self.rank, self.world_size, self.skip_bad_images = rank, world_size, skip_bad_images
        self._plan = self._batches = None

    def __getstate__(self):
        return {**self.__dict__, "_plan": None, "_batches": None}

    def __setstate__(self, state):
        # Unpickled in each DALI worker process as it starts (DALI has no worker initializer).
        self.__dict__.update(state)
        leave_to_parent()

    def epoch_plan(self, epoch_idx: int) -> tuple[int, int]:
        if self._plan is None:
            self._plan = np.memmap(self.plan_path, dtype=np.int64, mode="r", shape=(_PLAN_SLOTS, 2))
        epoch, start = (int(v) for v in self._plan[epoch_idx % _PLAN_SLOTS])
        return epoch, start

    def __call__(self, info):
        epoch, start = self.epoch_plan(info.epoch_idx)
        if self._batches is None or self._batches[0] != epoch:
            from .sampling import epoch_batches

            self._batches = (epoch, epoch_batches(len(self.records), self.batch_size, seed=self.seed, epoch=epoch,
                                                  rank=self.rank, world_size=self.world_size))
        batches = self._batches[1]
        if start + info.iteration >= len(batches):
            raise StopIteration
        return read_batch(self.records, batches[start + info.iteration], seed=self.seed, epoch=epoch,
                          skip_bad_images=self.skip_bad_images)


def read_batch(records, indices, *, seed, epoch, skip_bad_images):
    """``(encoded, candidates, positions, kept)`` of one batch: each readable image's bytes, its crop
    draws (:func:`crop_draws`) and its index (int64 ``[1]``)."""
    data, candidates, positions, kept, bad = [], [], [], [], []
    for i in indices:
        record = records[i]
        try:
            raw = read_image_bytes(record)
            if not raw.startswith(_MAGIC):
                raise OSError("not an encoded image")
            # A decode error stops the whole DALI pipeline, so when skipping, catch the common
            # corruption (a cut-off JPEG has no end-of-image marker near its end) before it.
            if skip_bad_images and raw.startswith(b"\xff\xd8") and b"\xff\xd9" not in raw[-64:]:
                raise OSError("truncated JPEG (no end-of-image marker)")
        except OSError as e:
            if not skip_bad_images:
                raise DataError(f"{image_name(record)}: cannot read image ({e})") from None
            bad.append(image_name(record))
            continue
        data.append(np.frombuffer(raw, dtype=np.uint8))
        cand, pos = crop_draws(seed, epoch, i)
        candidates.append(cand)
        positions.append(pos)
        kept.append(np.array([i], dtype=np.int64))
    if not data:
        raise DataError(f"every image of a batch is unreadable (first: {bad[0]})")
    return data, candidates, positions, kept


def _decode_error(records, indices, error: Exception) -> DataError:
    """A :class:`DataError` naming the image of ``indices`` that PIL cannot decode either."""
    from .image_cache import open_image

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
    leave_to_parent()
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
    tens of ms of Python per batch). Spawned, not forked: forking next to DALI's threads can hang.
    Its processes start at a ``submit`` (:meth:`DaliEpochs._text` holds the stop signals there)."""
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


class DaliEpochs:
    """One DALI pipeline for the whole run: :meth:`iterate` goes through one epoch of this rank's batches as
    ``(images, tokens, indices, bad_names)``, from any (epoch, start_batch); the pipeline is re-seeded
    through the shared plan (:class:`EpochSource`) instead of rebuilt, and rebuilt only after an
    epoch left unfinished or an error.

    ``images``: float32 ``[B',3,S,S]`` on ``cuda:device_id`` (or CPU when ``device_id`` is None).
    Unreadable images (missing file, empty or non-image bytes) raise :class:`DataError` naming the
    file, or are dropped from their batch and reported in ``bad_names`` with ``skip_bad_images``.
    """

    def __init__(self, records, *, tokenizer, image_size, mean, std, batch_size, num_negatives, seed, rank=0,
                 world_size=1, device_id=None, num_threads=4, py_workers=None, skip_bad_images=False,
                 sample_with_replacement=False, trim_text=True, pool=None, token_cache=None):
        import tempfile

        self.records, self.num_negatives, self.batch_size, self.seed = records, num_negatives, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.skip_bad_images, self.with_replacement, self.trim = skip_bad_images, sample_with_replacement, trim_text
        self.device_id, self.tokenizer, self.pool, self.token_cache = device_id, tokenizer, pool, token_cache
        self.epoch = 0
        self._graph = dict(batch_size=batch_size, image_size=image_size, mean=mean, std=std, device_id=device_id,
                           num_threads=num_threads, py_workers=py_workers or max(1, min(4, num_threads)))
        fd, self._plan_path = tempfile.mkstemp(prefix="degla-dali-plan-", suffix=".bin")
        with open(fd, "wb") as fh:
            fh.write(b"\0" * (_PLAN_SLOTS * 16))
        self._plan = np.memmap(self._plan_path, dtype=np.int64, mode="r+", shape=(_PLAN_SLOTS, 2))
        self.pipe, self._dali_epoch, self.builds = None, 0, 0

    def _build(self):
        self.close_pipeline()
        source = EpochSource(self.records, self._plan_path, batch_size=self.batch_size, seed=self.seed,
                             rank=self.rank, world_size=self.world_size, skip_bad_images=self.skip_bad_images)
        self.pipe, self._dali_epoch = _build_pipeline(source, **self._graph), 0
        with held():  # the reader processes start here; they leave stop signals to the trainer
            self.pipe.build()
        self.builds += 1

    def close_pipeline(self):
        if self.pipe is not None:
            pipe, self.pipe = self.pipe, None
            del pipe  # stops its worker processes

    def close(self):
        self.close_pipeline()
        if getattr(self, "_plan_path", None):
            self._plan = None
            try:
                os.unlink(self._plan_path)
            except OSError:
                pass
            self._plan_path = None

    def __del__(self):
        self.close()

    def _text(self, indices):
        if self.pool is None:
            return _text_job_inline(self, indices)
        with held():  # a submit may start a pool process: it leaves stop signals to the trainer
            return self.pool.submit(_text_job, indices, self.seed, self.epoch)

    def iterate(self, epoch: int, start_batch: int = 0):
        from .sampling import epoch_batches

        self.epoch = epoch
        batches = epoch_batches(len(self.records), self.batch_size, seed=self.seed, epoch=epoch, rank=self.rank,
                                world_size=self.world_size)[start_batch:]
        if not batches:
            return
        if self.pipe is None:
            self._build()
        # Written before the DALI epoch's first batch is scheduled (at its first run()).
        self._plan[self._dali_epoch % _PLAN_SLOTS] = (epoch, start_batch)
        self._plan.flush()
        finished = False
        try:
            yield from self._run(batches)
            finished = True
        finally:
            if not finished:  # left midway (or failed): the next epoch gets a fresh pipeline
                self.close_pipeline()

    def _run(self, batches):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        ahead = []
        for n, batch in enumerate(batches):
            while len(ahead) < 4 and n + len(ahead) < len(batches):
                ahead.append(self._text(batches[n + len(ahead)]))
            tokens = ahead.pop(0)
            tokens = tokens.result() if hasattr(tokens, "result") else tokens
            try:
                out, kept_out = self.pipe.run()
            except StopIteration:
                raise RuntimeError("DALI's source ended before the epoch did") from None
            except Exception as e:  # noqa: BLE001 - a worker's DataError or a decode failure
                raise _decode_error(self.records, [i for b in batches[n:n + 4] for i in b], e) from None
            kept = np.array(kept_out.as_tensor()).reshape(-1).tolist()
            keep = set(kept)
            bad = [image_name(self.records[i]) for i in batch if i not in keep]
            if self.device_id is not None:
                shape = [len(kept), *out.as_tensor().shape()[1:]]
                images = torch.empty(shape, dtype=torch.float32, device=f"cuda:{self.device_id}")
                feed_ndarray(out.as_tensor(), images, cuda_stream=torch.cuda.current_stream(self.device_id))
            else:
                images = torch.from_numpy(np.array(out.as_tensor()))
            tokens = _keep_rows(tokens, batch, kept, self.num_negatives, self.trim)
            yield images, tokens, torch.tensor(kept, dtype=torch.long), bad
        # Consume the end of the DALI epoch and rewind: the next epoch reuses this pipeline.
        try:
            self.pipe.run()
            raise RuntimeError("DALI's source ran past the end of the epoch")
        except StopIteration:
            pass
        self.pipe.reset()
        self._dali_epoch += 1
