"""Triton kernel of one AdamW step fused with the EMA teacher update, over many tensors in one launch.

Per element, with fp32 arithmetic (the formula of ``torch.optim.AdamW``, then the EMA):

    p  = p * (1 - lr * wd)                              # decoupled weight decay
    m  = lerp(m, g, 1 - beta1)
    v  = v * beta2 + (1 - beta2) * g * g
    p  = p - lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)
    t  = lerp(t, p, 1 - decay)                          # toward the NEW parameter

Each of g, m, v, p, t is read once and p, m, v, t written once, so the teacher update costs
one read and one write of the teacher instead of a second pass over the parameter.

Addressing follows :mod:`degla_fast.kernels.ema` (every tensor is ``base + element offset``
from the first tensor of its list, offsets stored divided by their common 16-byte alignment so
the compiler can prove vector loads), with the table split in two levels: a per-block table
(tensor index, block index within the tensor) that depends only on the tensor sizes, and a
small per-tensor table of offsets and sizes. Gradients are often reallocated between steps
(``zero_grad(set_to_none=True)``); then only the per-tensor table (7 integers per tensor) is
rebuilt, never the per-block one (tens of thousands of rows for a CLIP model).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from .ema import DEFAULT_BLOCK, _common_alignment, _element_offsets, _lerp


@triton.jit
def _load(ptrs, inside, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
    else:
        return tl.load(ptrs).to(tl.float32)


@triton.jit
def _store(ptrs, value, inside, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=inside)
    else:
        tl.store(ptrs, value.to(ptrs.dtype.element_ty))


@triton.jit
def _adamw(p, g, m, v, wd_factor, avg_weight, beta2, sq_weight, step_size, bc2_sqrt, eps):
    """One AdamW step of fp32 values; IEEE sqrt/div (``_rn``) as torch's own kernels use."""
    p = p * wd_factor
    m = _lerp(m, g, avg_weight)
    v = v * beta2 + sq_weight * (g * g)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + step_size * tl.div_rn(m, denom)
    return p, m, v


@triton.jit
def _block(p_ptrs, g_ptrs, m_ptrs, v_ptrs, t_ptrs, c_ptrs, inside,
           wd_factor, avg_weight, beta2, sq_weight, step_size, bc2_sqrt, eps, ema_weight,
           MASKED: tl.constexpr, WRITE_COPY: tl.constexpr):
    g = _load(g_ptrs, inside, MASKED)
    m = _load(m_ptrs, inside, MASKED)
    v = _load(v_ptrs, inside, MASKED)
    p = _load(p_ptrs, inside, MASKED)
    t = _load(t_ptrs, inside, MASKED)
    p, m, v = _adamw(p, g, m, v, wd_factor, avg_weight, beta2, sq_weight, step_size, bc2_sqrt, eps)
    t = _lerp(t, p, ema_weight)
    _store(p_ptrs, p, inside, MASKED)
    _store(m_ptrs, m, inside, MASKED)
    _store(v_ptrs, v, inside, MASKED)
    _store(t_ptrs, t, inside, MASKED)
    if WRITE_COPY:
        _store(c_ptrs, t, inside, MASKED)


@triton.jit
def _adamw_ema_kernel(P, G, M, V, T, C, Blocks, Table,
                      wd_factor, avg_weight, beta2, sq_weight, step_size, bc2_sqrt, eps, ema_weight,
                      BLOCK: tl.constexpr, P_ALIGN: tl.constexpr, G_ALIGN: tl.constexpr, M_ALIGN: tl.constexpr,
                      V_ALIGN: tl.constexpr, T_ALIGN: tl.constexpr, C_ALIGN: tl.constexpr,
                      WRITE_COPY: tl.constexpr):
    pid = tl.program_id(0)
    # Table rows: offsets of p, g, m, v, t, copy (in units of their alignments), then numel.
    row = Table + tl.load(Blocks + 2 * pid).to(tl.int64) * 7
    # A multiple of the constexpr BLOCK, so the alignment of every stream survives the addition.
    start = tl.load(Blocks + 2 * pid + 1).to(tl.int64) * BLOCK
    lanes = start + tl.arange(0, BLOCK)
    p_ptrs = P + tl.load(row) * P_ALIGN + lanes
    g_ptrs = G + tl.load(row + 1) * G_ALIGN + lanes
    m_ptrs = M + tl.load(row + 2) * M_ALIGN + lanes
    v_ptrs = V + tl.load(row + 3) * V_ALIGN + lanes
    t_ptrs = T + tl.load(row + 4) * T_ALIGN + lanes
    c_ptrs = C + tl.load(row + 5) * C_ALIGN + lanes
    count = tl.load(row + 6) - start
    inside = tl.arange(0, BLOCK) < count  # unused (and dropped) on the unmasked path
    if count >= BLOCK:  # full blocks: no mask, vector loads
        _block(p_ptrs, g_ptrs, m_ptrs, v_ptrs, t_ptrs, c_ptrs, inside,
               wd_factor, avg_weight, beta2, sq_weight, step_size, bc2_sqrt, eps, ema_weight,
               MASKED=False, WRITE_COPY=WRITE_COPY)
    else:  # each tensor's last block
        _block(p_ptrs, g_ptrs, m_ptrs, v_ptrs, t_ptrs, c_ptrs, inside,
               wd_factor, avg_weight, beta2, sq_weight, step_size, bc2_sqrt, eps, ema_weight,
               MASKED=True, WRITE_COPY=WRITE_COPY)


@dataclass
class BlockLayout:
    """Per-block table of a list of tensor sizes: ``blocks`` int32 [num_blocks, 2] holds
    (tensor index, block index within that tensor). Depends only on the sizes and ``block``."""

    blocks: torch.Tensor
    block: int
    num_warps: int


@dataclass
class TensorTable:
    """Per-tensor table: ``table`` int64 [num_tensors, 7] (six stream offsets, each divided by its
    alignment, then numel) and the six alignments (elements). Valid while the tensors stay put."""

    table: torch.Tensor
    aligns: tuple[int, int, int, int, int, int]


def can_plan(*streams: Sequence[torch.Tensor]) -> bool:
    """Whether every list of tensors is contiguous and addressable from its first tensor."""
    for tensors in streams:
        if not all(t.is_contiguous() for t in tensors) or _element_offsets(tensors) is None:
            return False
    return True


def build_layout(numels: Sequence[int], device: torch.device, *, block: int = DEFAULT_BLOCK,
                 num_warps: int | None = None) -> BlockLayout:
    """The per-block table of tensors of sizes ``numels`` (all > 0); ``block`` a power of two >= 16."""
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16; got {block}")
    if not numels or min(numels) <= 0:
        raise ValueError("build_layout needs a non-empty list of positive sizes")
    # Built with tensor ops: a CLIP model has tens of thousands of blocks.
    per_tensor = (torch.tensor(list(numels), dtype=torch.int64) + block - 1) // block
    index = torch.repeat_interleave(torch.arange(len(numels)), per_tensor)
    first = torch.cumsum(per_tensor, 0) - per_tensor
    within = torch.arange(index.numel()) - first[index]
    blocks = torch.stack([index, within], dim=1).to(torch.int32)
    return BlockLayout(blocks=blocks.to(device), block=block, num_warps=num_warps or (8 if block >= 2048 else 4))


def build_table(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                exp_avg_sqs: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor],
                copies: Sequence[torch.Tensor] | None = None) -> TensorTable:
    """The per-tensor table of six equally long lists of contiguous tensors (``copies`` None: the
    teacher column is reused and the kernel does not write copies)."""
    streams = [params, grads, exp_avgs, exp_avg_sqs, teachers, teachers if copies is None else copies]
    if not can_plan(*streams):
        raise ValueError("build_table needs contiguous tensors whose addresses differ by whole elements")
    columns, aligns = [], []
    for tensors in streams:
        offsets = _element_offsets(tensors)
        align = _common_alignment(offsets, tensors[0].element_size())
        columns.append([o // align for o in offsets])
        aligns.append(align)
    columns.append([t.numel() for t in params])
    table = torch.tensor(columns, dtype=torch.int64).t().contiguous()
    return TensorTable(table=table.to(params[0].device), aligns=tuple(aligns))


def launch(layout: BlockLayout, table: TensorTable, bases: Sequence[torch.Tensor], *, lr: float, beta1: float,
           beta2: float, eps: float, weight_decay: float, step: int, decay: float, write_copy: bool) -> None:
    """One AdamW step plus EMA update of every tensor of ``table``, in one kernel launch.

    bases: the first param, grad, exp_avg, exp_avg_sq, teacher and copy tensors the table was
    built for (params/grads/moments fp32; teacher and copy any floating dtype; the copy base
    is the teacher base when ``write_copy`` is False). ``step``: the step count after this
    step (>= 1), for the bias corrections. In place; returns nothing.
    """
    num_blocks = layout.blocks.shape[0]
    if num_blocks == 0:
        return
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    # Scalars are computed in double and rounded to fp32 once, as torch's scalar arguments are.
    _adamw_ema_kernel[(num_blocks,)](
        *bases, layout.blocks, table.table,
        1.0 - lr * weight_decay, 1.0 - beta1, beta2, 1.0 - beta2, -(lr / bias_correction1),
        bias_correction2 ** 0.5, eps, 1.0 - decay,
        BLOCK=layout.block, P_ALIGN=table.aligns[0], G_ALIGN=table.aligns[1], M_ALIGN=table.aligns[2],
        V_ALIGN=table.aligns[3], T_ALIGN=table.aligns[4], C_ALIGN=table.aligns[5], WRITE_COPY=write_copy,
        num_warps=layout.num_warps)
