"""What one forward + backward of the fused loss backends asks of a GPU, counted from their code.

docs/loss.md's tables are printed by this module (``python -m degla_fast.loss.count``), from the
same plans the launchers use (:func:`degla_fast.kernels.degla_loss.make_plan`,
:func:`degla_fast.loss.gemm_backend.plan_chunks`), and ``tests/test_loss_count.py`` checks what the CPU
can check against a real call: the launches, the allocations and their sizes, the plan's passes.

The model (world size 1, IGC, TGC and distillation on, K <= 8):

* a **GEMM pass** is ``2 R C D`` FLOP (R = B rows, C = B(1+K) columns); the **floor** is three
  (the logits, dq, dx) at the GPU's dense 16-bit rate (:data:`H100`: 780 TFLOP/s);
* **bytes per logit** count, per kernel, what it moves through DRAM for each of the R x C
  logits *beyond what its GEMM moves itself* in the floor: a GEMM that writes the logits in the
  input dtype, and two that read a gradient matrix in the input dtype. Operand tiles re-read by
  the tiles of a GEMM are the GEMM's own (L2 hits in any tiled GEMM), not counted;
* **time** = passes at the FLOP rate + extra bytes at the bandwidth (3.0 TB/s), no overlap, and
  ``x_floor`` its ratio to the floor's three passes;
* **launches** are kernels of forward + backward in order; **allocations** every tensor the
  backend allocates, in order, with its bytes; **peak** the most of them alive at once (the
  stored logits live from the forward to the end of the backward).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch

#: The GPU the counts are made for: an H100 SXM's dense bf16 rate, HBM3 bandwidth and SMs.
H100 = dict(name="H100 SXM", flops=780e12, bandwidth=3.0e12, sms=132, arch=90)
F32 = 4


@dataclass
class Count:
    """One backend's count for one shape; bytes per logit by kernel beyond the floor GEMMs' own."""

    backend: str
    B: int
    K: int
    D: int
    dtype: str
    passes: float
    bytes_per_logit: dict = field(default_factory=dict)
    launches: list = field(default_factory=list)
    allocations: list = field(default_factory=list)  # (what, bytes, freed after step or None) in order
    peak_bytes: int = 0
    notes: str = ""
    plan: object = None  # the triton backend's Plan

    @property
    def logits(self) -> int:
        return self.B * self.B * (1 + self.K)

    @property
    def pass_flops(self) -> float:
        return 2.0 * self.logits * self.D

    def time_s(self, gpu: dict = H100) -> float:
        return self.passes * self.pass_flops / gpu["flops"] + sum(self.bytes_per_logit.values()) * self.logits \
            / gpu["bandwidth"]

    def floor_s(self, gpu: dict = H100) -> float:
        return 3 * self.pass_flops / gpu["flops"]

    def x_floor(self, gpu: dict = H100) -> float:
        return self.time_s(gpu) / self.floor_s(gpu)


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def _peak(allocations: list) -> int:
    """Most bytes alive at once: entries are (what, bytes, step it is freed after, or None: alive to
    the end of the backward)."""
    alive, peak = [], 0
    for step, (_, size, freed) in enumerate(allocations):
        alive = [(s, f) for s, f in alive if f is None or f >= step]
        alive.append((size, freed))
        peak = max(peak, sum(s for s, _ in alive))
    return peak


def triton_count(B: int, K: int, D: int, dtype: str = "bfloat16", *, store_bytes: int = 256 << 20,
                 gpu: dict | None = H100, precision: str = "tf32") -> Count:
    """The ``triton`` backend (``gpu`` None: the plan the interpreter runs, for the CPU tests)."""
    from ..kernels import degla_loss as kernels

    R, C, isz = B, B * (1 + K), _itemsize(dtype)
    plan = kernels.make_plan(R, C, D, dtype, precision, num_groups=B, with_cols=True, store_bytes=store_bytes,
                             arch=gpu["arch"] if gpu else 90, sm_count=gpu["sms"] if gpu else None)
    logits = R * C
    count = Count("triton" + ("" if plan.stored is not None else ", recomputed"), B, K, D, dtype, passes=0.0)
    stats = 5 * plan.fwd_splits * R * F32 + 2 * max(1, plan.col_parts) * (B if plan.col_parts else 1) * F32
    kept = plan.stored.itemsize if plan.stored is not None else 0
    recompute = 0 if plan.stored is not None else plan.slices
    count.passes = 1 + (0 if plan.fused_cols else 1 / (1 + K)) + 2 * recompute + 2
    local = 2 * 2 * (R + C) * D * isz  # TGC + distillation read student and teacher, forward and backward
    per = count.bytes_per_logit
    per["_lse_fwd_kernel"] = max(0, kept - isz) + 2 * stats / logits  # stored logits beyond the GEMM's own write
    dq_parts = plan.dq_splits * R * D * F32 if plan.dq_splits > 1 else 0
    dx_parts = plan.dx_splits * C * D * F32 if plan.dx_splits > 1 else 0
    per["_dq_kernel"] = max(0, kept * plan.slices - isz) + dq_parts / logits
    per["_dx_kernel"] = max(0, kept * plan.slices - isz) + dx_parts / logits
    if dq_parts:
        per["_sum_parts_kernel (dq)"] = (dq_parts + 2 * R * D * isz) / logits
    if dx_parts:
        per["_sum_parts_kernel (dx)"] = (dx_parts + 2 * C * D * isz) / logits
    per["local + finish"] = (local + 2 * stats) / logits
    count.launches = (["_lse_fwd_kernel"] + ([] if plan.fused_cols else ["_lse_fwd_kernel"])
                      + ["_local_fwd_kernel", "_finish_kernel", "_local_bwd_kernel", "_dq_kernel"]
                      + (["_sum_parts_kernel"] if dq_parts else []) + ["_dx_kernel"]
                      + (["_sum_parts_kernel"] if dx_parts else []))
    end = None  # alive to the end of the backward
    allocs = [(f"state {name}", plan.fwd_splits * R * F32, end) for name in ("row_m", "row_l", "pos", "group_m",
                                                                             "group_l")]
    cols = max(1, plan.col_parts) * (B if plan.col_parts else 1) * F32
    allocs += [("state col_m", cols, end), ("state col_l", cols, end)]
    if plan.stored is not None:
        allocs.append(("stored logits", R * plan.stride_l * kept, end))
    if not plan.fused_cols:
        allocs.append(("scratch", cols, len(allocs)))
    allocs += [("tgc", B * F32, end), ("tgc lse", B * F32, end), ("distill", B * F32, end)]
    allocs += [(f"output {i}", F32, end) for i in range(5)]
    allocs += [("dq", R * D * isz, end), ("dx", C * D * isz, end),
               ("d(scale) parts", plan.row_blocks * plan.dq_splits * F32, end), ("d(scale)", F32, end)]
    if dq_parts:
        allocs.append(("dq split partials", dq_parts, len(allocs)))
    if dx_parts:
        allocs.append(("dx split partials", dx_parts, len(allocs)))
    count.allocations = allocs
    count.peak_bytes = _peak(allocs)
    count.notes = (f"logits {'stored as ' + str(plan.stored).replace('torch.', '') if plan.stored is not None else 'recomputed'}"
                   f"; feature slices dq {plan.slices} x {plan.block_d}, dx {plan.slices} x {plan.block_d}; "
                   f"programs: forward {plan.row_blocks * plan.fwd_splits}, dq "
                   f"{plan.row_blocks * plan.slices * plan.dq_splits}, dx "
                   f"{plan.col_blocks * plan.slices * plan.dx_splits}")
    count.plan = plan
    return count


def gemm_count(B: int, K: int, D: int, dtype: str = "bfloat16", *, chunk_bytes: int = 256 << 20,
               gpu: dict | None = H100) -> Count:
    """The ``gemm`` backend: cuBLAS logits in fp32 per column chunk, a stats kernel, a gradient
    kernel writing the input dtype, two cuBLAS products, a finalize kernel."""
    from .gemm_backend import plan_chunks
    from ..kernels import gemm_loss

    R, C, isz = B, B * (1 + K), _itemsize(dtype)
    chunks = plan_chunks(R, C, isz, chunk_bytes)
    n = len(chunks)
    logits = R * C
    count = Count("gemm" + ("" if n == 1 else f", {n} chunks recomputed"), B, K, D, dtype,
                  passes=3.0 + (1 if n > 1 else 0))
    per = count.bytes_per_logit
    per["cuBLAS logits (fp32)"] = (4 - isz) * (2 if n > 1 else 1)    # fp32 beyond the floor's 16-bit write
    per["_stats_kernel"] = 4 + (4 * B / C)                             # rows read every logit; columns the first B
    per["_grad_kernel"] = 4 + isz                                      # fp32 logits read, gradient written
    per["cuBLAS dq, dx"] = (8 * R * D * max(0, n - 1)) / logits        # the fp32 dq accumulator read + written per chunk
    per["_finalize_kernel"] = (2 * (R + C) * D * F32 + 2 * 2 * (R + C) * D * isz) / logits
    count.launches = []
    for _ in chunks:
        count.launches += ["mm", "_stats_kernel"]
    count.launches += ["_local_fwd_kernel", "_finish_kernel"]
    for i, _ in enumerate(chunks):
        count.launches += (["mm"] if n > 1 else []) + ["_grad_kernel", "mm" if i == 0 else "addmm", "mm"]
    count.launches += ["_finalize_kernel"]
    end = None
    allocs = [(f"state {name}", R * F32, end) for name in ("row_m", "row_l", "pos", "group_m", "group_l")]
    allocs += [("state col_m", B * F32, end), ("state col_l", B * F32, end)]
    for i, (c0, c1) in enumerate(chunks):
        allocs.append((f"logits chunk {i}", R * (c1 - c0) * F32, end if n == 1 else len(allocs)))
    allocs += [("tgc", B * F32, end), ("tgc lse", B * F32, end), ("distill", B * F32, end)]
    allocs += [(f"output {i}", F32, end) for i in range(5)]
    wanted = gpu["sms"] * gemm_loss._PROGRAMS_PER_SM if gpu else 0
    parts = 0
    for c0, c1 in chunks:  # a one-column chunk's logits have a row stride of 2 (gemm_backend._logits)
        row_blocks, splits, _ = gemm_loss.grad_grid_for(R, c1 - c0, max(2, c1 - c0), wanted)
        parts += row_blocks * splits
    allocs.append(("d(scale) parts", parts * F32, end))
    if n > 1:
        allocs.append(("dx fp32 product", C * D * F32, end))
    for i, (c0, c1) in enumerate(chunks):
        at = len(allocs)
        if n > 1:
            allocs.append((f"recomputed logits {i}", R * (c1 - c0) * F32, at + 1))
        allocs.append((f"gradient chunk {i}", R * (c1 - c0) * isz, len(allocs) + (2 if i == 0 else 0)))
        if i == 0:
            allocs.append(("dq fp32 product", R * D * F32, end))
            if n == 1:
                allocs.append(("dx fp32 product", C * D * F32, end))
    allocs += [("dq", R * D * isz, end), ("dx", C * D * isz, end), ("d(scale)", F32, end)]
    count.allocations = allocs
    count.peak_bytes = _peak(allocs)
    count.notes = f"{n} column chunk(s) of at most {max(c1 - c0 for c0, c1 in chunks)}"
    return count


def floor_count(B: int, K: int, D: int, dtype: str = "bfloat16") -> Count:
    """Three GEMMs into preallocated outputs: the logits, dq and dx (the ``pure gemm floor`` row)."""
    return Count("three-GEMM floor", B, K, D, dtype, passes=3.0, launches=["mm", "mm", "mm"], notes="by definition")


def table(B: int, K: int = 4, D: int = 512, dtype: str = "bfloat16", gpu: dict = H100) -> str:
    """docs/loss.md's table for one batch size (markdown)."""
    counts = [floor_count(B, K, D, dtype), triton_count(B, K, D, dtype, gpu=gpu),
              triton_count(B, K, D, dtype, store_bytes=0, gpu=gpu), gemm_count(B, K, D, dtype, gpu=gpu)]
    if counts[1].backend == counts[2].backend:  # the default budget recomputes already
        del counts[2]
    lines = [f"B={B}, K={K}, D={D}, {dtype}, {gpu['name']} ({gpu['flops'] / 1e12:.0f} TFLOP/s, "
             f"{gpu['bandwidth'] / 1e12:.1f} TB/s, {gpu['sms']} SMs); one pass = "
             f"{counts[0].pass_flops / 1e9:.3g} GFLOP = {counts[0].pass_flops / gpu['flops'] * 1e3:.3g} ms",
             "",
             "| backend | GEMM passes | extra bytes per logit (by kernel) | launches | peak extra memory | time (ms) | x floor |",
             "|---|---|---|---|---|---|---|"]
    for c in counts:
        per = ", ".join(f"{k} {v:.2f}" for k, v in c.bytes_per_logit.items() if v >= 0.005) or "0"
        total = sum(c.bytes_per_logit.values())
        lines.append(f"| {c.backend} | {c.passes:.2f} | {total:.2f} ({per}) | {len(c.launches)} | "
                     f"{c.peak_bytes / 1e6:.0f} MB | {c.time_s(gpu) * 1e3:.3f} | {c.x_floor(gpu):.2f} |")
    lines += ["", "Plans: " + "; ".join(f"{c.backend}: {c.notes}" for c in counts[1:])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="docs/loss.md's count tables, from the code's plans")
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 4096, 65536])
    parser.add_argument("--negatives", type=int, default=4)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    print("\n\n".join(table(b, args.negatives, args.dim, args.dtype) for b in args.batch))


if __name__ == "__main__":
    main()
