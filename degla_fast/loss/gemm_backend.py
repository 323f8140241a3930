"""The ``gemm`` backend: cuBLAS GEMMs over column chunks with Triton epilogues, one autograd node
(the chunking and its passes: :mod:`degla_fast.loss.fused`'s doc; kernels:
:mod:`degla_fast.kernels.gemm_loss`)."""
from __future__ import annotations

import torch

from ..kernels import gemm_loss as kernels
from ..kernels import local_terms
from ..kernels.loss_terms import finish, new_state
from ..matmul import addmm_f32, loss_matmuls, mm_f32
from .fused import LossTerms, fused_backward, keep, local_args

#: Column chunks are multiples of this (GEMM tiles, 16-byte aligned rows) except the last.
CHUNK_ALIGN = 64


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
        R, K = q.shape[0], terms.num_negatives
        num_groups = terms.num_groups(x.shape[0])
        s = scale.reshape(1).float()
        state = new_state(R, num_groups, 1, 1 if terms.with_cols else 0, q.device)
        chunks = plan_chunks(R, x.shape[0], q.element_size(), terms.chunk_bytes)
        with loss_matmuls(q.device, terms.dot_precision):
            for c0, c1 in chunks:
                logits = _logits(q, x, c0, c1)
                kernels.stats(logits, s, state, c0=c0, row_offset=terms.row_offset, num_groups=num_groups,
                              num_negatives=K, **terms.flags)
        local = local_args(terms, q, x, teacher_q, teacher_x)
        tgc, tgc_lse, dist = local_terms.local_forward(*local) if local else (None, None, None)
        outs = finish(state, tgc, dist, terms.weights, num_groups=num_groups, **terms.flags)
        stored = logits if len(chunks) == 1 else None  # one chunk: keep it, skip the recomputation
        return keep(ctx, terms, scale, chunks, outs, q, x, s, teacher_q, teacher_x, state["row_m"],
                    state["group_m"], state["col_m"], tgc_lse, stored)

    @staticmethod
    @fused_backward
    def backward(ctx, grads):
        q, x, s, teacher_q, teacher_x, row_lse, group_lse, col_lse, tgc_lse, stored = ctx.saved_tensors
        terms, chunks = ctx.terms, ctx.launch
        K, R = terms.num_negatives, q.shape[0]
        num_groups = terms.num_groups(x.shape[0])
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
        return dq, dx, dscale
