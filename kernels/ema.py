"""Triton kernel of the EMA update ``t += w * (s - t)`` over many tensors in one launch.

Every teacher tensor is addressed as ``teacher_base + offset`` and every student tensor as
``student_base + offset`` (element offsets from the first tensor of each list, which may be
negative), so a whole parameter list is one launch with no per-step allocation: the block
table (one row per ``BLOCK`` elements of every tensor) is built once by :func:`build_plan`
and reused while the tensors stay where they are.

Alignment: offsets are stored divided by the largest power of two (up to 16 bytes) that
divides all of them, and the kernel multiplies them back by that compile-time constant, so
the compiler can prove 16-byte alignment and emit vector loads without ``multiple_of`` hints.
Full blocks take an unmasked path for the same reason; only each tensor's last block is masked.
Optionally the same pass writes the new teacher values into a second layout of another dtype
(the bf16 weights of the teacher's forward), saving the per-step cast autocast would do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

#: Elements per program: 16 KB of fp32 per stream, enough to hide latency on current GPUs.
DEFAULT_BLOCK = 4096
#: Widest vector access the alignment proof aims for.
_VECTOR_BYTES = 16


@triton.jit
def _lerp(t, s, weight):
    """torch.lerp's two-sided form in fp32: exact at weight 0 (teacher) and 1 (student)."""
    d = s - t
    return tl.where(weight < 0.5, t + weight * d, s - d * (1.0 - weight))


@triton.jit
def _ema_kernel(T, S, C, TStart, SStart, Count, weight,
                BLOCK: tl.constexpr, T_ALIGN: tl.constexpr, S_ALIGN: tl.constexpr, WRITE_COPY: tl.constexpr):
    pid = tl.program_id(0)
    t_off = tl.load(TStart + pid) * T_ALIGN + tl.arange(0, BLOCK)
    s_ptrs = S + tl.load(SStart + pid) * S_ALIGN + tl.arange(0, BLOCK)
    count = tl.load(Count + pid)
    if count == BLOCK:
        t = tl.load(T + t_off).to(tl.float32)
        s = tl.load(s_ptrs).to(tl.float32)
        out = _lerp(t, s, weight)
        tl.store(T + t_off, out.to(T.dtype.element_ty))
        if WRITE_COPY:
            tl.store(C + t_off, out.to(C.dtype.element_ty))
    else:
        inside = tl.arange(0, BLOCK) < count
        t = tl.load(T + t_off, mask=inside, other=0.0).to(tl.float32)
        s = tl.load(s_ptrs, mask=inside, other=0.0).to(tl.float32)
        out = _lerp(t, s, weight)
        tl.store(T + t_off, out.to(T.dtype.element_ty), mask=inside)
        if WRITE_COPY:
            tl.store(C + t_off, out.to(C.dtype.element_ty), mask=inside)


@dataclass
class EmaPlan:
    """A block table for one (teacher dtype, student dtype) group of tensor pairs.

    ``t_start``/``s_start``: int64 [num_blocks] block starts in elements from the first teacher
    and first student tensor, divided by ``t_align``/``s_align``; ``count``: int32 [num_blocks]
    elements in each block. Valid while the tensors stay at the addresses it was built for.
    """

    t_start: torch.Tensor
    s_start: torch.Tensor
    count: torch.Tensor
    t_align: int
    s_align: int
    block: int
    num_warps: int


def _common_alignment(offsets: Sequence[int], element_size: int) -> int:
    """Largest power of two, at most 16 bytes' worth of elements, dividing every offset."""
    align = max(1, _VECTOR_BYTES // element_size)
    while align > 1 and any(o % align for o in offsets):
        align //= 2
    return align


def _element_offsets(tensors: Sequence[torch.Tensor]) -> list[int] | None:
    """Element offsets of each tensor's first element from the first tensor's (None if not whole elements)."""
    size = tensors[0].element_size()
    base = tensors[0].data_ptr()
    deltas = [t.data_ptr() - base for t in tensors]
    if any(d % size for d in deltas):
        return None
    return [d // size for d in deltas]


def can_plan(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> bool:
    """Whether a pair of same-dtype tensor lists can be addressed from one base each.

    Needs dense (contiguous) tensors whose addresses differ by whole elements.
    """
    if not all(t.is_contiguous() for t in teacher) or not all(s.is_contiguous() for s in student):
        return False
    return _element_offsets(teacher) is not None and _element_offsets(student) is not None


def build_plan(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], *,
               block: int = DEFAULT_BLOCK, num_warps: int | None = None) -> EmaPlan:
    """The block table that updates ``teacher[i]`` toward ``student[i]`` for all i in one launch.

    teacher: contiguous tensors of one floating dtype; student: contiguous tensors of one
    floating dtype with ``student[i].numel() == teacher[i].numel()``, on the same device.
    ``block``: elements per program, a power of two of at least 16.
    """
    if len(teacher) != len(student) or not teacher:
        raise ValueError(f"build_plan needs two non-empty lists of equal length; got {len(teacher)} and {len(student)}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16; got {block}")
    if not can_plan(teacher, student):
        raise ValueError("build_plan needs contiguous tensors whose addresses differ by whole elements")
    t_offsets, s_offsets = _element_offsets(teacher), _element_offsets(student)
    t_align = _common_alignment(t_offsets, teacher[0].element_size())
    s_align = _common_alignment(s_offsets, student[0].element_size())
    t_start, s_start, count = [], [], []
    for t_off, s_off, t in zip(t_offsets, s_offsets, teacher):
        numel = t.numel()
        for start in range(0, numel, block):
            t_start.append((t_off + start) // t_align)
            s_start.append((s_off + start) // s_align)
            count.append(min(block, numel - start))
    device = teacher[0].device
    return EmaPlan(
        t_start=torch.tensor(t_start, dtype=torch.int64, device=device),
        s_start=torch.tensor(s_start, dtype=torch.int64, device=device),
        count=torch.tensor(count, dtype=torch.int32, device=device),
        t_align=t_align, s_align=s_align, block=block,
        num_warps=num_warps or (8 if block >= 2048 else 4),
    )


def launch(plan: EmaPlan, teacher_base: torch.Tensor, student_base: torch.Tensor, weight: float,
           copy_base: torch.Tensor | None = None) -> None:
    """``t += weight * (s - t)`` for every pair of ``plan`` (fp32 arithmetic), in one kernel launch.

    teacher_base/student_base: the first teacher and student tensors the plan was built for.
    copy_base: optional start of a second teacher layout (e.g. bf16 for the teacher's forward)
    whose tensors sit at the same element offsets from it as the teacher tensors from
    ``teacher_base``; it receives the new teacher values in its own dtype in the same pass.
    """
    num_blocks = plan.count.numel()
    if num_blocks == 0:
        return
    _ema_kernel[(num_blocks,)](
        teacher_base, student_base, teacher_base if copy_base is None else copy_base,
        plan.t_start, plan.s_start, plan.count, float(weight),
        BLOCK=plan.block, T_ALIGN=plan.t_align, S_ALIGN=plan.s_align, WRITE_COPY=copy_base is not None,
        num_warps=plan.num_warps)
