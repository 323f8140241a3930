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
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

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


def write_results(name: str, rows: list[dict], out_dir: Path | str = RESULTS_DIR, device=None) -> Path:
    """Write ``{"env": ..., "rows": ...}`` to ``out_dir/<name>.json`` atomically; returns the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    payload = {"benchmark": name, "env": env_info(device), "rows": rows}
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=1)
    os.replace(tmp, path)
    return path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub markdown table of ``rows`` restricted to ``columns`` (floats to 3 significant digits)."""
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
