"""Functional forms of the DeGLA loss and its pieces (method doc, section 3).

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

``dot_precision`` is the dot precision of fp32 inputs on a GPU: ``"tf32"`` (default, tensor cores,
about 1e-3 relative error per dot product) or ``"ieee"`` (exact fp32 products, no tensor cores).
bf16/fp16 inputs always use tensor cores; every backend accumulates in fp32. (Not the trainer's
``precision``, the autocast mode of :mod:`degla_fast.precision`.)
"""
from __future__ import annotations

import torch

from ..errors import ShapeError
from . import torch_backend
from .dispatch import LossOutput, check_features, compute
from .spec import DEFAULT_CHUNK_BYTES, LossSpec, check_place


def degla_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
               teacher_image_features: torch.Tensor | None = None, teacher_text_features: torch.Tensor | None = None,
               *, num_negatives: int = 4, igc_weight: float = 0.1, tgc_weight: float = 0.1,
               distill_weight: float = 0.005, tgc_scale: float = 10.0, backend: str = "auto",
               official_tgc_indexing: bool = False, local_loss: bool = False, gather_with_grad: bool = False,
               rank: int = 0, world_size: int = 1, dot_precision: str = "tf32", check_finite: bool = True,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES, logit_bias: torch.Tensor | None = None,
               output_dict: bool = False) -> LossOutput | dict[str, torch.Tensor]:
    """The DeGLA loss: ``clip + igc_weight*igc + tgc_weight*tgc + distill_weight*distill``.

    Returns a :class:`~degla_fast.loss.LossOutput`, or with ``output_dict=True`` (open_clip's
    convention) the weighted terms by name, which sum to the total: ``contrastive_loss``
    (open_clip's name for the global term), then ``igc_loss``, ``tgc_loss``, ``distill_loss`` for
    the terms whose weight is not 0 (none with K = 0, where they do not exist). ``logit_bias`` (a
    SigLIP model's) is refused: this loss is softmax-based.

    The keywords other than ``rank``, ``world_size``, ``logit_bias`` and ``output_dict`` are the
    fields of :class:`~degla_fast.loss.LossSpec` (documented there, checked when it is built: a
    one-line ConfigError); :class:`~degla_fast.loss.DeGLALoss` holds one spec for many calls.

    ``num_negatives=0``: plain CLIP (open_clip's ClipLoss) through the same backends; text
    features are [B, D], IGC, TGC and distillation are zero whatever their weights, and the
    teacher features are not read (see :attr:`LossSpec.needs_teacher`).

    ``check_finite``: the ``torch`` and ``reference`` backends raise NonFiniteError on NaN/Inf
    inputs (a host read per input); a trainer that checks the loss on the device itself passes
    False. ``chunk_bytes``: the logits the fused backends may keep for the backward (``triton``:
    its 16-bit logits, all or none; ``gemm``: one chunk of fp32 logits and their gradient; see
    :mod:`degla_fast.loss.fused`), beyond which they recompute; ``auto`` reports it.

    Distributed (open_clip's ClipLoss semantics, :mod:`degla_fast.loss.gather`): features of all
    ranks are gathered. With ``local_loss`` each rank's images (and positive captions) are anchors
    against every rank's captions, negatives (and images), labels offset by rank, and
    TGC/distillation use the local batch; without it every term is computed on the whole gathered
    batch, so each rank gets the single-process loss of the concatenated batch.
    ``gather_with_grad`` gathers with autograd (gradients reach the rank that owns each feature).
    """
    spec = LossSpec(num_negatives=num_negatives, igc_weight=igc_weight, tgc_weight=tgc_weight,
                    distill_weight=distill_weight, tgc_scale=tgc_scale, backend=backend,
                    official_tgc_indexing=official_tgc_indexing, local_loss=local_loss,
                    gather_with_grad=gather_with_grad, dot_precision=dot_precision, check_finite=check_finite,
                    chunk_bytes=chunk_bytes)
    check_place(rank, world_size)
    return compute(spec, image_features, text_features, logit_scale, teacher_image_features, teacher_text_features,
                   rank=rank, world_size=world_size, logit_bias=logit_bias, output_dict=output_dict)


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
    spec = LossSpec(num_negatives=num_negatives)
    batch = check_features(spec, image_features, text_features, logit_scale, teacher=False)
    columns = torch_backend.group_columns(batch, 0, num_negatives, batch, image_features.device)
    acc = torch_backend.acc_dtype(text_features)
    candidates = text_features[columns].to(acc)                       # [B, 1+K, D]
    logits = logit_scale.to(acc) * torch.einsum("bd,bkd->bk", image_features.to(acc), candidates)
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def tgc_loss(text_features: torch.Tensor, teacher_text_features: torch.Tensor, *, num_negatives: int,
             tgc_scale: float = 10.0, official_indexing: bool = False) -> torch.Tensor:
    """Text-grounded contrast alone: student caption vs teacher caption and its K negatives (mean CE)."""
    spec = LossSpec(num_negatives=num_negatives, tgc_scale=tgc_scale, official_tgc_indexing=official_indexing)
    if num_negatives < 1 or text_features.dim() != 2 or text_features.shape[0] % (1 + num_negatives):
        raise ShapeError(f"text_features rows must be B*(1+K) with K >= 1; got {list(text_features.shape)} and "
                         f"K={num_negatives}")
    batch = text_features.shape[0] // (1 + num_negatives)
    dummy = text_features.new_zeros(batch, text_features.shape[1])  # stands in for the images TGC does not read
    check_features(spec, dummy, text_features, dummy.new_ones(()), dummy, teacher_text_features, teacher=True)
    return torch_backend.local_terms(text_features, teacher_text_features.detach(), dummy, dummy, num_negatives,
                                     tgc_scale, official_indexing, True, False)[0]


def distill_loss(image_features: torch.Tensor, text_features: torch.Tensor, teacher_image_features: torch.Tensor,
                 teacher_text_features: torch.Tensor) -> torch.Tensor:
    """Self-distillation alone: sum of squared differences to the teacher over images and all captions."""
    for name, student, teacher in (("image", image_features, teacher_image_features),
                                   ("text", text_features, teacher_text_features)):
        if student.shape != teacher.shape:
            raise ShapeError(f"teacher_{name}_features {list(teacher.shape)} must match {name}_features "
                             f"{list(student.shape)}")
    return torch_backend.distill_sum(image_features, text_features, teacher_image_features.detach(),
                                     teacher_text_features.detach())
