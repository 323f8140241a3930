"""The two fused backends of the DeGLA loss, each the whole loss as one autograd node.

Both compute, for rows q [R, D] against columns x [Bg(1+K), D] (target of row r: column
``row_offset + r``), the same statistics per row and column (:mod:`degla_fast.kernels.loss_terms`),
and in the backward the gradient of every logit at once: image-to-text, text-to-image (when the
rows are the whole batch: the first ``Bg`` columns, transposed, need no GEMM of their own) and
IGC. TGC and distillation run in the same node when the rows are the whole batch and K <= 8.
This module holds what both share: :class:`LossTerms` (what one call computes) and the autograd
plumbing.

``gemm`` (:class:`~degla_fast.loss.gemm_backend.GemmLoss`): cuBLAS writes each column chunk's logits ``L = q @ x_c^T`` in fp32;
one stats kernel reads it (:mod:`degla_fast.kernels.gemm_loss`). The backward writes each
logit's gradient once in the input dtype and takes dq and dx from two more GEMMs; the finalize
kernel scales and casts them and adds the local terms' gradients. The columns are chunked so
that one chunk's fp32 logits and its gradient (``R * Cc * (4 + itemsize)`` bytes) fit in
``chunk_bytes``; with every column in one chunk the forward keeps it for the backward (three
GEMM passes), otherwise each chunk is recomputed (four passes), one chunk alive at a time, and
the fp32 dq product accumulates in place over the chunks. The default budget
(:data:`DEFAULT_CHUNK_BYTES`, 256 MiB) stores the logits up to B=2990 at K=4 in bf16 and
recomputes two chunks at B=4096 (about 300 MB of extra memory, docs/loss.md).

``triton`` (:class:`~degla_fast.loss.triton_backend.TritonLoss`, :mod:`degla_fast.kernels.degla_loss`): the kernels are the GEMMs.
The logits kernel keeps fp16 cosines (fp32 for fp32 inputs) where they fit in ``chunk_bytes``
and makes every statistic in its epilogue; a row-stationary dq kernel and a column-stationary dx
kernel read them (or recompute them, when they were not kept), form each logit's gradient in
registers and write their rows or columns once (no atomics). Recomputed, extra memory is
O((R + C) D): what lets B=65536 fit.

Launches at world size 1 (K <= 8, TGC or distillation on), forward + backward: ``gemm`` stored
8 (GEMM, stats, local, finish; grad, 2 GEMMs, finalize), two recomputed chunks 15; ``triton`` 6
to 8 (logits + statistics, local, finish; local, dq, dx, and a merge of the fp32 partials of
each backward loop that was split to fill the GPU). Host-side choices depend on shapes only and
nothing is read back, so both can be captured in a CUDA graph (docs/loss.md); docs/loss.md's
counts are printed by :mod:`degla_fast.loss.count`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .spec import DEFAULT_CHUNK_BYTES, TermWeights


@dataclass(frozen=True)
class LossTerms:
    """What one fused call computes.

    ``weights``: of each term in its ``total`` output (:class:`~degla_fast.loss.spec.TermWeights`). ``with_cols``: the rows are the
    whole batch (world size 1, or every rank's rows without ``local_loss``), so ``ce`` is half the
    image-to-text plus half the text-to-image cross-entropy; otherwise ``ce`` is the rows' mean.
    ``local``: TGC and distillation of that whole batch in the same call (K <= 8).
    ``chunk_bytes``: the gemm backend's budget (see the module doc).
    """

    num_negatives: int
    weights: TermWeights = TermWeights(1.0, 0.0, 0.0, 0.0)
    row_offset: int = 0
    with_igc: bool = False
    with_cols: bool = True
    local: bool = False
    official: bool = False
    tgc_scale: float = 10.0
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    dot_precision: str = "tf32"

    @property
    def flags(self) -> dict:
        return dict(with_igc=self.with_igc, with_cols=self.with_cols)

    def num_groups(self, columns: int) -> int:
        """Bg, the samples of ``columns`` caption rows (each sample's positive and K negatives)."""
        return columns // (1 + self.num_negatives)


def upstream(grad_outs) -> torch.Tensor | None:
    """The kernels' upstream gradients: the total's alone (the usual case, no launch), or all
    five stacked when the caller back-propagates through the parts too; None if nothing needs them."""
    if all(g is None for g in grad_outs):
        return None
    if grad_outs[0] is not None and all(g is None for g in grad_outs[1:]):
        return grad_outs[0].reshape(1)
    ref = next(g for g in grad_outs if g is not None)
    return torch.stack([g.reshape(()) if g is not None else ref.new_zeros(()) for g in grad_outs]).float()


def keep(ctx, terms: LossTerms, scale: torch.Tensor, launch, outs: tuple, *tensors) -> tuple:
    """Keep what the backward needs (the tensors, the terms, the forward's ``launch`` plan, the
    scale's shape and dtype: its gradient's) and return ``outs``; gradients of unused outputs stay
    None (no zero tensors made for them)."""
    ctx.save_for_backward(*tensors)
    ctx.terms, ctx.launch, ctx.scale_meta = terms, launch, (scale.shape, scale.dtype)
    ctx.set_materialize_grads(False)
    return outs


def fused_backward(backward):
    """The autograd plumbing of a fused Function's backward, around ``backward(ctx, grads) -> (dq,
    dx, dscale)``: ``grads`` are the kernels' upstream gradients (:func:`upstream`; nothing runs
    when no output needs one), and the result comes back as the six input gradients, the scale's
    in its own shape and dtype."""

    @functools.wraps(backward)
    def wrapped(ctx, *grad_outs):
        grads = upstream(grad_outs)
        if grads is None:
            return None, None, None, None, None, None
        dq, dx, dscale = backward(ctx, grads)
        shape, dtype = ctx.scale_meta
        return dq, dx, dscale.reshape(shape).to(dtype), None, None, None

    return wrapped


def local_args(terms: LossTerms, q, x, teacher_q, teacher_x) -> tuple | None:
    """The arguments of :func:`degla_fast.kernels.local_terms.local_forward` (TGC and distillation
    of the whole batch in the same node), or None when the call has no local terms. Arguments,
    not the call: the Functions launch it themselves, one frame closer to the module."""
    if not terms.local:
        return None
    return x, teacher_x, q, teacher_q, terms.num_negatives, terms.tgc_scale, terms.official
