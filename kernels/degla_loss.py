"""Triton kernels of the DeGLA loss. Tensors in, tensors out: no autograd, no modules.

Global term (image-to-text with hard negatives, text-to-image, IGC): rows ``q`` [R, D] are
contrasted with columns ``x`` [C, D], ``C = Bg * (1 + K)``; row r's target is column
``row_offset + r`` and its IGC group is that column plus columns ``Bg + (row_offset + r) * K
+ m``. The forward streams column tiles with an online log-sum-exp per row (and per IGC
group, picked out of the same tiles); the backward recomputes the tiles, so nothing of size
R x C is ever stored.

Local terms (TGC and self-distillation): one program per sample, O(K * D) work each.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Finite "minus infinity" for running maxima: keeps exp(m_old - m_new) well defined when a
# tile holds no column of a row's IGC group. (Valid rows always end with l >= 1; the clamp in
# the final log only silences padding rows, whose results are never stored.)
_NEG_BIG = -1.0e30


@triton.jit
def _mm(a, b, F32_DOT: tl.constexpr):
    """a @ b accumulated in fp32: exact fp32 products (F32_DOT) or native half/bf16 tensor cores."""
    if F32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b.to(a.dtype))


@triton.jit
def _tile_logits(q, x_ptrs, col_ok, dim_ok, scale, F32_DOT: tl.constexpr):
    """Raw dot products and scaled logits of a [BLOCK_M, D] x [BLOCK_N, D] tile (fp32)."""
    x = tl.load(x_ptrs, mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
    dots = _mm(q, tl.trans(x), F32_DOT)
    return x, dots, dots * scale


@triton.jit
def _load_rows(Q, first, R, D, stride_q, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``first .. first + BLOCK_M`` of the ``[R, D]`` query matrix, zero outside, with their masks."""
    rows = first + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    q = tl.load(Q + rows[:, None] * stride_q + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    return rows, row_ok, dims, dim_ok, q


@triton.jit
def _global_fwd_kernel(Q, X, Scale, Lse, LseIgc, Pos, R, C, D, Bg, row_offset, K,
                       stride_q, stride_x,
                       WITH_IGC: tl.constexpr, F32_DOT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, row_ok, dims, dim_ok, q = _load_rows(Q, tl.program_id(0) * BLOCK_M, R, D, stride_q, BLOCK_M, BLOCK_D)
    scale = tl.load(Scale).to(tl.float32)
    target = rows + row_offset
    neg_lo = Bg + target * K

    m_all = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_all = tl.zeros([BLOCK_M], tl.float32)
    m_grp = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_grp = tl.zeros([BLOCK_M], tl.float32)
    pos = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, C, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < C
        _, dots, logits = _tile_logits(q, X + cols[:, None] * stride_x + dims[None, :], col_ok, dim_ok, scale, F32_DOT)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        m_new = tl.maximum(m_all, tl.max(logits, 1))
        l_all = l_all * tl.exp(m_all - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), 1)
        m_all = m_new
        is_target = cols[None, :] == target[:, None]
        pos += tl.sum(tl.where(is_target, logits, 0.0), 1)
        if WITH_IGC:
            in_group = is_target | ((cols[None, :] >= neg_lo[:, None]) & (cols[None, :] < neg_lo[:, None] + K))
            group_logits = tl.where(in_group, logits, float("-inf"))
            m_new = tl.maximum(m_grp, tl.max(group_logits, 1))
            l_grp = l_grp * tl.exp(m_grp - m_new) + tl.sum(tl.exp(group_logits - m_new[:, None]), 1)
            m_grp = m_new
    tl.store(Lse + rows, m_all + tl.log(tl.maximum(l_all, 1e-30)), mask=row_ok)
    tl.store(Pos + rows, pos, mask=row_ok)
    if WITH_IGC:
        tl.store(LseIgc + rows, m_grp + tl.log(tl.maximum(l_grp, 1e-30)), mask=row_ok)


@triton.jit
def _dlogits(logits, cols, col_ok, target, neg_lo, K, lse, lse_igc, g_ce, g_igc, WITH_IGC: tl.constexpr):
    """d(loss)/d(logits) of a tile: g_ce*(softmax - onehot) + g_igc*(group softmax - onehot)."""
    is_target = cols[None, :] == target[:, None]
    onehot = tl.where(is_target, 1.0, 0.0)
    p = tl.where(col_ok[None, :], tl.exp(logits - lse[:, None]), 0.0)
    dl = g_ce * (p - onehot)
    if WITH_IGC:
        in_group = is_target | ((cols[None, :] >= neg_lo[:, None]) & (cols[None, :] < neg_lo[:, None] + K))
        p_grp = tl.where(in_group & col_ok[None, :], tl.exp(logits - lse_igc[:, None]), 0.0)
        dl += g_igc * (p_grp - onehot)
    return dl


@triton.jit
def _global_bwd_dq_kernel(Q, X, Scale, Lse, LseIgc, GradOut, DQ, DScale, R, C, D, Bg, row_offset, K,
                          stride_q, stride_x, stride_dq,
                          WITH_IGC: tl.constexpr, F32_DOT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, row_ok, dims, dim_ok, q = _load_rows(Q, tl.program_id(0) * BLOCK_M, R, D, stride_q, BLOCK_M, BLOCK_D)
    scale = tl.load(Scale).to(tl.float32)
    g_ce = tl.load(GradOut).to(tl.float32) / R
    g_igc = tl.load(GradOut + 1).to(tl.float32) / R
    lse = tl.load(Lse + rows, mask=row_ok, other=0.0)
    lse_igc = tl.load(LseIgc + rows, mask=row_ok, other=0.0)
    target = rows + row_offset
    neg_lo = Bg + target * K
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dscale = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, C, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < C
        x, dots, logits = _tile_logits(q, X + cols[:, None] * stride_x + dims[None, :], col_ok, dim_ok, scale, F32_DOT)
        dl = _dlogits(logits, cols, col_ok, target, neg_lo, K, lse, lse_igc, g_ce, g_igc, WITH_IGC)
        dl = tl.where(row_ok[:, None], dl, 0.0)
        dscale += tl.sum(dl * dots, 1)
        dq += _mm(dl.to(x.dtype), x, F32_DOT)
    tl.store(DQ + rows[:, None] * stride_dq + dims[None, :], dq * scale, mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(DScale + rows, dscale, mask=row_ok)


@triton.jit
def _global_bwd_dx_kernel(Q, X, Scale, Lse, LseIgc, GradOut, DX, R, C, D, Bg, row_offset, K,
                          stride_q, stride_x, stride_dx,
                          WITH_IGC: tl.constexpr, F32_DOT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    scale = tl.load(Scale).to(tl.float32)
    g_ce = tl.load(GradOut).to(tl.float32) / R
    g_igc = tl.load(GradOut + 1).to(tl.float32) / R
    dx = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, R, BLOCK_M):
        rows, row_ok, _, _, q = _load_rows(Q, start, R, D, stride_q, BLOCK_M, BLOCK_D)
        lse = tl.load(Lse + rows, mask=row_ok, other=0.0)
        lse_igc = tl.load(LseIgc + rows, mask=row_ok, other=0.0)
        target = rows + row_offset
        neg_lo = Bg + target * K
        _, dots, logits = _tile_logits(q, X + cols[:, None] * stride_x + dims[None, :], col_ok, dim_ok, scale, F32_DOT)
        dl = _dlogits(logits, cols, col_ok, target, neg_lo, K, lse, lse_igc, g_ce, g_igc, WITH_IGC)
        dl = tl.where(row_ok[:, None], dl, 0.0)
        dx += _mm(tl.trans(dl).to(q.dtype), q, F32_DOT)
    tl.store(DX + cols[:, None] * stride_dx + dims[None, :], dx * scale, mask=col_ok[:, None] & dim_ok[None, :])


def _f32_dot(q: torch.Tensor) -> bool:
    """fp32 products for fp32 inputs, and under the CPU interpreter, whose bf16/fp16 tl.dot is wrong
    (triton 3.8); half/bf16 inputs on a GPU use tensor cores with fp32 accumulation."""
    return q.dtype == torch.float32 or q.device.type == "cpu"


def _global_blocks(D: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps): whole feature rows per tile, so the backward's
    [BLOCK, D] fp32 accumulators stay in registers; narrower tiles and more warps for wide D."""
    block_d = max(16, triton.next_power_of_2(D))
    if block_d <= 128:
        return 64, 64, block_d, 4
    if block_d <= 512:
        return 32, 64, block_d, 8
    return 16, 32, block_d, 8


def _check_global(q: torch.Tensor, x: torch.Tensor, num_negatives: int, row_offset: int) -> int:
    if q.dim() != 2 or x.dim() != 2 or q.shape[1] != x.shape[1]:
        raise ValueError(f"global kernel: expected q [R, D] and x [C, D], got {tuple(q.shape)} and {tuple(x.shape)}")
    if q.dtype != x.dtype:
        raise ValueError(f"global kernel: q and x dtypes differ ({q.dtype} vs {x.dtype})")
    if x.shape[0] % (1 + num_negatives):
        raise ValueError(f"global kernel: {x.shape[0]} columns is not a multiple of 1 + K = {1 + num_negatives}")
    num_groups = x.shape[0] // (1 + num_negatives)
    if row_offset + q.shape[0] > num_groups:
        raise ValueError(f"global kernel: rows {row_offset}..{row_offset + q.shape[0]} exceed the {num_groups} targets")
    return num_groups


def global_forward(q: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, row_offset: int, num_negatives: int,
                   with_igc: bool):
    """Per-row log-sum-exp over all columns, over the IGC group, and the target logit, each [R] fp32."""
    q, x = q.contiguous(), x.contiguous()
    num_groups = _check_global(q, x, num_negatives, row_offset)
    R, D = q.shape
    C = x.shape[0]
    lse = torch.empty(R, device=q.device, dtype=torch.float32)
    lse_igc = torch.empty_like(lse) if with_igc else lse
    pos = torch.empty_like(lse)
    block_m, block_n, block_d, num_warps = _global_blocks(D)
    _global_fwd_kernel[(triton.cdiv(R, block_m),)](
        q, x, scale.reshape(1).float(), lse, lse_igc, pos, R, C, D, num_groups, row_offset, num_negatives,
        q.stride(0), x.stride(0), WITH_IGC=with_igc, F32_DOT=_f32_dot(q),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)
    return lse, lse_igc, pos


def global_backward(q: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, row_offset: int, num_negatives: int,
                    with_igc: bool, lse: torch.Tensor, lse_igc: torch.Tensor, grad_out: torch.Tensor):
    """Gradients of ``g_ce * mean(ce) + g_igc * mean(igc)`` for ``grad_out = [g_ce, g_igc]``.

    Returns (dq [R, D] fp32, dx [C, D] fp32, dscale scalar fp32); logits are recomputed tile by tile.
    """
    q, x = q.contiguous(), x.contiguous()
    num_groups = _check_global(q, x, num_negatives, row_offset)
    R, D = q.shape
    C = x.shape[0]
    dq = torch.empty(R, D, device=q.device, dtype=torch.float32)
    dx = torch.empty(C, D, device=q.device, dtype=torch.float32)
    dscale_rows = torch.empty(R, device=q.device, dtype=torch.float32)
    grad_out = grad_out.to(torch.float32).contiguous()
    block_m, block_n, block_d, num_warps = _global_blocks(D)
    common = dict(WITH_IGC=with_igc, F32_DOT=_f32_dot(q), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                  num_warps=num_warps)
    scale = scale.reshape(1).float()
    _global_bwd_dq_kernel[(triton.cdiv(R, block_m),)](
        q, x, scale, lse, lse_igc, grad_out, dq, dscale_rows, R, C, D, num_groups, row_offset, num_negatives,
        q.stride(0), x.stride(0), dq.stride(0), **common)
    _global_bwd_dx_kernel[(triton.cdiv(C, block_n),)](
        q, x, scale, lse, lse_igc, grad_out, dx, R, C, D, num_groups, row_offset, num_negatives,
        q.stride(0), x.stride(0), dx.stride(0), **common)
    return dq, dx, dscale_rows.sum()


# ---------------------------------------------------------------------------------------------
# TGC + self-distillation: one program per sample.


@triton.jit
def _load_sample(Text, TText, Img, TImg, i, B, D, K, stride_t, stride_i,
                 BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    neg_rows = B + i * K + ks
    nmask = k_ok[:, None] & dim_ok[None, :]
    t = tl.load(Text + i * stride_t + dims, mask=dim_ok, other=0.0).to(tl.float32)
    tt = tl.load(TText + i * stride_t + dims, mask=dim_ok, other=0.0).to(tl.float32)
    n = tl.load(Text + neg_rows[:, None] * stride_t + dims[None, :], mask=nmask, other=0.0).to(tl.float32)
    nt = tl.load(TText + neg_rows[:, None] * stride_t + dims[None, :], mask=nmask, other=0.0).to(tl.float32)
    img = tl.load(Img + i * stride_i + dims, mask=dim_ok, other=0.0).to(tl.float32)
    timg = tl.load(TImg + i * stride_i + dims, mask=dim_ok, other=0.0).to(tl.float32)
    return dims, dim_ok, ks, k_ok, neg_rows, t, tt, n, nt, img, timg


@triton.jit
def _local_fwd_kernel(Text, TText, Img, TImg, Tgc, Lse, Dist, B, D, K, tgc_scale, stride_t, stride_i,
                      BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0)
    dims, dim_ok, ks, k_ok, neg_rows, t, tt, n, nt, img, timg = _load_sample(
        Text, TText, Img, TImg, i, B, D, K, stride_t, stride_i, BLOCK_K, BLOCK_D)
    pos = tgc_scale * tl.sum(t * tt, 0)
    neg = tl.where(k_ok, tgc_scale * tl.sum(n * t[None, :], 1), float("-inf"))
    m = tl.maximum(pos, tl.max(neg, 0))
    lse = m + tl.log(tl.exp(pos - m) + tl.sum(tl.exp(neg - m), 0))
    tl.store(Tgc + i, lse - pos)
    tl.store(Lse + i, lse)
    dist = tl.sum((img - timg) * (img - timg), 0) + tl.sum((t - tt) * (t - tt), 0) + tl.sum(tl.sum((n - nt) * (n - nt), 1), 0)
    tl.store(Dist + i, dist)


@triton.jit
def _local_bwd_kernel(Text, TText, Img, TImg, Lse, GradOut, DText, DImg, B, D, K, tgc_scale,
                      stride_t, stride_i, stride_dt, stride_di,
                      BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0)
    dims, dim_ok, ks, k_ok, neg_rows, t, tt, n, nt, img, timg = _load_sample(
        Text, TText, Img, TImg, i, B, D, K, stride_t, stride_i, BLOCK_K, BLOCK_D)
    g_tgc = tl.load(GradOut).to(tl.float32) * tgc_scale / B
    g_dist = 2.0 * tl.load(GradOut + 1).to(tl.float32)
    lse = tl.load(Lse + i)
    p_pos = tl.exp(tgc_scale * tl.sum(t * tt, 0) - lse)
    p_neg = tl.where(k_ok, tl.exp(tgc_scale * tl.sum(n * t[None, :], 1) - lse), 0.0)
    dt = g_tgc * ((p_pos - 1.0) * tt + tl.sum(p_neg[:, None] * n, 0)) + g_dist * (t - tt)
    dn = g_tgc * p_neg[:, None] * t[None, :] + g_dist * (n - nt)
    tl.store(DText + i * stride_dt + dims, dt, mask=dim_ok)
    tl.store(DText + neg_rows[:, None] * stride_dt + dims[None, :], dn, mask=k_ok[:, None] & dim_ok[None, :])
    tl.store(DImg + i * stride_di + dims, g_dist * (img - timg), mask=dim_ok)


def _local_blocks(D: int, K: int) -> tuple[int, int]:
    return max(2, triton.next_power_of_2(K)), max(16, triton.next_power_of_2(D))


def local_forward(text: torch.Tensor, teacher_text: torch.Tensor, image: torch.Tensor, teacher_image: torch.Tensor,
                  num_negatives: int, tgc_scale: float):
    """Per-sample TGC loss, its log-sum-exp and distillation sum, each [B] fp32 (own-negative indexing)."""
    text, teacher_text = text.contiguous(), teacher_text.contiguous()
    image, teacher_image = image.contiguous(), teacher_image.contiguous()
    B, D = image.shape
    tgc = torch.empty(B, device=text.device, dtype=torch.float32)
    lse, dist = torch.empty_like(tgc), torch.empty_like(tgc)
    block_k, block_d = _local_blocks(D, num_negatives)
    _local_fwd_kernel[(B,)](text, teacher_text, image, teacher_image, tgc, lse, dist, B, D, num_negatives,
                            float(tgc_scale), text.stride(0), image.stride(0), BLOCK_K=block_k, BLOCK_D=block_d)
    return tgc, lse, dist


def local_backward(text, teacher_text, image, teacher_image, num_negatives: int, tgc_scale: float,
                   lse: torch.Tensor, grad_out: torch.Tensor):
    """Gradients of ``g_tgc * mean(tgc) + g_dist * sum(dist)`` w.r.t. text [B(1+K), D] and image [B, D] (fp32)."""
    text, teacher_text = text.contiguous(), teacher_text.contiguous()
    image, teacher_image = image.contiguous(), teacher_image.contiguous()
    B, D = image.shape
    dtext = torch.empty(text.shape, device=text.device, dtype=torch.float32)
    dimage = torch.empty(image.shape, device=text.device, dtype=torch.float32)
    block_k, block_d = _local_blocks(D, num_negatives)
    _local_bwd_kernel[(B,)](text, teacher_text, image, teacher_image, lse, grad_out.to(torch.float32).contiguous(),
                            dtext, dimage, B, D, num_negatives, float(tgc_scale), text.stride(0), image.stride(0),
                            dtext.stride(0), dimage.stride(0), BLOCK_K=block_k, BLOCK_D=block_d)
    return dtext, dimage
