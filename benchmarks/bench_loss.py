"""DeGLA loss forward+backward: our ``gemm`` backend (at three chunk budgets: stored and recomputed
logits), ``triton`` (stored logits where they fit, and recomputed: ``chunk_bytes=1``) and
``torch`` backends, the release's structure (``backend="reference"``) and its ``torch.compile``,
two floors of the three B x D x B(1+K) GEMMs (:data:`FLOORS`: the pure one, into preallocated
outputs and nothing else, and the ``gemm floor`` with its allocations and one copy of the logits),
the loss replayed from a CUDA graph, and the library baselines for the global term (Inf-CL's
tiled contrastive loss, Liger-Kernel's fused linear cross-entropy) when installed, at the same
shapes in the same run, in :func:`measure_order` (what the targets need first).

Reports p20/p50/p80 time, peak extra memory (``torch.cuda.max_memory_allocated`` above what was
allocated before, the returned gradients included; on the CPU the peak RSS of a fresh process per
case), the speedup against the reference and the ratios to the floors (``x_floor``: the pure one;
``x_gemm_floor``), achieved
TFLOP/s counted as the three GEMMs (6 B^2 (1+K) D FLOP) against the device's peak, and at
B=:data:`ERROR_AT_B` the gradients' error against float64 (max |error| / max |float64|, per input).
Each case times as many iterations as fit in :data:`CASE_BUDGET_S` (3 to 30). ``--quick``: tiny
CPU shapes that prove the benchmark runs; CPU times say nothing about GPU kernels.
``--profile TRACE.json`` writes a torch.profiler trace of one configuration.

    python benchmarks/bench_loss.py --quick
    python benchmarks/bench_loss.py                         # GPU: B in 32..65536, K=4, D=512, bf16; fp32 at 4096
    python benchmarks/bench_loss.py --profile benchmarks/results/trace_loss.json --backend gemm
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from common import (_sync, add_ratios, peak_memory_bytes, profile_trace, report_run, roofline,
                    run_case_in_subprocess, time_fn)

from degla_fast.profiling import profile_range

NAME = "bench_loss"
#: impl -> (backend, DeGLALoss keywords); the CUDA-graph rows replay the same call.
LOSS_IMPLS = {
    "gemm": ("gemm", {}),
    "gemm 1 GiB": ("gemm", {"chunk_bytes": 1 << 30}),
    "gemm 64 MiB": ("gemm", {"chunk_bytes": 64 << 20}),
    "triton": ("triton", {}),
    # The smallest chunk budget: the logits never fit one, so triton recomputes them in the
    # backward (the default stores them when they fit, R*C*2 bytes <= chunk_bytes).
    "triton, recomputed": ("triton", {"chunk_bytes": 1}),
    "torch": ("torch", {}),
    "reference": ("reference", {}),
    "torch.compile(reference)": ("reference", {}),
    "gemm (CUDA graph)": ("gemm", {}),
    "triton (CUDA graph)": ("triton", {}),
}
#: The two floors and what each includes (a row's ``includes``). ``x_floor`` is against the pure one.
FLOORS = {
    "pure gemm floor": "three GEMMs into preallocated outputs, nothing else: logits = q @ x^T into a "
                       "[B, B(1+K)] tensor, dq = G @ x and dx = G^T @ q (G a preallocated [B, B(1+K)] tensor)",
    "gemm floor": "the logits GEMM into a new tensor, one copy of those logits into a preallocated [B, B(1+K)] "
                  "tensor G, then G @ x and G^T @ q into new tensors",
}
PURE_FLOOR = "pure gemm floor"
IMPLS = (*LOSS_IMPLS, *FLOORS, "inf-cl (global term)", "liger fused linear CE (global term)")
#: What the targets need, measured first (docs/benchmarks.md, "GPU check"): at each of
#: TARGET_SIZES (K=4, D=512, the run's first dtype) these rows, in this order; then the fused
#: backends and floors at LARGE_B (does it run within 40 GB); then every other row by size,
#: CUDA-graph replays, torch.compile and the library peers last.
TARGET_SIZES = (4096, 256)
TARGET_IMPLS = ("pure gemm floor", "gemm floor", "gemm", "triton", "triton, recomputed", "reference", "torch")
LARGE_B = 65536
LARGE_IMPLS = ("pure gemm floor", "gemm", "triton", "triton, recomputed")
GPU_SIZES = (32, 256, 1024, 4096, 16384, 65536)
#: Where the costly or narrow cases run on a GPU: compiling costs about a minute per shape; a
#: CUDA graph matters where launches dominate; fp32 (TF32 dots) at the paper's global batch.
COMPILE_SIZES, GRAPH_SIZES, FP32_SIZES = (256, 4096), (32, 256), (4096,)
GPU_DTYPES = ("bfloat16", "float32")
CPU_SIZES = (256, 1024, 2048)
QUICK_SIZES = (64, 256)
#: The batch size at which every row also reports its gradients' error against float64.
ERROR_AT_B = 256
#: Seconds of timed iterations a case aims for (at least 3, at most 30 iterations).
CASE_BUDGET_S = 1.5


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
    if device.type != "cuda" and LOSS_IMPLS.get(impl, ("",))[0] in ("gemm", "triton"):
        return "Triton on the CPU runs only through its interpreter, which is not a kernel"
    if device.type != "cuda" and impl.startswith(("inf-cl", "liger")):
        return f"{impl.split()[0]} is CUDA-only"
    return None


def _graphed(fwd_bwd):
    """``fwd_bwd`` captured once in a CUDA graph (after warm-up on a side stream, so kernels are
    compiled and the caching allocator has its blocks); the step replays it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fwd_bwd()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_grads = fwd_bwd()

    def step():
        graph.replay()
        return static_grads
    return step


def loss_step(impl: str, x: dict, num_negatives: int):
    """``() -> gradients`` running forward+backward of ``impl`` on inputs ``x``, or ``(None, reason)``."""
    from degla_fast import DeGLALoss

    grads_of = [x["image"], x["text"], x["scale"]]
    if impl in FLOORS:
        image, text = x["image"].detach(), x["text"].detach()
        grad_logits = torch.empty(image.shape[0], text.shape[0], device=image.device, dtype=image.dtype)
        if impl == "gemm floor":
            def step():
                grad_logits.copy_(image @ text.T)  # forward logits; the copy stands in for "use them"
                return grad_logits @ text, grad_logits.T @ image  # the two backward GEMMs
            return step, None
        grad_logits.normal_()  # G: finite values, so no GEMM takes a slow path on NaN or zeros
        logits = torch.empty_like(grad_logits)
        dq, dx = torch.empty_like(image), torch.empty_like(text)

        def pure():
            torch.mm(image, text.T, out=logits)
            torch.mm(grad_logits, text, out=dq)
            torch.mm(grad_logits.T, image, out=dx)
            return dq, dx
        return pure, None
    reason = skip_reason(impl, x["image"].device)
    if reason:
        return None, reason
    if impl.startswith(("inf-cl", "liger")):
        loss, reason = _global_term_baseline(impl, x)
        if loss is None:
            return None, reason
        return (lambda: torch.autograd.grad(loss(), grads_of)), None
    backend, kwargs = LOSS_IMPLS[impl]
    loss_fn = DeGLALoss(num_negatives=num_negatives, backend=backend, check_finite=False, **kwargs)
    if impl.startswith("torch.compile"):
        loss_fn = torch.compile(loss_fn)

    def step():
        with profile_range("loss"):
            out = loss_fn(x["image"], x["text"], x["scale"], x["t_image"], x["t_text"])
        with profile_range("backward"):
            return torch.autograd.grad(out.total, grads_of)
    return (_graphed(step) if "CUDA graph" in impl else step), None


def timed(step, device: torch.device, budget_s: float = CASE_BUDGET_S) -> dict:
    """p20/p50/p80 of ``step`` in ms over as many iterations as fit in ``budget_s`` (3..30),
    judged from one first, timed call, after a second warm-up call."""
    t0 = time.perf_counter()
    step()
    _sync(device)
    iters = max(3, min(30, int(budget_s / max(time.perf_counter() - t0, 1e-6))))
    return {**time_fn(step, device=device, warmup=1, iters=iters), "iters": iters}


def grad_errors(grads, x: dict, num_negatives: int) -> dict:
    """max |error| / max |float64| of each gradient against the float64 reference of the same inputs."""
    from degla_fast.loss import degla_loss

    leaves = [x[k].detach().double().requires_grad_(True) for k in ("image", "text", "scale")]
    out = degla_loss(*leaves, x["t_image"].double(), x["t_text"].double(), num_negatives=num_negatives,
                     backend="reference")
    want = torch.autograd.grad(out.total, leaves)
    return {f"grad_err_{name}": float((g.double() - w).abs().max() / w.abs().max().clamp_min(1e-30))
            for name, g, w in zip(("image", "text", "scale"), grads, want)}


def _gemm_fields(impl: str, case: dict) -> dict:
    """For gemm rows: the chunk budget, how many column chunks, and whether the logits are stored."""
    backend, kwargs = LOSS_IMPLS.get(impl, (None, {}))
    if backend != "gemm":
        return {}
    from degla_fast.loss.gemm_backend import plan_chunks
    from degla_fast.loss.spec import DEFAULT_CHUNK_BYTES

    budget = kwargs.get("chunk_bytes", DEFAULT_CHUNK_BYTES)
    itemsize = torch.tensor([], dtype=getattr(torch, case["dtype"])).element_size()
    chunks = len(plan_chunks(case["B"], case["B"] * (1 + case["K"]), itemsize, budget))
    return {"chunk_mib": budget >> 20, "chunks": chunks, "stored": chunks == 1}


def run_case(case: dict) -> dict:
    """Measure one ``{"impl", "B", "K", "D", "dtype", "device"}`` case; returns its row."""
    device = torch.device(case["device"])
    if device.type == "cpu":
        torch.set_num_threads(1)  # shared machines: a stalled second thread dominates the timings
    fields = {k: case[k] for k in ("B", "K", "D", "dtype")}
    row = {"name": "degla_loss", "impl": case["impl"], **fields, **_gemm_fields(case["impl"], case)}
    if case["impl"] in FLOORS:
        row["includes"] = FLOORS[case["impl"]]
    if device.type == "cpu":
        # Load the libraries' code and lazy state at a tiny size, so peak RSS counts only the case.
        warm, _ = loss_step(case["impl"], make_inputs(8, case["K"], case["D"], torch.float32, device), case["K"])
        if warm is not None:
            warm()
    x = make_inputs(case["B"], case["K"], case["D"], getattr(torch, case["dtype"]), device)
    try:
        step, reason = loss_step(case["impl"], x, case["K"])
        if step is None:
            return {**row, "skipped": reason}
        row["peak_mem_bytes"] = peak_memory_bytes(step, device=device)
        row.update(timed(step, device, case.get("budget_s", CASE_BUDGET_S)))
        if case["B"] == ERROR_AT_B and case["impl"] not in FLOORS:
            row.update(grad_errors(step(), x, case["K"]))
    except torch.cuda.OutOfMemoryError:
        return {**row, "skipped": "out of memory"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    flops = 6.0 * case["B"] * case["B"] * (1 + case["K"]) * case["D"]
    return roofline(row, flops=flops)


def _wanted(impl: str, batch: int, dtype: str, gpu: bool, quick: bool) -> bool:
    if quick and (impl.startswith("torch.compile") or "CUDA graph" in impl):
        return False
    if not gpu:
        return True
    if impl.startswith("torch.compile"):
        return batch in COMPILE_SIZES and dtype == "bfloat16"
    if "CUDA graph" in impl:
        return batch in GRAPH_SIZES and dtype == "bfloat16"
    return dtype == "bfloat16" or batch in FP32_SIZES


def measure_order(case: dict, first_dtype: str) -> tuple:
    """Where ``case`` comes in a run: the rows the targets need first (:data:`TARGET_IMPLS` at
    :data:`TARGET_SIZES`, then :data:`LARGE_IMPLS` at :data:`LARGE_B`), then the other rows by
    dtype and size, then CUDA-graph replays, torch.compile and the library peers: a run stopped
    at its limit has measured what the targets need."""
    impl, batch, main = case["impl"], case["B"], case["dtype"] == first_dtype
    if main and batch in TARGET_SIZES and impl in TARGET_IMPLS:
        return 0, TARGET_SIZES.index(batch), TARGET_IMPLS.index(impl)
    if main and batch == LARGE_B and impl in LARGE_IMPLS:
        return 1, 0, LARGE_IMPLS.index(impl)
    tier = (5 if impl.startswith(("inf-cl", "liger")) else 4 if impl.startswith("torch.compile")
            else 3 if "CUDA graph" in impl else 2)
    return tier, not main, batch, IMPLS.index(impl)


def cases(quick: bool) -> list[dict]:
    """The configurations a run measures, in :func:`measure_order`: GPU sizes in bf16 (fp32 at
    4096), or CPU sizes in fp32."""
    gpu = torch.cuda.is_available() and not quick
    sizes = GPU_SIZES if gpu else (QUICK_SIZES if quick else CPU_SIZES)
    base = {"K": 4, "D": 64 if quick else 512, "device": "cuda" if gpu else "cpu",
            "budget_s": 0.3 if quick else CASE_BUDGET_S}
    dtypes = GPU_DTYPES if gpu else ("float32",)
    found = [{**base, "dtype": dtype, "impl": impl, "B": b} for dtype in dtypes for b in sizes for impl in IMPLS
             if _wanted(impl, b, dtype, gpu, quick)]
    return sorted(found, key=lambda case: measure_order(case, dtypes[0]))


def finish_rows(rows: list[dict]) -> list[dict]:
    """Ratios within each (B, dtype), for every row measured so far (a run stopped at its limit
    keeps them): speedups against the reference and its compiled form, ``x_floor`` = p50 / the
    pure GEMM floor's p50, ``x_gemm_floor`` = p50 / the gemm floor's."""
    add_ratios(rows, "reference", group_by=("B", "dtype"))
    add_ratios(rows, "torch.compile(reference)", group_by=("B", "dtype"))
    for floor, field in ((PURE_FLOOR, "x_floor"), ("gemm floor", "x_gemm_floor")):
        add_ratios(rows, floor, group_by=("B", "dtype"))
        for r in rows:
            ratio = r.pop(f"speedup_vs_{floor}", None)
            if ratio:
                r[field] = 1.0 / ratio
    return rows


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
    return finish_rows(rows)


COLUMNS = ["B", "K", "D", "dtype", "impl", "chunks", "stored", "p20_ms", "p50_ms", "p80_ms", "peak_mem_bytes",
           "x_floor", "x_gemm_floor", "speedup_vs_reference", "speedup_vs_torch.compile(reference)", "achieved_tflops",
           "pct_of_peak_flops", "grad_err_image", "grad_err_text", "grad_err_scale", "skipped"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small CPU sizes (proves the benchmark runs)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one case, in a fresh process
    parser.add_argument("--profile", metavar="TRACE.json", default=None,
                        help="write a torch.profiler trace of one configuration instead of benchmarking")
    parser.add_argument("--batch", type=int, default=None, help="B of the --profile configuration")
    parser.add_argument("--backend", default="gemm", choices=sorted(LOSS_IMPLS) + sorted(FLOORS),
                        help="implementation of the --profile configuration")
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
