"""``LossSpec``: the DeGLA loss's options, declared once.

:class:`~degla_fast.losses.DeGLALoss`, :func:`~degla_fast.functional.degla_loss` and the
trainer's ``loss:`` configuration section all hold one of these; each field's doc is what
``degla-fast train --help-config`` prints. Where the process sits (``rank``, ``world_size``) is
not a loss option: it stays beside the spec, as open_clip's ClipLoss takes it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .backends import LOSS_BACKENDS, check_backend
from .errors import ConfigError
from .fields import doc_field
from .kernels.configs import PRECISIONS as DOT_PRECISIONS

#: Bytes of one column chunk's fp32 logits plus their gradient in the input dtype (the ``gemm``
#: backend, :mod:`degla_fast.fused_loss`). Here, with the spec's other defaults, so that the spec
#: (and the trainer's configuration, ``degla-fast train --help``) loads without torch.
DEFAULT_CHUNK_BYTES = 256 << 20

# DOT_PRECISIONS: the dot precisions of fp32 inputs (the loss's ``dot_precision``; not the
# training precision of :mod:`degla_fast.precision`, which picks an autocast dtype).


def check_dot_precision(dot_precision: str) -> str:
    """``dot_precision`` if it is one of :data:`DOT_PRECISIONS`, else a ConfigError naming the choices."""
    if dot_precision not in DOT_PRECISIONS:
        raise ConfigError(f"dot_precision must be one of {', '.join(DOT_PRECISIONS)}; got {dot_precision!r}")
    return dot_precision


@dataclass(frozen=True)
class LossSpec:
    """DeGLA loss settings (num_negatives 0 gives the plain CLIP loss). Checked once, when built."""

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
        check_dot_precision(self.dot_precision)
        if self.num_negatives < 0:
            raise ConfigError(f"num_negatives must be >= 0 (0: plain CLIP), got {self.num_negatives}")
        check_backend(self.backend, LOSS_BACKENDS)
        for name in ("igc_weight", "tgc_weight", "distill_weight", "tgc_scale"):  # (the fields' minimum 0)
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.chunk_bytes <= 0:
            raise ConfigError(f"chunk_bytes must be > 0, got {self.chunk_bytes}")

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
