"""Triton kernels of the ``triton`` loss backend: the GEMMs of the global term with its statistics
and gradient inside them, no atomics. Tensors in, tensors out: no autograd, no modules.

Rows ``q`` [R, D] are contrasted with columns ``x`` [C, D] (image-to-text: q = images, x = [T; N],
C = Bg(1+K); text-to-image: q = captions, x = images, K = 0). Logit tiles ``s * q @ x^T`` of
[BLOCK_M, BLOCK_N] are built over chunks of the feature dimension (``BLOCK_K``), so any D fits.

* :func:`_lse_fwd_kernel` (forward, the logits GEMM; grid row blocks x column splits): per row and
  split, the online (max, sum of exp) over all columns, over the row's IGC group (its target
  column and its own K negatives, picked in the tile by :func:`.loss_terms.group_member`), and
  the target logit; in its epilogue, when the rows are the whole batch, the text-to-image column
  partials of the first ``Bg`` columns over the program's rows; with ``STORE``, the tile's raw
  dots kept in ``L`` (fp16 cosines for 16-bit inputs, fp32 for fp32). The splits let small
  batches fill the GPU; :func:`.loss_terms.finish` merges the partials.
* :func:`_dq_kernel` (backward, row-stationary; grid row blocks x feature slices x column splits):
  reads the stored tiles of its rows (or recomputes them), forms d(loss)/d(logit) for every term
  at once (:func:`.loss_terms.logit_grad`: image-to-text, text-to-image and IGC), and accumulates
  ``G @ x[:, slice]`` in registers ([BLOCK_M, BLOCK_D] fp32); one write per element of dq, or of
  the split's fp32 partial, which :func:`_sum_parts_kernel` merges in a fixed order.
* :func:`_dx_kernel` (backward, column-stationary; grid column blocks x feature slices x row
  splits): the same tiles from the columns' side, ``G^T @ q[:, slice]`` in registers.

:func:`make_plan` makes every launch choice from shapes alone (stored or recomputed, splits,
slices); :mod:`degla_fast.loss.count` counts passes, bytes and memory from it. A feature slice
narrower than D reads (or recomputes) the band of logits once per slice: the tiles are chosen so
that D=512 is one slice.

Dot precision (``DOT``): 0 = exact fp32 products ("ieee"; also under the CPU interpreter, which
computes every dot in fp32), 1 = TF32 tensor cores for fp32 inputs, 2 = bf16/fp16 tensor cores;
fp32 accumulation in all. The gradient enters the backward products in the input dtype at unit
scale (divided by ``f``, see :func:`.loss_terms.logit_coefficients`); ``s * f`` multiplies the
fp32 accumulators.
"""
from __future__ import annotations

from dataclasses import dataclass

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


@triton.jit(do_not_specialize=["R", "C", "row_offset", "Bg", "K", "tiles_per_split", "with_igc", "with_cols"])
def _lse_fwd_kernel(Q, X, Scale, L, RowM, RowL, Pos, GroupM, GroupL, ColM, ColL, R, C, D, row_offset, Bg, K, stride_q,
                    stride_x, stride_l, tiles_per_split, with_igc, with_cols, DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STORE: tl.constexpr):
    """Split ``program_id(1)``'s partial (max, sum of exp) of every row over its columns and over
    the row's IGC group members among them, and its target logit (0 where the target is elsewhere),
    at ``[split, row]`` of each [splits, R] output.

    ``STORE``: the raw dots also go to ``L`` [R, C] (fp16 for 16-bit inputs, fp32 for fp32), and
    the statistics are made from the stored values, so the backward's probabilities, made from
    ``L``, are the forward's exactly (a saturated row's gradient stays exactly 0).
    ``with_cols``: the tile's column partials too, for the text-to-image log-sum-exps of the first
    ``Bg`` columns: (max, sum of exp) over this program's rows at ``[program_id(0), column]`` of
    ColM / ColL [row blocks, Bg] (the logits kernel's epilogue: no second pass over the columns)."""
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
        if STORE:
            kept = dots.to(L.dtype.element_ty)
            tl.store(L + rows[:, None] * stride_l + cols[None, :], kept, mask=row_ok[:, None] & col_ok[None, :])
            dots = kept.to(tl.float32)
        z = tl.where(col_ok[None, :], dots * scale, float("-inf"))
        if with_cols:
            if start < Bg:
                zc = tl.where(row_ok[:, None] & col_ok[None, :], z, NEG_BIG)
                cm = tl.max(zc, 0)
                at_col = tl.program_id(0) * Bg + cols
                tl.store(ColM + at_col, cm, mask=cols < Bg)
                tl.store(ColL + at_col, tl.sum(tl.exp(zc - cm[None, :]), 0), mask=cols < Bg)
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
def _grad_tile(Q, X, L, RowLse, GroupLse, ColLse, rows, row_ok, cols, col_ok, scale, a, b, c, f, R, Bg, K, D,
               row_offset, stride_q, stride_x, stride_l, with_igc, with_cols, DOT: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STORED: tl.constexpr):
    """(d(loss)/d(logit) of a tile, masked, fp32; its sum of gradient * dots per row). The dots are
    read from the forward's ``L`` (``STORED``: the prologue of the dq / dx product, as
    flash-attention's backward forms dS) or recomputed from q and x."""
    if STORED:
        dots = tl.load(L + rows[:, None] * stride_l + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                       other=0.0).to(tl.float32)
    else:
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


@triton.jit(do_not_specialize=["R", "C", "row_offset", "Bg", "K", "n_grads", "part_stride", "tiles_per_split"] + _FLAGS)
def _dq_kernel(Q, X, L, Scale, Grads, RowLse, GroupLse, ColLse, DQ, DScalePart, R, C, D, row_offset, Bg, K, stride_q,
               stride_x, stride_l, stride_dq, part_stride, n_grads, w_ce, w_igc, with_igc, with_cols, accumulate,
               tiles_per_split, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, STORED: tl.constexpr):
    """DQ[rows, slice] (+)= s f * sum over the split's columns of (G / f) @ x[:, slice]. Grid: row
    blocks x feature slices x column splits; split ``p`` writes at ``DQ + p * part_stride`` (the
    launcher's fp32 partials when there are several, summed in a fixed order after). The first
    slice's programs also write their rows' d(scale) partial at DScalePart[split, row block]."""
    scale, a, b, c, f = _coefficients(Scale, Grads, n_grads, w_ce, w_igc, R, Bg, with_igc, with_cols)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    split = tl.program_id(2)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dscale = tl.zeros([BLOCK_M], tl.float32)
    first = split * tiles_per_split * BLOCK_N
    for start in range(first, tl.minimum(first + tiles_per_split * BLOCK_N, C), BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < C
        grad, row_dscale = _grad_tile(Q, X, L, RowLse, GroupLse, ColLse, rows, row_ok, cols, col_ok, scale, a, b, c,
                                      f, R, Bg, K, D, row_offset, stride_q, stride_x, stride_l, with_igc, with_cols,
                                      DOT, BLOCK_M, BLOCK_N, BLOCK_K, STORED)
        dscale += row_dscale
        x = tl.load(X + cols[:, None] * stride_x + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        acc = _dot((grad / f).to(Q.dtype.element_ty), x, acc, DOT)
    _write(DQ + split * part_stride, rows[:, None] * stride_dq + dims[None, :], row_ok[:, None] & dim_ok[None, :],
           acc, scale * f, accumulate)
    if tl.program_id(1) == 0:
        tl.store(DScalePart + split * tl.num_programs(0) + tl.program_id(0), tl.sum(dscale, 0))


@triton.jit(do_not_specialize=["R", "C", "row_offset", "Bg", "K", "n_grads", "n_parts", "part_stride",
                              "tiles_per_split"] + _FLAGS)
def _dx_kernel(Q, X, L, Scale, Grads, RowLse, GroupLse, ColLse, DX, DScalePart, DScale, n_parts, R, C, D, row_offset,
               Bg, K, stride_q, stride_x, stride_l, stride_dx, part_stride, n_grads, w_ce, w_igc, with_igc, with_cols,
               accumulate, tiles_per_split, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PART_BLOCK: tl.constexpr, STORED: tl.constexpr):
    """DX[cols, slice] (+)= s f * sum over the split's rows of (G / f)^T @ q[:, slice]. Grid: column
    blocks x feature slices x row splits, written as in :func:`_dq_kernel`; program (0, 0, 0) also
    sums the dq kernel's d(scale) partials into DScale (it runs after that kernel)."""
    scale, a, b, c, f = _coefficients(Scale, Grads, n_grads, w_ce, w_igc, R, Bg, with_igc, with_cols)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    split = tl.program_id(2)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    first = split * tiles_per_split * BLOCK_M
    for start in range(first, tl.minimum(first + tiles_per_split * BLOCK_M, R), BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < R
        grad, row_dscale = _grad_tile(Q, X, L, RowLse, GroupLse, ColLse, rows, row_ok, cols, col_ok, scale, a, b, c,
                                      f, R, Bg, K, D, row_offset, stride_q, stride_x, stride_l, with_igc, with_cols,
                                      DOT, BLOCK_M, BLOCK_N, BLOCK_K, STORED)
        q = tl.load(Q + rows[:, None] * stride_q + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        acc = _dot(tl.trans((grad / f).to(Q.dtype.element_ty)), q, acc, DOT)
    _write(DX + split * part_stride, cols[:, None] * stride_dx + dims[None, :], col_ok[:, None] & dim_ok[None, :],
           acc, scale * f, accumulate)
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0) & (split == 0):
        parts = tl.zeros([PART_BLOCK], tl.float32)
        for start in range(0, n_parts, PART_BLOCK):
            idx = start + tl.arange(0, PART_BLOCK)
            parts += tl.load(DScalePart + idx, mask=idx < n_parts, other=0.0)
        tl.store(DScale, tl.sum(parts, 0))


@triton.jit(do_not_specialize=["numel", "n_parts", "accumulate"])
def _sum_parts_kernel(Parts, Out, numel, n_parts, accumulate, BLOCK: tl.constexpr):
    """Out (+)= the sum of ``n_parts`` fp32 partials [n_parts, numel], in order (bitwise repeatable),
    cast to Out's dtype: the splits of :func:`_dq_kernel` / :func:`_dx_kernel` merged."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < numel
    total = tl.zeros([BLOCK], tl.float32)
    for p in range(0, n_parts):
        total += tl.load(Parts + p * numel + idx, mask=ok, other=0.0)
    if accumulate:
        total += tl.load(Out + idx, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + idx, total.to(Out.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
# Launch choices: one table and one plan, read by the launchers, the counts and gate_configs.

#: Feature dimensions, negatives per caption and input dtypes the compile gate enumerates: D=16
#: and D=40 take the narrow tiles (with and without 16 | D); the others every BLOCK_D.
GATE_DIMS = (16, 40, 64, 128, 256, 384, 512, 640, 768, 1024, 1280)
GATE_DTYPES = ("float32", "bfloat16", "float16")

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, forward stages, backward stages, widest BLOCK_D recomputed,
# widest BLOCK_D stored) by (dot mode, arch), chosen with the compile gate (registers, spills,
# shared memory on Triton 3.6 and 3.8). The forward and both backward kernels share tile and warps
# on purpose: recomputed logits then equal the forward's bit for bit (same chunks of D, same dot
# instructions), so at a saturated row P rounds to exactly 1 at the target and P - onehot to 0,
# as with stored logits. Every feature slice of the backward reads (stored) or recomputes (not
# stored) the whole band of logits again, so the widest slice that compiles without spills sets
# the passes: the backward kernels hold a [32, BLOCK_D] fp32 accumulator beside the logit tile,
# and 32 x 32 tiles at 8 warps are what keep D=512 in one slice with no spills (64-row tiles
# spill 300-900 bytes at BLOCK_D=512 on sm_90, even at 16 warps). Exact fp32 dots (no tensor
# cores) keep their operands in registers, hence their narrow slice.
_TILES = {
    (DOT_NATIVE, 90): (32, 32, 32, 8, 3, 3, 512, 512),
    (DOT_NATIVE, 80): (32, 32, 32, 8, 3, 3, 512, 512),
    (DOT_TF32, 90): (32, 32, 16, 8, 3, 2, 256, 256),
    (DOT_TF32, 80): (32, 32, 16, 8, 2, 2, 256, 256),
    (DOT_IEEE, 90): (16, 16, 16, 4, 1, 1, 32, 32),
    (DOT_IEEE, 80): (16, 16, 16, 4, 1, 1, 32, 32),
}
# Features narrower than the table's BLOCK_K or not a multiple of 16 (no vector loads, so more
# address registers): one narrow tile on both architectures.
_NARROW_TILES = {
    DOT_NATIVE: (64, 64, 16, 8, 2, 1, 64, 64),
    DOT_TF32: (64, 64, 16, 8, 2, 1, 64, 64),
    DOT_IEEE: (16, 16, 16, 4, 1, 1, 32, 32),
}
#: The interpreter (tests on the CPU) has no registers to spill; it runs programs one by one in
#: numpy, so it takes larger tiles than the GPU's exact-fp32 ones (fewer, larger numpy steps).
#: Every GPU variant is in the tables above and goes through the compile gate.
_INTERPRETER_TILE = (32, 32, 16, 4, 1, 1, 64, 64)
#: Forward programs the column splits aim for: a few per SM, so small batches fill the GPU.
_PROGRAMS_PER_SM = 4
#: Backward programs the splits of the dq and dx loops aim for (at least two per SM).
_BACKWARD_PROGRAMS_PER_SM = 2
#: The interpreter runs programs one by one: a few splits keep the merges exercised in tests.
_INTERPRETER_PROGRAMS = 4
#: The forward makes the text-to-image column partials in its epilogue (one [row blocks, Bg]
#: pair, merged by the finish kernel's single program) up to this many row blocks; beyond, a
#: second forward call on (captions, images) makes them, 1/(1+K) of a pass.
MAX_COL_PARTS = 128
#: Stored logits are padded to rows of a multiple of this many elements (aligned vector loads).
STORE_ALIGN = 16
#: The narrowest feature slice :func:`_slice_width` halves to.
MIN_SLICE = 64
SUM_BLOCK, SUM_WARPS = 1024, 4


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def dot_mode(dtype_name: str, precision: str, interpreted: bool) -> int:
    """DOT constexpr for inputs of ``dtype_name``: 16-bit tensor cores, TF32 or exact fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if dtype_name not in GATE_DTYPES:
        raise ValueError(f"loss kernels: inputs must be float32, bfloat16 or float16, got {dtype_name}")
    if interpreted:
        return DOT_IEEE  # the interpreter computes every dot in fp32
    if dtype_name == "float32":
        return DOT_TF32 if precision == "tf32" else DOT_IEEE
    return DOT_NATIVE


def tiles(dot: int, D: int, arch: int, which: str, interpreted: bool = False) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_D, num_warps, num_stages) of the ``fwd``, ``bwd``
    (recomputing) or ``bwd_stored`` kernels for width D (BLOCK_D: the backward's feature slice; 0
    in the forward) on ``arch``, or under the interpreter."""
    table = _INTERPRETER_TILE if interpreted else _TILES[(dot, arch)]
    if not interpreted and (D % 16 or D < table[2]):
        table = _NARROW_TILES[dot]
    block_m, block_n, block_k, warps, fwd_stages, bwd_stages, widest, widest_stored = table
    if which == "fwd":
        return block_m, block_n, block_k, 0, warps, fwd_stages
    wide = widest_stored if which == "bwd_stored" else widest
    return block_m, block_n, block_k, min(triton.next_power_of_2(D), wide), warps, bwd_stages


def stored_dtype(dtype_name: str) -> torch.dtype:
    """What the forward keeps of each logit: fp16 cosines for 16-bit inputs (bounded by 1 for
    normalised features: 11 significant bits, four times bf16's), fp32 for fp32 inputs."""
    return torch.float32 if dtype_name == "float32" else torch.float16


def _split(tiles_: int, programs: int, target: int) -> tuple[int, int]:
    """(splits, tiles per split) of a loop of ``tiles_`` tiles so that ``programs`` x splits
    reaches ``target``; no split is empty."""
    wanted = max(1, min(tiles_, triton.cdiv(target, programs)))
    per = triton.cdiv(tiles_, wanted)
    return triton.cdiv(tiles_, per), per


@dataclass(frozen=True)
class Plan:
    """Every launch choice of one loss call, from shapes alone (no device value is read, so a
    call can be captured in a CUDA graph; docs/loss.md's counts are made from it).

    Rows q [R, D] against columns x [C, D]; ``stored``: the dtype the forward keeps the logits
    in (row stride ``stride_l``), or None (recomputed in the backward); ``fused_cols``: the
    text-to-image column partials come from the forward's epilogue (``col_parts`` row blocks of
    them), else from a second forward call (``col_splits`` x ``col_per``)."""

    R: int
    C: int
    D: int
    dot: int
    fwd: tuple
    bwd: tuple
    fwd_splits: int
    fwd_per: int
    with_cols: bool
    fused_cols: bool
    col_splits: int
    col_per: int
    stored: torch.dtype | None
    stride_l: int
    block_d: int
    dq_splits: int
    dq_per: int
    dx_splits: int
    dx_per: int

    @property
    def row_blocks(self) -> int:
        return triton.cdiv(self.R, self.fwd[0])

    @property
    def col_blocks(self) -> int:
        return triton.cdiv(self.C, self.bwd[1])

    @property
    def slices(self) -> int:
        """Feature slices of both backward kernels (``block_d`` wide)."""
        return triton.cdiv(self.D, self.block_d)

    @property
    def col_parts(self) -> int:
        """Partials per text-to-image column the finish kernel merges (0 without columns)."""
        if not self.with_cols:
            return 0
        return self.row_blocks if self.fused_cols else self.col_splits


def make_plan(R: int, C: int, D: int, dtype_name: str, precision: str, *, num_groups: int, with_cols: bool,
              store_bytes: int, arch: int = 90, sm_count: int | None = None) -> Plan:
    """The :class:`Plan` for ``R`` x ``C`` logits of width ``D``: on a GPU of ``arch`` with
    ``sm_count`` SMs, or (``sm_count`` None) under the interpreter. The logits are stored when
    their padded size fits ``store_bytes`` (and below 2^31 elements: int32 offsets)."""
    interpreted = sm_count is None
    dot = dot_mode(dtype_name, precision, interpreted)
    fwd = tiles(dot, D, arch, "fwd", interpreted)
    stride_l = triton.cdiv(C, STORE_ALIGN) * STORE_ALIGN
    kept = stored_dtype(dtype_name)
    store = R * stride_l * kept.itemsize <= store_bytes and R * stride_l < 2 ** 31
    bwd = tiles(dot, D, arch, "bwd_stored" if store else "bwd", interpreted)
    fwd_target = _INTERPRETER_PROGRAMS if interpreted else _PROGRAMS_PER_SM * sm_count
    bwd_target = _INTERPRETER_PROGRAMS if interpreted else _BACKWARD_PROGRAMS_PER_SM * sm_count
    block_m, block_n = fwd[:2]
    row_blocks, col_tiles = triton.cdiv(R, block_m), triton.cdiv(C, block_n)
    fwd_splits, fwd_per = _split(col_tiles, row_blocks, fwd_target)
    fused_cols = with_cols and row_blocks <= MAX_COL_PARTS
    col_splits = col_per = 0
    if with_cols and not fused_cols:
        col_splits, col_per = _split(triton.cdiv(R, block_n), triton.cdiv(num_groups, block_m), fwd_target)
    fill = _INTERPRETER_PROGRAMS if interpreted else sm_count
    block_d = _slice_width(bwd[3], D, row_blocks * col_tiles, fill)
    slices = triton.cdiv(D, block_d)
    dq_splits, dq_per = _split(col_tiles, row_blocks * slices, bwd_target)
    dx_splits, dx_per = _split(row_blocks, col_tiles * slices, bwd_target)
    # Partials beyond int32 offsets: fewer splits (at such sizes the grid is full without them).
    while dq_splits > 1 and dq_splits * R * D >= 2 ** 31:
        dq_splits, dq_per = _split(col_tiles, 1, dq_splits // 2)
    while dx_splits > 1 and dx_splits * C * D >= 2 ** 31:
        dx_splits, dx_per = _split(row_blocks, 1, dx_splits // 2)
    return Plan(R, C, D, dot, fwd, bwd, fwd_splits, fwd_per, with_cols, fused_cols, col_splits, col_per,
                kept if store else None, stride_l if store else 0, block_d, dq_splits, dq_per, dx_splits, dx_per)


def _slice_width(widest: int, D: int, tiles_: int, fill: int) -> int:
    """The backward's feature slice: the table's widest (every slice reads or recomputes the band
    of logits again), or half of it when the logit tiles alone cannot give every SM a program
    (small batches: B=128 at K=4 has 80 tiles of 32 x 32 for an H100's 132 SMs)."""
    if tiles_ >= fill or widest < 2 * MIN_SLICE or D <= widest // 2:
        return widest
    return widest // 2


def plan_for(q: torch.Tensor, x: torch.Tensor, precision: str, *, num_groups: int, with_cols: bool,
             store_bytes: int) -> Plan:
    """:func:`make_plan` for rows q against columns x on their device."""
    if q.device.type == "cuda":
        props = torch.cuda.get_device_properties(q.device)
        arch, sms = arch_of((props.major, props.minor)), props.multi_processor_count
    else:
        arch, sms = 90, None
    return make_plan(q.shape[0], x.shape[0], q.shape[1], _dtype_name(q.dtype), precision, num_groups=num_groups,
                     with_cols=with_cols, store_bytes=store_bytes, arch=arch, sm_count=sms)


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


def forward(q: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, state: dict, plan: Plan, *, row_offset: int,
            num_negatives: int, with_igc: bool) -> torch.Tensor | None:
    """Fill ``state`` (:func:`.loss_terms.new_state` with ``plan.fwd_splits`` row and
    ``plan.col_parts`` column partials) with the statistics of ``scale * q @ x^T``; return the
    stored logits [R, stride_l] (``plan.stored``) or None. q, x contiguous."""
    R, D = q.shape
    num_groups = check(q, x, num_negatives, row_offset)
    block_m, block_n, block_k, _, warps, stages = plan.fwd
    logits = None
    if plan.stored is not None:
        logits = torch.empty(R, plan.stride_l, device=q.device, dtype=plan.stored)
    row = tuple(state[n] for n in ("row_m", "row_l", "pos", "group_m", "group_l"))
    common = dict(DOT=plan.dot, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    _lse_fwd_kernel[(plan.row_blocks, plan.fwd_splits)](
        q, x, scale, logits if logits is not None else scale, *row, state["col_m"], state["col_l"], R, x.shape[0], D,
        row_offset, num_groups, num_negatives, q.stride(0), x.stride(0), plan.stride_l, plan.fwd_per, int(with_igc),
        int(plan.fused_cols), STORE=logits is not None, **common)
    if plan.with_cols and not plan.fused_cols:  # text-to-image: its rows' statistics are the first Bg columns'
        scratch = torch.empty_like(state["col_m"])
        captions = x[:num_groups]
        _lse_fwd_kernel[(triton.cdiv(num_groups, block_m), plan.col_splits)](
            captions, q, scale, scale, state["col_m"], state["col_l"], scratch, scratch, scratch, scratch, scratch,
            num_groups, R, D, 0, R, 0, captions.stride(0), q.stride(0), 0, plan.col_per, 0, 0, STORE=False, **common)
    return logits


def backward(q: torch.Tensor, x: torch.Tensor, logits: torch.Tensor | None, scale: torch.Tensor, grads: torch.Tensor,
             lse: tuple, dq: torch.Tensor, dx: torch.Tensor, plan: Plan, *, row_offset: int, num_negatives: int,
             weights: tuple, with_igc: bool, with_cols: bool, accumulate: bool) -> torch.Tensor:
    """Write (``accumulate``: add) the global term's gradients into ``dq`` [R, D] and ``dx`` [C, D]
    (their dtypes, contiguous) and return d(scale) [1] fp32. ``lse`` = (row [R], IGC [R], column [Bg])
    log-sum-exps of the forward; ``logits``: what :func:`forward` stored (None: recomputed);
    ``grads``: the upstream gradients (1 or 5 fp32)."""
    R, D = q.shape
    C = x.shape[0]
    num_groups = check(q, x, num_negatives, row_offset)
    if not (dq.is_contiguous() and dx.is_contiguous()):
        raise ValueError("loss kernels: dq and dx must be contiguous")
    block_m, block_n, block_k, _, warps, stages = plan.bwd
    parts = torch.empty(plan.row_blocks * plan.dq_splits, device=q.device, dtype=torch.float32)
    dscale = torch.empty(1, device=q.device, dtype=torch.float32)
    common = dict(DOT=plan.dot, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                  num_stages=stages, STORED=logits is not None)
    stored = logits if logits is not None else scale
    head = (grads.numel(), float(weights[0]), float(weights[1]), int(with_igc), int(with_cols))

    def target(out, splits):
        """(where the kernel writes, its part stride, accumulate flag, the fp32 partials or None)."""
        if splits == 1:
            return out, 0, int(accumulate), None
        part = torch.empty(splits, *out.shape, device=out.device, dtype=torch.float32)
        return part, out.numel(), 0, part

    def merge(part, out):
        if part is not None:
            _sum_parts_kernel[(triton.cdiv(out.numel(), SUM_BLOCK),)](part, out, out.numel(), part.shape[0],
                                                                      int(accumulate), BLOCK=SUM_BLOCK,
                                                                      num_warps=SUM_WARPS)

    out, stride, acc, part = target(dq, plan.dq_splits)
    _dq_kernel[(plan.row_blocks, plan.slices, plan.dq_splits)](
        q, x, stored, scale, grads, *lse, out, parts, R, C, D, row_offset, num_groups, num_negatives, q.stride(0),
        x.stride(0), plan.stride_l, D, stride, *head, acc, plan.dq_per, BLOCK_D=plan.block_d, **common)
    merge(part, dq)
    del part
    out, stride, acc, part = target(dx, plan.dx_splits)
    _dx_kernel[(plan.col_blocks, plan.slices, plan.dx_splits)](
        q, x, stored, scale, grads, *lse, out, parts, dscale, parts.numel(), R, C, D, row_offset, num_groups,
        num_negatives, q.stride(0), x.stride(0), plan.stride_l, D, stride, *head, acc, plan.dx_per,
        BLOCK_D=plan.block_d, PART_BLOCK=PART_BLOCK, **common)
    merge(part, dx)
    return dscale


# ---------------------------------------------------------------------------------------------
# What the launchers above can choose, for the compile gate.

_DOT_NAMES = {DOT_IEEE: "ieee", DOT_TF32: "tf32", DOT_NATIVE: "native"}
_WIDTH_ARGS = ("D", "stride_q", "stride_x", "stride_dq", "stride_dx")


def _aligned_ints(D: int) -> tuple:
    """Integer arguments a launch sees as multiples of 16: D and the row strides (contiguous rows)
    when 16 | D; the stored logits' row stride always (padded to :data:`STORE_ALIGN`, or 0)."""
    return (_WIDTH_ARGS if D % 16 == 0 else ()) + ("stride_l",)


def kernel_configs(dtype: str, D: int, arch: int) -> list[KernelConfig]:
    """Every kernel variant the launchers can pick for inputs of ``dtype`` ("float32", "bfloat16",
    "float16") and feature width D on ``arch`` (80/90), over both fp32 precisions, logits stored or
    recomputed, and the backward writing its gradient (input dtype) or fp32 split partials. K, the
    row offset, the splits and the IGC / text-to-image / accumulate flags are run-time arguments."""
    ptr, f32 = POINTER_TYPES[dtype], "*fp32"
    kept = POINTER_TYPES[_dtype_name(stored_dtype(dtype))]
    out = []
    for dot in sorted({dot_mode(dtype, p, False) for p in PRECISIONS}):
        label = {"dtype": f"{dtype}/{_DOT_NAMES[dot]}", "D": D}
        bm, bn, bk, _, warps, stages = tiles(dot, D, arch, "fwd")
        stats = {n: f32 for n in ("Scale", "RowM", "RowL", "Pos", "GroupM", "GroupL", "ColM", "ColL")}
        for store in (False, True):
            out.append(make_config(_lse_fwd_kernel, {"Q": ptr, "X": ptr, "L": kept if store else f32, **stats},
                                   dict(DOT=dot, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STORE=store), num_warps=warps,
                                   num_stages=stages, arch=arch, aligned_ints=_aligned_ints(D),
                                   label={**label, "tile": f"{bm}x{bn}x{bk}", "logits": "stored" if store else "-"}))
        for stored, bd in [(stored, width) for stored in (False, True)
                           for width in _slice_widths(tiles(dot, D, arch, "bwd_stored" if stored else "bwd")[3], D)]:
            bm, bn, bk, _, warps, stages = tiles(dot, D, arch, "bwd_stored" if stored else "bwd")
            for grad_type in sorted({ptr, f32}):
                types = {"Q": ptr, "X": ptr, "L": kept if stored else f32, "Scale": f32, "Grads": f32,
                         "RowLse": f32, "GroupLse": f32, "ColLse": f32, "DQ": grad_type, "DX": grad_type,
                         "DScalePart": f32, "DScale": f32, "w_ce": "fp32", "w_igc": "fp32"}
                for kernel, extra in ((_dq_kernel, {}), (_dx_kernel, {"PART_BLOCK": PART_BLOCK})):
                    out.append(make_config(kernel, {k: v for k, v in types.items() if k in kernel.arg_names},
                                           dict(DOT=dot, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd,
                                                STORED=stored) | extra,
                                           num_warps=warps, num_stages=stages, arch=arch,
                                           aligned_ints=_aligned_ints(D),
                                           label={**label, "tile": f"{bm}x{bn}x{bk}/{bd}",
                                                  "logits": "stored" if stored else "recomputed",
                                                  "out": grad_type[1:]}))
    return out


def _slice_widths(widest: int, D: int) -> list[int]:
    """The feature slices :func:`_slice_width` can pick for width D (its table's widest for D)."""
    widths = {_slice_width(widest, D, tiles_, 2) for tiles_ in (1, 2)}
    return sorted(widths, reverse=True)


def sum_configs(arch: int) -> list[KernelConfig]:
    """The split partials' merge: fp32 partials into each gradient dtype."""
    return [make_config(_sum_parts_kernel, {"Parts": "*fp32", "Out": POINTER_TYPES[dtype]}, dict(BLOCK=SUM_BLOCK),
                        num_warps=SUM_WARPS, num_stages=1, arch=arch, label={"dtype": dtype, "tile": str(SUM_BLOCK)})
            for dtype in GATE_DTYPES]


def gate_configs(arch: int) -> list[KernelConfig]:
    """All variants over the gate's dtypes and feature widths."""
    return ([cfg for dtype in GATE_DTYPES for D in GATE_DIMS for cfg in kernel_configs(dtype, D, arch)]
            + sum_configs(arch))
