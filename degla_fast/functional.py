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
autograd node; :mod:`degla_fast.fused_loss`), ``triton`` (fully fused tiled kernels, O((R + C) D)
memory; CUDA, or CPU under TRITON_INTERPRET=1), ``auto`` (measured or modelled per device and
size; the rule lives in :mod:`degla_fast.backends`).

``precision`` is the dot precision of fp32 inputs on a GPU: ``"tf32"`` (default, tensor cores,
about 1e-3 relative error per dot product) or ``"ieee"`` (exact fp32 products, no tensor cores).
bf16/fp16 inputs always use tensor cores; every backend accumulates in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import reference
from .backends import LOSS_BACKENDS, resolve_loss_backend
from .errors import ConfigError, NonFiniteError, ShapeError
from .fused_loss import DEFAULT_CHUNK_BYTES, FUSED, LossTerms
from .kernels.configs import LOCAL_MAX_NEGATIVES
from .kernels.configs import PRECISIONS as DOT_PRECISIONS
from .loss_ops import GlobalContrast, TorchGlobalImpl, acc_dtype, distill_sum, group_columns, torch_local_terms

# DOT_PRECISIONS: the dot precisions of fp32 inputs (the loss's ``precision``; not the training
# precision of :mod:`degla_fast.precision`, which picks an autocast dtype). LOCAL_MAX_NEGATIVES:
# the local Triton kernel holds all K negatives of a sample at once; with larger K (or with
# ``local_loss`` across ranks) the fused backends leave TGC and distillation to plain torch,
# O(B*K*D) either way.


@dataclass
class LossOutput:
    """The weighted total and its unweighted parts, all scalar tensors."""

    total: torch.Tensor
    clip: torch.Tensor
    igc: torch.Tensor
    tgc: torch.Tensor
    distill: torch.Tensor

    def named(self, igc_weight: float, tgc_weight: float, distill_weight: float,
              num_negatives: int) -> dict[str, torch.Tensor]:
        """open_clip's form (``output_dict=True``; open_clip_train trains on the sum of the values
        and logs each by name): ``contrastive_loss`` (the global term), then the weighted
        ``igc_loss``, ``tgc_loss``, ``distill_loss`` that exist (K > 0) with a non-zero weight.
        The values sum to ``total``."""
        named = {"contrastive_loss": self.clip}
        for name, weight, term in (("igc_loss", igc_weight, self.igc), ("tgc_loss", tgc_weight, self.tgc),
                                   ("distill_loss", distill_weight, self.distill)):
            if weight != 0 and num_negatives > 0:
                named[name] = weight * term
        return named

    def items(self) -> dict[str, float]:
        """Plain floats for logging (synchronises with the device)."""
        return {name: float(getattr(self, name).detach()) for name in ("total", "clip", "igc", "tgc", "distill")}


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_dot_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`DOT_PRECISIONS`, else a ConfigError naming the choices."""
    if precision not in DOT_PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(DOT_PRECISIONS)}; got {precision!r}")
    return precision


def _resolve_for(backend, image_features, text_features, local_loss, world_size, precision, chunk_bytes) -> str:
    """The backend for one call: ``precision`` checked, ``auto`` sized by this rank's
    image-to-text logits (its anchor rows times every rank's caption rows)."""
    check_dot_precision(precision)
    anchors = image_features.shape[0] * (1 if local_loss else world_size)
    return resolve_loss_backend(backend, image_features.device, rows=anchors,
                                columns=text_features.shape[0] * world_size, dtype=image_features.dtype,
                                chunk_bytes=chunk_bytes)


def needs_teacher(num_negatives: int, tgc_weight: float, distill_weight: float) -> bool:
    """Whether the loss reads teacher features: TGC's positives or the distillation target.
    Plain CLIP (K = 0) reads none: without negatives DeGLA's extra terms are all absent."""
    return num_negatives > 0 and (tgc_weight != 0 or distill_weight != 0)


def _validate(image, text, logit_scale, teacher_image, teacher_text, num_negatives: int, need_teacher: bool,
              check_finite: bool) -> None:
    if num_negatives < 0:
        raise ShapeError(f"num_negatives (K) must be >= 0, got {num_negatives}")
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


def _global_terms(backend, image_rows, text_all, image_all, text_rows, logit_scale, num_negatives, row_offset,
                  with_igc, precision, chunk_bytes):
    """(clip, igc) for anchor rows against all columns, with the ``reference`` or ``torch`` backend."""
    if backend == "reference":
        clip = reference.global_loss(image_rows, text_all, image_all, text_rows, logit_scale,
                                     num_negatives=num_negatives, row_offset=row_offset)
        igc = (reference.igc_loss(image_rows, text_all, logit_scale, num_negatives=num_negatives, row_offset=row_offset)
               if with_igc else clip.new_zeros(()))
        return clip, igc
    i2t, igc = GlobalContrast.apply(image_rows, text_all, logit_scale, row_offset, num_negatives, with_igc,
                                    TorchGlobalImpl, precision, chunk_bytes)
    t2i, _ = GlobalContrast.apply(text_rows, image_all, logit_scale, row_offset, 0, False, TorchGlobalImpl, precision,
                                  chunk_bytes)
    return (i2t + t2i) / 2, igc


def _local_terms(backend, text, teacher_text, image, teacher_image, num_negatives, tgc_scale, official, with_tgc,
                 with_distill):
    """(tgc, distill) on one batch of samples, with the ``reference`` backend or plain torch."""
    if backend == "reference":
        zero = text.new_zeros((), dtype=torch.float32)
        tgc = (reference.tgc_loss(text, teacher_text.detach(), num_negatives=num_negatives, tgc_scale=tgc_scale,
                                  official_indexing=official) if with_tgc else zero)
        distill = (reference.distill_loss(image, text, teacher_image.detach(), teacher_text.detach())
                   if with_distill else zero)
        return tgc, distill
    teacher_text = teacher_text.detach() if teacher_text is not None else None
    teacher_image = teacher_image.detach() if teacher_image is not None else None
    return torch_local_terms(text, teacher_text, image, teacher_image, num_negatives, tgc_scale, official, with_tgc,
                             with_distill)


def degla_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
               teacher_image_features: torch.Tensor | None = None, teacher_text_features: torch.Tensor | None = None,
               *, num_negatives: int = 4, igc_weight: float = 0.1, tgc_weight: float = 0.1,
               distill_weight: float = 0.005, tgc_scale: float = 10.0, backend: str = "auto",
               official_tgc_indexing: bool = False, local_loss: bool = False, gather_with_grad: bool = False,
               rank: int = 0, world_size: int = 1, precision: str = "tf32", check_finite: bool = True,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES, logit_bias: torch.Tensor | None = None,
               output_dict: bool = False) -> LossOutput | dict[str, torch.Tensor]:
    """The DeGLA loss: ``clip + igc_weight*igc + tgc_weight*tgc + distill_weight*distill``.

    Returns a :class:`LossOutput`, or with ``output_dict=True`` (open_clip's convention) the
    weighted terms by name, which sum to the total: ``contrastive_loss`` (open_clip's name for
    the global term), then ``igc_loss``, ``tgc_loss``, ``distill_loss`` for the terms whose
    weight is not 0 (none with K = 0, where they do not exist). ``logit_bias`` (a SigLIP
    model's) is refused: this loss is softmax-based.

    ``num_negatives=0``: plain CLIP (open_clip's ClipLoss) through the same backends; text
    features are [B, D], IGC, TGC and distillation are zero whatever their weights, and the
    teacher features are not read (see :func:`needs_teacher`).

    ``check_finite``: the ``torch`` and ``reference`` backends raise NonFiniteError on NaN/Inf
    inputs (a host read per input); a trainer that checks the loss on the device itself passes
    False. ``chunk_bytes``: the ``gemm`` backend's memory for one chunk of logits and their
    gradient (:mod:`degla_fast.gemm_loss`; ``auto`` also sizes its choice by it).

    Distributed (open_clip's ClipLoss semantics): features of all ranks are gathered. With
    ``local_loss`` each rank's images (and positive captions) are anchors against every rank's
    captions, negatives (and images), labels offset by rank, and TGC/distillation use the
    local batch; without it every term is computed on the whole gathered batch, so each rank
    gets the single-process loss of the concatenated batch. ``gather_with_grad`` gathers with
    autograd (gradients reach the rank that owns each feature). ``precision``: see the module doc.
    """
    if logit_bias is not None:
        raise ConfigError("logit_bias: the DeGLA loss is softmax-based; SigLIP's sigmoid loss (a model with a "
                          "logit_bias) is not supported")
    need_teacher = needs_teacher(num_negatives, tgc_weight, distill_weight)
    backend = _resolve_for(backend, image_features, text_features, local_loss, world_size, precision, chunk_bytes)
    _validate(image_features, text_features, logit_scale, teacher_image_features, teacher_text_features,
              num_negatives, need_teacher, check_finite=check_finite and backend not in ("triton", "gemm"))
    batch = image_features.shape[0]
    with_igc = igc_weight != 0 and num_negatives > 0

    image_all = _gather(image_features, rank, world_size, gather_with_grad)
    text_all = _gather_text(text_features, batch, rank, world_size, gather_with_grad)
    if local_loss or world_size == 1:
        image_rows, text_rows, row_offset = image_features, text_features[:batch], rank * batch
        local = (text_features, teacher_text_features, image_features, teacher_image_features)
    else:
        image_rows, text_rows, row_offset = image_all, text_all[: batch * world_size], 0
        teachers = [None, None]
        if need_teacher:  # teacher features carry no gradient: a plain gather suffices
            teachers = [_gather(teacher_image_features.detach(), rank, world_size, False),
                        _gather_text(teacher_text_features.detach(), batch, rank, world_size, False)]
        local = (text_all, teachers[1], image_all, teachers[0])

    with_tgc, with_distill = need_teacher and tgc_weight != 0, need_teacher and distill_weight != 0
    if backend in FUSED:
        out = _fused(FUSED[backend], image_rows, text_all, image_all, text_rows, logit_scale, local,
                     num_negatives=num_negatives, weights=(igc_weight, tgc_weight, distill_weight),
                     row_offset=row_offset, with_igc=with_igc, with_tgc=with_tgc, with_distill=with_distill,
                     tgc_scale=tgc_scale, official=official_tgc_indexing, chunk_bytes=chunk_bytes,
                     precision=precision)
    else:
        clip, igc = _global_terms(backend, image_rows, text_all, image_all, text_rows, logit_scale, num_negatives,
                                  row_offset, with_igc, precision, chunk_bytes)
        tgc, distill = _local_terms(backend, *local, num_negatives, tgc_scale, official_tgc_indexing, with_tgc,
                                    with_distill)
        total = clip + igc_weight * igc + tgc_weight * tgc + distill_weight * distill
        out = LossOutput(total=total, clip=clip, igc=igc, tgc=tgc, distill=distill)
    return out.named(igc_weight, tgc_weight, distill_weight, num_negatives) if output_dict else out


def _fused_input(t: torch.Tensor | None) -> torch.Tensor | None:
    """Contiguous rows; fp64 computed in fp32 (the kernels are compiled for 32- and 16-bit)."""
    if t is None:
        return None
    return (t.float() if t.dtype == torch.float64 else t).contiguous()


def _fused(function, image_rows, text_all, image_all, text_rows, scale, local, *, num_negatives, weights, row_offset,
           with_igc, with_tgc, with_distill, tgc_scale, official, chunk_bytes, precision) -> LossOutput:
    """The loss through a :mod:`~degla_fast.fused_loss` Function: one node when the rows are the
    whole batch (world size 1, or ``local_loss=False``) and K <= 8; with ``local_loss`` across
    ranks, text-to-image is a second, 1/(1+K)-sized call and TGC/distillation the local batch's."""
    w_igc, w_tgc, w_distill = weights
    text, teacher_text, image, teacher_image = local
    square = image_rows.shape[0] == image_all.shape[0]
    fused = square and (with_tgc or with_distill) and num_negatives <= LOCAL_MAX_NEGATIVES
    common = dict(row_offset=row_offset, tgc_scale=tgc_scale, official=official, chunk_bytes=chunk_bytes,
                  precision=precision)
    terms = LossTerms(num_negatives, weights=(1.0 if square else 0.5, w_igc if with_igc else 0.0,
                                              w_tgc if fused else 0.0, w_distill if fused else 0.0),
                      with_igc=with_igc, with_cols=square, local=fused, **common)
    teachers = (_fused_input(teacher_image.detach()), _fused_input(teacher_text.detach())) if fused else (None, None)
    dtype = image_rows.dtype
    total, clip, igc, tgc, distill = (t.to(dtype) if dtype == torch.float64 else t for t in function.apply(
        _fused_input(image_rows), _fused_input(text_all), scale, *teachers, terms))
    if not square:  # text-to-image: this rank's captions against every rank's images
        t2i_total, t2i_ce, *_ = function.apply(_fused_input(text_rows), _fused_input(image_all), scale, None, None,
                                               LossTerms(0, weights=(0.5, 0.0, 0.0, 0.0), with_cols=False, **common))
        total, clip = total + t2i_total.to(total.dtype), (clip + t2i_ce.to(clip.dtype)) / 2
    if not fused and (with_tgc or with_distill):
        tgc, distill = _local_terms("torch", text, teacher_text, image, teacher_image, num_negatives, tgc_scale,
                                    official, with_tgc, with_distill)
        total = total + w_tgc * tgc + w_distill * distill
    return LossOutput(total=total, clip=clip, igc=igc, tgc=tgc, distill=distill)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, *,
              num_negatives: int = 0, backend: str = "auto", local_loss: bool = False, gather_with_grad: bool = False,
              rank: int = 0, world_size: int = 1, precision: str = "tf32", check_finite: bool = True) -> torch.Tensor:
    """The global contrastive loss alone (NegCLIP when K >= 1, plain CLIP when K = 0): the
    ``clip`` term of :func:`degla_loss` with every other weight 0.

    image_features [B, D], text_features [B*(1+K), D] -> scalar ``(CE_i2t + CE_t2i) / 2``.
    """
    return degla_loss(image_features, text_features, logit_scale, num_negatives=num_negatives, igc_weight=0.0,
                      tgc_weight=0.0, distill_weight=0.0, backend=backend, local_loss=local_loss,
                      gather_with_grad=gather_with_grad, rank=rank, world_size=world_size, precision=precision,
                      check_finite=check_finite).clip


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
