"""``degla-fast experiment``: the local analog of DeGLA's ablation, on the synthetic dataset.

One tiny CLIP (``degla-tiny``) is pre-trained once from random weights with the plain CLIP loss on the
synthetic training captions. Four fine-tunings start from it, each with several seeds:

(a) ``clip``     the plain CLIP loss (no negatives): the control;
(b) ``negclip``  hard negatives in the global image-to-text softmax only (NegCLIP);
(c) ``igc_tgc``  (b) + the local IGC and TGC losses, no self-distillation;
(d) ``degla``    (c) + self-distillation toward the EMA teacher: full DeGLA.

Every model is scored on the held-out compositional sets (swap / replace / add, unseen object-relation
combinations) and the two zero-shot tasks (shape, colour). Results go to ``OUTPUT/results.md`` (markdown,
mean +- standard deviation over seeds), ``OUTPUT/results.png`` (bar chart) and ``OUTPUT/results.json``.
Finished runs are kept (``OUTPUT/runs/<variant>-seed<S>/eval.json``), so an interrupted experiment
resumes where it stopped when started again with the same settings.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ConfigError, DeglaError
from .io import write_bytes_atomic, write_json_atomic

# variant -> (label, loss settings)
VARIANTS = {
    "clip": ("(a) CLIP loss", {"negatives": False, "igc_weight": 0.0, "tgc_weight": 0.0, "distill_weight": 0.0}),
    "negclip": ("(b) NegCLIP", {"negatives": True, "igc_weight": 0.0, "tgc_weight": 0.0, "distill_weight": 0.0}),
    "igc_tgc": ("(c) + IGC + TGC", {"negatives": True, "igc_weight": 0.1, "tgc_weight": 0.1, "distill_weight": 0.0}),
    "degla": ("(d) DeGLA", {"negatives": True, "igc_weight": 0.1, "tgc_weight": 0.1, "distill_weight": 0.005}),
}
BASELINE = "pretrained"
METRICS = ("swap", "replace", "add", "compositional_avg", "zeroshot_shape", "zeroshot_colour", "zeroshot_avg")
COMPOSITIONAL = ("swap", "replace", "add", "compositional_avg")
ZEROSHOT = ("zeroshot_shape", "zeroshot_colour", "zeroshot_avg")
PRETRAIN_KEYS = ("synthetic_version", "images", "eval_items", "zeroshot_items", "data_seed", "batch_size", "pretrain_steps", "pretrain_lr",
                 "warmup_steps", "device", "model")


@dataclass
class Settings:
    """Sizes and hyper-parameters of the experiment (defaults: about 20 minutes on 2 CPU cores)."""

    images: int = 2000            # synthetic training scenes
    eval_items: int = 200         # items per held-out compositional subset
    zeroshot_items: int = 40      # images per zero-shot class
    data_seed: int = 0
    batch_size: int = 32
    num_negatives: int = 4        # K for variants (b)-(d)
    pretrain_steps: int = 800
    pretrain_lr: float = 1e-3
    finetune_steps: int = 100
    finetune_lr: float = 2e-4
    warmup_steps: int = 20
    ema_decay: float = 0.9996
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    device: str = "cpu"
    threads: int = 1              # CPU threads; 1 is far faster than 2 when other work shares the cores
    model: str = "degla-tiny"

    def validate(self) -> None:
        """ConfigError naming the first bad setting."""
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
        if not self.seeds:
            raise ConfigError("--seeds: give at least one seed")
        for name in ("images", "eval_items", "zeroshot_items", "batch_size", "pretrain_steps", "finetune_steps",
                     "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")


QUICK = dict(images=48, eval_items=4, zeroshot_items=2, batch_size=8, pretrain_steps=3, finetune_steps=2,
             warmup_steps=1, seeds=[0])


# ---------------------------------------------------------------------------------------------- steps

def _stamp_matches(folder: Path, stamp: dict) -> bool:
    path = folder / "settings.json"
    return path.is_file() and json.loads(path.read_text(encoding="utf-8")) == stamp


def prepare_data(settings: Settings, folder: Path, progress: bool) -> Path:
    """The synthetic dataset in ``folder`` (rendered unless an identical one is already there)."""
    from .data.synthetic import VERSION as SYNTHETIC_VERSION, generate

    stamp = {**{k: getattr(settings, k) for k in ("images", "eval_items", "zeroshot_items", "data_seed")},
             "synthetic_version": SYNTHETIC_VERSION}
    if not _stamp_matches(folder, stamp):
        generate(folder, settings.images, settings.data_seed, eval_items=settings.eval_items,
                 zeroshot_items=settings.zeroshot_items, progress=progress)
        write_json_atomic(folder / "settings.json", stamp)
    return folder


def train_config(settings: Settings, data: Path, output: Path, *, pretrained: str | None, steps: int, lr: float,
                 seed: int, negatives: bool, igc_weight: float, tgc_weight: float, distill_weight: float,
                 progress: bool) -> dict:
    """The trainer's YAML configuration (as a dict) of one run."""
    return {
        "data": {"path": str(data / "train.json"), "batch_size": settings.batch_size, "num_workers": 0,
                 "pipeline": "torch"},
        "model": {"name": settings.model, "pretrained": pretrained},
        "loss": {"num_negatives": settings.num_negatives if negatives else 0, "igc_weight": igc_weight,
                 "tgc_weight": tgc_weight, "distill_weight": distill_weight},
        "optim": {"lr": lr, "warmup_steps": min(settings.warmup_steps, steps - 1)},
        "ema": {"decay": settings.ema_decay},
        "output": str(output), "epochs": 10_000, "max_steps": steps, "seed": seed, "precision": "fp32",
        "device": settings.device, "save_every": 0, "keep_last": 1, "progress": progress, "log_every": 10,
        "profile_phases": False,
    }


def train(config: dict, folder: Path) -> Path:
    """Run ``degla-fast train`` on ``config`` (written to ``folder/ablation.yaml``; the trainer adds its full
    ``config.yaml``); returns the run folder."""
    import yaml

    from .train.main import main as train_main

    folder.mkdir(parents=True, exist_ok=True)
    config_path = write_bytes_atomic(folder / "ablation.yaml", yaml.safe_dump(config, sort_keys=False).encode())
    status = train_main(["--config", str(config_path)])
    if status != 0:
        raise DeglaError(f"training run {folder} failed (exit status {status}; its error is printed above)")
    return folder


def evaluate(run_folder: Path, data: Path, settings: Settings, progress: bool) -> dict:
    """Synthetic metrics of the newest checkpoint in ``run_folder``, saved to ``run_folder/eval.json``."""
    from .evaluate.synthetic import evaluate_synthetic
    from .model import load_model

    bundle = load_model(None, str(run_folder), device=settings.device)
    metrics = evaluate_synthetic(bundle, data, device=settings.device, progress=progress)
    write_json_atomic(run_folder / "eval.json", metrics)
    return metrics


def _run(name: str, folder: Path, stamp: dict, work) -> tuple[dict, float]:
    """Metrics of a run: reused from ``folder/eval.json`` when its settings stamp matches, else ``work()``."""
    if _stamp_matches(folder, stamp) and (folder / "eval.json").is_file():
        return json.loads((folder / "eval.json").read_text(encoding="utf-8")), 0.0
    start = time.perf_counter()
    metrics = work()
    write_json_atomic(folder / "settings.json", stamp)
    elapsed = time.perf_counter() - start
    print(f"{name}: compositional {metrics['compositional_avg']:.1f}, zero-shot {metrics['zeroshot_avg']:.1f} "
          f"({elapsed:.0f} s)", flush=True)
    return metrics, elapsed


# ---------------------------------------------------------------------------------------------- summary

def summarize(per_seed: dict[str, list[dict]]) -> dict[str, dict[str, dict[str, float]]]:
    """{variant: [metrics of each seed]} -> {variant: {metric: {"mean", "std", "min", "max", "n"}}}.

    ``std`` is the sample standard deviation over seeds (0 for a single seed).
    """
    out = {}
    for variant, runs in per_seed.items():
        out[variant] = {}
        for metric in METRICS:
            values = [run[metric] for run in runs]
            out[variant][metric] = {
                "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values), "n": len(values)}
    return out


def markdown(summary: dict, labels: dict[str, str]) -> str:
    """The summary as a markdown table: one row per variant, "mean ± std" per metric."""
    header = "| model | " + " | ".join(METRICS) + " |"
    lines = [header, "|---|" + "---:|" * len(METRICS)]
    for variant, stats in summary.items():
        cells = []
        for metric in METRICS:
            s = stats[metric]
            cells.append(f"{s['mean']:.1f}" if s["n"] == 1 else f"{s['mean']:.1f} ± {s['std']:.1f}")
        lines.append(f"| {labels[variant]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(summary: dict, labels: dict[str, str]) -> bytes:
    """PNG bytes: compositional (left) and zero-shot (right) accuracy per model, error bars = std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [4, 3]})
    variants = list(summary)
    width = 0.8 / len(variants)
    for ax, metrics, title in ((axes[0], COMPOSITIONAL, "held-out compositional accuracy (%)"),
                               (axes[1], ZEROSHOT, "zero-shot accuracy (%)")):
        for i, variant in enumerate(variants):
            xs = [m + (i - (len(variants) - 1) / 2) * width for m in range(len(metrics))]
            means = [summary[variant][m]["mean"] for m in metrics]
            stds = [summary[variant][m]["std"] for m in metrics]
            ax.bar(xs, means, width, yerr=stds, capsize=2, label=labels[variant])
        ax.set_xticks(range(len(metrics)))
        ax.set_xticklabels([m.replace("zeroshot_", "").replace("compositional_", "") for m in metrics])
        ax.set_title(title)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0].axhline(50, color="grey", linestyle=":", linewidth=1)  # chance for a two-way choice
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(variants), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- driver

def run_experiment(settings: Settings, output: str | Path, progress: bool = False) -> dict:
    """Run (or resume) the whole experiment into ``output``; returns the results dict also saved as JSON."""
    import torch

    settings.validate()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return _run_experiment(settings, Path(output), progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run_experiment(settings: Settings, output: Path, progress: bool) -> dict:
    started = time.perf_counter()
    timings = {}

    t0 = time.perf_counter()
    data = prepare_data(settings, output / "data", progress)
    timings["data_s"] = time.perf_counter() - t0

    from .data.synthetic import VERSION as SYNTHETIC_VERSION

    # A new renderer version changes the data, so every run stamped with it is redone.
    common = {**{k: v for k, v in asdict(settings).items() if k not in ("seeds", "variants", "threads")},
              "synthetic_version": SYNTHETIC_VERSION}
    pre_folder = output / "runs" / BASELINE
    # the start point does not depend on the fine-tuning settings: changing those reuses it
    pre_stamp = {"kind": BASELINE, **{k: common[k] for k in PRETRAIN_KEYS}}
    baseline, timings["pretrain_s"] = _run(BASELINE, pre_folder, pre_stamp, lambda: evaluate(train(train_config(
        settings, data, pre_folder, pretrained=None, steps=settings.pretrain_steps, lr=settings.pretrain_lr,
        seed=settings.data_seed, progress=progress, **{k: v for k, v in VARIANTS["clip"][1].items()}),
        pre_folder), data, settings, progress))
    pretrained_checkpoint = str(pre_folder / "checkpoints")

    per_seed: dict[str, list[dict]] = {BASELINE: [baseline]}
    timings["finetune_s"] = 0.0
    for variant in settings.variants:
        per_seed[variant] = []
        for seed in settings.seeds:
            name = f"{variant}-seed{seed}"
            folder = output / "runs" / name
            stamp = {"kind": variant, "seed": seed, **common}
            config = train_config(settings, data, folder, pretrained=pretrained_checkpoint,
                                  steps=settings.finetune_steps, lr=settings.finetune_lr, seed=seed,
                                  progress=progress, **VARIANTS[variant][1])
            metrics, elapsed = _run(name, folder, stamp,
                                    lambda: evaluate(train(config, folder), data, settings, progress))
            timings["finetune_s"] += elapsed
            per_seed[variant].append(metrics)

    labels = {BASELINE: "pre-trained (start point)", **{v: label for v, (label, _) in VARIANTS.items()}}
    summary = summarize(per_seed)
    timings["total_s"] = time.perf_counter() - started
    results = {"settings": asdict(settings), "summary": summary, "per_seed": per_seed, "timings": timings}
    table = markdown(summary, labels)
    seeds = ", ".join(map(str, settings.seeds))
    write_bytes_atomic(output / "results.md", (
        f"Synthetic ablation: {settings.model}, pre-trained {settings.pretrain_steps} steps with the CLIP loss, "
        f"fine-tuned {settings.finetune_steps} steps (batch {settings.batch_size}, K={settings.num_negatives}), "
        f"seeds {seeds}; mean ± sample std over seeds; accuracies in %.\n\n{table}\n\n"
        f"Wall time: {timings['total_s']:.0f} s (this invocation; reused runs count 0).\n").encode())
    write_bytes_atomic(output / "results.png", bar_chart(summary, labels))
    write_json_atomic(output / "results.json", results)
    print(table)
    print(f"wrote {output / 'results.md'}, {output / 'results.png'}, {output / 'results.json'}")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``degla-fast experiment``."""
    defaults = Settings()
    parser.add_argument("--output", default="runs/experiment", help="output folder (default runs/experiment)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run with tiny sizes")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help=f"fine-tuning seeds ({defaults.seeds})")
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help=f"subset of {', '.join(VARIANTS)} (default: all)")
    for name in ("images", "eval_items", "zeroshot_items", "batch_size", "num_negatives", "pretrain_steps",
                 "finetune_steps", "warmup_steps", "threads"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"default {getattr(defaults, name)}")
    for name in ("pretrain_lr", "finetune_lr", "ema_decay"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=None,
                            help=f"default {getattr(defaults, name)}")
    parser.add_argument("--device", default=None, help="cpu or cuda (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings: defaults, then ``--quick`` sizes, then explicit flags."""
    settings = Settings(**(QUICK if args.quick else {}))
    for name in list(asdict(settings)):
        value = getattr(args, name, None)
        if value is not None:
            setattr(settings, name, value)
    return settings


def run(args: argparse.Namespace) -> int:
    """``degla-fast experiment``: returns 0."""
    run_experiment(settings_from_args(args), args.output, progress=not args.no_progress)
    return 0
