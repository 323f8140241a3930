"""One call of the DeGLA loss: check the inputs, pick the backend, gather, run it.

:func:`compute` is the one path every public form takes (:class:`~degla_fast.loss.DeGLALoss`,
:func:`~degla_fast.loss.degla_loss`, open_clip_train's and transformers' integrations): it derives
what a call needs from the spec and the shapes once (:class:`LossPlan`) and launches the
backend's autograd Function itself, so the frames from ``DeGLALoss.forward`` to a kernel launch
are four (the module, this, the Function's forward, the kernels' launcher; tests/test_structure.py
counts them).

Backends: ``reference`` (full matrices, the release's structure), ``torch`` (row-blocked,
recomputed in backward), ``gemm`` (cuBLAS GEMMs over column chunks with Triton epilogues, one
autograd node), ``triton`` (tiled kernels with the statistics and the gradient inside the GEMMs,
16-bit logits kept where they fit in ``chunk_bytes``, else recomputed in O((R + C) D) memory;
CUDA, or CPU under TRITON_INTERPRET=1), ``auto`` (:mod:`degla_fast.loss.auto`).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import ConfigError, NonFiniteError, ShapeError
from ..kernels.configs import LOCAL_MAX_NEGATIVES
from . import reference, torch_backend
from .auto import resolve_backend
from .fused import LossTerms
from .gather import GlobalBatch, LocalBatch, batches
from .spec import LossSpec, TermWeights

# LOCAL_MAX_NEGATIVES: the local Triton kernel holds all K negatives of a sample at once; with
# larger K (or with ``local_loss`` across ranks) the fused backends leave TGC and distillation to
# plain torch, O(B*K*D) either way.

#: The fused backends' autograd Functions, imported when first used (they need Triton).
_FUSED = {"gemm": ("degla_fast.loss.gemm_backend", "GemmLoss"),
          "triton": ("degla_fast.loss.triton_backend", "TritonLoss")}


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
        ``igc_loss``, ``tgc_loss``, ``distill_loss`` whose weight in :attr:`LossSpec.weights` is
        not 0. The values sum to ``total``."""
        weights = spec.weights
        named = {"contrastive_loss": self.clip}
        for name, weight, term in (("igc_loss", weights.igc, self.igc), ("tgc_loss", weights.tgc, self.tgc),
                                   ("distill_loss", weights.distill, self.distill)):
            if weight:
                named[name] = weight * term
        return named

    def items(self) -> dict[str, float]:
        """Plain floats for logging (synchronises with the device)."""
        return {name: float(getattr(self, name).detach()) for name in ("total", "clip", "igc", "tgc", "distill")}


class LossPlan(NamedTuple):
    """What one call runs, derived once from the spec, the shapes and the process's place."""

    spec: LossSpec
    backend: str
    batch: int          # B, this rank's samples
    whole_rows: bool    # the anchor rows are the whole batch (LossSpec.whole_batch_rows)
    fused_local: bool   # TGC and distillation inside the fused node (whole rows, K <= 8)

    @property
    def kernel_weights(self) -> TermWeights:
        """The weights of the fused node's ``total``: half the contrast when text-to-image is a
        call of its own, no TGC or distillation when they run outside the node."""
        w = self.spec.weights
        local = self.fused_local
        return TermWeights(1.0 if self.whole_rows else 0.5, w.igc, w.tgc if local else 0.0, w.distill if local else 0.0)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_features(spec: LossSpec, image, text, logit_scale, teacher_image=None, teacher_text=None, *,
                   teacher: bool | None = None, check_finite: bool = True) -> int:
    """B, after checking the features' shapes, devices (and values, with ``check_finite``) for
    ``spec``: one-line ShapeError / NonFiniteError naming the argument. ``teacher``: whether the
    teacher features are read (default :attr:`LossSpec.needs_teacher`)."""
    for name, t, wanted in (("image_features", image, "[B, D]"), ("text_features", text, "[B*(1+K), D]")):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ShapeError(f"{name} must be a {wanted} tensor, got "
                             f"{_shape(t) if isinstance(t, torch.Tensor) else type(t).__name__}")
    batch = spec.batch_size(text.shape[0], image.shape[0], _shape(text))
    if text.shape[1] != image.shape[1]:
        raise ShapeError(f"feature widths differ: image_features {_shape(image)}, text_features {_shape(text)}")
    if not isinstance(logit_scale, torch.Tensor) or logit_scale.numel() != 1:
        raise ShapeError(f"logit_scale must be a scalar tensor, got {getattr(logit_scale, 'shape', logit_scale)}")
    named = {"image_features": image, "text_features": text, "logit_scale": logit_scale}
    if spec.needs_teacher if teacher is None else teacher:
        if teacher_image is None or teacher_text is None:
            raise ShapeError("teacher_image_features and teacher_text_features are required when tgc_weight or "
                             "distill_weight is non-zero")
        for name, student, t in (("image", image, teacher_image), ("text", text, teacher_text)):
            if t.shape != student.shape:
                raise ShapeError(f"teacher_{name}_features {_shape(t)} must match {name}_features {_shape(student)}")
        named.update(teacher_image_features=teacher_image, teacher_text_features=teacher_text)
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        raise ShapeError("inputs are on different devices: " + ", ".join(f"{n} on {d}" for n, d in devices.items()))
    if check_finite:
        _check_finite(named)
    return batch


def _check_finite(named: dict[str, torch.Tensor]) -> None:
    for name, t in named.items():
        if t is not None and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{name} {_shape(t)} contains NaN or Inf")


def plan_call(spec: LossSpec, image, text, logit_scale, teacher_image, teacher_text, *, world_size: int,
              logit_bias=None) -> LossPlan:
    """The :class:`LossPlan` of one call, after checking its inputs (see :func:`check_features`)."""
    if logit_bias is not None:
        raise ConfigError("logit_bias: the DeGLA loss is softmax-based; SigLIP's sigmoid loss (a model with a "
                          "logit_bias) is not supported")
    batch = check_features(spec, image, text, logit_scale, teacher_image, teacher_text, check_finite=False)
    backend = resolve_backend(spec, batch=batch, device=image.device, world_size=world_size,
                              dtype=torch.promote_types(image.dtype, text.dtype)).name
    if spec.check_finite and backend not in _FUSED:  # a host read per input: the GPU backends skip it
        teachers = (teacher_image, teacher_text) if spec.needs_teacher else (None, None)
        _check_finite(dict(zip(("image_features", "text_features", "logit_scale", "teacher_image_features",
                                "teacher_text_features"), (image, text, logit_scale, *teachers))))
    whole = spec.whole_batch_rows(world_size)
    fused_local = whole and (spec.with_tgc or spec.with_distill) and spec.num_negatives <= LOCAL_MAX_NEGATIVES
    return LossPlan(spec, backend, batch, whole, fused_local)


def compute(spec: LossSpec, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
            teacher_image_features: torch.Tensor | None = None, teacher_text_features: torch.Tensor | None = None,
            *, rank: int = 0, world_size: int = 1, logit_bias: torch.Tensor | None = None,
            output_dict: bool = False) -> LossOutput | dict[str, torch.Tensor]:
    """The DeGLA loss of ``spec`` for this rank's features (see :func:`degla_fast.loss.degla_loss`)."""
    plan = plan_call(spec, image_features, text_features, logit_scale, teacher_image_features,
                     teacher_text_features, world_size=world_size, logit_bias=logit_bias)
    rows, local = batches(spec, image_features, text_features, teacher_image_features, teacher_text_features,
                          rank, world_size)
    if plan.backend in _FUSED:
        function = getattr(importlib.import_module(_FUSED[plan.backend][0]), _FUSED[plan.backend][1])
        outs = []
        for args in _fused_calls(plan, rows, local, logit_scale):  # a loop, not a comprehension: no frame of its own
            outs.append(function.apply(*args))
        out = _fused_output(plan, outs, local)
    else:
        out = _unfused_output(plan, rows, local, logit_scale)
    return out.named(spec) if output_dict else out


def _fused_input(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Contiguous rows of one dtype: features of mixed dtypes meet the kernels in their promoted
    dtype, as the ``torch`` backend computes them (autograd casts each gradient back). fp64
    never gets here (:func:`~degla_fast.loss.auto.choose` refuses it)."""
    return None if t is None else t.to(dtype).contiguous()


def _fused_calls(plan: LossPlan, rows: GlobalBatch, local: LocalBatch, scale) -> list[tuple]:
    """The fused Function's arguments: one call when the rows are the whole batch; with
    ``local_loss`` across ranks a second, 1/(1+K)-sized call for text-to-image (this rank's
    captions against every rank's images)."""
    spec = plan.spec
    common = dict(row_offset=rows.row_offset, tgc_scale=spec.tgc_scale, official=spec.official_tgc_indexing,
                  chunk_bytes=spec.chunk_bytes, dot_precision=spec.dot_precision)
    terms = LossTerms(spec.num_negatives, weights=plan.kernel_weights, with_igc=spec.with_igc,
                      with_cols=plan.whole_rows, local=plan.fused_local, **common)
    dtype = torch.promote_types(rows.image_rows.dtype, rows.text_all.dtype)
    teachers = ((_fused_input(local.teacher_image.detach(), dtype), _fused_input(local.teacher_text.detach(), dtype))
                if plan.fused_local else (None, None))
    calls = [(_fused_input(rows.image_rows, dtype), _fused_input(rows.text_all, dtype), scale, *teachers, terms)]
    if not plan.whole_rows:
        t2i = LossTerms(0, weights=TermWeights(0.5, 0.0, 0.0, 0.0), with_cols=False, **common)
        calls.append((_fused_input(rows.text_rows, dtype), _fused_input(rows.image_all, dtype), scale, None, None, t2i))
    return calls


def _fused_output(plan: LossPlan, outs: list[tuple], local: LocalBatch) -> LossOutput:
    """The fused calls' outputs as one LossOutput, with TGC and distillation in plain torch where
    they did not run inside the node."""
    spec = plan.spec
    total, clip, igc, tgc, distill = outs[0]
    if len(outs) > 1:  # text-to-image, a call of its own: half of the contrast
        t2i_total, t2i_ce, *_ = outs[1]
        total, clip = total + t2i_total.to(total.dtype), (clip + t2i_ce.to(clip.dtype)) / 2
    if not plan.fused_local and (spec.with_tgc or spec.with_distill):
        tgc, distill = _local_terms(plan, local)
        total = total + spec.weights.tgc * tgc + spec.weights.distill * distill
    return LossOutput(total=total, clip=clip, igc=igc, tgc=tgc, distill=distill)


def _unfused_output(plan: LossPlan, rows: GlobalBatch, local: LocalBatch, scale) -> LossOutput:
    """The ``reference`` and ``torch`` backends: the global terms, then the local ones."""
    spec, k, offset = plan.spec, plan.spec.num_negatives, rows.row_offset
    if plan.backend == "reference":
        clip = reference.global_loss(rows.image_rows, rows.text_all, rows.image_all, rows.text_rows, scale,
                                     num_negatives=k, row_offset=offset)
        igc = (reference.igc_loss(rows.image_rows, rows.text_all, scale, num_negatives=k, row_offset=offset)
               if spec.with_igc else clip.new_zeros(()))
    else:
        options = (spec.dot_precision, spec.chunk_bytes)
        i2t, igc = torch_backend.GlobalContrast.apply(rows.image_rows, rows.text_all, scale, offset, k,
                                                      spec.with_igc, *options)
        t2i, _ = torch_backend.GlobalContrast.apply(rows.text_rows, rows.image_all, scale, offset, 0, False, *options)
        clip = (i2t + t2i) / 2
    tgc, distill = _local_terms(plan, local)
    w = spec.weights
    total = clip + w.igc * igc + w.tgc * tgc + w.distill * distill
    return LossOutput(total=total, clip=clip, igc=igc, tgc=tgc, distill=distill)


def _local_terms(plan: LossPlan, local: LocalBatch):
    """(tgc, distill) on one batch of samples: the ``reference`` backend's, or plain torch's (the
    ``torch`` backend's, and the fused backends' where their local kernel does not apply)."""
    spec = plan.spec
    teacher_text = local.teacher_text.detach() if local.teacher_text is not None else None
    teacher_image = local.teacher_image.detach() if local.teacher_image is not None else None
    if plan.backend == "reference":
        zero = local.text.new_zeros((), dtype=torch.float32)
        tgc = (reference.tgc_loss(local.text, teacher_text, num_negatives=spec.num_negatives,
                                  tgc_scale=spec.tgc_scale, official_indexing=spec.official_tgc_indexing)
               if spec.with_tgc else zero)
        distill = (reference.distill_loss(local.image, local.text, teacher_image, teacher_text)
                   if spec.with_distill else zero)
        return tgc, distill
    return torch_backend.local_terms(local.text, teacher_text, local.image, teacher_image, spec.num_negatives,
                                     spec.tgc_scale, spec.official_tgc_indexing, spec.with_tgc, spec.with_distill)
