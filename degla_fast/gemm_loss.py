"""The ``gemm`` backend of the DeGLA loss: cuBLAS GEMMs for the logits and both gradients, a few
Triton kernels (``degla_fast.kernels.gemm_loss``) for everything else.

Per chunk of columns ``x[c0:c1]`` the forward makes one GEMM, ``L = q @ x_c^T`` in fp32, and one
stats kernel reads it once (row and IGC-group log-sum-exps merged across chunks, the target
logit, and, when the rows are the whole batch, the text-to-image log-sum-exp of the first ``Bg``
columns: text-to-image is their transpose and needs no GEMM of its own). The backward writes the
gradient of each logit once, in the input dtype, and gets ``dq`` and ``dx`` from two more GEMMs;
no atomics. TGC and distillation run in the same forward and backward (the local kernel, and the
finalize kernel that also scales and casts ``dq``/``dx``), so the whole loss is one autograd node.

**Stored or recomputed.** The columns are chunked so that one chunk's fp32 logits and its
gradient (``R * Cc * (4 + itemsize)`` bytes) fit in ``chunk_bytes``. When every column fits in one
chunk, the forward keeps that chunk for the backward (three GEMM passes, the floor); otherwise
each chunk's logits are recomputed in the backward (four passes) and extra memory stays one
chunk. The default budget (:data:`DEFAULT_CHUNK_BYTES`, 256 MiB) stores everything up to B=2048
at K=4 (R x 5R logits: 126 MB at B=2048, bf16) and recomputes in two chunks at B=4096, which
keeps the whole loss near 330 MB of extra memory there instead of 500 MB.

Launches at world size 1 (K <= 8, TGC or distillation on): forward = per chunk (GEMM + stats)
+ local kernel + finish; backward = per chunk (recomputing GEMM if not stored + grad kernel +
two GEMMs) + finalize. Stored: 4 + 4 = 8; two chunks recomputed: 6 + 9 = 15. Every host-side
choice depends on shapes only and nothing is read back, so the loss can be captured in a CUDA
graph (docs/loss.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .matmul import addmm_f32, loss_matmuls, mm_f32

#: Bytes of one column chunk's fp32 logits plus their gradient in the input dtype (see the module doc).
DEFAULT_CHUNK_BYTES = 256 << 20
#: Column chunks are multiples of this (GEMM tiles, 16-byte aligned rows) except the last.
CHUNK_ALIGN = 64


@dataclass(frozen=True)
class GemmTerms:
    """What one :class:`GemmLoss` call computes.

    ``weights``: of (ce, igc, tgc, distill) in its ``total`` output. ``with_cols``: the rows are the
    whole batch (world size 1, or every rank's rows without ``local_loss``), so ``ce`` is half the
    image-to-text plus half the text-to-image cross-entropy; otherwise ``ce`` is the rows' mean.
    ``local``: TGC and distillation of that whole batch in the same call (K <= 8).
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
    precision: str = "tf32"


def plan_chunks(rows: int, cols: int, grad_itemsize: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Column ranges ``[(c0, c1), ...]`` of near-equal width, each within ``chunk_bytes`` (at least
    :data:`CHUNK_ALIGN` columns wide); one range when everything fits."""
    per_column = max(1, rows) * (4 + grad_itemsize)
    if per_column * cols <= chunk_bytes:
        return [(0, cols)]
    widest = max(CHUNK_ALIGN, chunk_bytes // per_column // CHUNK_ALIGN * CHUNK_ALIGN)
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
    """The loss of rows q [R, D] against columns x [Bg(1+K), D] (target of row r: column
    ``row_offset + r``), with ``scale`` (exp applied), per :class:`GemmTerms`.

    Returns five fp32 scalars ``(total, ce, igc, tgc, distill)``. ``teacher_q``/``teacher_x``
    (the teacher features of q and x) are read only with ``terms.local``; they get no gradient.
    Inputs must be contiguous fp32, bf16 or fp16 (the caller casts fp64 to fp32).
    """

    @staticmethod
    def forward(ctx, q, x, scale, teacher_q, teacher_x, terms: GemmTerms):
        from .kernels import gemm_loss as kernels
        from .kernels import local_terms

        R, K = q.shape[0], terms.num_negatives
        num_groups = x.shape[0] // (1 + K)
        s = scale.reshape(1).float()
        f32 = dict(device=q.device, dtype=torch.float32)
        state = {name: torch.empty(R, **f32) for name in ("row_m", "row_l", "pos", "group_m", "group_l")}
        state["col_lse"] = torch.empty(num_groups if terms.with_cols else 1, **f32)
        chunks = plan_chunks(R, x.shape[0], q.element_size(), terms.chunk_bytes)
        flags = dict(with_igc=terms.with_igc, with_cols=terms.with_cols)
        with loss_matmuls(q.device, terms.precision):
            for c0, c1 in chunks:
                logits = _logits(q, x, c0, c1)
                kernels.stats(logits, s, state, c0=c0, row_offset=terms.row_offset, num_groups=num_groups,
                              num_negatives=K, **flags)
        tgc = dist = tgc_lse = None
        if terms.local:
            tgc, tgc_lse, dist = local_terms.local_forward(x, teacher_x, q, teacher_q, K, terms.tgc_scale,
                                                           terms.official)
        outs = kernels.finish(state, tgc, dist, terms.weights, num_groups=num_groups, **flags)
        stored = logits if len(chunks) == 1 else None  # one chunk: keep it, skip the recomputation
        ctx.save_for_backward(q, x, s, teacher_q, teacher_x, state["row_m"], state["group_m"], state["col_lse"],
                              tgc_lse, stored)
        ctx.terms, ctx.chunks, ctx.scale_meta = terms, chunks, (scale.shape, scale.dtype)
        ctx.set_materialize_grads(False)
        return outs

    @staticmethod
    def backward(ctx, *grad_outs):
        from .kernels import gemm_loss as kernels

        if all(g is None for g in grad_outs):
            return None, None, None, None, None, None
        q, x, s, teacher_q, teacher_x, row_lse, group_lse, col_lse, tgc_lse, stored = ctx.saved_tensors
        terms, chunks = ctx.terms, ctx.chunks
        K = terms.num_negatives
        num_groups = x.shape[0] // (1 + K)
        if grad_outs[0] is not None and all(g is None for g in grad_outs[1:]):
            grads = grad_outs[0].reshape(1)  # the usual case: only the total is back-propagated
        else:
            grads = torch.stack([g.reshape(()) if g is not None else s.new_zeros(()) for g in grad_outs]).float()
        state = {"row_m": row_lse, "group_m": group_lse, "col_lse": col_lse}
        flags = dict(with_igc=terms.with_igc, with_cols=terms.with_cols)
        R = q.shape[0]
        # A one-column chunk's logits have a row stride of 2 (see _logits).
        strides = [stored.stride(0) if stored is not None else max(2, c1 - c0) for c0, c1 in chunks]
        parts = torch.empty(sum(kernels.num_grad_parts(R, c1 - c0, stride, q.device)
                                for (c0, c1), stride in zip(chunks, strides)), device=q.device, dtype=torch.float32)
        dq_raw = dx_raw = None
        if len(chunks) > 1:
            dx_raw = torch.empty(x.shape, device=x.device, dtype=torch.float32)
        offset = 0
        with loss_matmuls(q.device, terms.precision):
            for c0, c1 in chunks:
                logits = stored if stored is not None else _logits(q, x, c0, c1)
                grad = torch.empty_strided(logits.shape, logits.stride(), device=q.device, dtype=q.dtype)
                offset += kernels.grad(logits, s, grads, state, grad, parts, offset, c0=c0,
                                       row_offset=terms.row_offset, num_groups=num_groups, num_negatives=K,
                                       weights=terms.weights, **flags)
                del logits
                x_c = x[c0:c1]
                dq_raw = mm_f32(grad, x_c) if dq_raw is None else addmm_f32(dq_raw, grad, x_c)
                if dx_raw is None:
                    dx_raw = mm_f32(grad.T, q)
                else:
                    mm_f32(grad.T, q, out=dx_raw[c0:c1])
        local = (teacher_x, teacher_q, tgc_lse) if terms.local else None
        dq, dx, dscale = kernels.finalize(dq_raw, dx_raw, s, grads, parts, q, x, local, num_groups=num_groups,
                                          num_negatives=K, official=terms.official, tgc_scale=terms.tgc_scale,
                                          weights=terms.weights, **flags)
        shape, dtype = ctx.scale_meta
        return dq, dx, dscale.reshape(shape).to(dtype), None, None, None
