"""Optimiser step plus EMA teacher update over the ViT-B/32 parameter list: ``torch.optim.AdamW``
(foreach, then fused) followed by ``EMATeacher.update``, against the fused ``AdamWEMA`` step
(Triton, and its torch backend), with the device's copy bandwidth measured in the same run.

Bytes moved per step, fp32 everywhere, N parameters: AdamW reads grad, exp_avg, exp_avg_sq and
param and writes the last three (28 N), the EMA then reads param and teacher and writes the
teacher (12 N): 40 N separately; the fused step reads the five once and writes four (36 N).
The copy reference is ``dst.copy_(src)`` over 36 N bytes (read + write). ``--quick``: the list
scaled down 32x on the CPU; the Triton row is skipped (its CPU interpreter is not a kernel) and
so is fused AdamW (a CUDA baseline). CPU timings say nothing about GPU kernels.

    python benchmarks/bench_adamw_ema.py --quick
    python benchmarks/bench_adamw_ema.py            # on a GPU
"""
from __future__ import annotations

import argparse
import sys

import torch

from bench_ema import _QUICK_SCALE, _gbps, clip_parameter_shapes
from common import add_ratios, measure, report_run

DECAY = 0.9996
LR = 1e-4
BASELINE = "AdamW(foreach) + EMATeacher.update"
SEPARATE_BYTES, FUSED_BYTES = 40, 36  # per fp32 parameter, see the module docstring


class _Student(torch.nn.Module):
    """Parameters of the given shapes with fixed random gradients (reused by every step)."""

    def __init__(self, shapes: list[torch.Size], device: torch.device):
        super().__init__()
        self.params = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes])
        for p in self.params:
            p.grad = torch.randn_like(p) * 1e-3


def _cases(student: _Student, device: torch.device):
    """(impl, bytes per parameter, builder of the step function or a skip reason)."""
    from degla_fast import EMATeacher
    from degla_fast.optim_ema import AdamWEMA

    def separate(**adamw):
        opt = torch.optim.AdamW(student.parameters(), lr=LR, **adamw)
        ema = EMATeacher(student, decay=DECAY)
        return lambda: (opt.step(), ema.update(student))

    def fused(backend):
        opt = AdamWEMA(student.parameters(), EMATeacher(student, decay=DECAY), lr=LR, backend=backend)
        return opt.step

    cuda = device.type == "cuda"
    return [
        (BASELINE, SEPARATE_BYTES, lambda: separate(foreach=True)),
        ("AdamW(fused) + EMATeacher.update", SEPARATE_BYTES,
         (lambda: separate(fused=True)) if cuda else "fused AdamW is the CUDA baseline; not run on the CPU"),
        ("AdamWEMA (triton)", FUSED_BYTES,
         (lambda: fused("triton")) if cuda else "Triton's CPU interpreter is not a kernel; GPU only"),
        ("AdamWEMA (torch backend)", SEPARATE_BYTES, lambda: fused("torch")),
    ]


def _copy_reference(label: str, bytes_moved: int, device: torch.device, iters: int, fields: dict) -> dict:
    """``dst.copy_(src)`` moving ``bytes_moved`` bytes (half read, half written); buffers freed after."""
    src = torch.empty(bytes_moved // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return measure(label, "copy_", lambda: dst.copy_(src), device=device, iters=iters, memory=False, **fields)


def run(quick: bool) -> list[dict]:
    """One row per implementation on the ViT-B/32 parameter list (scaled down in quick mode)."""
    device = torch.device("cuda" if torch.cuda.is_available() and not quick else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # on a shared machine a stalled second thread dominates the timings
    label, shapes = "ViT-B/32", clip_parameter_shapes("ViT-B-32")
    if quick:
        label = f"{label} / {_QUICK_SCALE}"
        shapes = [torch.Size([max(1, s.numel() // _QUICK_SCALE)]) for s in shapes]
    numel = sum(s.numel() for s in shapes)
    fields = {"params": numel, "tensors": len(shapes)}
    iters = 10 if quick else 50

    copy = _copy_reference(label, numel * FUSED_BYTES, device, iters, fields)
    copy_ms = copy["p50_ms"]
    rows = [_gbps(copy, numel * FUSED_BYTES, copy_ms)]
    student = _Student(shapes, device)
    for impl, per_param, build in _cases(student, device):
        if isinstance(build, str):
            rows.append({"name": label, "impl": impl, **fields, "skipped": build})
            continue
        row = measure(label, impl, build(), device=device, iters=iters, memory=False, **fields)
        rows.append(_gbps(row, numel * per_param, copy_ms))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the optimiser state and teacher of this case are gone
    return add_ratios(rows, BASELINE, group_by=("name",))


COLUMNS = ["name", "impl", "p50_ms", "bytes_moved", "gb_per_s", "pct_of_copy_bw", f"speedup_vs_{BASELINE}", "skipped"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small CPU sizes (proves the benchmark runs)")
    args = parser.parse_args(argv)
    report_run("bench_adamw_ema", run(args.quick), COLUMNS, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
