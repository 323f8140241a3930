"""``DeGLALoss``: the drop-in module form of :func:`degla_fast.functional.degla_loss`."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .errors import ConfigError
from .functional import DEFAULT_CHUNK_BYTES, LossOutput, spec_loss
from .loss_spec import LossSpec

__all__ = ["DeGLALoss", "LossOutput", "LossSpec"]


class DeGLALoss(nn.Module):
    """DeGLA loss with open_clip's ClipLoss distribution arguments.

    ``forward(image_features [B, D], text_features [B*(1+K), D], logit_scale,
    teacher_image_features [B, D], teacher_text_features [B*(1+K), D]) -> LossOutput``.
    Text rows are B positives then B*K negatives, sample-major; ``logit_scale`` has ``exp``
    applied. Teacher features may be None when :attr:`needs_teacher` is False (``tgc_weight``
    and ``distill_weight`` 0, or ``num_negatives=0``: plain CLIP on [B, D] captions, the same
    kernels, IGC/TGC/distillation reported as 0).

    The options are one :class:`~degla_fast.loss_spec.LossSpec` (:attr:`spec`; every keyword
    but ``rank`` and ``world_size`` is its field of the same name, documented there);
    :meth:`from_spec` builds the module from a spec, as the trainer does.

    open_clip's convention, ``loss(**model_out, output_dict=True)``, works as it is: with
    ``output_dict=True`` the result is a dict of the weighted terms (``contrastive_loss``, then
    ``igc_loss``, ``tgc_loss``, ``distill_loss`` where their weight is not 0) whose sum is the
    total; a ``logit_bias`` that is not None (SigLIP) is a ConfigError. See
    :func:`~degla_fast.functional.degla_loss`.
    """

    def __init__(self, num_negatives: int = 4, igc_weight: float = 0.1, tgc_weight: float = 0.1,
                 distill_weight: float = 0.005, tgc_scale: float = 10.0, backend: str = "auto",
                 official_tgc_indexing: bool = False, local_loss: bool = False, gather_with_grad: bool = False,
                 rank: int = 0, world_size: int = 1, dot_precision: str = "tf32", check_finite: bool = True,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        super().__init__()
        self.spec = LossSpec(num_negatives=num_negatives, igc_weight=igc_weight, tgc_weight=tgc_weight,
                             distill_weight=distill_weight, tgc_scale=tgc_scale, backend=backend,
                             official_tgc_indexing=official_tgc_indexing, local_loss=local_loss,
                             gather_with_grad=gather_with_grad, dot_precision=dot_precision,
                             check_finite=check_finite, chunk_bytes=chunk_bytes)
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.rank = rank
        self.world_size = world_size

    @classmethod
    def from_spec(cls, spec: LossSpec, rank: int = 0, world_size: int = 1) -> DeGLALoss:
        """The loss of ``spec`` for the process ``rank`` of ``world_size``."""
        return cls(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}, rank=rank,
                   world_size=world_size)

    def __getattr__(self, name: str):
        # The spec's fields read as the module's own attributes (``loss.num_negatives``), as before
        # the options became one spec; nn.Module's lookup (parameters, buffers, submodules) first.
        try:
            return super().__getattr__(name)
        except AttributeError:
            spec = self.__dict__.get("spec")
            if spec is not None and name in spec.__dataclass_fields__:
                return getattr(spec, name)
            raise

    def __setattr__(self, name: str, value) -> None:
        if name in LossSpec.__dataclass_fields__:  # forward reads the spec: a loose attribute would be ignored
            raise AttributeError(f"{name} is a field of the loss's frozen spec; build a new loss, e.g. "
                                 f"DeGLALoss.from_spec(dataclasses.replace(loss.spec, {name}=...))")
        super().__setattr__(name, value)

    @property
    def needs_teacher(self) -> bool:
        """Whether :meth:`forward` reads teacher features (:attr:`LossSpec.needs_teacher`)."""
        return self.spec.needs_teacher

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                teacher_image_features: torch.Tensor | None = None,
                teacher_text_features: torch.Tensor | None = None, logit_bias: torch.Tensor | None = None,
                output_dict: bool = False) -> LossOutput | dict[str, torch.Tensor]:
        return spec_loss(self.spec, image_features, text_features, logit_scale, teacher_image_features,
                         teacher_text_features, rank=self.rank, world_size=self.world_size, logit_bias=logit_bias,
                         output_dict=output_dict)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"num_negatives={s.num_negatives}, igc_weight={s.igc_weight}, tgc_weight={s.tgc_weight}, "
                f"distill_weight={s.distill_weight}, tgc_scale={s.tgc_scale}, backend={s.backend!r}, "
                f"official_tgc_indexing={s.official_tgc_indexing}, local_loss={s.local_loss}, "
                f"gather_with_grad={s.gather_with_grad}, rank={self.rank}, world_size={self.world_size}")
