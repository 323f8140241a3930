"""Shared timing, memory and environment helpers for every benchmark in this folder.

Each ``bench_*.py`` exposes ``run(quick: bool) -> list[dict]`` (one row per measured case,
built with :func:`measure`) and a ``main(argv)`` that prints a table and writes JSON with
:func:`write_results`. ``quick`` means small CPU sizes: they prove the benchmark runs, they
say nothing about GPU kernel speed.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from degla_fast.io import atomic_path, write_json_atomic

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device | str | None = None) -> str:
    """Human name of the device the benchmark ran on (GPU model or CPU model)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def env_info(device: torch.device | str | None = None) -> dict:
    """Versions and device, recorded with every result file."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - triton ships with Linux torch wheels
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        # The compute capability keys the loss's auto table (degla_fast.loss.auto.write_auto_table).
        "capability": ("%d.%d" % torch.cuda.get_device_capability(device)
                       if torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda"
                       else None),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentiles(samples_ms: list[float]) -> dict:
    """p20/p50/p80 of a list of milliseconds (inclusive quantiles)."""
    if len(samples_ms) == 1:
        return {"p20_ms": samples_ms[0], "p50_ms": samples_ms[0], "p80_ms": samples_ms[0]}
    q = statistics.quantiles(samples_ms, n=10, method="inclusive")
    return {"p20_ms": q[1], "p50_ms": statistics.median(samples_ms), "p80_ms": q[7]}


def time_fn(fn: Callable[[], object], *, device: torch.device | str = "cpu", warmup: int = 3, iters: int = 20) -> dict:
    """Wall-clock percentiles of ``fn()`` in ms; CUDA events on a GPU, perf_counter on the CPU."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return percentiles(samples)


def peak_memory_bytes(fn: Callable[[], object], *, device: torch.device | str = "cpu") -> int | None:
    """Peak memory of one call of ``fn`` above what was allocated before it.

    GPU: ``torch.cuda.max_memory_allocated`` delta. CPU: growth of the process's peak RSS,
    which only sees a new high-water mark; run memory cases in a fresh process (or largest
    last) for meaningful CPU numbers.
    """
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


def measure(name: str, impl: str, fn: Callable[[], object], *, device: torch.device | str = "cpu",
            warmup: int = 3, iters: int = 20, memory: bool = True, **fields) -> dict:
    """One result row: ``name``/``impl``, the shape ``fields``, timing percentiles and peak memory."""
    row = {"name": name, "impl": impl, **fields}
    if memory:
        row["peak_mem_bytes"] = peak_memory_bytes(fn, device=device)
    row.update(time_fn(fn, device=device, warmup=warmup, iters=iters))
    return row


def add_ratios(rows: list[dict], baseline_impl: str, key: str = "p50_ms", group_by: tuple[str, ...] = ()) -> list[dict]:
    """Add ``speedup_vs_<baseline>`` = baseline time / row time within each group of equal ``group_by`` fields."""
    base = {tuple(r.get(k) for k in group_by): r[key] for r in rows if r["impl"] == baseline_impl and r.get(key)}
    for r in rows:
        ref = base.get(tuple(r.get(k) for k in group_by))
        if ref and r.get(key):
            r[f"speedup_vs_{baseline_impl}"] = ref / r[key]
    return rows


def write_results(name: str, rows: list[dict], out_dir: Path | str = RESULTS_DIR, device=None, *,
                  partial: bool = False) -> Path:
    """Write ``{"env": ..., "rows": ...}`` to ``out_dir/<name>.json`` atomically; returns the path.
    ``partial``: the rows so far of a run still going (``"partial": true`` in the file)."""
    payload = {"benchmark": name, "env": env_info(device), "rows": rows, **({"partial": True} if partial else {})}
    return write_json_atomic(Path(out_dir) / f"{name}.json", payload)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub markdown table of ``rows`` restricted to ``columns`` (floats to 3 significant digits)."""
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# --- peaks, subprocess cases, profiling -------------------------------------------------------

# Dense bf16 tensor-core FLOP/s and memory bandwidth (bytes/s) from the vendors' data sheets.
# Matched by substring of the device name, most specific first; anything else is "unknown".
KNOWN_PEAKS = (
    ("H200", {"peak_flops": 989e12, "peak_bytes_per_s": 4.8e12}),
    ("H100 PCIe", {"peak_flops": 756e12, "peak_bytes_per_s": 2.0e12}),
    ("H100 NVL", {"peak_flops": 835e12, "peak_bytes_per_s": 3.9e12}),
    ("H100", {"peak_flops": 989e12, "peak_bytes_per_s": 3.35e12}),
    ("A100-SXM4-80GB", {"peak_flops": 312e12, "peak_bytes_per_s": 2.04e12}),
    ("A100", {"peak_flops": 312e12, "peak_bytes_per_s": 1.56e12}),
)


def device_peaks(name: str) -> dict | None:
    """``{"peak_flops", "peak_bytes_per_s"}`` of a known GPU by its name, else None ("unknown")."""
    for key, peaks in KNOWN_PEAKS:
        if key in name:
            return dict(peaks)
    return None


def roofline(row: dict, *, flops: float | None = None, bytes_moved: float | None = None,
             device: str | None = None) -> dict:
    """Add achieved TFLOP/s and/or GB/s to ``row`` (from its ``p50_ms``) and, on a known GPU,
    the percentage of that device's peak; ``peak`` is "unknown" elsewhere. Returns ``row``."""
    seconds = row.get("p50_ms", 0) * 1e-3
    if not seconds:
        return row
    peaks = device_peaks(device or device_name())
    row["peak"] = "known" if peaks else "unknown"
    if flops is not None:
        row["flops"] = flops
        row["achieved_tflops"] = flops / seconds / 1e12
        if peaks:
            row["pct_of_peak_flops"] = 100.0 * flops / seconds / peaks["peak_flops"]
    if bytes_moved is not None:
        row["bytes_moved"] = bytes_moved
        row["achieved_gb_per_s"] = bytes_moved / seconds / 1e9
        if peaks:
            row["pct_of_peak_bw"] = 100.0 * bytes_moved / seconds / peaks["peak_bytes_per_s"]
    return row


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case_in_subprocess(script: Path | str, case: dict, timeout: float = 1800) -> dict:
    """Run ``python script --case JSON`` in a fresh process and return the row it prints as its
    last stdout line; a fresh process is what makes a CPU peak-RSS figure mean something.
    A failing case comes back as ``{**case, "skipped": "<reason>"}``, never an exception."""
    import subprocess
    import sys

    cmd = [sys.executable, str(script), "--case", json.dumps(case)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**case, "skipped": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {**case, "skipped": f"case failed (exit {done.returncode}): {tail[:200]}"}
    return json.loads(lines[-1])


def profile_trace(fn: Callable[[], object], path: Path | str, *, device: torch.device | str = "cpu",
                  warmup: int = 2, steps: int = 3) -> Path:
    """Run ``fn`` ``warmup`` times, then ``steps`` times under ``torch.profiler``, and write the
    Chrome/Perfetto trace (open in chrome://tracing or ui.perfetto.dev) atomically to ``path``.
    ``record_function`` ranges inside ``fn`` show up as named spans (and as NVTX ranges when
    the run is wrapped in ``nsys profile``)."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(warmup):
        fn()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    with atomic_path(path, suffix=".json") as tmp:
        prof.export_chrome_trace(str(tmp))
    return path


def report_run(name: str, rows: list[dict], columns: list[str], *, quick: bool, out_dir: Path | str | None = None) -> Path:
    """A bench's ``main`` ending: print the markdown table of ``rows`` and write
    ``<name>[_quick].json`` (to ``out_dir`` or :data:`RESULTS_DIR`); returns the JSON path."""
    print(markdown_table(rows, columns))
    path = write_results(name + ("_quick" if quick else ""), rows, out_dir or RESULTS_DIR)
    print(f"wrote {path}")
    return path
