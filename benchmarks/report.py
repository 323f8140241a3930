"""Turn the benchmark JSON files of a results folder into ``RESULTS.md`` (one table per
benchmark, with device, versions, date and the ratios measured in the same run) and PNG plots:
loss time and peak memory against batch size (log scale), EMA GB/s against the device's copy
bandwidth, and the training step's phase breakdown as stacked bars.

    python benchmarks/report.py benchmarks/results                  # -> benchmarks/RESULTS.md, benchmarks/plots/
    python benchmarks/report.py RESULTS_DIR --out OUT_DIR
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from common import KNOWN_PEAKS, markdown_table
from degla_fast.io import atomic_path, write_text_atomic

HERE = Path(__file__).resolve().parent
_FIRST = ["name", "model", "B", "K", "D", "dtype", "precision", "student_dtype", "teacher_dtype", "impl"]
_HIDDEN = {"benchmark", "flops", "bytes_moved", "peak"}


def load_results(folder: Path | str) -> list[dict]:
    """Every ``{"benchmark", "env", "rows"}`` JSON file in ``folder`` (others are ignored), by name."""
    out = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and {"benchmark", "env", "rows"} <= data.keys():
            out.append(data)
    return out


def representative(env: dict) -> bool:
    """Whether a result can speak for GPU kernels: a CUDA device, not Triton's interpreter."""
    return bool(env.get("cuda")) and not env.get("device", "").startswith("CPU") and not env.get("triton_interpret")


def columns_of(rows: list[dict]) -> list[str]:
    """Table columns: shape and impl first, then every other field in first-seen order."""
    seen = []
    for r in rows:
        seen += [k for k in r if k not in seen and k not in _HIDDEN]
    return [c for c in _FIRST if c in seen] + [c for c in seen if c not in _FIRST]


def _save(fig, path: Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    return path


def _measured(rows):
    return [r for r in rows if r.get("p50_ms") and not r.get("skipped")]


def plot_loss(result: dict, out: Path) -> list[Path]:
    """Loss p50 time and peak memory against B per implementation (log-log)."""
    import matplotlib.pyplot as plt

    rows = [r for r in _measured(result["rows"]) if r.get("B")]
    paths = []
    for key, label, fname in (("p50_ms", "forward+backward p50 (ms)", "loss_time.png"),
                              ("peak_mem_bytes", "peak extra memory (MB)", "loss_memory.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((r["B"], r[key] / (1e6 if key == "peak_mem_bytes" else 1)) for r in rows
                         if r["impl"] == impl and r.get(key))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="batch size B", ylabel=label,
               title=f"DeGLA loss, {result['env']['device']}")
        if ax.lines:
            ax.legend(fontsize=7)
        paths.append(_save(fig, out / fname))
        plt.close(fig)
    return paths


def plot_ema(result: dict, out: Path) -> list[Path]:
    """EMA GB/s per implementation, one panel per parameter list, with the copy bandwidth as a line."""
    import matplotlib.pyplot as plt

    rows = [r for r in _measured(result["rows"]) if r.get("gb_per_s")]
    groups = list(dict.fromkeys((r.get("name"), r.get("student_dtype")) for r in rows))
    if not groups:
        return []
    fig, axes = plt.subplots(len(groups), 1, figsize=(7, 3 * len(groups)), squeeze=False)
    for ax, group in zip(axes[:, 0], groups):
        sel = [r for r in rows if (r.get("name"), r.get("student_dtype")) == group]
        copy = [r["gb_per_s"] for r in sel if r["impl"] == "copy_"]
        bars = [r for r in sel if r["impl"] != "copy_"]
        ax.barh([r["impl"] for r in bars], [r["gb_per_s"] for r in bars])
        if copy:
            ax.axvline(copy[0], color="k", linestyle="--", label=f"copy_ {copy[0]:.3g} GB/s")
            ax.legend(fontsize=7)
        ax.set(xlabel="GB/s", title=f"EMA update, {group[0]} (student {group[1]})")
        ax.tick_params(axis="y", labelsize=7)
    path = _save(fig, out / "ema_bandwidth.png")
    plt.close(fig)
    return [path]


def plot_step(result: dict, out: Path) -> list[Path]:
    """Training step p50 phase times as stacked bars, one bar per variant and batch size."""
    import matplotlib.pyplot as plt

    rows = _measured(result["rows"])
    phases = [k for k in columns_of(rows) if k.endswith("_ms") and k not in ("p20_ms", "p50_ms", "p80_ms")]
    if not rows or not phases:
        return []
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(rows)
    for phase in phases:
        vals = [r.get(phase) or 0.0 for r in rows]
        # One bar per (variant, batch): the same variant at B=256 and B=1024 must not share a spot.
        ax.bar([f"{r['impl']} B={r['B']}" if "B" in r else r["impl"] for r in rows], vals, bottom=bottom,
               label=phase[:-3])
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set(ylabel="ms per step (phase p50)", title=f"training step, {result['env']['device']}")
    ax.tick_params(axis="x", labelsize=7, rotation=15)
    ax.legend(fontsize=7)
    path = _save(fig, out / "step_breakdown.png")
    plt.close(fig)
    return [path]


PLOTTERS = {"bench_loss": plot_loss, "bench_ema": plot_ema, "bench_step": plot_step}


def _plotter(benchmark: str):
    return PLOTTERS.get(benchmark.removesuffix("_quick"))


def render(results: list[dict], plots: dict[str, list[Path]], out: Path) -> str:
    """The markdown of RESULTS.md."""
    lines = ["# Benchmark results", "",
             "Generated by `benchmarks/report.py` from the JSON in `benchmarks/results/` (`make bench`). "
             "Ratios (`speedup_vs_*`) compare implementations measured in the same run on the same device. "
             "Roofline columns: achieved TFLOP/s or GB/s and, on a GPU with known peaks, the percentage of "
             "that peak (`pct_of_peak_*`); peaks used:", ""]
    lines += [f"- {name}: {p['peak_flops'] / 1e12:.0f} TFLOP/s dense bf16, {p['peak_bytes_per_s'] / 1e12:.2f} TB/s"
              for name, p in KNOWN_PEAKS]
    lines += ["- any other device: unknown", ""]
    if not any(representative(r["env"]) for r in results):
        lines += ["**No GPU run is recorded here yet.** The tables below come from the CPU quick mode: they show that "
                  "every benchmark runs and what it reports, not how fast any kernel is. Run `make bench` on a GPU "
                  "to replace them.", ""]
    for res in results:
        env = res["env"]
        lines += [f"## {res['benchmark']}", "",
                  f"Device: **{env.get('device')}**; torch {env.get('torch')}, triton {env.get('triton')}, "
                  f"CUDA {env.get('cuda')}, Python {env.get('python')}; date {env.get('date')}.", ""]
        if not representative(env):
            lines += ["> **CPU run: not representative of GPU kernel performance.** These figures only show that "
                      "the benchmark runs; they say nothing about the speed of the CUDA/Triton kernels.", ""]
        rows = res["rows"]
        lines += [markdown_table(rows, columns_of(rows)), ""]
        for p in plots.get(res["benchmark"], []):
            lines += [f"![{p.stem}]({os.path.relpath(p, out)})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", default=str(HERE / "results"), help="folder of benchmark JSON files")
    parser.add_argument("--out", default=str(HERE), help="where RESULTS.md and plots/ go (default benchmarks/)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    results = load_results(args.results)
    if not results:
        print(f"no benchmark JSON in {args.results}", file=sys.stderr)
        return 2
    plots = {}
    for res in results:
        plotter = _plotter(res["benchmark"])
        if plotter:
            sub = out / "plots" / res["benchmark"]
            sub.mkdir(exist_ok=True)
            plots[res["benchmark"]] = plotter(res, sub)
    write_text_atomic(out / "RESULTS.md", render(results, plots, out))
    print(f"wrote {out / 'RESULTS.md'} and {sum(len(v) for v in plots.values())} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
