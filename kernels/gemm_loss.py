"""Triton kernels of the ``gemm`` loss backend: everything around cuBLAS's GEMMs. Tensors in, tensors out.

The backend (``degla_fast.loss.gemm_backend``) has cuBLAS write the raw fp32 dot products of rows q [R, D]
with one chunk of columns ``x[c0:c0+Cc]``, ``L = q @ x_c^T`` [R, Cc]. These kernels read each
such chunk once per use:

* :func:`_stats_kernel` (forward, one launch per column chunk). Row programs fold the chunk into
  each row's running max and sum of ``exp(s * L)`` (so the row log-sum-exp covers every chunk),
  pick the target logit (column ``row_offset + r``) and fold in the members of the row's IGC group
  (column ``t`` and columns ``Bg + t*K .. Bg + t*K + K - 1``) that lie in the chunk. Column
  programs, when the rows are the whole batch (``WITH_COLS``), take the log-sum-exp over all R
  rows of each of the chunk's first ``Bg`` columns: text-to-image is the transpose of those, so
  it needs no GEMM of its own, and every row is in every chunk, so each column is complete at once.
* :func:`.loss_terms.finish` (forward, one program): the means of the cross-entropies both ways,
  IGC and TGC, the distillation sum and the weighted total.
* :func:`_grad_kernel` (backward, one launch per chunk): the gradient of the loss w.r.t. each logit,
  ``a (P - onehot) + b (P_t2i - onehot) + c (P_igc - onehot)``, divided by ``f = |a| + |b| + |c|``
  so every entry lies in [-1, 1] (fp16 neither overflows under a loss scale nor loses the small
  ``1/R`` factor to subnormals), written in the input dtype for the two backward GEMMs; and the
  partial sums of ``gradient * L``, d(scale), per program (no atomics: summed in the finalize).
* :func:`_finalize_kernel` (backward, one program per sample): ``dq = s f (G @ x)`` and
  ``dx = s f (G^T @ q)`` from cuBLAS's fp32 products, plus the TGC and distillation gradients of
  the sample's own rows (:mod:`.local_terms`' formulas), cast to the input dtype; d(scale).

No kernel here reads a value on the host, and every launch's grid depends on shapes only, so
the backend can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import LOCAL_MAX_NEGATIVES, PART_BLOCK, POINTER_TYPES, KernelConfig, make_config
from .local_terms import (local_blocks, local_chunk_grads, local_probabilities, negative_rows, sample_rows,
                          tgc_dots)
from .loss_terms import NEG_BIG, logit_coefficients, logit_grad, upstream


@triton.jit
def _running(M, S, rows, row_ok, first, BLOCK_M: tl.constexpr):
    """The rows' running (max, sum of exp): fresh for the first chunk, else as the last chunk left it."""
    if first:
        m = tl.full([BLOCK_M], NEG_BIG, tl.float32)
        s = tl.zeros([BLOCK_M], tl.float32)
    else:
        m = tl.load(M + rows, mask=row_ok, other=NEG_BIG)
        s = tl.load(S + rows, mask=row_ok, other=0.0)
    return m, s


@triton.jit
def _row_stats(L, scale, RowM, RowL, Pos, GroupM, GroupL, pid, R, Cc, c0, row_offset, Bg, K, first, stride_l,
               WITH_IGC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    m, s = _running(RowM, RowL, rows, row_ok, first, BLOCK_M)
    for start in range(0, Cc, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        ok = row_ok[:, None] & (cols < Cc)[None, :]
        z = tl.load(L + rows[:, None] * stride_l + cols[None, :], mask=ok, other=0.0) * scale
        z = tl.where(ok, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m = m_new
    tl.store(RowM + rows, m, mask=row_ok)
    tl.store(RowL + rows, s, mask=row_ok)
    target = rows + row_offset - c0  # the target column, local to the chunk
    here = row_ok & (target >= 0) & (target < Cc)
    tl.store(Pos + rows, tl.load(L + rows * stride_l + target, mask=here, other=0.0) * scale, mask=here)
    if WITH_IGC:
        gm, gs = _running(GroupM, GroupL, rows, row_ok, first, BLOCK_M)
        for j in range(0, K + 1):
            col = tl.where(j == 0, rows + row_offset, Bg + (rows + row_offset) * K + j - 1) - c0
            ok = row_ok & (col >= 0) & (col < Cc)
            z = tl.where(ok, tl.load(L + rows * stride_l + col, mask=ok, other=0.0) * scale, float("-inf"))
            gm_new = tl.maximum(gm, z)
            gs = gs * tl.exp(gm - gm_new) + tl.exp(z - gm_new)
            gm = gm_new
        tl.store(GroupM + rows, gm, mask=row_ok)
        tl.store(GroupL + rows, gs, mask=row_ok)


@triton.jit
def _column_stats(L, scale, ColM, ColL, pid, R, c0, n_cols, stride_l, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    m = tl.full([BLOCK_N], NEG_BIG, tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, R, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        ok = (rows < R)[:, None] & col_ok[None, :]
        z = tl.load(L + rows[:, None] * stride_l + cols[None, :], mask=ok, other=0.0) * scale
        z = tl.where(ok, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[None, :]), 0)
        m = m_new
    tl.store(ColM + c0 + cols, m, mask=col_ok)
    tl.store(ColL + c0 + cols, s, mask=col_ok)


@triton.jit(do_not_specialize=["R", "Cc", "c0", "row_offset", "Bg", "K", "n_cols", "first", "n_row_programs"])
def _stats_kernel(L, Scale, RowM, RowL, Pos, GroupM, GroupL, ColM, ColL, R, Cc, c0, row_offset, Bg, K, n_cols, first,
                  n_row_programs, stride_l, WITH_IGC: tl.constexpr, ROW_BLOCK_M: tl.constexpr,
                  ROW_BLOCK_N: tl.constexpr, COL_BLOCK_M: tl.constexpr, COL_BLOCK_N: tl.constexpr):
    """Programs below ``n_row_programs`` fold the chunk into the row statistics, the others take
    the (max, sum of exp) of the chunk's first ``n_cols`` columns (the text-to-image rows)."""
    pid = tl.program_id(0)
    scale = tl.load(Scale).to(tl.float32)
    if pid < n_row_programs:
        _row_stats(L, scale, RowM, RowL, Pos, GroupM, GroupL, pid, R, Cc, c0, row_offset, Bg, K, first, stride_l,
                   WITH_IGC, ROW_BLOCK_M, ROW_BLOCK_N)
    else:
        _column_stats(L, scale, ColM, ColL, pid - n_row_programs, R, c0, n_cols, stride_l, COL_BLOCK_M, COL_BLOCK_N)


@triton.jit(do_not_specialize=["R", "Cc", "c0", "row_offset", "Bg", "K", "tiles_per_program", "part_offset",
                               "n_grads"])
def _grad_kernel(L, Scale, Grads, RowLse, GroupLse, ColLse, G, DScalePart, R, Cc, c0, row_offset, Bg, K,
                 tiles_per_program, part_offset, stride_l, n_grads, w_ce, w_igc,
                 WITH_IGC: tl.constexpr, WITH_COLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """G[r, j] = d(loss)/d(logit) / f in G's dtype, for the rows of ``program_id(0)`` and its share
    of the chunk's column tiles; DScalePart[part_offset + program] = sum of d(loss)/d(logit) * L."""
    scale = tl.load(Scale).to(tl.float32)
    g_ce, g_igc, g_tgc, g_dist = upstream(Grads, n_grads, w_ce, w_igc, 0.0, 0.0)
    a, b, c, f = logit_coefficients(g_ce, g_igc, R, Bg, WITH_IGC, WITH_COLS)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    target = rows + row_offset
    lse = tl.load(RowLse + rows, mask=row_ok, other=0.0)
    glse = lse
    if WITH_IGC:
        glse = tl.load(GroupLse + rows, mask=row_ok, other=0.0)
    dscale = tl.zeros([BLOCK_M], tl.float32)
    first = tl.program_id(1) * tiles_per_program * BLOCK_N
    for start in range(first, tl.minimum(first + tiles_per_program * BLOCK_N, Cc), BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        ok = row_ok[:, None] & (cols < Cc)[None, :]
        dots = tl.load(L + rows[:, None] * stride_l + cols[None, :], mask=ok, other=0.0)
        gcols = c0 + cols
        col_lse = lse  # unused without WITH_COLS
        if WITH_COLS:
            col_lse = tl.load(ColLse + gcols, mask=gcols < Bg, other=float("inf"))
        grad = logit_grad(dots * scale, lse, col_lse, glse, target, gcols, a, b, c, Bg, K, WITH_IGC, WITH_COLS)
        grad = tl.where(ok, grad, 0.0)
        dscale += tl.sum(grad * dots, 1)
        tl.store(G + rows[:, None] * stride_l + cols[None, :], (grad / f).to(G.dtype.element_ty), mask=ok)
    tl.store(DScalePart + part_offset + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.sum(dscale, 0))


@triton.jit(do_not_specialize=["R", "Bg", "K", "official", "n_parts", "n_grads", "with_igc", "with_cols"])
def _finalize_kernel(DQRaw, DXRaw, Scale, Grads, DScalePart, n_parts, Text, TText, Img, TImg, TgcLse, DQ, DX, DScale,
                     R, Bg, K, D, official, n_grads, with_igc, with_cols, tgc_scale, w_ce, w_igc, w_tgc, w_dist,
                     stride_t, stride_i, WITH_LOCAL: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                     PART_BLOCK: tl.constexpr):
    """Program i: row i of dq (if i < R) and the rows of sample i in dx (its positive row i and
    its K negatives, if i < Bg), ``s f * raw`` plus the local terms' gradients; program 0 also
    d(scale). The raw products are fp32 [*, D] contiguous; dq/dx are written in their dtype with
    the strides of q (``stride_i``) and x (``stride_t``)."""
    i = tl.program_id(0)
    scale = tl.load(Scale).to(tl.float32)
    g_ce, g_igc, g_tgc, g_dist = upstream(Grads, n_grads, w_ce, w_igc, w_tgc, w_dist)
    a, b, c, f = logit_coefficients(g_ce, g_igc, R, Bg, with_igc, with_cols)
    alpha = scale * f
    if i == 0:
        parts = tl.zeros([PART_BLOCK], tl.float32)
        for start in range(0, n_parts, PART_BLOCK):
            idx = start + tl.arange(0, PART_BLOCK)
            parts += tl.load(DScalePart + idx, mask=idx < n_parts, other=0.0)
        tl.store(DScale, tl.sum(parts, 0))
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    if WITH_LOCAL:  # TGC needs the sample's dots over all of D before any gradient chunk
        pos, neg, dist = tgc_dots(Text, TText, Img, TImg, i, Bg, D, K, official, ks, k_ok, stride_t, stride_i,
                                  BLOCK_K, BLOCK_D)
        p_pos, p_neg = local_probabilities(pos, neg, tl.load(TgcLse + i), k_ok, tgc_scale)
    for k0 in range(0, D, BLOCK_D):
        dims = k0 + tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        dq = alpha * tl.load(DQRaw + i * D + dims, mask=(i < R) & dim_ok, other=0.0)
        dt = alpha * tl.load(DXRaw + i * D + dims, mask=(i < Bg) & dim_ok, other=0.0)
        if WITH_LOCAL:
            _, t, tt, n, nt, img, timg = sample_rows(Text, TText, Img, TImg, i, Bg, K, official, dims, dim_ok, ks,
                                                     k_ok, stride_t, stride_i)
            lt, ln, limg = local_chunk_grads(t, tt, n, nt, img, timg, p_pos, p_neg, g_tgc * tgc_scale / Bg,
                                             2.0 * g_dist)
            dt += lt
            dq += limg
        tl.store(DQ + i * stride_i + dims, dq.to(DQ.dtype.element_ty), mask=(i < R) & dim_ok)
        tl.store(DX + i * stride_t + dims, dt.to(DX.dtype.element_ty), mask=(i < Bg) & dim_ok)
        # The negatives BLOCK_K at a time: K may exceed one tile when the local terms are not
        # fused here (K > LOCAL_MAX_NEGATIVES); with them, K <= BLOCK_K and this is one pass.
        for kb in range(0, K, BLOCK_K):
            neg_rows = negative_rows(i, Bg, K, kb + ks, official)
            neg_ok = (i < Bg) & (kb + ks < K)[:, None] & dim_ok[None, :]
            dn = alpha * tl.load(DXRaw + neg_rows[:, None] * D + dims[None, :], mask=neg_ok, other=0.0)
            if WITH_LOCAL:
                dn += ln
            tl.store(DX + neg_rows[:, None] * stride_t + dims[None, :], dn.to(DX.dtype.element_ty), mask=neg_ok)


# ---------------------------------------------------------------------------------------------
# Launchers: shapes checked, tiles picked from one table (what the compile gate compiles).

#: Row programs of the stats kernel: BLOCK_M rows, BLOCK_N columns per step; column programs:
#: BLOCK_N columns, BLOCK_M rows per step (a column program reads R x 64 logits, a row program
#: 16 x Cc: similar work at K = 4). The grad kernel's tile. All elementwise: no tensor cores.
STATS_TILES = dict(ROW_BLOCK_M=16, ROW_BLOCK_N=256, COL_BLOCK_M=64, COL_BLOCK_N=64)
STATS_WARPS = 4
GRAD_WARPS = 8
#: The grad kernel's tile by whether the logits' row stride is a multiple of 16: without vector
#: loads each element needs its own 64-bit addresses, so the unaligned tile is half as tall
#: (sm_90's 128-register cap at 8 warps).
GRAD_TILES = {True: (32, 64), False: (16, 64)}
#: The finalize kernel: the local kernels' feature chunk (BLOCK_D) and BLOCK_K, 8 warps (it holds
#: the raw products of the sample's 1+K rows besides the local kernels' tiles); program 0 sums
#: the d(scale) partials PART_BLOCK (configs) at a time.
FINALIZE_WARPS = 8
#: The grad kernel aims for this many programs per SM (its column tiles are split among them).
_PROGRAMS_PER_SM = 8
#: The interpreter runs programs one by one: a few splits keep the split path exercised in tests.
_INTERPRETER_SPLITS = 3


def _programs(device: torch.device) -> int:
    if device.type == "cuda":
        return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 0


def stats(logits: torch.Tensor, scale: torch.Tensor, state: dict, *, c0: int, row_offset: int, num_groups: int,
          num_negatives: int, with_igc: bool, with_cols: bool) -> None:
    """Fold the chunk ``logits`` [R, Cc] (raw fp32 dots of columns ``c0 ..``) into ``state``
    (:func:`.loss_terms.new_state` with one split: chunks are merged here, in order)."""
    R, Cc = logits.shape
    n_cols = max(0, min(Cc, num_groups - c0)) if with_cols else 0
    row_programs = triton.cdiv(R, STATS_TILES["ROW_BLOCK_M"])
    grid = (row_programs + triton.cdiv(n_cols, STATS_TILES["COL_BLOCK_N"]),)
    _stats_kernel[grid](logits, scale, state["row_m"], state["row_l"], state["pos"], state["group_m"],
                        state["group_l"], state["col_m"], state["col_l"], R, Cc, c0, row_offset, num_groups,
                        num_negatives, n_cols, int(c0 == 0), row_programs, logits.stride(0), WITH_IGC=with_igc,
                        **STATS_TILES, num_warps=STATS_WARPS)


def grad_tile(row_stride: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the grad kernel for logits with this row stride."""
    return GRAD_TILES[row_stride % 16 == 0]


def grad_grid(R: int, Cc: int, row_stride: int, device: torch.device) -> tuple[int, int, int]:
    """(row blocks, column splits, column tiles per program) of the grad kernel for a chunk of R x Cc."""
    return grad_grid_for(R, Cc, row_stride, _programs(device))


def grad_grid_for(R: int, Cc: int, row_stride: int, wanted: int) -> tuple[int, int, int]:
    """:func:`grad_grid` for a device that wants ``wanted`` programs (0: the interpreter); also
    what :mod:`degla_fast.loss.count` counts for a GPU it does not have."""
    block_m, block_n = grad_tile(row_stride)
    tiles, row_blocks = triton.cdiv(Cc, block_n), triton.cdiv(R, block_m)
    splits = _INTERPRETER_SPLITS if wanted == 0 else triton.cdiv(wanted, row_blocks)
    per = triton.cdiv(tiles, max(1, min(tiles, splits)))
    return row_blocks, triton.cdiv(tiles, per), per


def grad(logits: torch.Tensor, scale: torch.Tensor, grads: torch.Tensor, state: dict, out: torch.Tensor,
         parts: torch.Tensor, part_offset: int, *, c0: int, row_offset: int, num_groups: int, num_negatives: int,
         weights: tuple, with_igc: bool, with_cols: bool) -> int:
    """Write the chunk's gradient w.r.t. its logits, at unit scale, into ``out`` (same shape and
    strides as ``logits``, the input dtype); its d(scale) partials from ``parts[part_offset]`` on.
    Returns the number of partials written. ``grads``: the upstream gradients (1 or 5 fp32)."""
    R, Cc = logits.shape
    if out.stride() != logits.stride():
        raise ValueError(f"gemm grad kernel: the gradient {tuple(out.stride())} and logits {tuple(logits.stride())} "
                         "strides differ")
    row_blocks, splits, per = grad_grid(R, Cc, logits.stride(0), logits.device)
    block_m, block_n = grad_tile(logits.stride(0))
    _grad_kernel[(row_blocks, splits)](
        logits, scale, grads, state["row_m"], state["group_m"], state["col_m"], out, parts, R, Cc, c0, row_offset,
        num_groups, num_negatives, per, part_offset, logits.stride(0), grads.numel(), float(weights[0]),
        float(weights[1]), WITH_IGC=with_igc, WITH_COLS=with_cols, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=GRAD_WARPS)
    return row_blocks * splits


def num_grad_parts(R: int, Cc: int, row_stride: int, device: torch.device) -> int:
    """How many d(scale) partials :func:`grad` writes for one chunk of R x Cc."""
    row_blocks, splits, _ = grad_grid(R, Cc, row_stride, device)
    return row_blocks * splits


def finalize(dq_raw: torch.Tensor, dx_raw: torch.Tensor, scale: torch.Tensor, grads: torch.Tensor,
             parts: torch.Tensor, q: torch.Tensor, x: torch.Tensor, local: tuple | None, *, num_groups: int,
             num_negatives: int, official: bool, tgc_scale: float, weights: tuple, with_igc: bool,
             with_cols: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq [R, D] in q's dtype, dx [C, D] in x's dtype, dscale [1] fp32) from the raw fp32 products
    and the d(scale) partials. ``local``: (teacher_x, teacher_q, tgc_lse) to add the TGC and
    distillation gradients of the whole batch (q = images, x = [T; N]), or None."""
    R, D = q.shape
    dq = torch.empty_like(q)
    dx = torch.empty_like(x)
    dscale = torch.empty(1, device=q.device, dtype=torch.float32)
    block_k, block_d = local_blocks(D, min(num_negatives, LOCAL_MAX_NEGATIVES))
    tt, ti, lse = local if local is not None else (x, q, parts)
    _finalize_kernel[(max(R, num_groups),)](
        dq_raw, dx_raw, scale, grads, parts, parts.numel(), x, tt, q, ti, lse, dq, dx, dscale, R, num_groups,
        num_negatives, D, int(official), grads.numel(), int(with_igc), int(with_cols), float(tgc_scale),
        *[float(w) for w in weights], x.stride(0), q.stride(0), WITH_LOCAL=local is not None, BLOCK_K=block_k,
        BLOCK_D=block_d, PART_BLOCK=PART_BLOCK, num_warps=FINALIZE_WARPS)
    return dq, dx, dscale


# ---------------------------------------------------------------------------------------------
# What the launchers above can choose, for the compile gate.

GATE_DTYPES = ("float32", "bfloat16", "float16")
#: D with and without 16 | D; K from 0 (plain CLIP) to the local kernels' maximum.
GATE_DIMS = (40, 512)
GATE_NEGATIVES = (0, 1, 4, 8)


def kernel_configs(dtype: str, D: int, K: int, arch: int) -> list[KernelConfig]:
    """Every variant the launchers can pick for ``dtype`` inputs of width D with K negatives
    (the stats kernel reads only fp32; D and K reach the finalize kernel only through 16 | D and
    its BLOCK_K)."""
    ptr, f32 = POINTER_TYPES[dtype], "*fp32"
    label = {"dtype": dtype, "D": D, "K": K}
    weights = {w: "fp32" for w in ("w_ce", "w_igc", "w_tgc", "w_dist")}
    out = []
    for igc in (False, True):
        # The logits' row stride is the chunk's width: a multiple of 16 or not, whatever D is.
        for aligned in ((), ("stride_l",)):
            out.append(make_config(
                _stats_kernel, {n: f32 for n in ("L", "Scale", "RowM", "RowL", "Pos", "GroupM", "GroupL", "ColM",
                                                 "ColL")},
                dict(WITH_IGC=igc, **STATS_TILES), num_warps=STATS_WARPS, num_stages=2, arch=arch,
                aligned_ints=aligned, label={**label, "dtype": "float32", "tile": "16x256/64x64",
                                             "flags": f"igc={int(igc)}"}))
            block_m, block_n = GRAD_TILES[bool(aligned)]
            for cols in (False, True):
                out.append(make_config(
                    _grad_kernel, {"L": f32, "Scale": f32, "Grads": f32, "RowLse": f32, "GroupLse": f32,
                                   "ColLse": f32, "G": ptr, "DScalePart": f32, "w_ce": "fp32", "w_igc": "fp32"},
                    dict(WITH_IGC=igc, WITH_COLS=cols, BLOCK_M=block_m, BLOCK_N=block_n),
                    num_warps=GRAD_WARPS, num_stages=2, arch=arch, aligned_ints=aligned,
                    label={**label, "tile": f"{block_m}x{block_n}", "flags": f"igc={int(igc)} cols={int(cols)}"}))
    block_k, block_d = local_blocks(D, min(K, LOCAL_MAX_NEGATIVES))
    for local in (False, True):
        out.append(make_config(
            _finalize_kernel, {"DQRaw": f32, "DXRaw": f32, "Scale": f32, "Grads": f32, "DScalePart": f32,
                               "Text": ptr, "TText": ptr, "Img": ptr, "TImg": ptr, "TgcLse": f32, "DQ": ptr,
                               "DX": ptr, "DScale": f32, "tgc_scale": "fp32"} | weights,
            dict(WITH_LOCAL=local, BLOCK_K=block_k, BLOCK_D=block_d, PART_BLOCK=PART_BLOCK),
            num_warps=FINALIZE_WARPS, num_stages=1, arch=arch,
            aligned_ints=("D", "stride_t", "stride_i") if D % 16 == 0 else (),
            label={**label, "tile": f"{block_k}x{block_d}", "flags": f"local={int(local)}"}))
    return out


def gate_configs(arch: int) -> list[KernelConfig]:
    """All variants over the gate's dtypes, widths (16 | D or not) and K (BLOCK_K 2, 4, 8)."""
    return [cfg for dtype in GATE_DTYPES for D in GATE_DIMS for K in GATE_NEGATIVES
            for cfg in kernel_configs(dtype, D, K, arch)]
