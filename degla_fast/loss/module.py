"""``DeGLALoss``: the drop-in module form of :func:`degla_fast.loss.degla_loss`."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .dispatch import LossOutput, compute
from .spec import DEFAULT_CHUNK_BYTES, LossSpec, check_place


class DeGLALoss(nn.Module):
    """DeGLA loss with open_clip's ClipLoss distribution arguments.

    ``forward(image_features [B, D], text_features [B*(1+K), D], logit_scale,
    teacher_image_features [B, D], teacher_text_features [B*(1+K), D]) -> LossOutput``.
    Text rows are B positives then B*K negatives, sample-major; ``logit_scale`` has ``exp``
    applied. Teacher features may be None when :attr:`needs_teacher` is False (``tgc_weight``
    and ``distill_weight`` 0, or ``num_negatives=0``: plain CLIP on [B, D] captions, the same
    kernels, IGC/TGC/distillation reported as 0).

    The options are one frozen :class:`~degla_fast.loss.LossSpec`, :attr:`spec` (every keyword
    but ``rank`` and ``world_size`` is its field of the same name, documented and checked there);
    :meth:`from_spec` takes a spec whole, as the trainer does. Another setting is another loss:
    ``DeGLALoss.from_spec(dataclasses.replace(loss.spec, igc_weight=0.0))``.

    open_clip's convention, ``loss(**model_out, output_dict=True)``, works as it is: with
    ``output_dict=True`` the result is a dict of the weighted terms (``contrastive_loss``, then
    ``igc_loss``, ``tgc_loss``, ``distill_loss`` where their weight is not 0) whose sum is the
    total; a ``logit_bias`` that is not None (SigLIP) is a ConfigError. See
    :func:`~degla_fast.loss.degla_loss`.
    """

    spec: LossSpec

    def __init__(self, num_negatives: int = 4, igc_weight: float = 0.1, tgc_weight: float = 0.1,
                 distill_weight: float = 0.005, tgc_scale: float = 10.0, backend: str = "auto",
                 official_tgc_indexing: bool = False, local_loss: bool = False, gather_with_grad: bool = False,
                 rank: int = 0, world_size: int = 1, dot_precision: str = "tf32", check_finite: bool = True,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        super().__init__()
        self._place(LossSpec(num_negatives=num_negatives, igc_weight=igc_weight, tgc_weight=tgc_weight,
                             distill_weight=distill_weight, tgc_scale=tgc_scale, backend=backend,
                             official_tgc_indexing=official_tgc_indexing, local_loss=local_loss,
                             gather_with_grad=gather_with_grad, dot_precision=dot_precision,
                             check_finite=check_finite, chunk_bytes=chunk_bytes), rank, world_size)

    @classmethod
    def from_spec(cls, spec: LossSpec, rank: int = 0, world_size: int = 1) -> DeGLALoss:
        """The loss of ``spec`` (kept as it is) for the process ``rank`` of ``world_size``."""
        if not isinstance(spec, LossSpec):
            raise ConfigError(f"from_spec takes a LossSpec, got {type(spec).__name__}")
        loss = cls.__new__(cls)
        nn.Module.__init__(loss)
        loss._place(spec, rank, world_size)
        return loss

    def _place(self, spec: LossSpec, rank: int, world_size: int) -> None:
        check_place(rank, world_size)
        self.spec, self.rank, self.world_size = spec, rank, world_size

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
        return compute(self.spec, image_features, text_features, logit_scale, teacher_image_features,
                       teacher_text_features, rank=self.rank, world_size=self.world_size, logit_bias=logit_bias,
                       output_dict=output_dict)

    def extra_repr(self) -> str:
        fields = ", ".join(f"{name}={getattr(self.spec, name)!r}" for name in LossSpec.__dataclass_fields__)
        return f"{fields}, rank={self.rank}, world_size={self.world_size}"
