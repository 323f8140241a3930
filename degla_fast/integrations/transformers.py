"""DeGLA for Hugging Face transformers: fine-tune ``transformers.CLIPModel`` under ``transformers.Trainer``.

Three pieces (docs/transformers.md)::

    from degla_fast.integrations.transformers import DeGLACollator, DeGLATrainer

    collator = DeGLACollator(processor, num_negatives=4)    # examples {"image", "caption", "negatives"}
    trainer = DeGLATrainer(model=clip_model, args=training_args, train_dataset=examples,
                           data_collator=collator, num_negatives=4)  # + the DeGLALoss keywords, ema_decay
    trainer.train()                                         # or train(resume_from_checkpoint=True)

* :class:`DeGLACollator`: the model's processor tokenises each caption and its K hard negatives
  into the loss's text layout (B positives, then the B*K negatives sample-major) and prepares the
  images.
* :class:`DeGLATrainer`: ``Trainer`` whose loss is :class:`~degla_fast.loss.DeGLALoss` on
  ``CLIPModel``'s projected, normalised embeddings and its ``logit_scale`` (:func:`clip_model_loss`);
  each term (``contrastive_loss``, ``igc_loss``, ``tgc_loss``, ``distill_loss``) is averaged into
  the trainer's logs next to its ``loss``. At K = 0 the loss is ``CLIPModel(..., return_loss=True).loss``
  in value and gradients.
* :class:`EMATeacherCallback`: the EMA teacher (this project's fused update) as a ``TrainerCallback``:
  it follows the student after every optimiser step, is saved as ``degla_teacher.pt`` in each of the
  trainer's ``checkpoint-N`` folders and restored from the one a run resumes from.

Imports of transformers go through :mod:`degla_fast.compat.transformers` (this checkout's
``kernels/`` folder would shadow the hub-kernels package transformers 5 imports).
"""
from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from ..compat.transformers import import_transformers
from ..ema import EMATeacher, check_decay
from . import unwrap
from ..errors import ConfigError, DataError
from ..loss import DeGLALoss, LossOutput, LossSpec
from ..train.config import EMAConfig

transformers = import_transformers()

#: The teacher's file in each ``checkpoint-N`` folder the trainer writes.
TEACHER_FILE = "degla_teacher.pt"
#: The loss terms the trainer's logs carry (weighted, as open_clip_train's loss dict: their sum is ``loss``).
TERMS = ("contrastive_loss", "igc_loss", "tgc_loss", "distill_loss")


class DeGLACollator:
    """Examples -> ``{"pixel_values" [B, 3, H, W], "input_ids" [B*(1+K), L], "attention_mask"}``.

    Each example is a mapping with an image (a PIL image or a path), a caption and a list of hard
    negatives (keys ``image_key``, ``caption_key``, ``negatives_key``). The K negatives of an example
    with more are drawn without replacement from a generator seeded with ``seed`` (one draw per
    example, in the order batches come); one with fewer is a :class:`DataError` naming it. Text rows:
    the B captions, then each example's K negatives in example order (the layout
    :class:`~degla_fast.loss.DeGLALoss` reads), padded to the batch's longest one.
    """

    def __init__(self, processor, num_negatives: int = 4, *, image_key: str = "image", caption_key: str = "caption",
                 negatives_key: str = "negatives", max_length: int | None = None, seed: int = 0):
        num_negatives = LossSpec(num_negatives=num_negatives).num_negatives  # the loss's own check of K
        self.processor, self.num_negatives = processor, num_negatives
        self.image_key, self.caption_key, self.negatives_key = image_key, caption_key, negatives_key
        self.max_length = max_length
        self.rng = torch.Generator().manual_seed(seed)

    def _negatives(self, example: dict, where: str) -> list[str]:
        pool = list(example.get(self.negatives_key) or [])
        if len(pool) < self.num_negatives:
            raise DataError(f"{where}: {len(pool)} hard negatives in {self.negatives_key!r}, num_negatives="
                            f"{self.num_negatives} needs that many")
        if len(pool) == self.num_negatives:
            return pool
        picks = torch.randperm(len(pool), generator=self.rng)[:self.num_negatives].tolist()
        return [pool[i] for i in picks]

    def _image(self, example: dict, where: str):
        from ..data.sources import open_rgb_image, read_image_file

        image = example.get(self.image_key)
        if isinstance(image, (str, os.PathLike)):
            return open_rgb_image(lambda: read_image_file(image), f"{where}: {image}")
        if image is None:
            raise DataError(f"{where}: no {self.image_key!r}")
        return image

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        captions, negatives, images = [], [], []
        for i, example in enumerate(examples):
            where = f"example {example.get('id', i)}"
            caption = example.get(self.caption_key)
            if not isinstance(caption, str):
                raise DataError(f"{where}: {self.caption_key!r} must be a string, got {type(caption).__name__}")
            captions.append(caption)
            if self.num_negatives:
                negatives.extend(self._negatives(example, where))
            images.append(self._image(example, where))
        text = self.processor.tokenizer(captions + negatives, padding=True, truncation=True,
                                        max_length=self.max_length, return_tensors="pt")
        pixels = self.processor.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": pixels["pixel_values"], "input_ids": text["input_ids"],
                "attention_mask": text["attention_mask"]}


def clip_model_loss(model, inputs: dict, loss_fn: DeGLALoss, teacher: EMATeacher | None = None) -> LossOutput:
    """``loss_fn`` on ``CLIPModel``'s normalised ``image_embeds`` / ``text_embeds`` of ``inputs`` and its
    ``logit_scale.exp()``; the teacher's embeddings of the same inputs where the loss needs them.
    ``model`` may be the trainer's wrapped model: its forward is called, so DDP sees the step."""
    out = model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                attention_mask=inputs.get("attention_mask"))
    t_image = t_text = None
    if loss_fn.needs_teacher:
        if teacher is None:
            raise ConfigError("clip_model_loss: this loss needs the EMA teacher (num_negatives > 0 with tgc_weight or "
                              "distill_weight not 0)")
        with torch.no_grad():
            t_out = teacher.module(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                                   attention_mask=inputs.get("attention_mask"))
        t_image, t_text = t_out.image_embeds, t_out.text_embeds
    return loss_fn(out.image_embeds, out.text_embeds, unwrap(model).logit_scale.exp(), t_image, t_text)


class EMATeacherCallback(transformers.TrainerCallback):
    """The EMA teacher of the trainer's model: built at the start of training (restored from
    ``checkpoint-N/degla_teacher.pt`` when the run resumes from ``checkpoint-N``), moved toward the
    student after every optimiser step, saved into every checkpoint folder the trainer writes."""

    def __init__(self, decay: float = EMAConfig.decay, backend: str = "auto"):
        self.decay, self.backend = decay, backend
        self.teacher: EMATeacher | None = None
        self.resume_from: str | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.teacher is None:
            self.teacher = EMATeacher(model, decay=self.decay, backend=self.backend)
        if self.resume_from is not None:
            path = Path(self.resume_from) / TEACHER_FILE
            if path.is_file():
                self.teacher.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
                logging.getLogger(__name__).info(f"degla-fast: EMA teacher restored from {path}")
            else:
                logging.getLogger(__name__).warning(
                    f"degla-fast: {self.resume_from} holds no {TEACHER_FILE}; the teacher starts from the resumed "
                    "student")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.teacher.update(model)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                torch.save(self.teacher.state_dict(), folder / TEACHER_FILE)


class DeGLATrainer(transformers.Trainer):
    """``transformers.Trainer`` for ``CLIPModel`` with the DeGLA loss (see the module doc).

    ``loss_kwargs``: :class:`DeGLALoss` keywords (``num_negatives``, the weights, ``tgc_scale``,
    ``backend``, ...; defaults and checks are the loss's own, but ``check_finite`` is off) except
    ``rank``/``world_size``, taken from the trainer's arguments; with several processes the loss
    gathers features with autograd from each process's anchors (``local_loss``,
    ``gather_with_grad``). ``ema_decay`` (default: ``ema.decay`` of ``degla-fast train``): the
    teacher's decay, used where the loss needs a teacher (an :class:`EMATeacherCallback` is added).
    """

    def __init__(self, *args, ema_decay: float = EMAConfig.decay, loss: DeGLALoss | None = None, **kwargs):
        loss_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in inspect.signature(DeGLALoss).parameters}
        placed = [k for k in ("rank", "world_size") if k in loss_kwargs]
        if placed:
            raise ConfigError(f"DeGLATrainer: {', '.join(placed)} come from the TrainingArguments (process_index, "
                              "world_size); do not pass them")
        check_decay(ema_decay)  # now, not when training starts
        super().__init__(*args, **kwargs)
        # The collator reads the examples' own columns (image, caption, negatives); the Trainer would
        # otherwise drop every column CLIPModel.forward does not name before the collator sees them.
        self.args.remove_unused_columns = False
        if loss is None:
            world = self.args.world_size
            loss_kwargs.setdefault("local_loss", world > 1)
            loss_kwargs.setdefault("gather_with_grad", world > 1)
            # As with open_clip_train: no host read of the inputs each step (the Trainer watches the loss).
            loss_kwargs.setdefault("check_finite", False)
            loss = DeGLALoss(rank=self.args.process_index, world_size=world, **loss_kwargs)
        elif loss_kwargs:
            raise ConfigError(f"DeGLATrainer: give loss= or the loss keywords ({', '.join(loss_kwargs)}), not both")
        self.degla_loss = loss
        self.teacher_callback = None
        if loss.needs_teacher:
            self.teacher_callback = EMATeacherCallback(decay=ema_decay)
            self.add_callback(self.teacher_callback)
        self._term_sums: dict[str, float] = {}
        self._term_count = 0

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if self.teacher_callback is not None and resume_from_checkpoint:
            path = resume_from_checkpoint
            if path is True:
                path = transformers.trainer_utils.get_last_checkpoint(self.args.output_dir)
            self.teacher_callback.resume_from = path
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        teacher = self.teacher_callback.teacher if self.teacher_callback is not None else None
        out = clip_model_loss(model, inputs, self.degla_loss, teacher)
        if model.training:  # (an evaluation's loss is not a training log's)
            for name, value in out.named(self.degla_loss.spec).items():  # summed on the device, read when it logs
                self._term_sums[name] = self._term_sums.get(name, 0.0) + value.detach()
            self._term_count += 1
        return (out.total, out) if return_outputs else out.total

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._term_count and "loss" in logs:  # a training log line: each term's mean since the last one
            for name, total in self._term_sums.items():
                logs[name] = round(float(total) / self._term_count, 6)
            self._term_sums, self._term_count = {}, 0
        super().log(logs, *args, **kwargs)
