"""fp32 vector atomics: how many bytes per second a GPU adds into global memory with
``tl.atomic_add``, to every address once ("distinct") and with 32 programs adding into the same
block at once ("32-way", the contention of a per-tile dq/dx reduction), against plain stores of the
same bytes and PyTorch's ``index_add_`` (its own atomics) in the same run.

Why: a fused loss backward that adds dq and dx per tile moves 4.8 GB of fp32 atomics at B=4096
(docs/kernels.md); what that costs depends on this throughput, which no data sheet gives. The
loss kernels now have no such atomics; this measures what the old design paid, and what any
future design that needs them would.

Each row: ``payload_mib`` added per launch, p20/p50/p80 ms, ``gb_per_s`` of payload, and
``speedup_vs_store`` (store time / row time). ``--quick`` (the CPU): Triton's interpreter at a tiny
size, which only proves the benchmark runs.

    python benchmarks/bench_atomics.py           # GPU: 256 MiB of payload per launch
    python benchmarks/bench_atomics.py --quick
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

from common import add_ratios, measure, report_run

NAME = "bench_atomics"
BLOCK, WARPS = 1024, 4
#: Payload per launch: 256 MiB of fp32 on a GPU, 256 KiB through the interpreter.
GPU_ELEMENTS, QUICK_ELEMENTS = 1 << 26, 1 << 16
CONTENTION = 32


@triton.jit(do_not_specialize=["ways"])
def _add_kernel(Out, ways, ATOMIC: tl.constexpr, BLOCK: tl.constexpr):
    """Program p adds 1.0 to the BLOCK floats of Out's block ``p // ways`` (``ways`` programs share
    each block), with ``tl.atomic_add`` or, for the baseline, a plain store of the same bytes."""
    offsets = (tl.program_id(0) // ways) * BLOCK + tl.arange(0, BLOCK)
    ones = tl.full([BLOCK], 1.0, tl.float32)
    if ATOMIC:
        tl.atomic_add(Out + offsets, ones, sem="relaxed")
    else:
        tl.store(Out + offsets, ones)


def launch(out: torch.Tensor, elements: int, ways: int, atomic: bool) -> None:
    """``elements`` floats of payload into ``out`` (``elements / ways`` floats, fp32, contiguous)."""
    _add_kernel[(elements // BLOCK,)](out, ways, ATOMIC=atomic, BLOCK=BLOCK, num_warps=WARPS)


def gate_configs(arch: int):
    """The two variants :func:`launch` compiles (for the compile gate)."""
    from degla_fast.kernels.configs import make_config

    return [make_config(_add_kernel, {"Out": "*fp32"}, dict(ATOMIC=atomic, BLOCK=BLOCK), num_warps=WARPS,
                        num_stages=1, arch=arch, label={"dtype": "float32", "tile": str(BLOCK),
                                                        "flags": f"atomic={int(atomic)}"})
            for atomic in (False, True)]


def _skip(device: torch.device) -> str | None:
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "Triton on the CPU runs only through its interpreter (TRITON_INTERPRET=1)"


def run(quick: bool) -> list[dict]:
    gpu = torch.cuda.is_available() and not quick
    device = torch.device("cuda" if gpu else "cpu")
    elements = GPU_ELEMENTS if gpu else QUICK_ELEMENTS
    fields = {"payload_mib": elements * 4 / 2 ** 20}
    rows = []
    reason = _skip(device)
    for impl, ways, atomic in (("store", 1, False), ("atomic_add distinct", 1, True),
                               (f"atomic_add {CONTENTION}-way", CONTENTION, True)):
        if reason:
            rows.append({"name": "atomics", "impl": impl, **fields, "skipped": reason})
            continue
        out = torch.zeros(elements // ways, device=device)
        rows.append(measure("atomics", impl, lambda: launch(out, elements, ways, atomic), device=device,
                            warmup=2, iters=3 if quick else 20, memory=False, **fields))
    # PyTorch's own scatter-add (atomics on a GPU), 32 sources per destination.
    out = torch.zeros(elements // CONTENTION, device=device)
    index = torch.arange(elements, device=device) // CONTENTION
    ones = torch.ones(elements, device=device)
    rows.append(measure("atomics", f"torch index_add_ {CONTENTION}-way", lambda: out.index_add_(0, index, ones),
                        device=device, warmup=2, iters=3 if quick else 20, memory=False, **fields))
    for row in rows:
        if row.get("p50_ms"):
            row["gb_per_s"] = elements * 4 / (row["p50_ms"] * 1e-3) / 1e9
    return add_ratios(rows, "store")


COLUMNS = ["impl", "payload_mib", "p20_ms", "p50_ms", "p80_ms", "gb_per_s", "speedup_vs_store", "skipped"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny size on the CPU (proves the benchmark runs)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    report_run(NAME, run(args.quick), COLUMNS, quick=args.quick, out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
