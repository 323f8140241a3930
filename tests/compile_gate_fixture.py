"""Kernels for tests/test_compile_gate.py: one the compile gate passes and three it must fail.

Every one of them runs under TRITON_INTERPRET=1; only the real compiler tells them apart.
Not a test file (pytest does not collect it); the gate imports it with tests/ on PYTHONPATH.
"""
import triton
import triton.language as tl

from degla_fast.kernels.configs import make_config

#: A plain Python float: the interpreter reads it, the compiler refuses it.
SCALE = 0.5


@triton.jit
def good_kernel(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    tl.store(Y + offs, tl.load(X + offs, mask=inside) * 2.0, mask=inside)


@triton.jit
def global_kernel(X, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    tl.store(X + offs, tl.load(X + offs, mask=inside) * SCALE, mask=inside)


@triton.jit
def matmul_kernel(A, B, C, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a = A + rm[:, None] * K + rk[None, :]
    b = B + rk[:, None] * BN + rn[None, :]
    acc = tl.zeros((BM, BN), tl.float32)
    for _ in range(0, K, BK):
        acc += tl.dot(tl.load(a), tl.load(b))
        a += BK
        b += BK * BN
    tl.store(C + rm[:, None] * BN + rn[None, :], acc)


@triton.jit
def softmax_kernel(X, BLOCK: tl.constexpr):
    # The whole row stays live across the two reductions: BLOCK / (32 * warps) values per thread.
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    e = tl.exp(x - tl.max(x, 0))
    tl.store(X + offs, e / tl.sum(e, 0))


def gate_configs(arch: int):
    good = make_config(good_kernel, {"X": "*fp32", "Y": "*fp32"}, {"BLOCK": 1024}, num_warps=4, num_stages=2,
                       arch=arch, label={"dtype": "float32", "tile": 1024, "case": "good"})
    configs = [good, good]  # the same variant twice: compiled once
    if arch == 80:
        configs += [
            make_config(global_kernel, {"X": "*fp32"}, {"BLOCK": 1024}, num_warps=4, num_stages=2, arch=arch,
                        label={"dtype": "float32", "tile": 1024, "case": "global"}),
            # 128x128x128 fp16 tiles, 6 stages: 192 KiB of shared memory > sm_80's 163 KiB.
            make_config(matmul_kernel, {"A": "*fp16", "B": "*fp16", "C": "*fp32"}, {"BM": 128, "BN": 128, "BK": 128},
                        num_warps=4, num_stages=6, arch=arch,
                        label={"dtype": "float16", "D": 128, "tile": "128x128x128", "case": "shared"}),
            # 8192 fp32 per warp: 256 live values per thread, more than 255 registers.
            make_config(softmax_kernel, {"X": "*fp32"}, {"BLOCK": 8192}, num_warps=1, num_stages=1, arch=arch,
                        label={"dtype": "float32", "tile": 8192, "case": "spill"}),
        ]
    return configs
