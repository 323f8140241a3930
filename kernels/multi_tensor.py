"""What the multi-tensor kernels (:mod:`.ema`, :mod:`.adamw_ema`) share: addressing a list of
tensors from one base pointer, its alignment, the launch architecture and the EMA's lerp.

A list of tensors is one kernel argument: its first tensor is the base, and every tensor is
``base + element offset`` (offsets may be negative), so a whole parameter list is one launch
with no per-step allocation. That needs dense tensors whose addresses differ by whole elements
(:func:`addressable`). When the base starts on 16 bytes and every offset is a multiple of the
stream's 16-byte vector (:func:`is_aligned`), a planner stores the offsets divided by the
vector and the kernel multiplies them back by a compile-time constant, so the compiler can
prove 16-byte alignment and emit vector loads without ``multiple_of`` hints.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .configs import arch_of

#: Widest vector access the alignment proof aims for.
VECTOR_BYTES = 16
#: Triton's short names of the floating dtypes the kernels are compiled for.
TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def arch_for(device: torch.device) -> int:
    """The ``TILES`` key of ``device``: its CUDA architecture, or 90 on the CPU interpreter."""
    device = torch.device(device)
    if device.type == "cuda":
        return arch_of(torch.cuda.get_device_capability(device))
    return 90


def vector(dtype: torch.dtype) -> int:
    """Elements of ``dtype`` in one 16-byte vector."""
    return VECTOR_BYTES // torch.empty((), dtype=dtype).element_size()


def element_offsets(tensors: Sequence[torch.Tensor]) -> list[int] | None:
    """Element offsets of each tensor's first element from the first tensor's (None if not whole elements)."""
    size = tensors[0].element_size()
    base = tensors[0].data_ptr()
    deltas = [t.data_ptr() - base for t in tensors]
    if any(d % size for d in deltas):
        return None
    return [d // size for d in deltas]


def addressable(*streams: Sequence[torch.Tensor]) -> bool:
    """Whether every list of tensors is contiguous and addressable from its first tensor."""
    return all(all(t.is_contiguous() for t in tensors) and element_offsets(tensors) is not None
               for tensors in streams)


def is_aligned(tensors: Sequence[torch.Tensor], offsets: Sequence[int], vector: int) -> bool:
    """Whether the first tensor starts on 16 bytes and every offset is a multiple of ``vector`` elements."""
    return tensors[0].data_ptr() % VECTOR_BYTES == 0 and all(o % vector == 0 for o in offsets)


@triton.jit
def lerp(t, s, weight):
    """torch.lerp's two-sided form in fp32: exact at weight 0 (teacher) and 1 (student)."""
    d = s - t
    return tl.where(weight < 0.5, t + weight * d, s - d * (1.0 - weight))
