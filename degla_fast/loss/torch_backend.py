"""The ``torch`` backend of the DeGLA loss (the fused ``gemm`` and ``triton`` backends are
:mod:`degla_fast.loss.gemm_backend` and :mod:`degla_fast.loss.triton_backend`), and the O(B*K*D)
local terms in plain torch, which the fused backends also use where their local kernel does not
apply (K > 8, or ``local_loss`` across ranks).

The forward keeps only per-row log-sum-exps; the backward recomputes the logits in row blocks of
ordinary matmuls (peak extra memory: one block of ``chunk_bytes``). It runs anywhere torch does.
"""
from __future__ import annotations

import torch

from ..matmul import loss_matmuls, mm_f32


def group_columns(rows: int, row_offset: int, num_negatives: int, num_groups: int, device) -> torch.Tensor:
    """[rows, 1+K] columns of each row's IGC group; column 0 is the target."""
    target = torch.arange(rows, device=device) + row_offset
    negatives = num_groups + target[:, None] * num_negatives + torch.arange(num_negatives, device=device)
    return torch.cat([target[:, None], negatives], dim=1)


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32 for half/bf16/fp32 inputs, fp64 for fp64 (exact gradchecks)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# The global term, row-blocked. Products go through :mod:`degla_fast.matmul` (16-bit GEMMs with
# fp32 results for 16-bit inputs, TF32 per ``dot_precision`` for fp32 ones); nothing is read on
# the host.

def _blocks(q: torch.Tensor, x: torch.Tensor, chunk_bytes: int):
    """Row blocks whose fp32 logits, their exp and the gradient (about three buffers of
    block x C) fit in ``chunk_bytes``."""
    per_row = max(1, x.shape[0]) * (8 + q.element_size())
    size = max(8, chunk_bytes // per_row)
    return range(0, q.shape[0], size), size


def _global_forward(q, x, scale, row_offset, num_negatives, with_igc, dot_precision, chunk_bytes):
    rows, cols = q.shape[0], x.shape[0]
    num_groups = cols // (1 + num_negatives)
    acc = acc_dtype(q)
    s = scale.to(acc)
    lse = torch.empty(rows, device=q.device, dtype=acc)
    lse_igc, pos = torch.empty_like(lse), torch.empty_like(lse)
    starts, size = _blocks(q, x, chunk_bytes)
    with loss_matmuls(q.device, dot_precision):
        for start in starts:
            stop = min(start + size, rows)
            logits = mm_f32(q[start:stop], x.T).mul_(s)
            group = logits.gather(1, group_columns(stop - start, row_offset + start, num_negatives, num_groups,
                                                   q.device))
            lse[start:stop] = torch.logsumexp(logits, dim=1)
            pos[start:stop] = group[:, 0]
            if with_igc:
                lse_igc[start:stop] = torch.logsumexp(group, dim=1)
    return lse, lse_igc, pos


def _global_backward(q, x, scale, row_offset, num_negatives, with_igc, lse, lse_igc, grad_out, dot_precision,
                     chunk_bytes):
    rows, cols = q.shape[0], x.shape[0]
    num_groups = cols // (1 + num_negatives)
    acc = acc_dtype(q)
    s = scale.to(acc)
    g_ce, g_igc = (grad_out.to(acc) / rows).unbind()
    # The gradient of each logit enters the products in the input dtype at unit scale (divided
    # by f = |g_ce| + |g_igc|, so it lies in [-1, 1]: no fp16 subnormals); f * s multiplies
    # the fp32 products.
    f = (g_ce.abs() + g_igc.abs()).clamp_min(1e-30)
    dq = torch.empty(q.shape, device=q.device, dtype=acc)
    dx = torch.zeros(x.shape, device=q.device, dtype=acc)
    dscale = torch.zeros((), device=q.device, dtype=acc)
    starts, size = _blocks(q, x, chunk_bytes)
    with loss_matmuls(q.device, dot_precision):
        for start in starts:
            stop = min(start + size, rows)
            dots = mm_f32(q[start:stop], x.T)
            dlogits = dots.mul(s).sub_(lse[start:stop, None]).exp_().mul_(g_ce)
            group_cols = group_columns(stop - start, row_offset + start, num_negatives, num_groups, q.device)
            d_group = torch.zeros(group_cols.shape, device=q.device, dtype=acc)
            d_group[:, 0] = -g_ce
            if with_igc:
                group = dots.gather(1, group_cols) * s
                d_group += torch.exp(group - lse_igc[start:stop, None]) * g_igc
                d_group[:, 0] -= g_igc
            dlogits.scatter_add_(1, group_cols, d_group)
            dscale += torch.vdot(dlogits.reshape(-1), dots.reshape(-1))
            unit = dlogits.div_(f).to(q.dtype)
            dq[start:stop] = mm_f32(unit, x)
            dx.add_(mm_f32(unit.T, q[start:stop]))
    return dq.mul_(f * s), dx.mul_(f * s), dscale


class GlobalContrast(torch.autograd.Function):
    """Mean cross-entropy of rows ``q`` over columns ``x`` (target ``row_offset + r``) and mean IGC,
    computed in row blocks of ordinary matmuls.

    q [R, D], x [Bg*(1+K), D], scale scalar (exp already applied) -> (ce, igc) scalars fp32.
    With ``with_igc=False`` the second output is zero. ``dot_precision``: dot precision of fp32
    inputs ("tf32" or "ieee"); ``chunk_bytes``: the torch backend's row-block budget.
    """

    @staticmethod
    def forward(ctx, q, x, scale, row_offset: int, num_negatives: int, with_igc: bool, dot_precision: str,
                chunk_bytes: int):
        lse, lse_igc, pos = _global_forward(q, x, scale, row_offset, num_negatives, with_igc, dot_precision,
                                                    chunk_bytes)
        ctx.save_for_backward(q, x, scale, lse, lse_igc)
        ctx.args = (row_offset, num_negatives, with_igc, dot_precision, chunk_bytes)
        ce = (lse - pos).mean()
        igc = (lse_igc - pos).mean() if with_igc else torch.zeros_like(ce)
        return ce, igc

    @staticmethod
    def backward(ctx, grad_ce, grad_igc):
        q, x, scale, lse, lse_igc = ctx.saved_tensors
        row_offset, num_negatives, with_igc, dot_precision, chunk_bytes = ctx.args
        grad_out = torch.stack([grad_ce, grad_igc])
        dq, dx, dscale = _global_backward(q, x, scale, row_offset, num_negatives, with_igc, lse, lse_igc,
                                                  grad_out, dot_precision, chunk_bytes)
        return (dq.to(q.dtype), dx.to(x.dtype), dscale.reshape(scale.shape).to(scale.dtype),
                None, None, None, None, None)


def local_terms(text, teacher_text, image, teacher_image, num_negatives: int, tgc_scale: float,
                      official_indexing: bool, with_tgc: bool, with_distill: bool):
    """TGC and distillation with ordinary autograd ops: O(B*K*D) memory, fp32 arithmetic.

    Returns (tgc mean, distill sum); a term that is not asked for is a zero scalar.
    """
    acc = acc_dtype(text)
    zero = text.new_zeros((), dtype=acc)
    batch, dim = image.shape
    tgc = distill = zero
    if with_tgc:
        positives = text[:batch].to(acc)
        negatives = text[batch:].to(acc)
        if official_indexing:
            # The release's repeat(1, K) mask: anchor i meets negative rows i + B*m.
            negatives = negatives.view(num_negatives, batch, dim).transpose(0, 1)
        else:
            negatives = negatives.view(batch, num_negatives, dim)
        pos = tgc_scale * (positives * teacher_text[:batch].to(acc)).sum(-1, keepdim=True)
        neg = tgc_scale * torch.einsum("bd,bkd->bk", positives, negatives)
        logits = torch.cat([pos, neg], dim=1)
        tgc = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
    if with_distill:
        distill = distill_sum(image, text, teacher_image, teacher_text)
    return tgc, distill


class _SquaredDistance(torch.autograd.Function):
    """sum((a - b)^2) without keeping a - b alive until backward (b receives no gradient)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        acc = acc_dtype(a)
        return (a.to(acc) - b.to(acc)).square_().sum()

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return ((a.to(grad.dtype) - b.to(grad.dtype)).mul_(2 * grad)).to(a.dtype), None


def distill_sum(image, text, teacher_image, teacher_text) -> torch.Tensor:
    """Sum of squared differences of images and all captions to the teacher (fp32, or fp64 for fp64)."""
    return _SquaredDistance.apply(image, teacher_image.detach()) + _SquaredDistance.apply(text, teacher_text.detach())

