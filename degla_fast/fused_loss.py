"""The two fused backends of the DeGLA loss, each the whole loss as one autograd node.

Both compute, for rows q [R, D] against columns x [Bg(1+K), D] (target of row r: column
``row_offset + r``), the same statistics per row and column (:mod:`degla_fast.kernels.loss_terms`),
and in the backward the gradient of every logit at once: image-to-text, text-to-image (when the
rows are the whole batch: the first ``Bg`` columns, transposed, need no GEMM of their own) and
IGC. TGC and distillation run in the same node when the rows are the whole batch and K <= 8.

``gemm`` (:class:`GemmLoss`): cuBLAS writes each column chunk's logits ``L = q @ x_c^T`` in fp32;
one stats kernel reads it (:mod:`degla_fast.kernels.gemm_loss`). The backward writes each
logit's gradient once in the input dtype and takes dq and dx from two more GEMMs; the finalize
kernel scales and casts them and adds the local terms' gradients. The columns are chunked so
that one chunk's fp32 logits and its gradient (``R * Cc * (4 + itemsize)`` bytes) fit in
``chunk_bytes``; with every column in one chunk the forward keeps it for the backward (three
GEMM passes), otherwise each chunk is recomputed (four passes), one chunk alive at a time, and
the fp32 dq product accumulates in place over the chunks. The default budget
(:data:`DEFAULT_CHUNK_BYTES`, 256 MiB) stores the logits up to B=2990 at K=4 in bf16 and
recomputes two chunks at B=4096 (about 300 MB of extra memory, docs/loss.md).

``triton`` (:class:`TritonLoss`, :mod:`degla_fast.kernels.degla_loss`): the kernels are the GEMMs.
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
counts are printed by :mod:`degla_fast.loss_count`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .loss_spec import DEFAULT_CHUNK_BYTES
from .matmul import addmm_f32, loss_matmuls, mm_f32

#: Column chunks are multiples of this (GEMM tiles, 16-byte aligned rows) except the last.
CHUNK_ALIGN = 64


@dataclass(frozen=True)
class LossTerms:
    """What one fused call computes.

    ``weights``: of (ce, igc, tgc, distill) in its ``total`` output. ``with_cols``: the rows are the
    whole batch (world size 1, or every rank's rows without ``local_loss``), so ``ce`` is half the
    image-to-text plus half the text-to-image cross-entropy; otherwise ``ce`` is the rows' mean.
    ``local``: TGC and distillation of that whole batch in the same call (K <= 8).
    ``chunk_bytes``: the gemm backend's budget (see the module doc).
    """

    num_negatives: int
    weights: tuple = (1.0, 0.0, 0.0, 0.0)
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


#: Elements of one chunk stay below this: the Triton kernels index a chunk with int32 offsets.
MAX_CHUNK_ELEMENTS = 2 ** 31 - 1


def plan_chunks(rows: int, cols: int, grad_itemsize: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Column ranges ``[(c0, c1), ...]`` of near-equal width, each within ``chunk_bytes`` (at least
    :data:`CHUNK_ALIGN` columns wide) and below :data:`MAX_CHUNK_ELEMENTS` elements (rows up to
    2^31 / CHUNK_ALIGN); one range when everything fits."""
    rows = max(1, rows)
    per_column = rows * (4 + grad_itemsize)
    if per_column * cols <= chunk_bytes and rows * cols <= MAX_CHUNK_ELEMENTS:
        return [(0, cols)]
    widest = max(CHUNK_ALIGN, chunk_bytes // per_column // CHUNK_ALIGN * CHUNK_ALIGN)
    widest = min(widest, max(CHUNK_ALIGN, MAX_CHUNK_ELEMENTS // rows // CHUNK_ALIGN * CHUNK_ALIGN))
    count = -(-cols // widest)
    width = -(-(-(-cols // count)) // CHUNK_ALIGN) * CHUNK_ALIGN
    return [(c0, min(c0 + width, cols)) for c0 in range(0, cols, width)]


def _upstream(grad_outs) -> torch.Tensor | None:
    """The kernels' upstream gradients: the total's alone (the usual case, no launch), or all
    five stacked when the caller back-propagates through the parts too; None if nothing needs them."""
    if all(g is None for g in grad_outs):
        return None
    if grad_outs[0] is not None and all(g is None for g in grad_outs[1:]):
        return grad_outs[0].reshape(1)
    ref = next(g for g in grad_outs if g is not None)
    return torch.stack([g.reshape(()) if g is not None else ref.new_zeros(()) for g in grad_outs]).float()


def _keep(ctx, terms: LossTerms, scale: torch.Tensor, *tensors) -> None:
    """What both backwards need: the tensors, the terms, the scale's shape and dtype (its
    gradient's); gradients of unused outputs stay None (no zero tensors made for them)."""
    ctx.save_for_backward(*tensors)
    ctx.terms, ctx.scale_meta = terms, (scale.shape, scale.dtype)
    ctx.set_materialize_grads(False)


def _scale_grad(ctx, dscale: torch.Tensor) -> torch.Tensor:
    shape, dtype = ctx.scale_meta
    return dscale.reshape(shape).to(dtype)


def _local_forward(terms: LossTerms, q, x, teacher_q, teacher_x):
    """(tgc [B], tgc lse [B], distillation [B]) of the whole batch, or three Nones."""
    if not terms.local:
        return None, None, None
    from .kernels import local_terms

    return local_terms.local_forward(x, teacher_x, q, teacher_q, terms.num_negatives, terms.tgc_scale,
                                     terms.official)


def _logits(q: torch.Tensor, x: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
    """Raw fp32 dots ``q @ x[c0:c1]^T``, with a row stride of at least 2 (a one-column chunk
    would otherwise reach the kernels with a stride of 1, a variant the compile gate never saw)."""
    if c1 - c0 > 1:
        return mm_f32(q, x[c0:c1].T)
    out = torch.empty(q.shape[0], 2, device=q.device, dtype=torch.float32)[:, :1]
    out.copy_(mm_f32(q, x[c0:c1].T))
    return out


class GemmLoss(torch.autograd.Function):
    """The ``gemm`` backend: ``(q, x, scale, teacher_q, teacher_x, terms) -> (total, ce, igc, tgc,
    distill)``, five fp32 scalars. Teacher features are read only with ``terms.local`` and get no
    gradient. Inputs: contiguous fp32, bf16 or fp16 of one dtype (the caller refuses fp64)."""

    @staticmethod
    def forward(ctx, q, x, scale, teacher_q, teacher_x, terms: LossTerms):
        from .kernels import gemm_loss as kernels
        from .kernels.loss_terms import finish, new_state

        R, K = q.shape[0], terms.num_negatives
        num_groups = x.shape[0] // (1 + K)
        s = scale.reshape(1).float()
        state = new_state(R, num_groups, 1, 1 if terms.with_cols else 0, q.device)
        chunks = plan_chunks(R, x.shape[0], q.element_size(), terms.chunk_bytes)
        with loss_matmuls(q.device, terms.dot_precision):
            for c0, c1 in chunks:
                logits = _logits(q, x, c0, c1)
                kernels.stats(logits, s, state, c0=c0, row_offset=terms.row_offset, num_groups=num_groups,
                              num_negatives=K, **terms.flags)
        tgc, tgc_lse, dist = _local_forward(terms, q, x, teacher_q, teacher_x)
        outs = finish(state, tgc, dist, terms.weights, num_groups=num_groups, **terms.flags)
        stored = logits if len(chunks) == 1 else None  # one chunk: keep it, skip the recomputation
        _keep(ctx, terms, scale, q, x, s, teacher_q, teacher_x, state["row_m"], state["group_m"], state["col_m"],
              tgc_lse, stored)
        ctx.chunks = chunks
        return outs

    @staticmethod
    def backward(ctx, *grad_outs):
        from .kernels import gemm_loss as kernels

        grads = _upstream(grad_outs)
        if grads is None:
            return None, None, None, None, None, None
        q, x, s, teacher_q, teacher_x, row_lse, group_lse, col_lse, tgc_lse, stored = ctx.saved_tensors
        terms, chunks = ctx.terms, ctx.chunks
        K, R = terms.num_negatives, q.shape[0]
        num_groups = x.shape[0] // (1 + K)
        state = {"row_m": row_lse, "group_m": group_lse, "col_m": col_lse}
        # A one-column chunk's logits have a row stride of 2 (see _logits).
        strides = [stored.stride(0) if stored is not None else max(2, c1 - c0) for c0, c1 in chunks]
        parts = torch.empty(sum(kernels.num_grad_parts(R, c1 - c0, stride, q.device)
                                for (c0, c1), stride in zip(chunks, strides)), device=q.device, dtype=torch.float32)
        dq_raw = dx_raw = None
        if len(chunks) > 1:
            dx_raw = torch.empty(x.shape, device=x.device, dtype=torch.float32)
        offset = 0
        with loss_matmuls(q.device, terms.dot_precision):
            for c0, c1 in chunks:
                logits = stored if stored is not None else _logits(q, x, c0, c1)
                grad = torch.empty_strided(logits.shape, logits.stride(), device=q.device, dtype=q.dtype)
                offset += kernels.grad(logits, s, grads, state, grad, parts, offset, c0=c0,
                                       row_offset=terms.row_offset, num_groups=num_groups, num_negatives=K,
                                       weights=terms.weights, **terms.flags)
                del logits
                x_c = x[c0:c1]
                dq_raw = mm_f32(grad, x_c) if dq_raw is None else addmm_f32(dq_raw, grad, x_c)
                if dx_raw is None:
                    dx_raw = mm_f32(grad.T, q)
                else:
                    mm_f32(grad.T, q, out=dx_raw[c0:c1])
                del grad  # freed before the next chunk's logits and gradient are allocated
        local = (teacher_x, teacher_q, tgc_lse) if terms.local else None
        dq, dx, dscale = kernels.finalize(dq_raw, dx_raw, s, grads, parts, q, x, local, num_groups=num_groups,
                                          num_negatives=K, official=terms.official, tgc_scale=terms.tgc_scale,
                                          weights=terms.weights, **terms.flags)
        return dq, dx, _scale_grad(ctx, dscale), None, None, None


class TritonLoss(torch.autograd.Function):
    """The ``triton`` backend, with :class:`GemmLoss`'s signature and outputs (CUDA tensors, or
    CPU tensors under ``TRITON_INTERPRET=1``). The logits are kept from the forward (fp16 cosines
    for 16-bit inputs, fp32 for fp32) where they fit in ``chunk_bytes``, else recomputed in the
    backward (:func:`degla_fast.kernels.degla_loss.make_plan`)."""

    @staticmethod
    def forward(ctx, q, x, scale, teacher_q, teacher_x, terms: LossTerms):
        from .kernels import degla_loss as kernels
        from .kernels.loss_terms import finish, new_state

        R, K = q.shape[0], terms.num_negatives
        num_groups = x.shape[0] // (1 + K)
        s = scale.reshape(1).float()
        plan = kernels.plan_for(q, x, terms.dot_precision, num_groups=num_groups, with_cols=terms.with_cols,
                                store_bytes=terms.chunk_bytes)
        state = new_state(R, num_groups, plan.fwd_splits, plan.col_parts, q.device)
        logits = kernels.forward(q, x, s, state, plan, row_offset=terms.row_offset, num_negatives=K,
                                 with_igc=terms.with_igc)
        tgc, tgc_lse, dist = _local_forward(terms, q, x, teacher_q, teacher_x)
        outs = finish(state, tgc, dist, terms.weights, num_groups=num_groups, **terms.flags)
        _keep(ctx, terms, scale, q, x, s, teacher_q, teacher_x, state["row_m"][0], state["group_m"][0],
              state["col_m"][0], tgc_lse, logits)
        ctx.plan = plan
        return outs

    @staticmethod
    def backward(ctx, *grad_outs):
        from .kernels import degla_loss as kernels
        from .kernels import local_terms

        grads = _upstream(grad_outs)
        if grads is None:
            return None, None, None, None, None, None
        q, x, s, teacher_q, teacher_x, row_lse, group_lse, col_lse, tgc_lse, logits = ctx.saved_tensors
        terms = ctx.terms
        dq, dx = torch.empty_like(q), torch.empty_like(x)
        if terms.local:  # written first; the global term's kernels add to it
            local_terms.local_backward(x, teacher_x, q, teacher_q, terms.num_negatives, terms.tgc_scale, tgc_lse,
                                       grads, terms.weights[2:], dx, dq, terms.official)
        dscale = kernels.backward(q, x, logits, s, grads, (row_lse, group_lse, col_lse), dq, dx, ctx.plan,
                                  row_offset=terms.row_offset, num_negatives=terms.num_negatives,
                                  weights=terms.weights, accumulate=terms.local, **terms.flags)
        return dq, dx, _scale_grad(ctx, dscale), None, None, None


FUSED = {"gemm": GemmLoss, "triton": TritonLoss}
