"""What the two fused loss backends share: the gradient of each logit, and the forward's last step.

Both the ``gemm`` backend (:mod:`.gemm_loss`: logits from cuBLAS) and the ``triton`` backend
(:mod:`.degla_loss`: logits recomputed in tiles) see the same quantities per row ``r`` of
``q`` and column ``j`` of ``x``:

* the row log-sum-exp over all columns, the target logit (column ``t = row_offset + r``) and the
  log-sum-exp of the row's IGC group (column ``t`` and columns ``Bg + t*K .. Bg + t*K + K - 1``);
* when the rows are the whole batch (``cols``), the log-sum-exp of each of the first ``Bg``
  columns over all rows: text-to-image is those columns, transposed.

:func:`logit_grad` is d(loss)/d(logit) from them, :func:`upstream` and
:func:`logit_coefficients` the factors the autograd gradients put on each term, and
:func:`finish` merges the per-split statistics into the five outputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import KernelConfig, make_config

# Finite "minus infinity" for running maxima (exp(m_old - m_new) stays defined before the first
# column); a constexpr, since a GPU compile rejects plain Python globals inside @jit functions.
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def upstream(Grads, n_grads, w_ce, w_igc, w_tgc, w_dist):
    """d(loss)/d(each term): the total's gradient times the term's weight, plus the term's own
    gradient when the caller back-propagates through it too (``n_grads == 5``: Grads holds the
    gradients of total, ce, igc, tgc, distill; 1: only the total's)."""
    g = tl.load(Grads).to(tl.float32)
    g_ce, g_igc, g_tgc, g_dist = g * w_ce, g * w_igc, g * w_tgc, g * w_dist
    if n_grads == 5:
        g_ce += tl.load(Grads + 1).to(tl.float32)
        g_igc += tl.load(Grads + 2).to(tl.float32)
        g_tgc += tl.load(Grads + 3).to(tl.float32)
        g_dist += tl.load(Grads + 4).to(tl.float32)
    return g_ce, g_igc, g_tgc, g_dist


@triton.jit
def logit_coefficients(g_ce, g_igc, R, Bg, with_igc, with_cols):
    """(a, b, c, f): d(loss)/d(logit) = a (P - onehot) + b (P_t2i - onehot) + c (P_igc - onehot),
    f = |a| + |b| + |c| (at least 1e-30), every bracket in [-1, 1], so grad / f is too. ce is the
    mean over rows, or, with ``with_cols``, half the row mean plus half the column mean. The
    flags may be constexprs or run-time integers (scalar work: no variant per flag)."""
    a = g_ce / R
    b = a * 0.0
    c = a * 0.0
    if with_cols:
        a = g_ce * 0.5 / R
        b = g_ce * 0.5 / Bg
    if with_igc:
        c = g_igc / R
    return a, b, c, tl.maximum(tl.abs(a) + tl.abs(b) + tl.abs(c), 1e-30)


@triton.jit
def group_member(cols, target, Bg, K):
    """[M, N] mask: column ``cols[n]`` is in the IGC group of the row whose target is ``target[m]``."""
    first_neg = Bg + target * K
    return (cols[None, :] == target[:, None]) | ((cols[None, :] >= first_neg[:, None])
                                                 & (cols[None, :] < first_neg[:, None] + K))


@triton.jit
def logit_grad(z, lse, col_lse, glse, target, cols, a, b, c, Bg, K, with_igc, with_cols):
    """d(loss)/d(logit) of a tile of logits ``z`` [M, N]: rows with log-sum-exp ``lse`` [M], IGC
    log-sum-exp ``glse`` [M] and target column ``target`` [M]; columns ``cols`` [N] (global) with
    text-to-image log-sum-exp ``col_lse`` [N] (+inf beyond Bg). Out-of-range entries are the
    caller's to mask. The one-hot is subtracted here, from the same logits, so a saturated row
    (P at its target rounding to 1) gives exactly 0. The flags may be constexprs (the gemm grad
    kernel: elementwise work, a variant each) or run-time integers (the tiled kernels, where the
    dots dominate and fewer variants keep the compile gate short)."""
    is_target = cols[None, :] == target[:, None]
    onehot = tl.where(is_target, 1.0, 0.0)
    grad = a * (tl.exp(z - lse[:, None]) - onehot)
    if with_cols:
        grad += b * (tl.exp(z - col_lse[None, :]) - onehot)
    if with_igc:
        member = group_member(cols, target, Bg, K)
        grad += c * (tl.where(member, tl.exp(z - glse[:, None]), 0.0) - onehot)
    return grad


@triton.jit
def _merged_lse(M, L, rows, ok, n_splits, R):
    """log-sum-exp of each row from ``n_splits`` partial (max, sum of exp) pairs at ``M + s*R``."""
    m = tl.load(M + rows, mask=ok, other=NEG_BIG)
    for s in range(1, n_splits):
        m = tl.maximum(m, tl.load(M + s * R + rows, mask=ok, other=NEG_BIG))
    total = tl.zeros(rows.shape, tl.float32)
    for s in range(0, n_splits):
        total += tl.load(L + s * R + rows, mask=ok, other=0.0) * tl.exp(tl.load(M + s * R + rows, mask=ok,
                                                                                other=NEG_BIG) - m)
    return m + tl.log(tl.where(ok, total, 1.0))


@triton.jit
def _summed(P, rows, ok, n_splits, R):
    """Sum over ``n_splits`` partials [S, R] of each row (the target logit: one split holds it)."""
    total = tl.zeros(rows.shape, tl.float32)
    for s in range(0, n_splits):
        total += tl.load(P + s * R + rows, mask=ok, other=0.0)
    return total


@triton.jit(do_not_specialize=["R", "Bg", "B_local", "n_splits", "n_col_splits"])
def _finish_kernel(RowM, RowL, Pos, GroupM, GroupL, ColM, ColL, Tgc, Dist, Total, Ce, Igc, TgcOut, DistOut, R, Bg,
                   B_local, n_splits, n_col_splits, w_ce, w_igc, w_tgc, w_dist, WITH_IGC: tl.constexpr,
                   WITH_COLS: tl.constexpr, WITH_LOCAL: tl.constexpr, BLOCK: tl.constexpr):
    """One program. Row statistics come as ``n_splits`` partials [S, R] (``Pos`` summed over
    splits: one split holds each target), column ones as ``n_col_splits`` partials [S, Bg].
    Leaves the row, IGC and column log-sum-exps in RowM[0], GroupM[0] and ColM[0] (for the
    backward; each element rewritten by the thread that read it) and writes the five outputs. Sums run in one fixed order: bitwise repeatable."""
    ce_rows = tl.zeros([BLOCK], tl.float32)
    igc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, R, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        ok = rows < R
        pos = _summed(Pos, rows, ok, n_splits, R)
        lse = _merged_lse(RowM, RowL, rows, ok, n_splits, R)
        tl.store(RowM + rows, lse, mask=ok)
        ce_rows += tl.where(ok, lse - pos, 0.0)
        if WITH_IGC:
            glse = _merged_lse(GroupM, GroupL, rows, ok, n_splits, R)
            tl.store(GroupM + rows, glse, mask=ok)
            igc += tl.where(ok, glse - pos, 0.0)
    ce = tl.sum(ce_rows, 0) / R
    if WITH_COLS:  # the rows are the whole batch: column j's target is row j's
        ce_cols = tl.zeros([BLOCK], tl.float32)
        for start in range(0, Bg, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < Bg
            col_lse = _merged_lse(ColM, ColL, cols, ok, n_col_splits, Bg)
            tl.store(ColM + cols, col_lse, mask=ok)
            ce_cols += tl.where(ok, col_lse - _summed(Pos, cols, ok, n_splits, R), 0.0)
        ce = 0.5 * ce + 0.5 * tl.sum(ce_cols, 0) / Bg
    igc_mean = tl.sum(igc, 0) / R
    tgc = tl.zeros([BLOCK], tl.float32)
    dist = tl.zeros([BLOCK], tl.float32)
    if WITH_LOCAL:
        for start in range(0, B_local, BLOCK):
            rows = start + tl.arange(0, BLOCK)
            ok = rows < B_local
            tgc += tl.load(Tgc + rows, mask=ok, other=0.0)
            dist += tl.load(Dist + rows, mask=ok, other=0.0)
    tgc_mean = tl.sum(tgc, 0) / B_local
    dist_sum = tl.sum(dist, 0)
    tl.store(Total, w_ce * ce + w_igc * igc_mean + w_tgc * tgc_mean + w_dist * dist_sum)
    tl.store(Ce, ce)
    tl.store(Igc, igc_mean)
    tl.store(TgcOut, tgc_mean)
    tl.store(DistOut, dist_sum)


FINISH_BLOCK, FINISH_WARPS = 512, 4


def new_state(R: int, num_groups: int, splits: int, col_splits: int, device) -> dict:
    """The forward's statistics, fp32: ``row_m``/``row_l``/``pos``/``group_m``/``group_l`` [splits, R]
    and ``col_m``/``col_l`` [col_splits, Bg] (col_splits 0: no text-to-image columns)."""
    f32 = dict(device=device, dtype=torch.float32)
    state = {name: torch.empty(splits, R, **f32) for name in ("row_m", "row_l", "pos", "group_m", "group_l")}
    state.update({name: torch.empty(max(1, col_splits), num_groups if col_splits else 1, **f32)
                  for name in ("col_m", "col_l")})
    return state


def finish(state: dict, tgc: torch.Tensor | None, dist: torch.Tensor | None, weights: tuple, *, num_groups: int,
           with_igc: bool, with_cols: bool) -> tuple[torch.Tensor, ...]:
    """(total, ce, igc, tgc, distill) as five fp32 scalars from ``state`` (:func:`new_state`,
    filled by a backend's forward kernels); leaves the row, IGC and column log-sum-exps in
    ``row_m[0]``, ``group_m[0]`` and ``col_m[0]``.
    ``tgc``/``dist``: the local kernel's per-sample values [B], or None (both terms 0)."""
    splits, R = state["row_m"].shape
    outs = [torch.empty((), device=state["row_m"].device, dtype=torch.float32) for _ in range(5)]
    local = tgc is not None
    _finish_kernel[(1,)](state["row_m"], state["row_l"], state["pos"], state["group_m"], state["group_l"],
                         state["col_m"], state["col_l"], tgc if local else state["pos"],
                         dist if local else state["pos"], *outs, R, num_groups, R, splits, state["col_m"].shape[0],
                         *[float(w) for w in weights], WITH_IGC=with_igc, WITH_COLS=with_cols, WITH_LOCAL=local,
                         BLOCK=FINISH_BLOCK, num_warps=FINISH_WARPS)
    return tuple(outs)


def gate_configs(arch: int) -> list[KernelConfig]:
    """The finish kernel's variants (fp32 statistics only: no dtype, D or K)."""
    f32 = {n: "*fp32" for n in ("RowM", "RowL", "Pos", "GroupM", "GroupL", "ColM", "ColL", "Tgc", "Dist", "Total",
                                "Ce", "Igc", "TgcOut", "DistOut")}
    weights = {w: "fp32" for w in ("w_ce", "w_igc", "w_tgc", "w_dist")}
    return [make_config(_finish_kernel, f32 | weights,
                        dict(WITH_IGC=igc, WITH_COLS=cols, WITH_LOCAL=local, BLOCK=FINISH_BLOCK),
                        num_warps=FINISH_WARPS, num_stages=1, arch=arch,
                        label={"dtype": "float32", "tile": str(FINISH_BLOCK),
                               "flags": f"igc={int(igc)} cols={int(cols)} local={int(local)}"})
            for igc in (False, True) for cols in (False, True) for local in (False, True)]
