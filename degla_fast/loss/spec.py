"""``LossSpec``: the DeGLA loss's options, declared and checked once, and what follows from them.

:class:`~degla_fast.loss.DeGLALoss`, :func:`~degla_fast.loss.degla_loss` and the trainer's
``loss:`` configuration section all hold one of these; each field's doc is what
``degla-fast train --help-config`` prints. Where the process sits (``rank``, ``world_size``) is
not a loss option: it stays beside the spec, as open_clip's ClipLoss takes it.

The spec imports neither torch nor a backend nor a kernel: the trainer's configuration (and
``degla-fast train --help``) loads it without them, and the backends depend on it, not the
reverse. The names of the backends and dot precisions are therefore declared here, and the
kernels' own list of precisions is checked against :data:`DOT_PRECISIONS` by the tests.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import ConfigError, ShapeError
from ..fields import check_value, doc_field

#: The loss implementations (:mod:`degla_fast.loss.auto` resolves ``auto``).
LOSS_BACKENDS = ("auto", "reference", "torch", "gemm", "triton")
#: The dot precisions of fp32 features on a GPU (the loss's ``dot_precision``; not the training
#: precision of :mod:`degla_fast.precision`, which picks an autocast dtype).
DOT_PRECISIONS = ("tf32", "ieee")
#: Bytes of logits the fused backends may keep from the forward for the backward (see the
#: ``chunk_bytes`` field).
DEFAULT_CHUNK_BYTES = 256 << 20


class TermWeights(NamedTuple):
    """The weight of each term in the total: 0 for a term that is off (K = 0, or weight 0)."""

    clip: float
    igc: float
    tgc: float
    distill: float


@dataclass(frozen=True)
class LossSpec:
    """DeGLA loss settings (num_negatives 0 gives the plain CLIP loss). Every field is checked
    when the spec is built (type, finiteness, bounds, choices): a one-line ConfigError."""

    num_negatives: int = doc_field(4, "hard negatives per caption, K; 0 trains with the plain CLIP loss", minimum=0,
                                   flag=True)
    igc_weight: float = doc_field(0.1, "weight of the image-grounded contrast (IGC)", minimum=0.0, flag=True)
    tgc_weight: float = doc_field(0.1, "weight of the text-grounded contrast (TGC)", minimum=0.0, flag=True)
    distill_weight: float = doc_field(0.005, "weight of the self-distillation toward the EMA teacher", minimum=0.0,
                                      flag=True)
    tgc_scale: float = doc_field(10.0, "fixed logit scale of TGC (1 / temperature)", minimum=0.0)
    backend: str = doc_field("auto", "loss implementation", LOSS_BACKENDS)
    official_tgc_indexing: bool = doc_field(False, "reproduce the released code's TGC negative indexing "
                                                   "(comparison only)")
    local_loss: bool = doc_field(False, "each process's samples are the anchors against all gathered features")
    gather_with_grad: bool = doc_field(False, "gather features across processes with autograd (exact global "
                                              "gradient)")
    dot_precision: str = doc_field("tf32", "dot precision of fp32 features on a GPU: tf32 (tensor cores, about 1e-3 "
                                           "relative error per dot) or ieee (exact fp32 products)", DOT_PRECISIONS)
    check_finite: bool = doc_field(True, "raise NonFiniteError on NaN/Inf inputs (a host read per input; the trainer "
                                         "checks the loss on the device instead)", in_config=False)
    chunk_bytes: int = doc_field(DEFAULT_CHUNK_BYTES, "bytes of logits the fused backends may keep from the forward "
                                                      "for the backward (triton: all or none of its 16-bit logits; "
                                                      "gemm: one column chunk of fp32 logits and their gradient; "
                                                      "torch: one row block); beyond it they recompute", minimum=1)

    def __post_init__(self):
        hints = _field_types()
        for f in dataclasses.fields(self):  # normalised values (a NumPy int as int) kept: the spec is frozen
            object.__setattr__(self, f.name, check_value(f.name, getattr(self, f.name), hints[f.name], f.metadata))

    @property
    def needs_teacher(self) -> bool:
        """Whether the loss reads teacher features: TGC's positives or the distillation target.
        Plain CLIP (K = 0) reads none: without negatives DeGLA's extra terms are all absent."""
        return self.num_negatives > 0 and (self.tgc_weight != 0 or self.distill_weight != 0)

    @property
    def with_igc(self) -> bool:
        return self.num_negatives > 0 and self.igc_weight != 0

    @property
    def with_tgc(self) -> bool:
        return self.needs_teacher and self.tgc_weight != 0

    @property
    def with_distill(self) -> bool:
        return self.needs_teacher and self.distill_weight != 0

    @property
    def weights(self) -> TermWeights:
        """Each term's weight in the total, 0 where the term is off: what every backend sums and
        :meth:`~degla_fast.loss.LossOutput.named` reports."""
        return TermWeights(1.0, self.igc_weight if self.with_igc else 0.0, self.tgc_weight if self.with_tgc else 0.0,
                           self.distill_weight if self.with_distill else 0.0)

    def batch_size(self, text_rows: int, image_rows: int, text_shape: str = "") -> int:
        """B, the samples of a call whose text features have ``text_rows`` rows (B positives, then
        B*K negatives) and whose image features have ``image_rows``; a ShapeError naming both
        (and ``text_shape``, the text features' shape as the message shows it) when they do not
        agree."""
        if image_rows == 0:
            raise ShapeError("image_features: an empty batch (B = 0) has no loss; every rank needs at least one "
                             "sample")
        if text_rows != image_rows * (1 + self.num_negatives):
            k = self.num_negatives
            raise ShapeError(f"text_features must have B*(1+K) = {image_rows}*(1+{k}) = {image_rows * (1 + k)} "
                             f"rows (B positives, then B*K negatives), got {text_shape or text_rows}")
        return image_rows

    def whole_batch_rows(self, world_size: int) -> bool:
        """Whether every rank's anchor rows are the whole (gathered) batch: one process, or
        ``local_loss`` off. Then the image-to-text logits hold the text-to-image ones too (their
        first B columns, transposed); otherwise text-to-image is a call of its own."""
        return world_size == 1 or not self.local_loss


@functools.cache
def _field_types() -> dict[str, type]:
    return typing.get_type_hints(LossSpec)



def check_place(rank: int, world_size: int) -> None:
    """Where the process sits: ``world_size`` an integer >= 1, ``rank`` one in [0, world_size); a
    one-line ConfigError otherwise."""
    world_size = check_value("world_size", world_size, int, {"minimum": 1})
    rank = check_value("rank", rank, int, {"minimum": 0})
    if rank >= world_size:
        raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}")
