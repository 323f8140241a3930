"""Triton kernels of the ``triton`` loss backend: the global term in tiles, no logits in memory,
no atomics. Tensors in, tensors out: no autograd, no modules.

Rows ``q`` [R, D] are contrasted with columns ``x`` [C, D] (image-to-text: q = images, x = [T; N],
C = Bg(1+K); text-to-image: q = captions, x = images, K = 0). Logit tiles ``s * q @ x^T`` of
[BLOCK_M, BLOCK_N] are built over chunks of the feature dimension (``BLOCK_K``), so any D fits.

* :func:`_lse_fwd_kernel` (forward; grid row blocks x column splits): per row and split, the
  online (max, sum of exp) over all columns, over the row's IGC group (its target column and its
  own K negatives, picked in the tile by :func:`.loss_terms.group_member`), and the target logit.
  The splits let small batches fill the GPU; :func:`.loss_terms.finish` merges them. With the
  rows the whole batch, text-to-image is one more call on (captions, images), 1/(1+K) the size:
  its row statistics are the column statistics of the first ``Bg`` columns.
* :func:`_dq_kernel` (backward, row-stationary; grid row blocks x feature slices): recomputes the
  tiles of its rows across all columns, forms d(loss)/d(logit) for every term at once
  (:func:`.loss_terms.logit_grad`: image-to-text, text-to-image and IGC), and accumulates
  ``G @ x[:, slice]`` in registers ([BLOCK_M, BLOCK_D] fp32); one write per element of dq.
* :func:`_dx_kernel` (backward, column-stationary; grid column blocks x feature slices): the same
  tiles from the columns' side, ``G^T @ q[:, slice]`` in registers; one write per element of dx.

The accumulators hold at most 64-256 features (``_TILES``), so for D above that each slice
recomputes the logits (``ceil(D / BLOCK_D)`` times): the price of having no atomics and
O((R + C) D) memory. Forward, dq and dx kernels share tile and warps, so the recomputed logits
equal the forward's bit for bit and a saturated row's gradient is exactly 0.

Dot precision (``DOT``): 0 = exact fp32 products ("ieee"; also under the CPU interpreter, which
computes every dot in fp32), 1 = TF32 tensor cores for fp32 inputs, 2 = bf16/fp16 tensor cores;
fp32 accumulation in all. The gradient enters the backward products in the input dtype at unit
scale (divided by ``f``, see :func:`.loss_terms.logit_coefficients`); ``s * f`` multiplies the
fp32 accumulators.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import PART_BLOCK, POINTER_TYPES, PRECISIONS, KernelConfig, arch_of, make_config
from .loss_terms import NEG_BIG, group_member, logit_coefficients, logit_grad, upstream

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


@triton.jit(do_not_specialize=["R", "C", "row_offset", "Bg", "K", "tiles_per_split", "with_igc"])
def _lse_fwd_kernel(Q, X, Scale, RowM, RowL, Pos, GroupM, GroupL, R, C, D, row_offset, Bg, K, stride_q, stride_x,
                    tiles_per_split, with_igc, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """Split ``program_id(1)``'s partial (max, sum of exp) of every row over its columns and over
    the row's IGC group members among them, and its target logit (0 where the target is elsewhere),
    at ``[split, row]`` of each [splits, R] output."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    target = rows + row_offset
    split = tl.program_id(1)
    scale = tl.load(Scale).to(tl.float32)
    m = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    gm = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    gs = tl.zeros([BLOCK_M], tl.float32)
    pos = tl.zeros([BLOCK_M], tl.float32)
    first = split * tiles_per_split * BLOCK_N
    for start in range(first, tl.minimum(first + tiles_per_split * BLOCK_N, C), BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < C
        dots = _tile_dots(Q, X, rows, row_ok, cols, col_ok, D, stride_q, stride_x, BLOCK_M, BLOCK_N, BLOCK_K, DOT)
        z = tl.where(col_ok[None, :], dots * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m = m_new
        pos += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), 1)
        if with_igc:
            zg = tl.where(group_member(cols, target, Bg, K) & col_ok[None, :], z, float("-inf"))
            gm_new = tl.maximum(gm, tl.max(zg, 1))
            gs = gs * tl.exp(gm - gm_new) + tl.sum(tl.exp(zg - gm_new[:, None]), 1)
            gm = gm_new
    at = split * R + rows
    tl.store(RowM + at, m, mask=row_ok)
    tl.store(RowL + at, s, mask=row_ok)
    tl.store(Pos + at, pos, mask=row_ok)
    if with_igc:
        tl.store(GroupM + at, gm, mask=row_ok)
        tl.store(GroupL + at, gs, mask=row_ok)


@triton.jit
def _coefficients(Scale, Grads, n_grads, w_ce, w_igc, R, Bg, with_igc, with_cols):
    """(scale, a, b, c, f) for the backward kernels (see :func:`.loss_terms.logit_coefficients`)."""
    scale = tl.load(Scale).to(tl.float32)
    g_ce, g_igc, g_tgc, g_dist = upstream(Grads, n_grads, w_ce, w_igc, 0.0, 0.0)
    a, b, c, f = logit_coefficients(g_ce, g_igc, R, Bg, with_igc, with_cols)
    return scale, a, b, c, f


@triton.jit
def _grad_tile(Q, X, RowLse, GroupLse, ColLse, rows, row_ok, cols, col_ok, scale, a, b, c, f, R, Bg, K, D,
               row_offset, stride_q, stride_x, with_igc, with_cols, DOT: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(d(loss)/d(logit) of a recomputed tile, masked, fp32; its sum of gradient * dots per row)."""
    dots = _tile_dots(Q, X, rows, row_ok, cols, col_ok, D, stride_q, stride_x, BLOCK_M, BLOCK_N, BLOCK_K, DOT)
    lse = tl.load(RowLse + rows, mask=row_ok, other=0.0)
    glse = lse
    if with_igc:
        glse = tl.load(GroupLse + rows, mask=row_ok, other=0.0)
    col_lse = tl.zeros([BLOCK_N], tl.float32)
    if with_cols:
        col_lse = tl.load(ColLse + cols, mask=cols < Bg, other=float("inf"))
    grad = logit_grad(dots * scale, lse, col_lse, glse, rows + row_offset, cols, a, b, c, Bg, K, with_igc, with_cols)
    grad = tl.where(row_ok[:, None] & col_ok[None, :], grad, 0.0)
    return grad, tl.sum(grad * dots, 1)


@triton.jit
def _write(Out, offsets, mask, acc, alpha, accumulate):
    """Out = alpha * acc (+ Out's value: the local terms' gradient written before), in Out's dtype."""
    value = alpha * acc
    if accumulate:
        value += tl.load(Out + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + offsets, value.to(Out.dtype.element_ty), mask=mask)


_FLAGS = ["with_igc", "with_cols", "accumulate"]


@triton.jit(do_not_specialize=["R", "C", "row_offset", "Bg", "K", "n_grads"] + _FLAGS)
def _dq_kernel(Q, X, Scale, Grads, RowLse, GroupLse, ColLse, DQ, DScalePart, R, C, D, row_offset, Bg, K, stride_q,
               stride_x, stride_dq, n_grads, w_ce, w_igc, with_igc, with_cols, accumulate, DOT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """DQ[rows, slice] (+)= s f * sum over all columns of (G / f) @ x[:, slice]; the first slice's
    programs also write the rows' d(scale) partial, DScalePart[program_id(0)]."""
    scale, a, b, c, f = _coefficients(Scale, Grads, n_grads, w_ce, w_igc, R, Bg, with_igc, with_cols)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dscale = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, C, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < C
        grad, row_dscale = _grad_tile(Q, X, RowLse, GroupLse, ColLse, rows, row_ok, cols, col_ok, scale, a, b, c, f,
                                      R, Bg, K, D, row_offset, stride_q, stride_x, with_igc, with_cols, DOT, BLOCK_M,
                                      BLOCK_N, BLOCK_K)
        dscale += row_dscale
        x = tl.load(X + cols[:, None] * stride_x + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        acc = _dot((grad / f).to(Q.dtype.element_ty), x, acc, DOT)
    _write(DQ, rows[:, None] * stride_dq + dims[None, :], row_ok[:, None] & dim_ok[None, :], acc, scale * f,
           accumulate)
    if tl.program_id(1) == 0:
        tl.store(DScalePart + tl.program_id(0), tl.sum(dscale, 0))


@triton.jit(do_not_specialize=["R", "C", "row_offset", "Bg", "K", "n_grads", "n_parts"] + _FLAGS)
def _dx_kernel(Q, X, Scale, Grads, RowLse, GroupLse, ColLse, DX, DScalePart, DScale, n_parts, R, C, D, row_offset, Bg,
               K, stride_q, stride_x, stride_dx, n_grads, w_ce, w_igc, with_igc, with_cols, accumulate,
               DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_D: tl.constexpr, PART_BLOCK: tl.constexpr):
    """DX[cols, slice] (+)= s f * sum over all rows of (G / f)^T @ q[:, slice]; program (0, 0) also
    sums the dq kernel's d(scale) partials into DScale (it runs after that kernel)."""
    scale, a, b, c, f = _coefficients(Scale, Grads, n_grads, w_ce, w_igc, R, Bg, with_igc, with_cols)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, R, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < R
        grad, row_dscale = _grad_tile(Q, X, RowLse, GroupLse, ColLse, rows, row_ok, cols, col_ok, scale, a, b, c, f,
                                      R, Bg, K, D, row_offset, stride_q, stride_x, with_igc, with_cols, DOT, BLOCK_M,
                                      BLOCK_N, BLOCK_K)
        q = tl.load(Q + rows[:, None] * stride_q + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        acc = _dot(tl.trans((grad / f).to(Q.dtype.element_ty)), q, acc, DOT)
    _write(DX, cols[:, None] * stride_dx + dims[None, :], col_ok[:, None] & dim_ok[None, :], acc, scale * f,
           accumulate)
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        parts = tl.zeros([PART_BLOCK], tl.float32)
        for start in range(0, n_parts, PART_BLOCK):
            idx = start + tl.arange(0, PART_BLOCK)
            parts += tl.load(DScalePart + idx, mask=idx < n_parts, other=0.0)
        tl.store(DScale, tl.sum(parts, 0))


# ---------------------------------------------------------------------------------------------
# Launch choices: one table, read by the launchers and by gate_configs (the compile gate).

#: Feature dimensions, negatives per caption and input dtypes the compile gate enumerates: D=16
#: and D=40 take the narrow tiles (with and without 16 | D); the others every BLOCK_D.
GATE_DIMS = (16, 40, 64, 128, 256, 384, 512, 640, 768, 1024, 1280)
GATE_DTYPES = ("float32", "bfloat16", "float16")

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, forward stages, backward stages, widest BLOCK_D) by
# (dot mode, arch), chosen with the compile gate (registers, spills, shared memory on Triton 3.6
# and 3.8). The forward and both backward kernels share tile and warps on purpose: the recomputed
# logits then equal the forward's bit for bit (same chunks of D, same dot instructions), so at a
# saturated row P rounds to exactly 1 at the target and P - onehot to 0, as when the logits are
# stored. The backward kernels hold a [64, BLOCK_D] fp32 accumulator beside the logit tile (BLOCK_D
# / 4 registers per thread at 8 warps), which sets the 64 x 64 tile and the widest feature slice;
# exact fp32 dots (no tensor cores) keep theirs in registers too, hence the small tile there.
_TILES = {
    (DOT_NATIVE, 90): (64, 64, 32, 8, 3, 2, 256),
    (DOT_NATIVE, 80): (64, 64, 32, 8, 3, 1, 128),
    (DOT_TF32, 90): (64, 64, 32, 8, 3, 2, 128),
    (DOT_TF32, 80): (64, 64, 16, 8, 2, 1, 128),
    (DOT_IEEE, 90): (32, 32, 16, 4, 1, 1, 64),
    (DOT_IEEE, 80): (32, 32, 16, 4, 1, 1, 64),
}
# Features narrower than the table's BLOCK_K or not a multiple of 16 (no vector loads, so more
# address registers): one narrow tile on both architectures.
_NARROW_TILES = {
    DOT_NATIVE: (64, 64, 16, 8, 2, 1, 64),
    DOT_TF32: (64, 64, 16, 8, 2, 1, 64),
    DOT_IEEE: (32, 32, 16, 4, 1, 1, 64),
}
#: Forward programs the column splits aim for: a few per SM, so small batches fill the GPU.
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


def tiles(dot: int, D: int, arch: int, which: str) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_D, num_warps, num_stages) of the ``fwd`` or backward
    (``bwd``) kernels for width D (BLOCK_D: the backward's feature slice; 0 in the forward)."""
    table = _TILES[(dot, arch)]
    if D % 16 or D < table[2]:
        table = _NARROW_TILES[dot]
    block_m, block_n, block_k, warps, fwd_stages, bwd_stages, widest = table
    if which == "fwd":
        return block_m, block_n, block_k, 0, warps, fwd_stages
    return block_m, block_n, block_k, min(triton.next_power_of_2(D), widest), warps, bwd_stages


def _arch(device: torch.device) -> int:
    return arch_of(torch.cuda.get_device_capability(device)) if device.type == "cuda" else 90


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_PROGRAMS


def splits(R: int, C: int, device: torch.device, dot: int, D: int) -> tuple[int, int]:
    """(column splits, column tiles per split) of the forward for R x C logits, so that row blocks
    x splits reaches the device's target; a launch argument only (no compiled variant)."""
    block_m, block_n = tiles(dot, D, _arch(device), "fwd")[:2]
    row_blocks, col_tiles = triton.cdiv(R, block_m), triton.cdiv(C, block_n)
    wanted = max(1, min(col_tiles, triton.cdiv(_target_programs(device), row_blocks)))
    per = triton.cdiv(col_tiles, wanted)
    return triton.cdiv(col_tiles, per), per


def forward_splits(q: torch.Tensor, x: torch.Tensor, precision: str) -> tuple[int, int]:
    """:func:`splits` for the forward of rows q against columns x."""
    dot = dot_mode(_dtype_name(q.dtype), precision, _interpreted(q))
    return splits(q.shape[0], x.shape[0], q.device, dot, q.shape[1])


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def check(q: torch.Tensor, x: torch.Tensor, num_negatives: int, row_offset: int) -> int:
    """Bg, the number of groups of x, after checking shapes (ValueError naming them)."""
    if q.dim() != 2 or x.dim() != 2 or q.shape[1] != x.shape[1]:
        raise ValueError(f"loss kernels: expected q [R, D] and x [C, D], got {tuple(q.shape)} and {tuple(x.shape)}")
    if q.dtype != x.dtype:
        raise ValueError(f"loss kernels: q and x dtypes differ ({q.dtype} vs {x.dtype})")
    if x.shape[0] % (1 + num_negatives):
        raise ValueError(f"loss kernels: {x.shape[0]} columns is not a multiple of 1 + K = {1 + num_negatives}")
    num_groups = x.shape[0] // (1 + num_negatives)
    if row_offset + q.shape[0] > num_groups:
        raise ValueError(f"loss kernels: rows {row_offset}..{row_offset + q.shape[0]} exceed the {num_groups} targets")
    return num_groups


def row_stats(q: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, stats: tuple, *, row_offset: int,
              num_negatives: int, with_igc: bool, precision: str, n_splits: int, per_split: int) -> None:
    """Write each split's row statistics of ``scale * q @ x^T`` into ``stats`` = (row_m, row_l,
    pos, group_m, group_l), each [n_splits, R] fp32 (see :func:`splits`); q, x contiguous."""
    R, D = q.shape
    num_groups = check(q, x, num_negatives, row_offset)
    dot = dot_mode(_dtype_name(q.dtype), precision, _interpreted(q))
    block_m, block_n, block_k, _, warps, stages = tiles(dot, D, _arch(q.device), "fwd")
    _lse_fwd_kernel[(triton.cdiv(R, block_m), n_splits)](
        q, x, scale, *stats, R, x.shape[0], D, row_offset, num_groups, num_negatives, q.stride(0), x.stride(0),
        per_split, int(with_igc), DOT=dot, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        num_stages=stages)


def backward(q: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, grads: torch.Tensor, lse: tuple, dq: torch.Tensor,
             dx: torch.Tensor, *, row_offset: int, num_negatives: int, weights: tuple, with_igc: bool,
             with_cols: bool, accumulate: bool, precision: str) -> torch.Tensor:
    """Write (``accumulate``: add) the global term's gradients into ``dq`` [R, D] and ``dx`` [C, D]
    (their dtypes, contiguous) and return d(scale) [1] fp32. ``lse`` = (row [R], IGC [R], column [Bg])
    log-sum-exps of the forward; ``grads``: the upstream gradients (1 or 5 fp32)."""
    R, D = q.shape
    C = x.shape[0]
    num_groups = check(q, x, num_negatives, row_offset)
    dot = dot_mode(_dtype_name(q.dtype), precision, _interpreted(q))
    block_m, block_n, block_k, block_d, warps, stages = tiles(dot, D, _arch(q.device), "bwd")
    slices = triton.cdiv(D, block_d)
    parts = torch.empty(triton.cdiv(R, block_m), device=q.device, dtype=torch.float32)
    dscale = torch.empty(1, device=q.device, dtype=torch.float32)
    common = dict(DOT=dot, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=warps,
                  num_stages=stages)
    scalars = (grads.numel(), float(weights[0]), float(weights[1]), int(with_igc), int(with_cols), int(accumulate))
    _dq_kernel[(triton.cdiv(R, block_m), slices)](
        q, x, scale, grads, *lse, dq, parts, R, C, D, row_offset, num_groups, num_negatives, q.stride(0), x.stride(0),
        dq.stride(0), *scalars, **common)
    _dx_kernel[(triton.cdiv(C, block_n), slices)](
        q, x, scale, grads, *lse, dx, parts, dscale, parts.numel(), R, C, D, row_offset, num_groups, num_negatives,
        q.stride(0), x.stride(0), dx.stride(0), *scalars, PART_BLOCK=PART_BLOCK, **common)
    return dscale


# ---------------------------------------------------------------------------------------------
# What the launchers above can choose, for the compile gate.

_DOT_NAMES = {DOT_IEEE: "ieee", DOT_TF32: "tf32", DOT_NATIVE: "native"}
_WIDTH_ARGS = ("D", "stride_q", "stride_x", "stride_dq", "stride_dx")


def _aligned_ints(D: int) -> tuple:
    """Integer arguments a launch sees as multiples of 16: D and the row strides (contiguous rows) when 16 | D."""
    return _WIDTH_ARGS if D % 16 == 0 else ()


def kernel_configs(dtype: str, D: int, arch: int) -> list[KernelConfig]:
    """Every kernel variant the launchers can pick for inputs of ``dtype`` ("float32", "bfloat16",
    "float16") and feature width D on ``arch`` (80/90), over both fp32 precisions. K, the row
    offset and the IGC / text-to-image / accumulate flags are run-time arguments: no variants."""
    ptr, f32 = POINTER_TYPES[dtype], "*fp32"
    out = []
    for dot in sorted({dot_mode(dtype, p, False) for p in PRECISIONS}):
        label = {"dtype": f"{dtype}/{_DOT_NAMES[dot]}", "D": D}
        bm, bn, bk, _, warps, stages = tiles(dot, D, arch, "fwd")
        stats = {n: f32 for n in ("Scale", "RowM", "RowL", "Pos", "GroupM", "GroupL")}
        out.append(make_config(_lse_fwd_kernel, {"Q": ptr, "X": ptr, **stats},
                               dict(DOT=dot, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=warps,
                               num_stages=stages, arch=arch, aligned_ints=_aligned_ints(D),
                               label={**label, "tile": f"{bm}x{bn}x{bk}"}))
        bm, bn, bk, bd, warps, stages = tiles(dot, D, arch, "bwd")
        types = {"Q": ptr, "X": ptr, "Scale": f32, "Grads": f32, "RowLse": f32, "GroupLse": f32, "ColLse": f32,
                 "DQ": ptr, "DX": ptr, "DScalePart": f32, "DScale": f32, "w_ce": "fp32", "w_igc": "fp32"}
        for kernel, extra in ((_dq_kernel, {}), (_dx_kernel, {"PART_BLOCK": PART_BLOCK})):
            out.append(make_config(kernel, {k: v for k, v in types.items() if k in kernel.arg_names},
                                   dict(DOT=dot, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd) | extra,
                                   num_warps=warps, num_stages=stages, arch=arch, aligned_ints=_aligned_ints(D),
                                   label={**label, "tile": f"{bm}x{bn}x{bk}/{bd}"}))
    return out


def gate_configs(arch: int) -> list[KernelConfig]:
    """All variants over the gate's dtypes and feature widths."""
    return [cfg for dtype in GATE_DTYPES for D in GATE_DIMS for cfg in kernel_configs(dtype, D, arch)]
