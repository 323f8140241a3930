"""Features across processes: open_clip's ClipLoss semantics for the DeGLA loss.

Text features are [B positives; B*K negatives] on every rank; gathered, they become the layout of
one big batch, [every rank's positives; every rank's negatives] (:func:`gather_text`). With
``local_loss`` each rank's own samples are the anchors (labels offset by rank) and TGC and
distillation use the local batch; without it every rank computes the whole batch's loss.
``gather_with_grad`` gathers with autograd, so gradients reach the rank that owns each feature.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from .spec import LossSpec


class _AllGatherWithGrad(torch.autograd.Function):
    """All ranks' ``t`` concatenated along dim 0; the local slice's gradient is the sum over ranks.

    Our own rather than ``torch.distributed.nn.all_gather``: that module binds ``group.WORLD`` into
    its default arguments when first imported, so importing it after ``init_process_group`` keeps
    the default group alive past ``destroy_process_group``, and gloo's worker threads then meet the
    interpreter's shutdown (an occasional SIGABRT of a finished rank). It is also deprecated.
    """

    @staticmethod
    def forward(ctx, t, rank: int, world_size: int):
        # The list forms: the same calls on every torch we support (the tensor forms are
        # deprecated on newer ones and their replacements absent on older ones).
        ctx.rank, ctx.world_size = rank, world_size
        parts = [torch.empty_like(t) for _ in range(world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        if dist.get_backend() == "nccl":
            local = grad.new_empty((grad.shape[0] // ctx.world_size, *grad.shape[1:]))
            dist.reduce_scatter(local, [c.contiguous() for c in grad.chunk(ctx.world_size, dim=0)])
            return local, None, None
        total = grad.clone(memory_format=torch.contiguous_format)  # gloo has no reduce-scatter
        dist.all_reduce(total)
        return total.chunk(ctx.world_size, dim=0)[ctx.rank], None, None


def gather(t: torch.Tensor, rank: int, world_size: int, with_grad: bool) -> torch.Tensor:
    """All ranks' ``t`` concatenated along dim 0. Without grad, the local slice keeps its graph."""
    if world_size == 1:
        return t
    if with_grad:
        return _AllGatherWithGrad.apply(t, rank, world_size)
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t.detach().contiguous())
    parts[rank] = t
    return torch.cat(parts, dim=0)


def gather_text(text, batch, rank, world_size, with_grad):
    """Gather [T; N] from every rank as [T_all; N_all], the layout of one big batch."""
    if world_size == 1:
        return text
    positives = gather(text[:batch], rank, world_size, with_grad)
    if text.shape[0] == batch:  # plain CLIP: no negatives to gather
        return positives
    negatives = gather(text[batch:], rank, world_size, with_grad)
    return torch.cat([positives, negatives], dim=0)


class GlobalBatch(NamedTuple):
    """The global contrast's operands: anchor rows against every rank's columns."""

    image_rows: torch.Tensor  # image-to-text anchors: this rank's images (local_loss) or every rank's
    text_all: torch.Tensor    # every rank's captions, [positives; negatives]
    image_all: torch.Tensor   # every rank's images (text-to-image columns)
    text_rows: torch.Tensor   # text-to-image anchors: the positive captions of image_rows
    row_offset: int           # the index of image_rows[0] among every rank's samples


class LocalBatch(NamedTuple):
    """The samples TGC and distillation run on; teacher features None where not read."""

    text: torch.Tensor
    teacher_text: torch.Tensor | None
    image: torch.Tensor
    teacher_image: torch.Tensor | None


def batches(spec: LossSpec, image, text, teacher_image, teacher_text, rank: int,
             world_size: int) -> tuple[GlobalBatch, LocalBatch]:
    """This rank's operands: with ``local_loss`` (or one process) its own samples are the anchors
    and the local batch; otherwise every rank's, so each rank computes the whole batch's loss."""
    batch = image.shape[0]
    image_all = gather(image, rank, world_size, spec.gather_with_grad)
    text_all = gather_text(text, batch, rank, world_size, spec.gather_with_grad)
    if spec.local_loss or world_size == 1:
        return (GlobalBatch(image, text_all, image_all, text[:batch], rank * batch),
                LocalBatch(text, teacher_text, image, teacher_image))
    teachers = (None, None)
    if spec.needs_teacher:  # teacher features carry no gradient: a plain gather suffices
        teachers = (gather(teacher_image.detach(), rank, world_size, False),
                    gather_text(teacher_text.detach(), batch, rank, world_size, False))
    return (GlobalBatch(image_all, text_all, image_all, text_all[: batch * world_size], 0),
            LocalBatch(text_all, teachers[1], image_all, teachers[0]))
