"""``DeGLALoss``: the drop-in module form of :func:`degla_fast.functional.degla_loss`."""
from __future__ import annotations

import torch
from torch import nn

from .backends import LOSS_BACKENDS, check_backend
from .errors import ConfigError
from .functional import DEFAULT_CHUNK_BYTES, LossOutput, check_dot_precision, degla_loss, needs_teacher

__all__ = ["DeGLALoss", "LossOutput"]


class DeGLALoss(nn.Module):
    """DeGLA loss with open_clip's ClipLoss distribution arguments.

    ``forward(image_features [B, D], text_features [B*(1+K), D], logit_scale,
    teacher_image_features [B, D], teacher_text_features [B*(1+K), D]) -> LossOutput``.
    Text rows are B positives then B*K negatives, sample-major; ``logit_scale`` has ``exp``
    applied. Teacher features may be None when :attr:`needs_teacher` is False (``tgc_weight``
    and ``distill_weight`` 0, or ``num_negatives=0``: plain CLIP on [B, D] captions, the same
    kernels, IGC/TGC/distillation reported as 0).

    open_clip's convention, ``loss(**model_out, output_dict=True)``, works as it is: with
    ``output_dict=True`` the result is a dict of the weighted terms (``contrastive_loss``, then
    ``igc_loss``, ``tgc_loss``, ``distill_loss`` where their weight is not 0) whose sum is the
    total; a ``logit_bias`` that is not None (SigLIP) is a ConfigError. See
    :func:`~degla_fast.functional.degla_loss`.
    """

    def __init__(self, num_negatives: int = 4, igc_weight: float = 0.1, tgc_weight: float = 0.1,
                 distill_weight: float = 0.005, tgc_scale: float = 10.0, backend: str = "auto",
                 official_tgc_indexing: bool = False, local_loss: bool = False, gather_with_grad: bool = False,
                 rank: int = 0, world_size: int = 1, precision: str = "tf32", check_finite: bool = True,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        super().__init__()
        check_dot_precision(precision)
        if num_negatives < 0:
            raise ConfigError(f"num_negatives must be >= 0 (0: plain CLIP), got {num_negatives}")
        check_backend(backend, LOSS_BACKENDS)
        for name, weight in (("igc_weight", igc_weight), ("tgc_weight", tgc_weight), ("distill_weight", distill_weight)):
            if weight < 0:
                raise ConfigError(f"{name} must be >= 0, got {weight}")
        if chunk_bytes <= 0:
            raise ConfigError(f"chunk_bytes must be > 0, got {chunk_bytes}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.num_negatives = num_negatives
        self.igc_weight = igc_weight
        self.tgc_weight = tgc_weight
        self.distill_weight = distill_weight
        self.tgc_scale = tgc_scale
        self.backend = backend
        self.official_tgc_indexing = official_tgc_indexing
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size
        self.precision = precision
        self.check_finite = check_finite  # False: no host read of the inputs (the caller checks the loss)
        self.chunk_bytes = chunk_bytes

    @property
    def needs_teacher(self) -> bool:
        """Whether :meth:`forward` reads teacher features (:func:`~degla_fast.functional.needs_teacher`)."""
        return needs_teacher(self.num_negatives, self.tgc_weight, self.distill_weight)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                teacher_image_features: torch.Tensor | None = None,
                teacher_text_features: torch.Tensor | None = None, logit_bias: torch.Tensor | None = None,
                output_dict: bool = False) -> LossOutput | dict[str, torch.Tensor]:
        return degla_loss(image_features, text_features, logit_scale, teacher_image_features, teacher_text_features,
                          logit_bias=logit_bias, output_dict=output_dict,
                          num_negatives=self.num_negatives, igc_weight=self.igc_weight, tgc_weight=self.tgc_weight,
                          distill_weight=self.distill_weight, tgc_scale=self.tgc_scale, backend=self.backend,
                          official_tgc_indexing=self.official_tgc_indexing, local_loss=self.local_loss,
                          gather_with_grad=self.gather_with_grad, rank=self.rank, world_size=self.world_size,
                          precision=self.precision, check_finite=self.check_finite, chunk_bytes=self.chunk_bytes)

    def extra_repr(self) -> str:
        return (f"num_negatives={self.num_negatives}, igc_weight={self.igc_weight}, tgc_weight={self.tgc_weight}, "
                f"distill_weight={self.distill_weight}, tgc_scale={self.tgc_scale}, backend={self.backend!r}, "
                f"official_tgc_indexing={self.official_tgc_indexing}, local_loss={self.local_loss}, "
                f"gather_with_grad={self.gather_with_grad}, rank={self.rank}, world_size={self.world_size}")
