"""Functional form of the DeGLA loss and its pieces (method doc, section 3).

Inputs are features as the model returns them (L2-normalised; nothing is renormalised):

* ``image_features`` [B, D]
* ``text_features`` [B*(1+K), D]: B positive captions, then B*K negatives, sample-major
  (rows ``B + i*K .. B + i*K + K-1`` are the negatives of sample i); K = 0 is plain CLIP
  ([B, D] captions, the same kernels with an empty negative block; IGC, TGC and
  distillation are zero and no teacher is read)
* ``logit_scale``: scalar tensor, the multiplier with ``exp`` already applied (open_clip)
* teacher features: same shapes, from the EMA teacher; they never receive gradients.

open_clip's calling convention works as it is (``loss(**model_out, output_dict=True)``, as
``open_clip_train`` calls its losses): the keywords ``image_features``, ``text_features``,
``logit_scale``, a ``logit_bias`` that must be None (SigLIP's sigmoid loss is another loss), and
``output_dict=True`` for the named weighted terms, which sum to the total.

Backends: ``reference`` (full matrices, the release's structure), ``torch`` (row-blocked,
recomputed in backward), ``gemm`` (cuBLAS GEMMs over column chunks with Triton epilogues, one
autograd node; :mod:`degla_fast.fused_loss`), ``triton`` (tiled kernels with the statistics and
the gradient inside the GEMMs, 16-bit logits kept where they fit in ``chunk_bytes``, else
recomputed in O((R + C) D) memory; CUDA, or CPU under TRITON_INTERPRET=1), ``auto`` (measured
or modelled per device and size; the rule lives in :mod:`degla_fast.backends`).

``dot_precision`` is the dot precision of fp32 inputs on a GPU: ``"tf32"`` (default, tensor cores,
about 1e-3 relative error per dot product) or ``"ieee"`` (exact fp32 products, no tensor cores).
bf16/fp16 inputs always use tensor cores; every backend accumulates in fp32. (Not the trainer's
``precision``, the autocast mode of :mod:`degla_fast.precision`.)

The options are one :class:`~degla_fast.loss_spec.LossSpec`; :func:`degla_loss` builds it from
its keywords, :func:`spec_loss` takes it whole (as :class:`~degla_fast.losses.DeGLALoss` does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import reference
from .backends import resolve_loss_backend
from .errors import ConfigError, NonFiniteError, ShapeError
from .fused_loss import DEFAULT_CHUNK_BYTES, FUSED, LossTerms
from .kernels.configs import LOCAL_MAX_NEGATIVES
from .loss_ops import GlobalContrast, acc_dtype, distill_sum, group_columns, torch_local_terms
from .loss_spec import LossSpec

# LOCAL_MAX_NEGATIVES: the local Triton kernel holds all K negatives of a sample at once; with
# larger K (or with ``local_loss`` across ranks) the fused backends leave TGC and distillation to
# plain torch, O(B*K*D) either way.


@dataclass
class LossOutput:
    """The weighted total and its unweighted parts, all scalar tensors."""

    total: torch.Tensor
    clip: torch.Tensor
    igc: torch.Tensor
    tgc: torch.Tensor
    distill: torch.Tensor

    def named(self, spec: LossSpec) -> dict[str, torch.Tensor]:
        """open_clip's form (``output_dict=True``; open_clip_train trains on the sum of the values
        and logs each by name): ``contrastive_loss`` (the global term), then the weighted
        ``igc_loss``, ``tgc_loss``, ``distill_loss`` that exist (K > 0) with a non-zero weight.
        The values sum to ``total``."""
        named = {"contrastive_loss": self.clip}
        for name, on, weight, term in (("igc_loss", spec.with_igc, spec.igc_weight, self.igc),
                                       ("tgc_loss", spec.with_tgc, spec.tgc_weight, self.tgc),
                                       ("distill_loss", spec.with_distill, spec.distill_weight, self.distill)):
            if on:
                named[name] = weight * term
        return named

    def items(self) -> dict[str, float]:
        """Plain floats for logging (synchronises with the device)."""
        return {name: float(getattr(self, name).detach()) for name in ("total", "clip", "igc", "tgc", "distill")}


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _resolve_for(spec: LossSpec, image_features, text_features, world_size: int) -> str:
    """The backend for one call: ``auto`` sized by this rank's image-to-text logits (its anchor
    rows times every rank's caption rows)."""
    anchors = image_features.shape[0] * (1 if spec.local_loss else world_size)
    return resolve_loss_backend(spec.backend, image_features.device, rows=anchors,
                                columns=text_features.shape[0] * world_size,
                                dtype=torch.promote_types(image_features.dtype, text_features.dtype),
                                chunk_bytes=spec.chunk_bytes)


def _check_negatives(num_negatives: int) -> None:
    """K < 0 as a ShapeError: the functional forms name K with the shapes it sets."""
    if num_negatives < 0:
        raise ShapeError(f"num_negatives (K) must be >= 0, got {num_negatives}")


def _validate(image, text, logit_scale, teacher_image, teacher_text, num_negatives: int, need_teacher: bool,
              check_finite: bool) -> None:
    _check_negatives(num_negatives)
    if image.dim() != 2:
        raise ShapeError(f"image_features must be [B, D], got {_shape(image)}")
    if text.dim() != 2:
        raise ShapeError(f"text_features must be [B*(1+K), D], got {_shape(text)}")
    batch, width = image.shape
    expected_rows = batch * (1 + num_negatives)
    if text.shape[0] != expected_rows:
        raise ShapeError(
            f"text_features must have B*(1+K) = {batch}*(1+{num_negatives}) = {expected_rows} rows "
            f"(B positives, then B*K negatives), got {_shape(text)}")
    if text.shape[1] != width:
        raise ShapeError(f"feature widths differ: image_features {_shape(image)}, text_features {_shape(text)}")
    if logit_scale.numel() != 1:
        raise ShapeError(f"logit_scale must be a scalar tensor, got {_shape(logit_scale)}")
    named = {"image_features": image, "text_features": text, "logit_scale": logit_scale}
    if need_teacher:
        if teacher_image is None or teacher_text is None:
            raise ShapeError("teacher_image_features and teacher_text_features are required when tgc_weight or "
                             "distill_weight is non-zero")
        for name, student, teacher in (("image", image, teacher_image), ("text", text, teacher_text)):
            if teacher.shape != student.shape:
                raise ShapeError(f"teacher_{name}_features {_shape(teacher)} must match {name}_features {_shape(student)}")
        named.update(teacher_image_features=teacher_image, teacher_text_features=teacher_text)
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        raise ShapeError("inputs are on different devices: " + ", ".join(f"{n} on {d}" for n, d in devices.items()))
    if check_finite:
        for name, t in named.items():
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"{name} {_shape(t)} contains NaN or Inf")


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


def _gather(t: torch.Tensor, rank: int, world_size: int, with_grad: bool) -> torch.Tensor:
    """All ranks' ``t`` concatenated along dim 0. Without grad, the local slice keeps its graph."""
    if world_size == 1:
        return t
    if with_grad:
        return _AllGatherWithGrad.apply(t, rank, world_size)
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t.detach().contiguous())
    parts[rank] = t
    return torch.cat(parts, dim=0)


def _gather_text(text, batch, rank, world_size, with_grad):
    """Gather [T; N] from every rank as [T_all; N_all], the layout of one big batch."""
    if world_size == 1:
        return text
    positives = _gather(text[:batch], rank, world_size, with_grad)
    if text.shape[0] == batch:  # plain CLIP: no negatives to gather
        return positives
    negatives = _gather(text[batch:], rank, world_size, with_grad)
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


def _batches(spec: LossSpec, image, text, teacher_image, teacher_text, rank: int,
             world_size: int) -> tuple[GlobalBatch, LocalBatch]:
    """This rank's operands: with ``local_loss`` (or one process) its own samples are the anchors
    and the local batch; otherwise every rank's, so each rank computes the whole batch's loss."""
    batch = image.shape[0]
    image_all = _gather(image, rank, world_size, spec.gather_with_grad)
    text_all = _gather_text(text, batch, rank, world_size, spec.gather_with_grad)
    if spec.local_loss or world_size == 1:
        return (GlobalBatch(image, text_all, image_all, text[:batch], rank * batch),
                LocalBatch(text, teacher_text, image, teacher_image))
    teachers = (None, None)
    if spec.needs_teacher:  # teacher features carry no gradient: a plain gather suffices
        teachers = (_gather(teacher_image.detach(), rank, world_size, False),
                    _gather_text(teacher_text.detach(), batch, rank, world_size, False))
    return (GlobalBatch(image_all, text_all, image_all, text_all[: batch * world_size], 0),
            LocalBatch(text_all, teachers[1], image_all, teachers[0]))


def _global_terms(backend: str, spec: LossSpec, rows: GlobalBatch, scale):
    """(clip, igc) for anchor rows against all columns, with the ``reference`` or ``torch`` backend."""
    k, offset = spec.num_negatives, rows.row_offset
    if backend == "reference":
        clip = reference.global_loss(rows.image_rows, rows.text_all, rows.image_all, rows.text_rows, scale,
                                     num_negatives=k, row_offset=offset)
        igc = (reference.igc_loss(rows.image_rows, rows.text_all, scale, num_negatives=k, row_offset=offset)
               if spec.with_igc else clip.new_zeros(()))
        return clip, igc
    options = (spec.dot_precision, spec.chunk_bytes)
    i2t, igc = GlobalContrast.apply(rows.image_rows, rows.text_all, scale, offset, k, spec.with_igc, *options)
    t2i, _ = GlobalContrast.apply(rows.text_rows, rows.image_all, scale, offset, 0, False, *options)
    return (i2t + t2i) / 2, igc


def _local_terms(backend: str, spec: LossSpec, local: LocalBatch):
    """(tgc, distill) on one batch of samples, with the ``reference`` backend or plain torch."""
    teacher_text = local.teacher_text.detach() if local.teacher_text is not None else None
    teacher_image = local.teacher_image.detach() if local.teacher_image is not None else None
    if backend == "reference":
        zero = local.text.new_zeros((), dtype=torch.float32)
        tgc = (reference.tgc_loss(local.text, teacher_text, num_negatives=spec.num_negatives,
                                  tgc_scale=spec.tgc_scale, official_indexing=spec.official_tgc_indexing)
               if spec.with_tgc else zero)
        distill = (reference.distill_loss(local.image, local.text, teacher_image, teacher_text)
                   if spec.with_distill else zero)
        return tgc, distill
    return torch_local_terms(local.text, teacher_text, local.image, teacher_image, spec.num_negatives,
                             spec.tgc_scale, spec.official_tgc_indexing, spec.with_tgc, spec.with_distill)


def degla_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
               teacher_image_features: torch.Tensor | None = None, teacher_text_features: torch.Tensor | None = None,
               *, num_negatives: int = 4, igc_weight: float = 0.1, tgc_weight: float = 0.1,
               distill_weight: float = 0.005, tgc_scale: float = 10.0, backend: str = "auto",
               official_tgc_indexing: bool = False, local_loss: bool = False, gather_with_grad: bool = False,
               rank: int = 0, world_size: int = 1, dot_precision: str = "tf32", check_finite: bool = True,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES, logit_bias: torch.Tensor | None = None,
               output_dict: bool = False) -> LossOutput | dict[str, torch.Tensor]:
    """The DeGLA loss: ``clip + igc_weight*igc + tgc_weight*tgc + distill_weight*distill``.

    Returns a :class:`LossOutput`, or with ``output_dict=True`` (open_clip's convention) the
    weighted terms by name, which sum to the total: ``contrastive_loss`` (open_clip's name for
    the global term), then ``igc_loss``, ``tgc_loss``, ``distill_loss`` for the terms whose
    weight is not 0 (none with K = 0, where they do not exist). ``logit_bias`` (a SigLIP
    model's) is refused: this loss is softmax-based.

    The keywords other than ``rank``, ``world_size``, ``logit_bias`` and ``output_dict`` are the
    fields of :class:`~degla_fast.loss_spec.LossSpec` (documented there); this builds one and
    calls :func:`spec_loss`.

    ``num_negatives=0``: plain CLIP (open_clip's ClipLoss) through the same backends; text
    features are [B, D], IGC, TGC and distillation are zero whatever their weights, and the
    teacher features are not read (see :attr:`LossSpec.needs_teacher`).

    ``check_finite``: the ``torch`` and ``reference`` backends raise NonFiniteError on NaN/Inf
    inputs (a host read per input); a trainer that checks the loss on the device itself passes
    False. ``chunk_bytes``: the logits the fused backends may keep for the backward (``triton``:
    its 16-bit logits, all or none; ``gemm``: one chunk of fp32 logits and their gradient; see
    :mod:`degla_fast.fused_loss`), beyond which they recompute; ``auto`` reports it.

    Distributed (open_clip's ClipLoss semantics): features of all ranks are gathered. With
    ``local_loss`` each rank's images (and positive captions) are anchors against every rank's
    captions, negatives (and images), labels offset by rank, and TGC/distillation use the
    local batch; without it every term is computed on the whole gathered batch, so each rank
    gets the single-process loss of the concatenated batch. ``gather_with_grad`` gathers with
    autograd (gradients reach the rank that owns each feature). ``dot_precision``: see the module doc.
    """
    _check_negatives(num_negatives)
    spec = LossSpec(num_negatives=num_negatives, igc_weight=igc_weight, tgc_weight=tgc_weight,
                    distill_weight=distill_weight, tgc_scale=tgc_scale, backend=backend,
                    official_tgc_indexing=official_tgc_indexing, local_loss=local_loss,
                    gather_with_grad=gather_with_grad, dot_precision=dot_precision, check_finite=check_finite,
                    chunk_bytes=chunk_bytes)
    return spec_loss(spec, image_features, text_features, logit_scale, teacher_image_features, teacher_text_features,
                     rank=rank, world_size=world_size, logit_bias=logit_bias, output_dict=output_dict)


def spec_loss(spec: LossSpec, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              teacher_image_features: torch.Tensor | None = None, teacher_text_features: torch.Tensor | None = None,
              *, rank: int = 0, world_size: int = 1, logit_bias: torch.Tensor | None = None,
              output_dict: bool = False) -> LossOutput | dict[str, torch.Tensor]:
    """:func:`degla_loss` with its options as one :class:`~degla_fast.loss_spec.LossSpec`."""
    if logit_bias is not None:
        raise ConfigError("logit_bias: the DeGLA loss is softmax-based; SigLIP's sigmoid loss (a model with a "
                          "logit_bias) is not supported")
    backend = _resolve_for(spec, image_features, text_features, world_size)
    _validate(image_features, text_features, logit_scale, teacher_image_features, teacher_text_features,
              spec.num_negatives, spec.needs_teacher, check_finite=spec.check_finite and backend not in FUSED)
    rows, local = _batches(spec, image_features, text_features, teacher_image_features, teacher_text_features,
                           rank, world_size)
    if backend in FUSED:
        out = _fused(FUSED[backend], spec, rows, local, logit_scale)
    else:
        clip, igc = _global_terms(backend, spec, rows, logit_scale)
        tgc, distill = _local_terms(backend, spec, local)
        total = clip + spec.igc_weight * igc + spec.tgc_weight * tgc + spec.distill_weight * distill
        out = LossOutput(total=total, clip=clip, igc=igc, tgc=tgc, distill=distill)
    return out.named(spec) if output_dict else out


def _fused_input(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Contiguous rows of one dtype: features of mixed dtypes meet the kernels in their promoted
    dtype, as the ``torch`` backend computes them (autograd casts each gradient back). fp64
    never gets here (:func:`~degla_fast.backends.resolve_loss_backend` refuses it)."""
    if t is None:
        return None
    return t.to(dtype).contiguous()


def _fused(function, spec: LossSpec, rows: GlobalBatch, local: LocalBatch, scale) -> LossOutput:
    """The loss through a :mod:`~degla_fast.fused_loss` Function: one node when the rows are the
    whole batch (world size 1, or ``local_loss=False``) and K <= 8; with ``local_loss`` across
    ranks, text-to-image is a second, 1/(1+K)-sized call and TGC/distillation the local batch's."""
    square = rows.image_rows.shape[0] == rows.image_all.shape[0]
    with_local = spec.with_tgc or spec.with_distill
    fused = square and with_local and spec.num_negatives <= LOCAL_MAX_NEGATIVES
    common = dict(row_offset=rows.row_offset, tgc_scale=spec.tgc_scale, official=spec.official_tgc_indexing,
                  chunk_bytes=spec.chunk_bytes, dot_precision=spec.dot_precision)
    weights = (1.0 if square else 0.5, spec.igc_weight if spec.with_igc else 0.0,
               spec.tgc_weight if fused else 0.0, spec.distill_weight if fused else 0.0)
    terms = LossTerms(spec.num_negatives, weights=weights, with_igc=spec.with_igc, with_cols=square, local=fused,
                      **common)
    dtype = torch.promote_types(rows.image_rows.dtype, rows.text_all.dtype)
    teachers = ((_fused_input(local.teacher_image.detach(), dtype), _fused_input(local.teacher_text.detach(), dtype))
                if fused else (None, None))
    total, clip, igc, tgc, distill = function.apply(_fused_input(rows.image_rows, dtype),
                                                    _fused_input(rows.text_all, dtype), scale, *teachers, terms)
    if not square:  # text-to-image: this rank's captions against every rank's images
        t2i_total, t2i_ce, *_ = function.apply(_fused_input(rows.text_rows, dtype),
                                               _fused_input(rows.image_all, dtype), scale, None, None,
                                               LossTerms(0, weights=(0.5, 0.0, 0.0, 0.0), with_cols=False, **common))
        total, clip = total + t2i_total.to(total.dtype), (clip + t2i_ce.to(clip.dtype)) / 2
    if not fused and with_local:
        tgc, distill = _local_terms("torch", spec, local)
        total = total + spec.tgc_weight * tgc + spec.distill_weight * distill
    return LossOutput(total=total, clip=clip, igc=igc, tgc=tgc, distill=distill)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, *,
              num_negatives: int = 0, backend: str = "auto", local_loss: bool = False, gather_with_grad: bool = False,
              rank: int = 0, world_size: int = 1, dot_precision: str = "tf32",
              check_finite: bool = True) -> torch.Tensor:
    """The global contrastive loss alone (NegCLIP when K >= 1, plain CLIP when K = 0): the
    ``clip`` term of :func:`degla_loss` with every other weight 0.

    image_features [B, D], text_features [B*(1+K), D] -> scalar ``(CE_i2t + CE_t2i) / 2``.
    """
    return degla_loss(image_features, text_features, logit_scale, num_negatives=num_negatives, igc_weight=0.0,
                      tgc_weight=0.0, distill_weight=0.0, backend=backend, local_loss=local_loss,
                      gather_with_grad=gather_with_grad, rank=rank, world_size=world_size,
                      dot_precision=dot_precision, check_finite=check_finite).clip


def igc_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, *,
             num_negatives: int) -> torch.Tensor:
    """Image-grounded contrast alone: each image over its own caption and K negatives (mean CE).

    O(B*K*D) with ordinary autograd ops; inside :func:`degla_loss` the fused backends get it
    from the global logits for free.
    """
    _validate(image_features, text_features, logit_scale, None, None, num_negatives, False, check_finite=True)
    batch = image_features.shape[0]
    columns = group_columns(batch, 0, num_negatives, batch, image_features.device)
    acc = acc_dtype(text_features)
    candidates = text_features[columns].to(acc)                       # [B, 1+K, D]
    logits = logit_scale.to(acc) * torch.einsum("bd,bkd->bk", image_features.to(acc), candidates)
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def tgc_loss(text_features: torch.Tensor, teacher_text_features: torch.Tensor, *, num_negatives: int,
             tgc_scale: float = 10.0, official_indexing: bool = False) -> torch.Tensor:
    """Text-grounded contrast alone: student caption vs teacher caption and its K negatives (mean CE)."""
    if num_negatives < 1 or text_features.shape[0] % (1 + num_negatives):
        raise ShapeError(f"text_features rows must be B*(1+K) with K >= 1; got {_shape(text_features)} and K={num_negatives}")
    if teacher_text_features.shape != text_features.shape:
        raise ShapeError(f"teacher_text_features {_shape(teacher_text_features)} must match text_features {_shape(text_features)}")
    batch = text_features.shape[0] // (1 + num_negatives)
    dummy = text_features.new_zeros(batch, text_features.shape[1])
    return torch_local_terms(text_features, teacher_text_features.detach(), dummy, dummy, num_negatives, tgc_scale,
                             official_indexing, True, False)[0]


def distill_loss(image_features: torch.Tensor, text_features: torch.Tensor, teacher_image_features: torch.Tensor,
                 teacher_text_features: torch.Tensor) -> torch.Tensor:
    """Self-distillation alone: sum of squared differences to the teacher over images and all captions."""
    for name, student, teacher in (("image", image_features, teacher_image_features),
                                   ("text", text_features, teacher_text_features)):
        if student.shape != teacher.shape:
            raise ShapeError(f"teacher_{name}_features {_shape(teacher)} must match {name}_features {_shape(student)}")
    return distill_sum(image_features, text_features, teacher_image_features.detach(), teacher_text_features.detach())
