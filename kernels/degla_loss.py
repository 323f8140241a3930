"""Triton kernels of the DeGLA loss. Tensors in, tensors out: no autograd, no modules.

Global term (image-to-text with hard negatives, text-to-image, IGC): rows ``q`` [R, D] are
contrasted with columns ``x`` [C, D]. Two kinds of kernel share the work:

* **Softmax kernels** see only the R x C logits ``s * q @ x^T``. The forward streams column
  tiles with an online log-sum-exp per row; the backward recomputes each tile once and adds
  ``P @ x`` and ``P^T @ q`` (P the softmax) into fp32 gradient buffers. Nothing of size R x C
  is stored. Logit tiles are built over chunks of the feature dimension, so any D fits and the
  per-thread state is a few [BLOCK_M, BLOCK_N] / [BLOCK, BLOCK_K] tiles whatever D is. The
  columns are split across programs (their partial log-sum-exps merged afterwards, as
  split-K / flash-decoding do) so that small batches still launch many programs.
* **Group kernels** handle each row's own group: its target column and, for IGC, its K
  negatives (``row_offset + r`` and ``Bg + (row_offset + r) * K + m``). That is O(R * (1+K) * D)
  work, so the softmax kernels carry no per-column masks beyond the edges.

Forward + backward of one direction is four GEMM-sized passes over the logits (forward,
recomputation, ``P @ x``, ``P^T @ q``); storing the logits instead would save one of them at
O(R x C) memory.

Local terms (TGC and self-distillation): one program per sample, O(K * D) work each, over
chunks of D.

Dot precision (``DOT``): 0 = exact fp32 products ("ieee"; also used under the CPU interpreter,
which computes every dot in fp32), 1 = TF32 tensor cores for fp32 inputs, 2 = bf16/fp16 tensor
cores. Accumulation is fp32 in every mode. The probabilities enter the backward products cast to
the input dtype (unit scale, so fp16 never sees the tiny ``g / R`` factor); the factor is applied
to the fp32 product.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import POINTER_TYPES, PRECISIONS, KernelConfig, arch_of, make_config

# Finite "minus infinity" for running maxima: keeps exp(m_old - m_new) defined before the first
# valid column. A constexpr: a GPU compile rejects plain Python globals inside @jit functions.
_NEG_BIG = tl.constexpr(-1.0e30)

DOT_IEEE, DOT_TF32, DOT_NATIVE = 0, 1, 2


@triton.jit
def _dot(a, b, acc, DOT: tl.constexpr):
    """acc + a @ b with fp32 accumulation in the chosen precision (see the module doc)."""
    if DOT == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif DOT == 1:
        return tl.dot(a, b, acc, input_precision="tf32")
    else:
        return tl.dot(a, b.to(a.dtype), acc)


@triton.jit
def _split_columns(split, tiles_per_split, C, BLOCK_N: tl.constexpr):
    """The columns ``[first, last)`` of column split ``split``: one walk for the forward and the
    backward, whose recomputed logits must equal the forward's tile for tile."""
    first = split * tiles_per_split * BLOCK_N
    return first, tl.minimum(first + tiles_per_split * BLOCK_N, C)


@triton.jit
def _tile_dots(Q, X, rows, row_ok, cols, col_ok, D, stride_q, stride_x,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
    """Raw dot products q[rows] . x[cols] of a [BLOCK_M, BLOCK_N] tile, over D in BLOCK_K chunks (fp32)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        dims = k0 + tl.arange(0, BLOCK_K)
        dim_ok = dims < D
        q = tl.load(Q + rows[:, None] * stride_q + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        x = tl.load(X + cols[:, None] * stride_x + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        acc = _dot(q, tl.trans(x), acc, DOT)
    return acc


@triton.jit(do_not_specialize=["R", "C", "tiles_per_split", "row_offset"])
def _lse_fwd_kernel(Q, X, Scale, MPart, LPart, PosPart, R, C, D, row_offset, stride_q, stride_x, tiles_per_split,
                    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial (max, sum of exp, target logit) of every row over the columns of split ``program_id(1)``.

    Row r's target is column ``row_offset + r``; splits without it contribute 0 to its target logit.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    target = rows + row_offset
    split = tl.program_id(1)
    scale = tl.load(Scale).to(tl.float32)
    m_run = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_run = tl.zeros([BLOCK_M], tl.float32)
    pos = tl.zeros([BLOCK_M], tl.float32)
    first, last = _split_columns(split, tiles_per_split, C, BLOCK_N)
    for start in range(first, last, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < C
        dots = _tile_dots(Q, X, rows, row_ok, cols, col_ok, D, stride_q, stride_x, BLOCK_M, BLOCK_N, BLOCK_K, DOT)
        logits = tl.where(col_ok[None, :], dots * scale, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(logits, 1))
        l_run = l_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), 1)
        m_run = m_new
        pos += tl.sum(tl.where(cols[None, :] == target[:, None], logits, 0.0), 1)
    tl.store(MPart + split * R + rows, m_run, mask=row_ok)
    tl.store(LPart + split * R + rows, l_run, mask=row_ok)
    tl.store(PosPart + split * R + rows, pos, mask=row_ok)


@triton.jit(do_not_specialize=["R", "C", "tiles_per_split", "row_offset"])
def _lse_bwd_kernel(Q, X, Scale, Lse, GradOut, DQ, DX, DScale, R, C, D, row_offset, stride_q, stride_x,
                    tiles_per_split,
                    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Adds g/R * s * (G @ x) to DQ, g/R * s * (G^T @ q) to DX and g/R * sum(G * dots) to DScale.

    G = P - onehot(target): the gradient of the mean cross-entropy per logit at unit scale, with
    P the softmax per row (from ``Lse``) and row r's target column ``row_offset + r``; g = GradOut[0];
    DQ/DX fp32, pre-zeroed. The one-hot is subtracted here, from the same recomputed logits, so a
    saturated row (P at its target rounding to 1) gives a zero gradient instead of the difference
    of two large, separately rounded products.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    target = rows + row_offset
    split = tl.program_id(1)
    scale = tl.load(Scale).to(tl.float32)
    g = tl.load(GradOut).to(tl.float32) / R
    alpha = g * scale
    lse = tl.load(Lse + rows, mask=row_ok, other=0.0)
    dscale = tl.zeros([BLOCK_M], tl.float32)
    first, last = _split_columns(split, tiles_per_split, C, BLOCK_N)
    for start in range(first, last, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < C
        dots = _tile_dots(Q, X, rows, row_ok, cols, col_ok, D, stride_q, stride_x, BLOCK_M, BLOCK_N, BLOCK_K, DOT)
        p = tl.exp(dots * scale - lse[:, None]) - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
        p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
        dscale += tl.sum(p * dots, 1)
        p_in = p.to(Q.dtype.element_ty)  # unit scale, in [-1, 1]: no fp16 underflow from g / R
        for k0 in range(0, D, BLOCK_K):
            dims = k0 + tl.arange(0, BLOCK_K)
            dim_ok = dims < D
            x = tl.load(X + cols[:, None] * stride_x + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
            dq = _dot(p_in, x, tl.zeros([BLOCK_M, BLOCK_K], tl.float32), DOT)
            tl.atomic_add(DQ + rows[:, None] * D + dims[None, :], dq * alpha,
                          mask=row_ok[:, None] & dim_ok[None, :], sem="relaxed")
            q = tl.load(Q + rows[:, None] * stride_q + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
            dx = _dot(tl.trans(p_in), q, tl.zeros([BLOCK_N, BLOCK_K], tl.float32), DOT)
            tl.atomic_add(DX + cols[:, None] * D + dims[None, :], dx * alpha,
                          mask=col_ok[:, None] & dim_ok[None, :], sem="relaxed")
    tl.atomic_add(DScale, tl.sum(dscale, 0) * g, sem="relaxed")


@triton.jit
def _group_column(rows, j, Bg, row_offset, K):
    """Column of member ``j`` of each row's group: 0 = the target, 1..K = its own negatives."""
    target = rows + row_offset
    return tl.where(j == 0, target, Bg + target * K + j - 1)


@triton.jit(do_not_specialize=["R", "Bg", "row_offset", "K"])
def _group_fwd_kernel(Q, X, Scale, GLogits, R, D, Bg, row_offset, K, stride_q, stride_x,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """GLogits[r, j] = s * q_r . x_{column j of row r's group}, j = 0..K (fp32, exact products)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    scale = tl.load(Scale).to(tl.float32)
    for j in range(0, K + 1):
        cols = _group_column(rows, j, Bg, row_offset, K)
        acc = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            dims = k0 + tl.arange(0, BLOCK_K)
            ok = row_ok[:, None] & (dims < D)[None, :]
            q = tl.load(Q + rows[:, None] * stride_q + dims[None, :], mask=ok, other=0.0).to(tl.float32)
            x = tl.load(X + cols[:, None] * stride_x + dims[None, :], mask=ok, other=0.0).to(tl.float32)
            acc += tl.sum(q * x, 1)
        tl.store(GLogits + rows * (K + 1) + j, acc * scale, mask=row_ok)


@triton.jit(do_not_specialize=["R", "Bg", "row_offset", "K"])
def _group_bwd_kernel(Q, X, Scale, DGroup, DQ, DX, R, D, Bg, row_offset, K, stride_q, stride_x,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """DQ[r] += s * sum_j DGroup[r, j] x_{c(r, j)}; DX[c(r, j)] += s * DGroup[r, j] q_r.

    Group columns of different rows are distinct, so the DX updates never collide.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    scale = tl.load(Scale).to(tl.float32)
    for k0 in range(0, D, BLOCK_K):
        dims = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (dims < D)[None, :]
        q = tl.load(Q + rows[:, None] * stride_q + dims[None, :], mask=ok, other=0.0).to(tl.float32)
        dq = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        for j in range(0, K + 1):
            cols = _group_column(rows, j, Bg, row_offset, K)
            w = tl.load(DGroup + rows * (K + 1) + j, mask=row_ok, other=0.0) * scale
            x = tl.load(X + cols[:, None] * stride_x + dims[None, :], mask=ok, other=0.0).to(tl.float32)
            dq += w[:, None] * x
            dx_ptrs = DX + cols[:, None] * D + dims[None, :]
            tl.store(dx_ptrs, tl.load(dx_ptrs, mask=ok, other=0.0) + w[:, None] * q, mask=ok)
        dq_ptrs = DQ + rows[:, None] * D + dims[None, :]
        tl.store(dq_ptrs, tl.load(dq_ptrs, mask=ok, other=0.0) + dq, mask=ok)


# ---------------------------------------------------------------------------------------------
# Launch choices: one table, read by the launchers and by gate_configs (the compile gate).

#: Feature dimensions, negatives per caption and input dtypes the compile gate enumerates: D=16
#: takes the narrow tiles with 16 | D, D=40 the narrow tiles without, D >= 64 the table's.
GATE_DIMS = (16, 40, 64, 128, 256, 384, 512, 640, 768, 1024, 1280)
GATE_NEGATIVES = (1, 4, 8)
GATE_DTYPES = ("float32", "bfloat16", "float16")

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, forward stages, backward stages) of the softmax kernels
# by (dot mode, arch), chosen with the compile gate (registers, spills, shared memory on Triton
# 3.6 and 3.8). Forward and backward share the tile and warps on purpose: the backward's
# recomputed logits then equal the forward's bit for bit (same chunks of D, same dot
# instructions), so at a saturated row P rounds to exactly 1 at the target and P - onehot to 0,
# as in a design that stores the logits. 16-bit on Hopper: 128-row tiles so the dots map to
# wgmma. The backward keeps its fp32 tile, its 16-bit copy and two [BLOCK, BLOCK_K] products live
# at once, which sets BLOCK_K.
_SOFTMAX_TILES = {
    (DOT_NATIVE, 90): (128, 64, 32, 8, 3, 2),
    (DOT_NATIVE, 80): (128, 64, 32, 8, 3, 2),
    (DOT_TF32, 90): (128, 64, 32, 8, 3, 2),
    (DOT_TF32, 80): (64, 64, 16, 8, 2, 2),
    (DOT_IEEE, 90): (64, 64, 16, 8, 1, 1),
    (DOT_IEEE, 80): (64, 64, 16, 8, 1, 1),
}
# Features narrower than the table's BLOCK_K or not a multiple of 16 (no vector loads, so more
# address registers): one narrow tile on both architectures.
_NARROW_TILES = {
    DOT_NATIVE: (64, 64, 16, 8, 2, 1),
    DOT_TF32: (64, 64, 16, 8, 2, 1),
    DOT_IEEE: (64, 64, 16, 8, 1, 1),
}
# Feature chunk and rows of the group kernels: fixed, so D and K change no compiled variant beyond
# the 16-divisibility of D.
_GROUP_BLOCK_M, _GROUP_BLOCK_K, _GROUP_WARPS = 16, 64, 4
#: Programs the forward and backward aim for: a few per SM, so small batches fill the GPU.
_PROGRAMS_PER_SM = 4
#: The interpreter runs programs one by one: a few splits keep the merge exercised in tests.
_INTERPRETER_PROGRAMS = 4


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def dot_mode(dtype_name: str, precision: str, interpreted: bool) -> int:
    """DOT constexpr for inputs of ``dtype_name``: 16-bit tensor cores, TF32 or exact fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if interpreted or dtype_name == "float64":
        return DOT_IEEE  # the interpreter computes every dot in fp32; fp64 inputs are cast to fp32 dots
    if dtype_name == "float32":
        return DOT_TF32 if precision == "tf32" else DOT_IEEE
    return DOT_NATIVE


def softmax_tiles(dot: int, D: int, arch: int, which: str) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the ``fwd``/``bwd`` softmax kernel."""
    tiles = _SOFTMAX_TILES[(dot, arch)]
    if D % 16 or D < tiles[2]:
        tiles = _NARROW_TILES[dot]
    block_m, block_n, block_k, warps, fwd_stages, bwd_stages = tiles
    return block_m, block_n, block_k, warps, fwd_stages if which == "fwd" else bwd_stages


def _arch(device: torch.device) -> int:
    return arch_of(torch.cuda.get_device_capability(device)) if device.type == "cuda" else 90


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_PROGRAMS


def _splits(R: int, C: int, block_m: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(number of column splits, column tiles per split) so rows x splits reaches the target."""
    row_blocks, col_tiles = triton.cdiv(R, block_m), triton.cdiv(C, block_n)
    wanted = max(1, min(col_tiles, triton.cdiv(_target_programs(device), row_blocks)))
    per_split = triton.cdiv(col_tiles, wanted)
    return triton.cdiv(col_tiles, per_split), per_split


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


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


def row_lse(q: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, row_offset: int = 0, precision: str = "tf32"):
    """Log-sum-exp and target logit of every row of ``scale * q @ x^T`` (target of row r: column
    ``row_offset + r``): q [R, D], x [C, D] -> (lse [R], pos [R]) fp32."""
    q, x = q.contiguous(), x.contiguous()
    R, D = q.shape
    C = x.shape[0]
    if row_offset + R > C:
        raise ValueError(f"softmax kernel: targets {row_offset}..{row_offset + R} exceed the {C} columns")
    dot = dot_mode(_dtype_name(q.dtype), precision, _interpreted(q))
    block_m, block_n, block_k, warps, stages = softmax_tiles(dot, D, _arch(q.device), "fwd")
    splits, per_split = _splits(R, C, block_m, block_n, q.device)
    parts = torch.empty(3, splits, R, device=q.device, dtype=torch.float32)
    m_part, l_part, pos_part = parts.unbind()
    _lse_fwd_kernel[(triton.cdiv(R, block_m), splits)](
        q, x, scale.reshape(1).float(), m_part, l_part, pos_part, R, C, D, row_offset, q.stride(0), x.stride(0),
        per_split, DOT=dot, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    if splits == 1:
        return m_part[0] + l_part[0].log(), pos_part[0]
    return torch.logsumexp(m_part + l_part.log(), dim=0), pos_part.sum(0)


def row_lse_backward(q: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, lse: torch.Tensor,
                     grad: torch.Tensor, row_offset: int = 0, precision: str = "tf32"):
    """Gradients of ``grad[0] * mean_r(lse_r - pos_r)`` (the mean cross-entropy) w.r.t. q, x and
    scale: (dq [R, D], dx [C, D], dscale [1]), fp32."""
    q, x = q.contiguous(), x.contiguous()
    R, D = q.shape
    C = x.shape[0]
    dot = dot_mode(_dtype_name(q.dtype), precision, _interpreted(q))
    block_m, block_n, block_k, warps, stages = softmax_tiles(dot, D, _arch(q.device), "bwd")
    splits, per_split = _splits(R, C, block_m, block_n, q.device)
    dq = torch.zeros(R, D, device=q.device, dtype=torch.float32)
    dx = torch.zeros(C, D, device=q.device, dtype=torch.float32)
    dscale = torch.zeros(1, device=q.device, dtype=torch.float32)
    _lse_bwd_kernel[(triton.cdiv(R, block_m), splits)](
        q, x, scale.reshape(1).float(), lse.contiguous(), grad.float().contiguous(), dq, dx, dscale,
        R, C, D, row_offset, q.stride(0), x.stride(0), per_split,
        DOT=dot, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return dq, dx, dscale


def group_logits(q: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, row_offset: int,
                 num_negatives: int) -> torch.Tensor:
    """[R, 1+K] fp32 logits of each row's target (column 0) and its own K negatives."""
    q, x = q.contiguous(), x.contiguous()
    num_groups = _check_global(q, x, num_negatives, row_offset)
    R, D = q.shape
    out = torch.empty(R, 1 + num_negatives, device=q.device, dtype=torch.float32)
    _group_fwd_kernel[(triton.cdiv(R, _GROUP_BLOCK_M),)](
        q, x, scale.reshape(1).float(), out, R, D, num_groups, row_offset, num_negatives, q.stride(0), x.stride(0),
        BLOCK_M=_GROUP_BLOCK_M, BLOCK_K=_GROUP_BLOCK_K, num_warps=_GROUP_WARPS)
    return out


def group_backward_(q: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, row_offset: int, num_negatives: int,
                    d_group: torch.Tensor, dq: torch.Tensor, dx: torch.Tensor) -> None:
    """Adds the gradient of ``sum(d_group * group_logits)`` w.r.t. q and x into ``dq``/``dx`` (fp32, contiguous)."""
    q, x = q.contiguous(), x.contiguous()
    num_groups = _check_global(q, x, num_negatives, row_offset)
    R, D = q.shape
    _group_bwd_kernel[(triton.cdiv(R, _GROUP_BLOCK_M),)](
        q, x, scale.reshape(1).float(), d_group.float().contiguous(), dq, dx, R, D, num_groups, row_offset,
        num_negatives, q.stride(0), x.stride(0), BLOCK_M=_GROUP_BLOCK_M, BLOCK_K=_GROUP_BLOCK_K,
        num_warps=_GROUP_WARPS)


# ---------------------------------------------------------------------------------------------
# What the launchers above can choose, for the compile gate.

_DOT_NAMES = {DOT_IEEE: "ieee", DOT_TF32: "tf32", DOT_NATIVE: "native"}
_WIDTH_ARGS = ("D", "stride_q", "stride_x")


def _aligned_ints(D: int) -> tuple:
    """Integer arguments a launch sees as multiples of 16: D and the row strides (contiguous rows) when 16 | D."""
    return _WIDTH_ARGS if D % 16 == 0 else ()


def kernel_configs(dtype: str, D: int, K: int, arch: int, with_igc: bool = True) -> list[KernelConfig]:
    """Every kernel variant the launchers can pick for inputs of ``dtype`` ("float32", "bfloat16",
    "float16"), feature width D, K negatives and ``arch`` (80/90), over both fp32 precisions.

    ``K`` and ``with_igc`` change no compiled variant (the group kernels loop over 1+K at run
    time; IGC is computed from the group logits) but are part of the enumeration on purpose.
    """
    ptr = POINTER_TYPES[dtype]
    f32 = "*fp32"
    modes = sorted({dot_mode(dtype, p, False) for p in PRECISIONS})
    out = []
    for dot in modes:
        for which, kernel in (("fwd", _lse_fwd_kernel), ("bwd", _lse_bwd_kernel)):
            bm, bn, bk, warps, stages = softmax_tiles(dot, D, arch, which)
            types = {"Q": ptr, "X": ptr, "Scale": f32, "MPart": f32, "LPart": f32, "PosPart": f32, "Lse": f32,
                     "GradOut": f32, "DQ": f32, "DX": f32, "DScale": f32}
            types = {k: v for k, v in types.items() if k in kernel.arg_names}
            out.append(make_config(kernel, types, dict(DOT=dot, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
                                   num_warps=warps, num_stages=stages, arch=arch, aligned_ints=_aligned_ints(D),
                                   label={"dtype": f"{dtype}/{_DOT_NAMES[dot]}", "D": D, "K": K,
                                          "tile": f"{bm}x{bn}x{bk}"}))
    bk = _GROUP_BLOCK_K
    group_types = {"Q": ptr, "X": ptr, "Scale": f32, "GLogits": f32, "DGroup": f32, "DQ": f32, "DX": f32}
    for kernel in (_group_fwd_kernel, _group_bwd_kernel):
        types = {k: v for k, v in group_types.items() if k in kernel.arg_names}
        out.append(make_config(kernel, types, dict(BLOCK_M=_GROUP_BLOCK_M, BLOCK_K=bk), num_warps=_GROUP_WARPS,
                               num_stages=3, arch=arch, aligned_ints=_aligned_ints(D),
                               label={"dtype": dtype, "D": D, "K": K, "tile": f"{_GROUP_BLOCK_M}x{bk}"}))
    return out


def gate_configs(arch: int) -> list[KernelConfig]:
    """All variants over the gate's dtypes, feature widths, K in {1, 4, 8}, IGC on and off."""
    out = []
    for dtype in GATE_DTYPES:
        for D in GATE_DIMS:
            for K in GATE_NEGATIVES:
                for with_igc in (True, False):
                    out += kernel_configs(dtype, D, K, arch, with_igc)
    return out
