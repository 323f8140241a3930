"""DeGLA loss forward+backward: the release's structure (``backend="reference"``), its
``torch.compile``, our torch and Triton backends, the GEMM floor (the three B x D x B(1+K)
matmuls alone) and the library baselines for the global term (Inf-CL's tiled contrastive
loss, Liger-Kernel's fused linear cross-entropy), at the same shapes in the same run.

Reports p20/p50/p80 time, peak extra memory (``torch.cuda.max_memory_allocated`` on a GPU; the
peak RSS of a fresh process per case on the CPU), the speedup against the reference and its
compiled form, and achieved TFLOP/s counted as the three GEMMs (6 B^2 (1+K) D FLOP) against the
device's peak. ``--quick``: tiny CPU shapes that prove the benchmark runs; CPU times say nothing
about GPU kernels. ``--profile TRACE.json`` writes a torch.profiler trace of one configuration.

    python benchmarks/bench_loss.py --quick
    python benchmarks/bench_loss.py                         # GPU: B in 256..65536, K=4, D=512, bf16 and fp32
    python benchmarks/bench_loss.py --profile benchmarks/results/trace_loss.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_ratios, measure, profile_trace, roofline,  # noqa: E402
                    report_run, run_case_in_subprocess)

from degla_fast.profiling import profile_range  # noqa: E402

NAME = "bench_loss"
IMPLS = ("reference", "torch.compile(reference)", "torch", "triton", "gemm floor", "inf-cl (global term)",
         "liger fused linear CE (global term)")
GPU_SIZES = (256, 1024, 4096, 16384, 32768, 65536)
GPU_DTYPES = ("bfloat16", "float32")  # fp32: the loss's default precision (TF32 dots in the triton backend)
CPU_SIZES = (256, 1024, 2048)
QUICK_SIZES = (64, 256)


def make_inputs(batch: int, num_negatives: int, dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """L2-normalised student and teacher features: image ``[B, D]``, text ``[B*(1+K), D]``, and
    ``logit_scale`` (exp applied, scalar); the student's tensors require grad."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def feats(rows, grad):
        x = torch.nn.functional.normalize(torch.randn(rows, dim, generator=gen), dim=-1)
        return x.to(device=device, dtype=dtype).requires_grad_(grad)

    text_rows = batch * (1 + num_negatives)
    return {"image": feats(batch, True), "text": feats(text_rows, True),
            "scale": torch.tensor(1 / 0.07, device=device).requires_grad_(True),
            "t_image": feats(batch, False), "t_text": feats(text_rows, False)}


def _global_term_baseline(impl: str, x: dict):
    """The global (image <-> text) term by a library; ``None`` plus a reason if it cannot run here."""
    batch = x["image"].shape[0]
    labels = torch.arange(batch, device=x["image"].device)
    try:
        if impl.startswith("inf-cl"):
            from inf_cl import cal_inf_loss

            def loss():
                # Inf-CL's tiled loss runs image->text over all B(1+K) texts and text->image over positives.
                return 0.5 * (cal_inf_loss(x["image"], x["text"], labels=labels, scale=x["scale"])
                              + cal_inf_loss(x["text"][:batch], x["image"], labels=labels, scale=x["scale"]))
        else:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            ce = LigerFusedLinearCrossEntropyLoss()

            def loss():
                # Logits = (scale * rows) @ columns^T, fused with the CE so they are never stored.
                return 0.5 * (ce(x["text"], x["image"] * x["scale"], labels)
                              + ce(x["image"], x["text"][:batch] * x["scale"], labels))
    except ImportError as err:
        return None, f"not installed ({err})"
    return loss, None


def skip_reason(impl: str, device: torch.device) -> str | None:
    """Why ``impl`` cannot be measured on ``device`` (None: it can)."""
    if device.type != "cuda" and impl == "triton":
        return "Triton on the CPU runs only through its interpreter, which is not a kernel"
    if device.type != "cuda" and impl.startswith(("inf-cl", "liger")):
        return f"{impl.split()[0]} is CUDA-only"
    return None


def loss_step(impl: str, x: dict, num_negatives: int):
    """``() -> None`` running forward+backward of ``impl`` on inputs ``x``, or ``(None, reason)``."""
    from degla_fast import DeGLALoss

    grads_of = [x["image"], x["text"], x["scale"]]
    if impl == "gemm floor":
        image, text = x["image"].detach(), x["text"].detach()
        grad_logits = torch.empty(image.shape[0], text.shape[0], device=image.device, dtype=image.dtype)

        def step():
            grad_logits.copy_(image @ text.T)  # forward logits; the copy stands in for "use them"
            return grad_logits @ text, grad_logits.T @ image  # the two backward GEMMs
        return step, None
    reason = skip_reason(impl, x["image"].device)
    if reason:
        return None, reason
    if impl.startswith(("inf-cl", "liger")):
        loss, reason = _global_term_baseline(impl, x)
        if loss is None:
            return None, reason
        return (lambda: torch.autograd.grad(loss(), grads_of)), None
    backend = "reference" if "reference" in impl else impl
    loss_fn = DeGLALoss(num_negatives=num_negatives, backend=backend)
    if impl.startswith("torch.compile"):
        loss_fn = torch.compile(loss_fn)

    def step():
        with profile_range("loss"):
            out = loss_fn(x["image"], x["text"], x["scale"], x["t_image"], x["t_text"])
        with profile_range("backward"):
            return torch.autograd.grad(out.total, grads_of)
    return step, None


def run_case(case: dict) -> dict:
    """Measure one ``{"impl", "B", "K", "D", "dtype", "device", "iters"}`` case; returns its row."""
    device = torch.device(case["device"])
    if device.type == "cpu":
        torch.set_num_threads(1)  # shared machines: a stalled second thread dominates the timings
    fields = {k: case[k] for k in ("B", "K", "D", "dtype")}
    row = {"name": "degla_loss", "impl": case["impl"], **fields}
    if device.type == "cpu":
        # Load the libraries' code and lazy state at a tiny size, so peak RSS counts only the case.
        warm, _ = loss_step(case["impl"], make_inputs(8, case["K"], case["D"], torch.float32, device), case["K"])
        if warm is not None:
            warm()
    x = make_inputs(case["B"], case["K"], case["D"], getattr(torch, case["dtype"]), device)
    step, reason = loss_step(case["impl"], x, case["K"])
    if step is None:
        return {**row, "skipped": reason}
    try:
        row = measure("degla_loss", case["impl"], step, device=device, warmup=case.get("warmup", 3),
                      iters=case["iters"], **fields)
    except torch.cuda.OutOfMemoryError:
        return {**row, "skipped": "out of memory"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    flops = 6.0 * case["B"] * case["B"] * (1 + case["K"]) * case["D"]
    return roofline(row, flops=flops)


def cases(quick: bool) -> list[dict]:
    """The configurations a run measures: full GPU sizes in bf16 and fp32, or CPU sizes in fp32."""
    gpu = torch.cuda.is_available() and not quick
    sizes = GPU_SIZES if gpu else (QUICK_SIZES if quick else CPU_SIZES)
    base = {"K": 4, "D": 64 if quick else 512, "device": "cuda" if gpu else "cpu",
            "iters": 3 if quick else (30 if gpu else 5), "warmup": 1 if quick else 3}
    impls = [i for i in IMPLS if not (quick and i.startswith("torch.compile"))]
    dtypes = GPU_DTYPES if gpu else ("float32",)
    return [{**base, "dtype": dtype, "impl": impl, "B": b} for dtype in dtypes for b in sizes for impl in impls]


def run(quick: bool) -> list[dict]:
    """One row per (B, implementation); skipped baselines carry a ``skipped`` reason."""
    rows = []
    for case in cases(quick):
        reason = skip_reason(case["impl"], torch.device(case["device"]))
        if reason:
            rows.append({"name": "degla_loss", **{k: case[k] for k in ("impl", "B", "K", "D", "dtype")},
                         "skipped": reason})
        elif case["device"] == "cpu":
            # Every CPU case in a fresh process, or peak RSS only sees the run's high-water mark.
            rows.append(run_case_in_subprocess(__file__, case))
        else:
            rows.append(run_case(case))
    if quick:
        rows.append({"name": "degla_loss", "impl": "torch.compile(reference)", "B": None,
                     "skipped": "quick mode: compilation dominates tiny CPU shapes"})
    add_ratios(rows, "reference", group_by=("B", "dtype"))
    return add_ratios(rows, "torch.compile(reference)", group_by=("B", "dtype"))


COLUMNS = ["B", "K", "D", "dtype", "impl", "p20_ms", "p50_ms", "p80_ms", "peak_mem_bytes", "speedup_vs_reference",
           "speedup_vs_torch.compile(reference)", "achieved_tflops", "pct_of_peak_flops", "skipped"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small CPU sizes (proves the benchmark runs)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one case, in a fresh process
    parser.add_argument("--profile", metavar="TRACE.json", default=None,
                        help="write a torch.profiler Chrome trace of one configuration instead of benchmarking")
    parser.add_argument("--batch", type=int, default=None, help="B of the --profile configuration")
    parser.add_argument("--backend", default="auto", help="loss backend of the --profile configuration")
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    if args.profile:
        gpu = torch.cuda.is_available()
        device = torch.device("cuda" if gpu else "cpu")
        batch = args.batch or (4096 if gpu else 256)
        x = make_inputs(batch, 4, 512, torch.bfloat16 if gpu else torch.float32, device)
        step, reason = loss_step(args.backend, x, 4)
        if step is None:
            print(f"cannot profile {args.backend}: {reason}", file=sys.stderr)
            return 2
        print(f"wrote {profile_trace(step, args.profile, device=device)}")
        return 0
    report_run(NAME, run(args.quick), COLUMNS, quick=args.quick, out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
