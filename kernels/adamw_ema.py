"""Triton kernel of one AdamW step fused with the EMA teacher update, over many tensors in one launch.

Per element, with fp32 arithmetic (the formula of ``torch.optim.AdamW``, then the EMA):

    p  = p * (1 - lr * wd)                              # decoupled weight decay
    m  = lerp(m, g, 1 - beta1)
    v  = v * beta2 + (1 - beta2) * g * g
    p  = p - lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)
    p  = min(p, clamp_max)                              # the group's clamp (+inf: none)
    t  = lerp(t, p, 1 - decay)                          # toward the NEW, clamped parameter

Each of g, m, v, p, t is read once and p, m, v, t written once, so the teacher update costs
one read and one write of the teacher instead of a second pass over the parameter.

Addressing is :mod:`.multi_tensor`'s (every tensor is ``base + element offset`` from the first
tensor of its list; when every tensor of every stream starts on 16 bytes the offsets are stored
divided by the 16-byte vector of their dtype so the compiler can prove vector loads, otherwise
all streams use element offsets), with the table split in two levels: a per-block table
(tensor index, block index within the tensor) that depends only on the tensor sizes, and a
small per-tensor table of offsets and sizes (:data:`TABLE_COLUMNS`). Gradients are often reallocated between steps
(``zero_grad(set_to_none=True)``); then only the per-tensor table (7 integers per tensor) is
rebuilt, never the per-block one (tens of thousands of rows for a CLIP model).

Dtypes: params, grads and moments fp32; the teacher (EMA state) fp32 too (a 16-bit state
would not move at decay 0.9996); the optional copy bf16 or fp16. Block size and warps come from
:data:`TILES` (at most 128 registers, no spills: docs/ema.md), and :func:`gate_configs` lists
every variant :func:`launch` can compile.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from .configs import KernelConfig, make_config
from .multi_tensor import TYPE_NAMES, addressable, arch_for, element_offsets, is_aligned, lerp, vector

#: (elements per program, warps) by architecture: 4 fp32 per thread and stream (one 16-byte
#: vector each of g, m, v, p, t). ptxas -v: at most 61 registers, no spills, no shared memory
#: on sm_80/sm_90 with Triton 3.6 and 3.8; BLOCK=4096 with 8 warps took 127-194 (docs/ema.md).
TILES = {80: (1024, 8), 90: (1024, 8)}
#: What the kernel is compiled for: everything fp32 but the optional forward copy.
TEACHER_DTYPES = (torch.float32,)
COPY_DTYPES = (None, torch.bfloat16, torch.float16)
#: The six streams, in kernel-argument and table-column order (no copy: the teacher again).
STREAMS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "teachers", "copies")
#: Columns of a per-tensor table row: each stream's offset (in units of its alignment), then numel.
TABLE_COLUMNS = STREAMS + ("numel",)
# The same columns as the kernel reads them (Triton kernels read only constexpr globals).
_P_COL, _G_COL, _M_COL, _V_COL, _T_COL, _C_COL, _NUMEL_COL = (tl.constexpr(i) for i in range(len(TABLE_COLUMNS)))
_TABLE_WIDTH = tl.constexpr(len(TABLE_COLUMNS))
# Columns of a per-block row: the tensor (a per-tensor table row) and the block within it.
_TENSOR_COL, _BLOCK_COL = tl.constexpr(0), tl.constexpr(1)
_LAYOUT_WIDTH = tl.constexpr(2)


def tile(arch: int) -> tuple[int, int]:
    """(BLOCK, num_warps) the launcher uses on ``arch`` (80 or 90): what the gate compiles."""
    return TILES[arch]


def supported(teacher_dtype: torch.dtype, copy_dtype: torch.dtype | None = None) -> bool:
    """Whether the kernel is compiled (and gated) for this teacher and copy dtype (params fp32)."""
    return teacher_dtype in TEACHER_DTYPES and copy_dtype in COPY_DTYPES


def _aligns(aligned: bool, copy_dtype: torch.dtype | None) -> tuple[int, int, int, int, int, int]:
    """(P, G, M, V, T, C)_ALIGN of an aligned or unaligned table (no copy: C is the teacher)."""
    if not aligned:
        return (1,) * 6
    return (vector(torch.float32),) * 5 + (vector(copy_dtype or torch.float32),)


def gate_configs(arch: int) -> list[KernelConfig]:
    """Every variant of ``_adamw_ema_kernel`` :func:`launch` can compile on ``arch``: forward copy
    (none, bf16, fp16) x aligned or not, at ``tile(arch)``."""
    block, num_warps = tile(arch)
    configs = []
    for c_dtype in COPY_DTYPES:
        for aligned in (True, False):
            aligns = _aligns(aligned, c_dtype)
            types = {name: "*fp32" for name in ("P", "G", "M", "V", "T")}
            types.update(C="*" + TYPE_NAMES[c_dtype or torch.float32], Blocks="*i32", Table="*i64")
            types.update({name: "fp32" for name in ("wd_factor", "avg_weight", "beta2", "sq_weight", "step_size",
                                                    "bc2_sqrt", "eps", "clamp_max", "ema_weight")})
            constexprs = dict(zip(("P_ALIGN", "G_ALIGN", "M_ALIGN", "V_ALIGN", "T_ALIGN", "C_ALIGN"), aligns))
            constexprs.update(BLOCK=block, WRITE_COPY=c_dtype is not None)
            copy = TYPE_NAMES[c_dtype] if c_dtype is not None else "none"
            label = {"dtype": f"p/g/m/v=fp32 t=fp32 copy={copy}", "D": "-",
                     "tile": f"BLOCK={block} align={'16B' if aligned else 'none'}"}
            configs.append(make_config(_adamw_ema_kernel, types, constexprs, num_warps=num_warps, num_stages=1,
                                       arch=arch, label=label))
    return configs


@triton.jit
def _adamw(p, g, m, v, wd_factor, avg_weight, beta2, sq_weight, step_size, bc2_sqrt, eps):
    """One AdamW step of fp32 values; IEEE sqrt/div (``_rn``) as torch's own kernels use."""
    p = p * wd_factor
    m = lerp(m, g, avg_weight)
    v = v * beta2 + sq_weight * (g * g)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + step_size * tl.div_rn(m, denom)
    return p, m, v


@triton.jit
def _block(p_ptrs, g_ptrs, m_ptrs, v_ptrs, t_ptrs, c_ptrs, inside,
           wd_factor, avg_weight, beta2, sq_weight, step_size, bc2_sqrt, eps, clamp_max, ema_weight,
           MASKED: tl.constexpr, WRITE_COPY: tl.constexpr):
    # Loads and stores written out rather than through helpers: the CPU interpreter pays
    # ~2 ms per nested jit call, and the tests run thousands of steps through it.
    if MASKED:
        g = tl.load(g_ptrs, mask=inside, other=0.0).to(tl.float32)
        m = tl.load(m_ptrs, mask=inside, other=0.0).to(tl.float32)
        v = tl.load(v_ptrs, mask=inside, other=0.0).to(tl.float32)
        p = tl.load(p_ptrs, mask=inside, other=0.0).to(tl.float32)
        t = tl.load(t_ptrs, mask=inside, other=0.0).to(tl.float32)
    else:
        g = tl.load(g_ptrs).to(tl.float32)
        m = tl.load(m_ptrs).to(tl.float32)
        v = tl.load(v_ptrs).to(tl.float32)
        p = tl.load(p_ptrs).to(tl.float32)
        t = tl.load(t_ptrs).to(tl.float32)
    p, m, v = _adamw(p, g, m, v, wd_factor, avg_weight, beta2, sq_weight, step_size, bc2_sqrt, eps)
    # Before the lerp, so the teacher follows the clamped value (as clamp-then-update does).
    # A select, not tl.minimum: a NaN parameter stays NaN, as torch's clamp keeps it.
    p = tl.where(p > clamp_max, clamp_max, p)
    t = lerp(t, p, ema_weight)
    if MASKED:
        tl.store(p_ptrs, p.to(p_ptrs.dtype.element_ty), mask=inside)
        tl.store(m_ptrs, m.to(m_ptrs.dtype.element_ty), mask=inside)
        tl.store(v_ptrs, v.to(v_ptrs.dtype.element_ty), mask=inside)
        tl.store(t_ptrs, t.to(t_ptrs.dtype.element_ty), mask=inside)
        if WRITE_COPY:
            tl.store(c_ptrs, t.to(c_ptrs.dtype.element_ty), mask=inside)
    else:
        tl.store(p_ptrs, p.to(p_ptrs.dtype.element_ty))
        tl.store(m_ptrs, m.to(m_ptrs.dtype.element_ty))
        tl.store(v_ptrs, v.to(v_ptrs.dtype.element_ty))
        tl.store(t_ptrs, t.to(t_ptrs.dtype.element_ty))
        if WRITE_COPY:
            tl.store(c_ptrs, t.to(c_ptrs.dtype.element_ty))


@triton.jit
def _adamw_ema_kernel(P, G, M, V, T, C, Blocks, Table,
                      wd_factor, avg_weight, beta2, sq_weight, step_size, bc2_sqrt, eps, clamp_max, ema_weight,
                      BLOCK: tl.constexpr, P_ALIGN: tl.constexpr, G_ALIGN: tl.constexpr, M_ALIGN: tl.constexpr,
                      V_ALIGN: tl.constexpr, T_ALIGN: tl.constexpr, C_ALIGN: tl.constexpr,
                      WRITE_COPY: tl.constexpr):
    pid = tl.program_id(0)
    block = Blocks + _LAYOUT_WIDTH * pid
    row = Table + tl.load(block + _TENSOR_COL).to(tl.int64) * _TABLE_WIDTH
    # A multiple of the constexpr BLOCK, so the alignment of every stream survives the addition.
    start = tl.load(block + _BLOCK_COL).to(tl.int64) * BLOCK
    lanes = start + tl.arange(0, BLOCK)
    p_ptrs = P + tl.load(row + _P_COL) * P_ALIGN + lanes
    g_ptrs = G + tl.load(row + _G_COL) * G_ALIGN + lanes
    m_ptrs = M + tl.load(row + _M_COL) * M_ALIGN + lanes
    v_ptrs = V + tl.load(row + _V_COL) * V_ALIGN + lanes
    t_ptrs = T + tl.load(row + _T_COL) * T_ALIGN + lanes
    c_ptrs = C + tl.load(row + _C_COL) * C_ALIGN + lanes
    count = tl.load(row + _NUMEL_COL) - start
    inside = tl.arange(0, BLOCK) < count  # unused (and dropped) on the unmasked path
    if count >= BLOCK:  # full blocks: no mask, vector loads
        _block(p_ptrs, g_ptrs, m_ptrs, v_ptrs, t_ptrs, c_ptrs, inside,
               wd_factor, avg_weight, beta2, sq_weight, step_size, bc2_sqrt, eps, clamp_max, ema_weight,
               MASKED=False, WRITE_COPY=WRITE_COPY)
    else:  # each tensor's last block
        _block(p_ptrs, g_ptrs, m_ptrs, v_ptrs, t_ptrs, c_ptrs, inside,
               wd_factor, avg_weight, beta2, sq_weight, step_size, bc2_sqrt, eps, clamp_max, ema_weight,
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
    """Per-tensor table: ``table`` int64 [num_tensors, 7] (:data:`TABLE_COLUMNS`: six stream
    offsets, each divided by its alignment, then numel) and the six alignments (elements).
    Valid while the tensors stay put."""

    table: torch.Tensor
    aligns: tuple[int, int, int, int, int, int]


def build_layout(numels: Sequence[int], device: torch.device, *, block: int | None = None,
                 num_warps: int | None = None) -> BlockLayout:
    """The per-block table of tensors of sizes ``numels`` (all > 0). ``block``/``num_warps``:
    ``tile(arch)`` of ``device`` when None (what the compile gate covers); other values are for
    tests only (a power of two >= 16)."""
    default_block, default_warps = tile(arch_for(device))
    block = block or default_block
    if num_warps is None:
        num_warps = default_warps if block == default_block else (8 if block >= 2048 else 4)
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
    return BlockLayout(blocks=blocks.to(device), block=block, num_warps=num_warps)


def build_table(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                exp_avg_sqs: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor],
                copies: Sequence[torch.Tensor] | None = None) -> TensorTable:
    """The per-tensor table of six equally long lists of contiguous tensors (``copies`` None: the
    teacher column is reused and the kernel does not write copies). All fp32 but the copies
    (bf16 or fp16)."""
    streams = [params, grads, exp_avgs, exp_avg_sqs, teachers, teachers if copies is None else copies]
    for name, tensors in zip(STREAMS[:5], streams):
        if tensors[0].dtype != torch.float32:
            raise ValueError(f"build_table: {name} must be float32; got {tensors[0].dtype}")
    copy_dtype = None if copies is None else copies[0].dtype
    if not supported(torch.float32, copy_dtype):
        raise ValueError(f"build_table: copies must be bf16 or fp16; got {copy_dtype}")
    if not addressable(*streams):
        raise ValueError("build_table needs contiguous tensors whose addresses differ by whole elements")
    offsets = [element_offsets(tensors) for tensors in streams]
    aligned = all(is_aligned(tensors, offs, vector(tensors[0].dtype)) for tensors, offs in zip(streams, offsets))
    aligns = _aligns(aligned, copy_dtype)
    columns = [[o // align for o in offs] for offs, align in zip(offsets, aligns)]
    columns.append([t.numel() for t in params])
    table = torch.tensor(columns, dtype=torch.int64).t().contiguous()
    return TensorTable(table=table.to(params[0].device), aligns=tuple(aligns))


def launch(layout: BlockLayout, table: TensorTable, bases: Sequence[torch.Tensor], *, lr: float, beta1: float,
           beta2: float, eps: float, weight_decay: float, step: int, decay: float, write_copy: bool,
           clamp_max: float | None = None) -> None:
    """One AdamW step plus EMA update of every tensor of ``table``, in one kernel launch.

    bases: the first param, grad, exp_avg, exp_avg_sq, teacher and copy tensors the table was
    built for (params/grads/moments fp32; teacher and copy any floating dtype; the copy base
    is the teacher base when ``write_copy`` is False). ``step``: the step count after this
    step (>= 1), for the bias corrections. ``clamp_max``: every new parameter is clamped to at
    most this before the teacher moves toward it (None: no clamp). In place; returns nothing.
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
        bias_correction2 ** 0.5, eps, float("inf") if clamp_max is None else float(clamp_max), 1.0 - decay,
        BLOCK=layout.block, P_ALIGN=table.aligns[0], G_ALIGN=table.aligns[1], M_ALIGN=table.aligns[2],
        V_ALIGN=table.aligns[3], T_ALIGN=table.aligns[4], C_ALIGN=table.aligns[5], WRITE_COPY=write_copy,
        num_warps=layout.num_warps, num_stages=1)
