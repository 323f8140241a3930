"""Triton kernels of the DeGLA loss's per-sample terms: TGC and self-distillation. Tensors in, tensors out.

One program per sample i, O((1+K) * D) work, D in chunks of :data:`BLOCK_D`. The sample owns its
positive caption row ``i``, its K negative rows and its image row, so the backward writes every
gradient row exactly once (no atomics, no zero-fill):

* own negatives (the paper): rows ``B + i*K + m``;
* ``official=1`` (the authors' release, ``repeat(1, K)`` where ``repeat_interleave`` was meant):
  rows ``B + i + m*B``. Each negative row still belongs to exactly one anchor, so the same
  partition covers every row once for the distillation term too.

The jit helpers here (:func:`sample_rows`, :func:`tgc_dots`, :func:`local_probabilities`,
:func:`local_chunk_grads`) are also the local part of the gemm backend's finalize kernel
(:mod:`.gemm_loss`), so the two backends share one formula.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import LOCAL_MAX_NEGATIVES, POINTER_TYPES, KernelConfig, make_config
from .loss_terms import upstream
#: Feature chunk and warps: fixed, so D changes no compiled variant beyond its 16-divisibility.
BLOCK_D, WARPS = 256, 4


@triton.jit
def negative_rows(i, B, K, ks, official):
    """Rows of sample i's negatives ``ks``: its own, or the release's pairing (see the module doc)."""
    return tl.where(official != 0, B + i + ks * B, B + i * K + ks)


@triton.jit
def sample_rows(Text, TText, Img, TImg, i, B, K, official, dims, dim_ok, ks, k_ok, stride_t, stride_i):
    """One D chunk of sample i: t, t*, its K negatives n, n* [BLOCK_K, chunk], image and teacher image (fp32)."""
    neg_rows = negative_rows(i, B, K, ks, official)
    nmask = k_ok[:, None] & dim_ok[None, :]
    t = tl.load(Text + i * stride_t + dims, mask=dim_ok, other=0.0).to(tl.float32)
    tt = tl.load(TText + i * stride_t + dims, mask=dim_ok, other=0.0).to(tl.float32)
    n = tl.load(Text + neg_rows[:, None] * stride_t + dims[None, :], mask=nmask, other=0.0).to(tl.float32)
    nt = tl.load(TText + neg_rows[:, None] * stride_t + dims[None, :], mask=nmask, other=0.0).to(tl.float32)
    img = tl.load(Img + i * stride_i + dims, mask=dim_ok, other=0.0).to(tl.float32)
    timg = tl.load(TImg + i * stride_i + dims, mask=dim_ok, other=0.0).to(tl.float32)
    return neg_rows, t, tt, n, nt, img, timg


@triton.jit
def tgc_dots(Text, TText, Img, TImg, i, B, D, K, official, ks, k_ok, stride_t, stride_i, BLOCK_K: tl.constexpr,
             BLOCK_D: tl.constexpr):
    """(t . t*, [t . n_m], squared distance to the teacher) of sample i, over all D chunks."""
    pos = 0.0
    neg = tl.zeros([BLOCK_K], tl.float32)
    dist = 0.0
    for k0 in range(0, D, BLOCK_D):
        dims = k0 + tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        _, t, tt, n, nt, img, timg = sample_rows(Text, TText, Img, TImg, i, B, K, official, dims, dim_ok, ks, k_ok,
                                                 stride_t, stride_i)
        pos += tl.sum(t * tt, 0)
        neg += tl.sum(n * t[None, :], 1)
        dist += tl.sum((img - timg) * (img - timg), 0) + tl.sum((t - tt) * (t - tt), 0)
        dist += tl.sum(tl.sum((n - nt) * (n - nt), 1), 0)
    return pos, neg, dist


@triton.jit
def local_probabilities(pos, neg, lse, k_ok, tgc_scale):
    """TGC softmax of sample i: (p of the teacher positive, [p of each negative])."""
    return tl.exp(tgc_scale * pos - lse), tl.where(k_ok, tl.exp(tgc_scale * neg - lse), 0.0)


@triton.jit
def local_chunk_grads(t, tt, n, nt, img, timg, p_pos, p_neg, g_tgc, g_dist):
    """One D chunk of sample i's gradients (d t, d n [BLOCK_K, chunk], d image), for
    ``g_tgc = d/d(mean TGC) * tgc_scale / B`` and ``g_dist = 2 * d/d(distillation sum)``."""
    dt = g_tgc * ((p_pos - 1.0) * tt + tl.sum(p_neg[:, None] * n, 0)) + g_dist * (t - tt)
    dn = g_tgc * p_neg[:, None] * t[None, :] + g_dist * (n - nt)
    return dt, dn, g_dist * (img - timg)


@triton.jit(do_not_specialize=["B", "K", "official"])
def _local_fwd_kernel(Text, TText, Img, TImg, Tgc, Lse, Dist, B, D, K, official, tgc_scale, stride_t, stride_i,
                      BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Tgc[i] = TGC cross-entropy of sample i, Lse[i] its log-sum-exp, Dist[i] its squared distance."""
    i = tl.program_id(0)
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    pos, neg, dist = tgc_dots(Text, TText, Img, TImg, i, B, D, K, official, ks, k_ok, stride_t, stride_i, BLOCK_K,
                              BLOCK_D)
    pos = tgc_scale * pos
    neg = tl.where(k_ok, tgc_scale * neg, float("-inf"))
    m = tl.maximum(pos, tl.max(neg, 0))
    lse = m + tl.log(tl.exp(pos - m) + tl.sum(tl.exp(neg - m), 0))
    tl.store(Tgc + i, lse - pos)
    tl.store(Lse + i, lse)
    tl.store(Dist + i, dist)


@triton.jit(do_not_specialize=["B", "K", "official", "n_grads"])
def _local_bwd_kernel(Text, TText, Img, TImg, Lse, Grads, DText, DImg, B, D, K, official, n_grads, w_tgc, w_dist,
                      tgc_scale, stride_t, stride_i, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """DText/DImg rows of sample i (their dtype, the strides of text and image): the gradient of
    the TGC mean and the distillation sum with the upstream gradients ``Grads`` (see
    :func:`.loss_terms.upstream`: the total's times the weights, plus the terms' own)."""
    i = tl.program_id(0)
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    g_ce, g_igc, g_tgc, g_dist = upstream(Grads, n_grads, 0.0, 0.0, w_tgc, w_dist)
    g_tgc = g_tgc * tgc_scale / B
    g_dist = 2.0 * g_dist
    pos, neg, _ = tgc_dots(Text, TText, Img, TImg, i, B, D, K, official, ks, k_ok, stride_t, stride_i, BLOCK_K,
                           BLOCK_D)
    p_pos, p_neg = local_probabilities(pos, neg, tl.load(Lse + i), k_ok, tgc_scale)
    for k0 in range(0, D, BLOCK_D):
        dims = k0 + tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        neg_rows, t, tt, n, nt, img, timg = sample_rows(Text, TText, Img, TImg, i, B, K, official, dims, dim_ok, ks,
                                                        k_ok, stride_t, stride_i)
        dt, dn, dimg = local_chunk_grads(t, tt, n, nt, img, timg, p_pos, p_neg, g_tgc, g_dist)
        out = DText.dtype.element_ty
        tl.store(DText + i * stride_t + dims, dt.to(out), mask=dim_ok)
        tl.store(DText + neg_rows[:, None] * stride_t + dims[None, :], dn.to(out), mask=k_ok[:, None] & dim_ok[None, :])
        tl.store(DImg + i * stride_i + dims, dimg.to(DImg.dtype.element_ty), mask=dim_ok)


def local_blocks(D: int, K: int) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_D): all K negatives of a sample (K <= 8) in one tile, D in chunks of 256."""
    if K > LOCAL_MAX_NEGATIVES:
        raise ValueError(f"local kernels take at most {LOCAL_MAX_NEGATIVES} negatives per caption; got {K}")
    return max(2, triton.next_power_of_2(K)), BLOCK_D


def local_forward(text: torch.Tensor, teacher_text: torch.Tensor, image: torch.Tensor, teacher_image: torch.Tensor,
                  num_negatives: int, tgc_scale: float, official: bool = False):
    """Per-sample TGC loss, its log-sum-exp and distillation sum, each [B] fp32.

    text/teacher_text [B(1+K), D], image/teacher_image [B, D], contiguous rows, K <= 8."""
    B, D = image.shape
    tgc = torch.empty(B, device=text.device, dtype=torch.float32)
    lse, dist = torch.empty_like(tgc), torch.empty_like(tgc)
    block_k, block_d = local_blocks(D, num_negatives)
    _local_fwd_kernel[(B,)](text, teacher_text, image, teacher_image, tgc, lse, dist, B, D, num_negatives,
                            int(official), float(tgc_scale), text.stride(0), image.stride(0), BLOCK_K=block_k,
                            BLOCK_D=block_d, num_warps=WARPS)
    return tgc, lse, dist


def local_backward(text, teacher_text, image, teacher_image, num_negatives: int, tgc_scale: float,
                   lse: torch.Tensor, grads: torch.Tensor, weights: tuple, dtext: torch.Tensor, dimage: torch.Tensor,
                   official: bool = False) -> None:
    """Write the gradients of the TGC mean and the distillation sum w.r.t. text [B(1+K), D] and
    image [B, D] into ``dtext``/``dimage`` (shaped and strided like text and image, any float
    dtype). ``grads``: the upstream gradients (1 or 5 fp32, :func:`.loss_terms.upstream`);
    ``weights``: (tgc, distill) in the total."""
    B, D = image.shape
    if dtext.stride() != text.stride() or dimage.stride() != image.stride():
        raise ValueError("local kernels: the gradients must have the strides of text and image")
    block_k, block_d = local_blocks(D, num_negatives)
    _local_bwd_kernel[(B,)](text, teacher_text, image, teacher_image, lse, grads, dtext, dimage, B, D, num_negatives,
                            int(official), grads.numel(), float(weights[0]), float(weights[1]), float(tgc_scale),
                            text.stride(0), image.stride(0), BLOCK_K=block_k, BLOCK_D=block_d, num_warps=WARPS)


# ---------------------------------------------------------------------------------------------
# What the launchers above can choose, for the compile gate.

_WIDTH_ARGS = ("D", "stride_t", "stride_i")


def aligned_widths(D: int, names: tuple = _WIDTH_ARGS) -> tuple:
    """Integer arguments a launch sees as multiples of 16: D and the row strides (contiguous rows) when 16 | D."""
    return names if D % 16 == 0 else ()


def local_kernel_configs(dtype: str, D: int, K: int, arch: int) -> list[KernelConfig]:
    """The TGC + distillation kernel variants for ``dtype`` features of width D with K negatives."""
    ptr = POINTER_TYPES[dtype]
    block_k, block_d = local_blocks(D, K)
    feats = {"Text": ptr, "TText": ptr, "Img": ptr, "TImg": ptr}
    label = {"dtype": dtype, "D": D, "K": K, "tile": f"{block_k}x{block_d}"}
    out = []
    for kernel, types in ((_local_fwd_kernel, {"Tgc": "*fp32", "Lse": "*fp32", "Dist": "*fp32"}),
                          (_local_bwd_kernel, {"Lse": "*fp32", "Grads": "*fp32", "DText": ptr, "DImg": ptr,
                                               "w_tgc": "fp32", "w_dist": "fp32"})):
        out.append(make_config(kernel, {**feats, **types, "tgc_scale": "fp32"}, dict(BLOCK_K=block_k, BLOCK_D=block_d),
                               num_warps=WARPS, num_stages=3, arch=arch, aligned_ints=aligned_widths(D),
                               label=label))
    return out


#: What the gate enumerates: every dtype, D with and without 16 | D, K up to the maximum.
GATE_DTYPES = ("float32", "bfloat16", "float16")
GATE_DIMS = (40, 512)
GATE_NEGATIVES = (1, 4, 8)


def gate_configs(arch: int) -> list[KernelConfig]:
    """All variants over the gate's dtypes, widths (16 | D or not) and K (BLOCK_K 2, 4, 8)."""
    return [cfg for dtype in GATE_DTYPES for D in GATE_DIMS for K in GATE_NEGATIVES
            for cfg in local_kernel_configs(dtype, D, K, arch)]
