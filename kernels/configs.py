"""What a launcher can choose: one :class:`KernelConfig` per compiled variant of a kernel.

Every launcher in this package picks its block sizes, warps and stages through a function
that also backs its module's ``kernel_configs(...)``; the compile gate
(``python -m degla_fast.compile_gate``, ``make check-kernels``) compiles exactly those
configurations with Triton's real compiler for sm_80 and sm_90, so a configuration a
launcher can pick at run time is one the gate has compiled.

No torch here: types are Triton's signature strings (``"*fp32"``, ``"*bf16"``, ``"i32"``,
``"fp32"``), as ``triton.compiler.ASTSource`` takes them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

#: Triton signature name of each floating dtype, keyed by torch's short names.
POINTER_TYPES = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16", "float64": "*fp64"}

#: Dot precisions of fp32 inputs (the loss's ``precision``): TF32 tensor cores or exact fp32 products.
PRECISIONS = ("tf32", "ieee")

#: Largest K the per-sample TGC + distillation kernels take (all K negatives of a sample are one
#: tile); above it the callers take the torch path. Here, not in ``local_terms``, so that code
#: without Triton can read it.
LOCAL_MAX_NEGATIVES = 8

#: d(scale) partials one program sums per pass, in the last kernel of a backward (degla_loss's
#: ``_dx_kernel``, gemm_loss's ``_finalize_kernel``).
PART_BLOCK = 1024

#: Shared memory one block may use (bytes, opt-in maximum), by the architectures the launchers
#: tell apart (:func:`arch_of`): 90 = Hopper and newer (227 KB), 80 = everything older (A100's
#: 163 KB; sm_86/89's 99 KB is not covered).
SHARED_LIMIT = {80: 166_912, 90: 232_448}


def arch_of(capability: tuple[int, int]) -> int:
    """The launcher architecture of a CUDA compute capability: 90 from Hopper on, else 80."""
    return 90 if capability[0] >= 9 else 80


@dataclass(frozen=True)
class KernelConfig:
    """One compiled variant: the kernel, its argument types, constexprs and launch options.

    ``signature`` maps every argument name to a Triton type string, constexpr arguments to
    ``"constexpr"``; ``constexprs`` gives their values. ``label`` holds what the gate's table
    shows beside the compile results (dtype, D, tile, ...): plain strings and numbers.
    """

    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    arch: int
    label: dict = field(default_factory=dict)
    #: Arguments a launch specialises as divisible by 16 (``tt.divisibility``): every pointer
    #: (torch allocations are 256-byte aligned) and the integers named by the launcher.
    divisible: tuple = ()

    @property
    def name(self) -> str:
        return getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__


def make_config(kernel, types: dict, constexprs: dict, *, num_warps: int, num_stages: int, arch: int,
                label: dict | None = None, aligned_ints: tuple = ()) -> KernelConfig:
    """A :class:`KernelConfig` whose arguments default to ``i32`` unless named in ``types``.

    types: argument name -> Triton type string for pointers and non-i32 scalars;
    constexprs: constexpr argument name -> value; aligned_ints: integer arguments whose launch
    value is a multiple of 16 (Triton compiles a separate variant for those). Integer arguments
    that may be 1 must be in the kernel's ``do_not_specialize`` (a launch with 1 would otherwise
    compile a variant with the value baked in, one the gate never saw).
    """
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = types.get(name, "i32")
    unknown = (set(types) | set(constexprs)) - set(kernel.arg_names)
    if unknown:
        raise ValueError(f"{kernel.__name__}: no arguments named {sorted(unknown)}")
    divisible = tuple(n for n in kernel.arg_names if signature[n].startswith("*") or n in aligned_ints)
    return KernelConfig(kernel=kernel, signature=signature, constexprs=dict(constexprs), num_warps=num_warps,
                        num_stages=num_stages, arch=arch, label=dict(label or {}), divisible=divisible)
