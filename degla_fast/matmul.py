"""The loss's matrix products: fp32 results from 16-bit inputs, one TF32 rule, autocast kept out.

Both GEMM-based backends (``gemm`` and ``torch``) multiply through these, so the rule lives once:

* bf16/fp16 inputs on CUDA: cuBLAS's 16-bit GEMM with fp32 accumulation and an **fp32 result**
  (``torch.mm(..., out_dtype=torch.float32)``, torch >= 2.10): logits at scale 100 rounded to bf16
  would carry errors of about 0.2. Elsewhere (the CPU, an older torch) the inputs are upcast
  first: a product of two 16-bit numbers is exact in fp32, so it is the same sum.
* fp32 inputs: TF32 tensor cores when the loss's ``dot_precision`` is ``"tf32"``, exact fp32 products
  for ``"ieee"``, whatever torch's global flag says (set for the call, then restored).
* autocast is off inside: under an autocast region (open_clip_train calls its loss inside one)
  an fp32 product would otherwise be cast back to 16 bits.
"""
from __future__ import annotations

import contextlib

import torch

_HALF = (torch.bfloat16, torch.float16)
#: torch's fp32-output overload of mm/addmm for 16-bit inputs (CUDA only). torch 2.8 and 2.9
#: have the overloads but refuse ``addmm`` of an fp32 accumulator with 16-bit factors, so the
#: gate is the version that accepts both, not the overloads' presence.
_TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
_HAS_OUT_DTYPE = (_TORCH_VERSION >= (2, 10) and hasattr(torch.ops.aten.mm, "dtype")
                  and hasattr(torch.ops.aten.addmm, "dtype"))


def _native(a: torch.Tensor) -> bool:
    return a.dtype in _HALF and a.is_cuda and _HAS_OUT_DTYPE


def mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` [M, K] x [K, N] -> [M, N] fp32 (fp64 for fp64 inputs), into ``out`` if given."""
    if _native(a):
        if out is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    return torch.mm(a.to(acc), b.to(acc), out=out)


def addmm_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` in place for an fp32 ``acc`` (one accumulator over every chunk: no
    allocation per call); returns ``acc``."""
    if _native(a):
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    return acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


@contextlib.contextmanager
def loss_matmuls(device: torch.device, dot_precision: str):
    """The loss's products inside: autocast off, and on CUDA fp32 products in TF32 (``"tf32"``)
    or exact (``"ieee"``), torch's own setting restored on exit."""
    with torch.autocast(device_type=device.type, enabled=False), _fp32_products(device, dot_precision):
        yield


@contextlib.contextmanager
def _fp32_products(device: torch.device, dot_precision: str):
    if device.type != "cuda":
        yield
        return
    with tf32_products(dot_precision):
        yield


def _legacy_readable(flags) -> bool:
    """Whether ``allow_tf32`` can be read: torch >= 2.9 refuses while its new ``fp32_precision``
    API holds "tf32" (the process chose the new API)."""
    try:
        flags.allow_tf32
    except RuntimeError:
        return False
    return True


@contextlib.contextmanager
def tf32_products(dot_precision: str):
    """cuBLAS's fp32 products in TF32 (``"tf32"``) or exact (``"ieee"``) inside, torch's setting
    restored on exit, through the API the process already uses, so that both APIs read as before
    after the call and inside it: torch >= 2.9 raises on a read of the legacy ``allow_tf32`` once
    ``fp32_precision`` was set to "tf32" (inductor reads the legacy flag), while a setting made
    through ``allow_tf32`` leaves both readable. A process flag only: the CPU test runs this path."""
    flags = torch.backends.cuda.matmul
    if _legacy_readable(flags):
        old_new = getattr(flags, "fp32_precision", None)
        old, flags.allow_tf32 = flags.allow_tf32, dot_precision == "tf32"
        try:
            yield
        finally:
            flags.allow_tf32 = old
            if old_new is not None and flags.fp32_precision != old_new:  # "none" (unset) reads back as "none"
                flags.fp32_precision = old_new
    else:
        old, flags.fp32_precision = flags.fp32_precision, ("tf32" if dot_precision == "tf32" else "ieee")
        try:
            yield
        finally:
            flags.fp32_precision = old
