"""Triton kernel of the EMA update ``t += w * (s - t)`` over many tensors in one launch.

Every teacher tensor is addressed as ``teacher_base + offset`` and every student tensor as
``student_base + offset`` (:mod:`.multi_tensor`), so a whole parameter list is one launch with
no per-step allocation: the block table (one row per ``BLOCK`` elements of every tensor) is
built once by :func:`build_plan` and reused while the tensors stay where they are.

Alignment: when every tensor starts on a 16-byte boundary and every offset is a multiple of
its stream's vector (8 elements for the fp32 teacher, which also puts a 16-bit copy on 16 bytes;
16 bytes of the student's dtype), offsets are stored divided by that vector (vector loads, see
:mod:`.multi_tensor`). Otherwise every stream uses element offsets (alignment 1, scalar
accesses). Two values per stream, not every power of two: the compile gate
compiles each variant, and the layouts that matter (EMATeacher's flat buffer, allocator-placed
student parameters, DeepSpeed partitions) are either fully aligned or not at all.
Full blocks take an unmasked path for the same reason; only each tensor's last block is masked.
Optionally the same pass writes the new teacher values into a second layout of another dtype
(the bf16 weights of the teacher's forward), saving the per-step cast autocast would do.

The EMA state (teacher) is always fp32: with decay 0.9996 the step ``4e-4 * (s - t)`` is below
half a bf16 ulp of ``t``, so a 16-bit state would never move. 16-bit teacher weights are only
the forward copy. :func:`gate_configs` lists every variant :func:`launch` can compile, with
the block size and warps of :data:`TILES` that :func:`build_plan` takes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from .configs import KernelConfig, make_config
from .multi_tensor import TYPE_NAMES, VECTOR_BYTES, addressable, arch_for, element_offsets, is_aligned, lerp, vector

#: (elements per program, warps) by architecture: 16 fp32 per thread and stream, 16 KB of fp32
#: per stream and program. ptxas -v: at most 80 registers, no spills on sm_80/sm_90 with Triton
#: 3.6 and 3.8 (docs/ema.md has the table); the gate checks every variant.
TILES = {80: (4096, 8), 90: (4096, 8)}
#: Teacher offsets of an aligned plan are multiples of this many elements: 32 bytes of the fp32
#: state, 16 bytes of a 16-bit forward copy written at the same element offsets.
_TEACHER_VECTOR = 8
#: What the kernel is compiled for (the gate's list): the EMA state is fp32 only.
TEACHER_DTYPES = (torch.float32,)
STUDENT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
COPY_DTYPES = (None, torch.bfloat16, torch.float16)


def tile(arch: int) -> tuple[int, int]:
    """(BLOCK, num_warps) the launcher uses on ``arch`` (80 or 90): what the gate compiles."""
    return TILES[arch]


def supported(teacher_dtype: torch.dtype, student_dtype: torch.dtype, copy_dtype: torch.dtype | None = None) -> bool:
    """Whether the kernel is compiled (and gated) for these dtypes; others take the torch path."""
    return teacher_dtype in TEACHER_DTYPES and student_dtype in STUDENT_DTYPES and copy_dtype in COPY_DTYPES


def _aligns(aligned: bool, student_dtype: torch.dtype) -> tuple[int, int]:
    """(T_ALIGN, S_ALIGN) of an aligned or unaligned plan."""
    if not aligned:
        return 1, 1
    return _TEACHER_VECTOR, vector(student_dtype)


def gate_configs(arch: int) -> list[KernelConfig]:
    """Every variant of ``_ema_kernel`` :func:`launch` can compile on ``arch``: student dtype x
    forward copy (none, bf16, fp16) x aligned or not, at ``tile(arch)``."""
    block, num_warps = tile(arch)
    configs = []
    for s_dtype in STUDENT_DTYPES:
        for c_dtype in COPY_DTYPES:
            for aligned in (True, False):
                t_align, s_align = _aligns(aligned, s_dtype)
                types = {"T": "*fp32", "S": "*" + TYPE_NAMES[s_dtype],
                         "C": "*" + TYPE_NAMES[c_dtype or torch.float32],
                         "TStart": "*i64", "SStart": "*i64", "Count": "*i32", "Weight": "*fp32"}
                constexprs = {"BLOCK": block, "T_ALIGN": t_align, "S_ALIGN": s_align, "WRITE_COPY": c_dtype is not None}
                copy = TYPE_NAMES[c_dtype] if c_dtype is not None else "none"
                label = {"dtype": f"t=fp32 s={TYPE_NAMES[s_dtype]} copy={copy}", "D": "-",
                         "tile": f"BLOCK={block} align={'16B' if aligned else 'none'}"}
                configs.append(make_config(_ema_kernel, types, constexprs, num_warps=num_warps, num_stages=1,
                                           arch=arch, label=label))
    return configs


@triton.jit
def _ema_kernel(T, S, C, TStart, SStart, Count, Weight,
                BLOCK: tl.constexpr, T_ALIGN: tl.constexpr, S_ALIGN: tl.constexpr, WRITE_COPY: tl.constexpr):
    pid = tl.program_id(0)
    # The weight is read from device memory: a step skipped on the device passes weight x 0
    # without the host reading the skip flag.
    weight = tl.load(Weight)
    t_off = tl.load(TStart + pid) * T_ALIGN + tl.arange(0, BLOCK)
    s_ptrs = S + tl.load(SStart + pid) * S_ALIGN + tl.arange(0, BLOCK)
    count = tl.load(Count + pid)
    if count == BLOCK:
        t = tl.load(T + t_off).to(tl.float32)
        s = tl.load(s_ptrs).to(tl.float32)
        out = lerp(t, s, weight)
        tl.store(T + t_off, out.to(T.dtype.element_ty))
        if WRITE_COPY:
            tl.store(C + t_off, out.to(C.dtype.element_ty))
    else:
        inside = tl.arange(0, BLOCK) < count
        t = tl.load(T + t_off, mask=inside, other=0.0).to(tl.float32)
        s = tl.load(s_ptrs, mask=inside, other=0.0).to(tl.float32)
        out = lerp(t, s, weight)
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


def build_plan(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], *,
               block: int | None = None, num_warps: int | None = None) -> EmaPlan:
    """The block table that updates ``teacher[i]`` toward ``student[i]`` for all i in one launch.

    teacher: contiguous fp32 tensors (the EMA state); student: contiguous tensors of one dtype
    of :data:`STUDENT_DTYPES` with ``student[i].numel() == teacher[i].numel()``, on the same
    device. ``block``/``num_warps``: ``tile(arch)`` of the device when None (what the compile
    gate covers); other values are for tests only (a power of two of at least 16).
    """
    if len(teacher) != len(student) or not teacher:
        raise ValueError(f"build_plan needs two non-empty lists of equal length; got {len(teacher)} and {len(student)}")
    if not supported(teacher[0].dtype, student[0].dtype):
        raise ValueError(f"build_plan: the kernel takes an fp32 teacher and a {'/'.join(map(TYPE_NAMES.get, STUDENT_DTYPES))} "
                         f"student; got teacher {teacher[0].dtype}, student {student[0].dtype}")
    default_block, default_warps = tile(arch_for(teacher[0].device))
    block = block or default_block
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16; got {block}")
    if not addressable(teacher, student):
        raise ValueError("build_plan needs contiguous tensors whose addresses differ by whole elements")
    t_offsets, s_offsets = element_offsets(teacher), element_offsets(student)
    _, s_vector = _aligns(True, student[0].dtype)
    aligned = is_aligned(teacher, t_offsets, _TEACHER_VECTOR) and is_aligned(student, s_offsets, s_vector)
    t_align, s_align = _aligns(aligned, student[0].dtype)
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
        num_warps=num_warps or (default_warps if block == default_block else (8 if block >= 2048 else 4)),
    )


def launch(plan: EmaPlan, teacher_base: torch.Tensor, student_base: torch.Tensor, weight: float | torch.Tensor,
           copy_base: torch.Tensor | None = None) -> None:
    """``t += weight * (s - t)`` for every pair of ``plan`` (fp32 arithmetic), in one kernel launch.

    teacher_base/student_base: the first teacher and student tensors the plan was built for.
    weight: a number, or a one-element fp32 tensor on the teachers' device (e.g. ``(1 - decay) *
    apply`` with ``apply`` a device-side skip flag), which the kernel reads from memory.
    copy_base: optional start of a second teacher layout (e.g. bf16 for the teacher's forward)
    whose tensors sit at the same element offsets from it as the teacher tensors from
    ``teacher_base`` (bf16 or fp16; on 16 bytes when the plan is aligned, as the teacher's base
    is); it receives the new teacher values in its own dtype in the same pass.
    """
    num_blocks = plan.count.numel()
    if num_blocks == 0:
        return
    if copy_base is not None and (copy_base.dtype not in COPY_DTYPES
                                  or (plan.t_align > 1 and copy_base.data_ptr() % VECTOR_BYTES)):
        raise ValueError(f"launch: the forward copy must be bf16 or fp16 (16-byte aligned with an aligned plan); "
                         f"got {copy_base.dtype} at {copy_base.data_ptr() % VECTOR_BYTES} bytes past 16")
    if not torch.is_tensor(weight):  # a fill kernel, no host-to-device copy
        weight = torch.full((1,), float(weight), dtype=torch.float32, device=teacher_base.device)
    elif weight.dtype != torch.float32 or weight.numel() != 1 or weight.device != teacher_base.device:
        raise ValueError(f"launch: weight must be one fp32 element on {teacher_base.device}; got {weight.dtype} "
                         f"{tuple(weight.shape)} on {weight.device}")
    _ema_kernel[(num_blocks,)](
        teacher_base, student_base, teacher_base if copy_base is None else copy_base,
        plan.t_start, plan.s_start, plan.count, weight,
        BLOCK=plan.block, T_ALIGN=plan.t_align, S_ALIGN=plan.s_align, WRITE_COPY=copy_base is not None,
        num_warps=plan.num_warps, num_stages=1)
