"""``degla-fast experiment``: the local analog of DeGLA's ablation (method doc section 8).

One tiny CLIP (``degla-synth``) is pre-trained once from random weights with the plain CLIP loss on
the synthetic world's broad pre-training distribution: the shared, cached start point. Five
fine-tunings on the narrow, relation-rich fine-tuning distribution start from it, each with
several seeds (the fine-tuning seed: data order, which 4 of the 5 negatives, augmentation):

(a) ``clip``          the plain CLIP loss (no negatives): the control;
(b) ``negclip``       hard negatives in the global image-to-text softmax only (NegCLIP);
(c) ``igc_tgc``       (b) + the local IGC and TGC losses, no self-distillation;
(d) ``degla``         (c) + self-distillation toward the EMA teacher: full DeGLA;
(e) ``degla_release`` (d) with the released code's TGC indexing (``loss.official_tgc_indexing``).

Every model is scored on one split of the held-out sets (``--split``: ``val`` for choosing
settings, ``test`` for reporting): compositional choices on unseen object/relation combinations
and five zero-shot tasks, plus the pairwise accuracy on the fine-tuning set's own hard negatives.
``OUTPUT/results.md`` holds mean ± std over seeds and the paired differences (same seed) with 95 %
confidence intervals, ``OUTPUT/results.png`` the same as bars with error bars, ``OUTPUT/results.json``
everything. Every stage is cached (:mod:`degla_fast.stages`): a second invocation, or one with more
seeds, reuses what is finished.
"""
from __future__ import annotations

import argparse
import io
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .console import log
from .errors import ConfigError
from .io import check_output_folder, write_bytes_atomic, write_json_atomic
from .loss.spec import LossSpec
from .threads import set_threads

# variant -> (label, loss fields)
VARIANTS = {
    "clip": ("(a) CLIP loss", {"negatives": False, "igc": False, "distill": False, "release_tgc": False}),
    "negclip": ("(b) NegCLIP", {"negatives": True, "igc": False, "distill": False, "release_tgc": False}),
    "igc_tgc": ("(c) NegCLIP + IGC + TGC", {"negatives": True, "igc": True, "distill": False, "release_tgc": False}),
    "degla": ("(d) DeGLA", {"negatives": True, "igc": True, "distill": True, "release_tgc": False}),
    "degla_release": ("(e) DeGLA, release TGC", {"negatives": True, "igc": True, "distill": True, "release_tgc": True}),
}
BASELINE = "pretrained"
COMPOSITIONAL = ("swap_obj", "swap_att", "swap", "replace", "add", "compositional_avg")
TRAIN_METRIC = "train_pairwise"
# (name, minuend, subtrahend, metric): the paired differences that carry the paper's claims
CONTRASTS = (
    ("NegCLIP - start", "negclip", BASELINE, "compositional_avg"),
    ("NegCLIP - start", "negclip", BASELINE, "zeroshot_avg"),
    ("NegCLIP - start", "negclip", BASELINE, TRAIN_METRIC),
    ("NegCLIP - CLIP loss", "negclip", "clip", "swap"),
    ("NegCLIP - CLIP loss", "negclip", "clip", "compositional_avg"),
    ("NegCLIP - CLIP loss", "negclip", "clip", TRAIN_METRIC),
    ("+IGC+TGC - NegCLIP", "igc_tgc", "negclip", "swap"),
    ("+IGC+TGC - NegCLIP", "igc_tgc", "negclip", "compositional_avg"),
    ("+IGC+TGC - NegCLIP", "igc_tgc", "negclip", TRAIN_METRIC),
    ("DeGLA - NegCLIP", "degla", "negclip", "compositional_avg"),
    ("DeGLA - NegCLIP", "degla", "negclip", "zeroshot_avg"),
    ("DeGLA - NegCLIP", "degla", "negclip", "swap"),
    ("DeGLA - (+IGC+TGC)", "degla", "igc_tgc", "zeroshot_avg"),
    ("DeGLA - (+IGC+TGC)", "degla", "igc_tgc", "swap"),
    ("DeGLA - (+IGC+TGC)", "degla", "igc_tgc", "compositional_avg"),
    ("fixed - release TGC", "degla", "degla_release", "swap"),
    ("fixed - release TGC", "degla", "degla_release", "compositional_avg"),
    ("fixed - release TGC", "degla", "degla_release", "zeroshot_avg"),
)
# the loss weights `degla-fast experiment` takes as flags (--igc-weight, ...)
LOSS_WEIGHTS = ("igc_weight", "tgc_weight", "distill_weight")
# two-sided 95 % Student t quantiles by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086}


@dataclass
class Settings:
    """Sizes and hyper-parameters (defaults: chosen on the validation split, docs/experiment.md)."""

    images: int = 3000             # fine-tuning scenes (5 hard negatives each)
    pretrain_images: int = 6000    # pre-training scenes (broad, captions only)
    eval_items: int = 200          # items per compositional subset (test split; val has half)
    zeroshot_items: int = 40       # images per zero-shot class (test split; val has 30)
    data_seed: int = 0
    batch_size: int = 32
    num_negatives: int = 4         # K, drawn each step from the 5 negatives of a caption
    pretrain_steps: int = 1000
    pretrain_lr: float = 2e-3
    finetune_steps: int = 800     # where binding has set in on validation (docs/experiment.md)
    finetune_lr: float = 1e-3
    warmup_steps: int = 20
    # The loss weights of the DeGLA variants (the loss's own defaults but for distillation, 0.01,
    # chosen with the EMA decay on the validation split: the most zero-shot accuracy whose swap
    # accuracy stays within 5 points of +IGC+TGC's); K is num_negatives above, set per variant.
    loss: LossSpec = field(default_factory=lambda: LossSpec(distill_weight=0.01))
    ema_decay: float = 0.995
    # The first seed's fine-tunes keep a checkpoint every this many steps, each scored on the split's
    # compositional sets: the learning curves (0 = none).
    curve_every: int = 100
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    split: str = "test"            # "val" while choosing settings, "test" to report
    device: str = "cpu"
    threads: int | None = None     # torch threads per process (None: degla_fast.threads' rule over `jobs`)
    jobs: int = 2                  # fine-tuning runs in parallel (processes)
    model: str = "degla-synth"

    def validate(self) -> None:
        """ConfigError naming the first bad setting."""
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
        if not self.seeds:
            raise ConfigError("--seeds: give at least one seed")
        if self.split not in ("val", "test"):
            raise ConfigError(f"--split: must be val or test, got {self.split!r}")
        for name in ("images", "pretrain_images", "eval_items", "zeroshot_items", "batch_size", "pretrain_steps",
                     "finetune_steps", "threads", "jobs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if self.curve_every < 0:
            raise ConfigError(f"--curve-every: must be >= 0, got {self.curve_every}")

    def data_sizes(self) -> dict:
        return {"num_images": self.images, "pretrain_images": self.pretrain_images, "seed": self.data_seed,
                "eval_items": self.eval_items, "zeroshot_items": self.zeroshot_items,
                "val_eval_items": max(1, self.eval_items // 2), "val_zeroshot_items": max(1, self.zeroshot_items * 3 // 4)}


QUICK = dict(images=48, pretrain_images=48, eval_items=4, zeroshot_items=2, batch_size=8, pretrain_steps=3,
             finetune_steps=2, warmup_steps=1, curve_every=1, seeds=[0, 1], jobs=1)


# ---------------------------------------------------------------------------------------------- stages

def pretrain_fields(settings: Settings, data: Path) -> dict:
    """The trainer fields of the start point: the CLIP loss on the pre-training distribution (one
    process: the spare cores go to :func:`degla_fast.stages.speed_fields`)."""
    from .stages import speed_fields

    return {"data.path": str(data / "pretrain.json"), "data.batch_size": settings.batch_size,
            "model.name": settings.model, "model.pretrained": "none", "loss.num_negatives": 0,
            "optim.lr": settings.pretrain_lr, "optim.warmup_steps": min(50, settings.pretrain_steps - 1),
            "max_steps": settings.pretrain_steps, "seed": settings.data_seed, "device": settings.device,
            **speed_fields()}


def finetune_fields(settings: Settings, data: Path, start: Path, variant: str, seed: int, curve: bool = False) -> dict:
    """The trainer fields of one fine-tuning run (``curve``: it keeps a checkpoint every
    ``settings.curve_every`` steps for :func:`degla_fast.stages.curve_stage`)."""
    v = VARIANTS[variant][1]
    teacher = {"ema.decay": settings.ema_decay} if v["negatives"] and v["igc"] else {}  # TGC / distillation read it
    return {**teacher, "data.path": str(data / "train.json"), "data.batch_size": settings.batch_size,
            "model.name": settings.model, "model.pretrained": str(start),
            "loss.num_negatives": settings.num_negatives if v["negatives"] else 0,
            "loss.igc_weight": settings.loss.igc_weight if v["igc"] else 0.0,
            "loss.tgc_weight": settings.loss.tgc_weight if v["igc"] else 0.0,
            "loss.distill_weight": settings.loss.distill_weight if v["distill"] else 0.0,
            "loss.official_tgc_indexing": v["release_tgc"],
            "optim.lr": settings.finetune_lr, "optim.warmup_steps": min(settings.warmup_steps, settings.finetune_steps - 1),
            "max_steps": settings.finetune_steps, "seed": seed, "device": settings.device,
            **({"save_every": settings.curve_every, "keep_last": settings.finetune_steps // settings.curve_every + 1}
               if curve and settings.curve_every else {})}


def prepare(settings: Settings, output: Path, progress: bool = False) -> tuple[Path, Path, dict]:
    """(data folder, start-point run folder, the start point's stamp): both stages cached."""
    from . import stages
    from .data.synthetic import VERSION

    data = stages.synth_stage(output / "data", progress=progress, **settings.data_sizes())
    depends = {"synthetic_version": VERSION, "data": settings.data_sizes()}
    start = stages.train_stage(output / "runs" / BASELINE, pretrain_fields(settings, data), progress=progress,
                               name="start point (CLIP loss pre-training)", depends=depends)
    return data, start, depends


# ---------------------------------------------------------------------------------------------- summary

def summarize(per_seed: dict[str, list[dict]]) -> dict[str, dict[str, dict[str, float]]]:
    """{variant: [metrics of each seed]} -> {variant: {metric: {"mean", "std", "min", "max", "n"}}};
    ``std`` is the sample standard deviation over seeds (0 for a single seed)."""
    out = {}
    for variant, runs in per_seed.items():
        out[variant] = {}
        for metric in runs[0]:
            values = [run[metric] for run in runs]
            out[variant][metric] = {
                "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values), "n": len(values)}
    return out


def paired(a: list[float], b: list[float]) -> dict:
    """Mean difference a - b over paired seeds with its 95 % t interval (``b`` of length 1: a
    shared value, such as the start point, subtracted from every seed)."""
    b = b * len(a) if len(b) == 1 else b
    d = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(d)
    if len(d) < 2:
        return {"mean": mean, "low": float("nan"), "high": float("nan"), "n": len(d)}
    half = _T95.get(len(d) - 1, 1.96) * statistics.stdev(d) / math.sqrt(len(d))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(d)}


def contrasts(per_seed: dict[str, list[dict]]) -> list[dict]:
    """The paired differences of :data:`CONTRASTS` whose variants were run."""
    out = []
    for name, a, b, metric in CONTRASTS:
        if a in per_seed and b in per_seed:
            out.append({"name": name, "metric": metric, **paired([r[metric] for r in per_seed[a]],
                                                                 [r[metric] for r in per_seed[b]])})
    return out


def table_metrics(metrics) -> list[str]:
    """The metrics a table shows, in order: compositional categories and average, every zero-shot task
    and the average, the training-set pairwise accuracy (per-subset numbers stay in the JSON)."""
    metrics = list(metrics)
    zs = [m for m in metrics if m.startswith("zeroshot_") and m != "zeroshot_avg"]
    return [m for m in (*COMPOSITIONAL, *zs, "zeroshot_avg", TRAIN_METRIC) if m in metrics]


def _label(metric: str) -> str:
    return {"compositional_avg": "compositional avg", "zeroshot_avg": "zero-shot avg",
            TRAIN_METRIC: "train pairwise"}.get(metric, metric.replace("zeroshot_", "zs "))


def markdown(summary: dict, labels: dict[str, str], chance: dict | None = None) -> str:
    """The summary as a markdown table: one column per model ("mean ± std"), one row per metric."""
    variants = list(summary)
    metrics = table_metrics(next(iter(summary.values())))
    header = "| metric | " + ("chance | " if chance else "") + " | ".join(labels[v] for v in variants) + " |"
    lines = [header, "|---|" + ("---:|" if chance else "") + "---:|" * len(variants)]
    for metric in metrics:
        cells = [f"{chance[metric]:.1f}"] if chance else []
        for v in variants:
            s = summary[v][metric]
            cells.append(f"{s['mean']:.1f}" if s["n"] == 1 else f"{s['mean']:.1f} ± {s['std']:.1f}")
        lines.append(f"| {_label(metric)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def contrast_table(rows: list[dict]) -> str:
    """Markdown table of paired differences with their 95 % intervals."""
    lines = ["| paired difference (same seed) | metric | mean | 95 % CI | excludes 0 |", "|---|---|---:|---|---|"]
    for r in rows:
        ci = "n/a" if math.isnan(r["low"]) else f"[{r['low']:+.1f}, {r['high']:+.1f}]"
        sign = "n/a" if math.isnan(r["low"]) else ("yes" if r["low"] > 0 or r["high"] < 0 else "no")
        lines.append(f"| {r['name']} | {_label(r['metric'])} | {r['mean']:+.1f} | {ci} | {sign} |")
    return "\n".join(lines)


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig, legend_axes, title: str, ncol: int | None = None, top: float = 1.0) -> bytes:
    """PNG bytes of ``fig``: the legend of ``legend_axes`` in one row below the plots (at most
    ``ncol`` entries a row), ``title`` above; the figure is closed."""
    handles, names = legend_axes.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), ncol or len(names)), fontsize=8,
               frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, top))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    _pyplot().close(fig)
    return buffer.getvalue()


def bar_chart(summary: dict, labels: dict[str, str], chance: dict | None = None, rows: list[dict] | None = None,
              title: str = "") -> bytes:
    """PNG bytes: compositional and zero-shot accuracy per model (error bars = std over seeds, none
    for a model of one seed), chance levels as ticks, and (when given) the paired differences with
    their 95 % intervals."""
    plt = _pyplot()
    metrics_all = list(next(iter(summary.values())))
    comp = [m for m in (*COMPOSITIONAL, TRAIN_METRIC) if m in metrics_all]
    zs = [m for m in metrics_all if m.startswith("zeroshot_")]
    ncols = 3 if rows else 2
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.6),
                             gridspec_kw={"width_ratios": [len(comp), len(zs)] + ([4] if rows else [])})
    variants = list(summary)
    width = 0.8 / len(variants)
    for ax, metrics, name in ((axes[0], comp, "held-out compositional (%)"), (axes[1], zs, "zero-shot (%)")):
        for i, variant in enumerate(variants):
            xs = [m + (i - (len(variants) - 1) / 2) * width for m in range(len(metrics))]
            # Error bars only where there is a spread to show: one seed (make train) draws none.
            spread = any(summary[variant][m]["n"] > 1 for m in metrics)
            ax.bar(xs, [summary[variant][m]["mean"] for m in metrics], width,
                   yerr=[summary[variant][m]["std"] for m in metrics] if spread else None, capsize=2 if spread else 0,
                   label=labels[variant])
        if chance:
            for k, m in enumerate(metrics):
                ax.hlines(chance[m], k - 0.45, k + 0.45, colors="black", linestyles=":", linewidth=1.2,
                          label="chance" if k == 0 and ax is axes[0] else None)
        ax.set_xticks(range(len(metrics)))
        ax.set_xticklabels([_label(m).replace("compositional ", "comp ") for m in metrics], fontsize=8)
        ax.set_title(name)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    if rows:
        ax = axes[2]
        names = [f"{r['name']}\n{_label(r['metric'])}" for r in rows]
        ys = list(range(len(rows)))[::-1]
        means = [r["mean"] for r in rows]
        err = [[0 if math.isnan(r["low"]) else r["mean"] - r["low"] for r in rows],
               [0 if math.isnan(r["high"]) else r["high"] - r["mean"] for r in rows]]
        ax.errorbar(means, ys, xerr=err, fmt="o", capsize=3, color="tab:red")
        ax.axvline(0, color="grey", linewidth=1)
        ax.set_yticks(ys)
        ax.set_yticklabels(names, fontsize=7)
        ax.set_title("paired differences, 95 % CI (points)")
        ax.grid(axis="x", alpha=0.3)
    return _png(fig, axes[0], title, ncol=7)


def curve_table(curves: dict[str, dict[int, dict]], labels: dict[str, str], metric: str = "swap") -> str:
    """Markdown: one row per evaluated step, one column per variant (``metric`` in %)."""
    steps = sorted({step for curve in curves.values() for step in curve})
    lines = ["| step | " + " | ".join(labels[v] for v in curves) + " |", "|---:|" + "---:|" * len(curves)]
    for step in steps:
        cells = [f"{curves[v][step][metric]:.1f}" if step in curves[v] else "" for v in curves]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_chart(curves: dict[str, dict[int, dict]], labels: dict[str, str], chance: float, title: str = "") -> bytes:
    """PNG bytes: swap, swap_obj and swap_att (%) against fine-tuning steps, one line per variant."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for ax, metric in zip(axes, ("swap", "swap_obj", "swap_att")):
        for variant, curve in curves.items():
            steps = sorted(curve)
            ax.plot(steps, [curve[s][metric] for s in steps], marker="o", markersize=3, label=labels[variant])
        ax.axhline(chance, color="black", linestyle=":", linewidth=1.2, label="chance")
        ax.set_title(metric)
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy (%)")
    return _png(fig, axes[0], title)


# ---------------------------------------------------------------------------------------------- driver

def _log_run(names: list[str]):
    """``train_and_evaluate``'s ``on_done``: one line per finished run (``names[i]``), its main metrics."""
    def done(i: int, metrics: dict, seconds: float | None) -> None:
        took = "reused" if seconds is None else f"{seconds:.0f} s"
        log(f"  {names[i]}: swap {metrics['swap']:.1f}, compositional {metrics['compositional_avg']:.1f}, zero-shot "
            f"{metrics['zeroshot_avg']:.1f}, train pairwise {metrics[TRAIN_METRIC]:.1f} ({took})")

    return done


def run_experiment(settings: Settings, output: str | Path, progress: bool = False) -> dict:
    """Run (or resume) the whole experiment into ``output``; returns the results dict also saved as JSON."""
    import torch

    settings.validate()
    output = check_output_folder(output, "--output")
    previous_threads = torch.get_num_threads()
    # The fine-tunes run `jobs` processes side by side: each gets its share of the cores.
    threads = set_threads(settings.threads, processes=settings.jobs)
    try:
        return _run_experiment(settings, output, progress, threads)
    finally:
        torch.set_num_threads(previous_threads)


def _run_experiment(settings: Settings, output: Path, progress: bool, threads: str) -> dict:
    import torch

    from . import stages

    started = time.perf_counter()
    timings = {}
    log(f"experiment: {threads} per process, {settings.jobs} fine-tuning process(es) at a time")
    log(f"[1/3] synthetic world and start point -> {output}")
    t0 = time.perf_counter()
    data, start, depends = prepare(settings, output, progress)
    timings["prepare_s"] = time.perf_counter() - t0
    baseline = stages.eval_stage(start, data, settings.split, device=settings.device)

    keys = [(v, s) for v in settings.variants for s in settings.seeds]
    jobs = [(output / "runs" / f"{v}-seed{s}", finetune_fields(settings, data, start, v, s, curve=s == settings.seeds[0]),
             {**depends, "start": str(start)}, data, settings.split) for v, s in keys]
    log(f"[2/3] {len(jobs)} fine-tuning runs ({len(settings.variants)} variants x {len(settings.seeds)} seeds, "
        f"{settings.jobs} at a time)")

    t0 = time.perf_counter()
    results = dict(zip(keys, stages.train_and_evaluate(jobs, settings.jobs, torch.get_num_threads(), settings.device,
                                                       _log_run([f"{v}-seed{s}" for v, s in keys]))))
    timings["finetune_s"] = time.perf_counter() - t0
    curves = {}
    if settings.curve_every:
        t0 = time.perf_counter()
        first = settings.seeds[0]
        log(f"  learning curves: seed {first}'s checkpoints every {settings.curve_every} steps on {settings.split}")
        curves = {v: {0: baseline, **stages.curve_stage(output / "runs" / f"{v}-seed{first}", data, settings.split,
                                                         device=settings.device)}
                  for v in settings.variants}
        timings["curves_s"] = time.perf_counter() - t0

    log("[3/3] summary")
    per_seed = {BASELINE: [baseline], **{v: [results[v, s] for s in settings.seeds] for v in settings.variants}}
    labels = {BASELINE: "start point (CLIP pre-training)", **{v: label for v, (label, _) in VARIANTS.items()}}
    summary = summarize(per_seed)
    rows = contrasts(per_seed)
    chance = stages.chance_levels(data)
    timings["total_s"] = time.perf_counter() - started
    # The loss record holds the weights the variants use (K is the settings' num_negatives).
    record = {**asdict(settings), "loss": {name: getattr(settings.loss, name) for name in LOSS_WEIGHTS}}
    out = {"settings": record, "summary": summary, "per_seed": per_seed, "contrasts": rows,
           "chance": chance, "timings": timings, "curves": curves}
    table, diffs = markdown(summary, labels, chance), contrast_table(rows)
    if curves:
        diffs += (f"\n\nLearning curves (seed {settings.seeds[0]}, {settings.split} split, swap %; step 0 is the start "
                  f"point):\n\n{curve_table(curves, labels)}\n\n![learning curves](curves.png)")
        write_bytes_atomic(output / "curves.png", curve_chart(curves, labels, chance.get("swap", 50.0),
                                                             f"seed {settings.seeds[0]}, {settings.split} split"))
    seeds = ", ".join(map(str, settings.seeds))
    head = (f"Synthetic ablation on the **{settings.split}** split: {settings.model}, pre-trained "
            f"{settings.pretrain_steps} steps (lr {settings.pretrain_lr:g}) with the CLIP loss on the broad "
            f"distribution, fine-tuned {settings.finetune_steps} steps (lr {settings.finetune_lr:g}, batch "
            f"{settings.batch_size}, K={settings.num_negatives}, IGC/TGC {settings.loss.igc_weight:g}/{settings.loss.tgc_weight:g}, "
            f"distillation {settings.loss.distill_weight:g}, EMA decay {settings.ema_decay:g}) on the narrow one; seeds "
            f"{seeds}; mean ± sample std over seeds; accuracies in %.")
    write_bytes_atomic(output / "results.md", (
        f"{head}\n\n{table}\n\n{diffs}\n\nWall time: {timings['total_s']:.0f} s (this invocation; reused stages "
        f"count 0).\n").encode())
    write_bytes_atomic(output / "results.png", bar_chart(summary, labels, chance, rows,
                                                         f"{settings.split} split, seeds {seeds}"))
    write_json_atomic(output / "results.json", out)
    print(table)
    print()
    print(diffs)
    print(f"wrote {output / 'results.md'}, {output / 'results.png'}, {output / 'results.json'} "
          f"({timings['total_s']:.0f} s)")
    return out


# ---------------------------------------------------------------------------------------------- sweep

#: the variants every sweep point is compared with: DeGLA without distillation (its swap is the
#: target) and NegCLIP (its zero-shot accuracy is the floor)
SWEEP_REFERENCES = ("negclip", "igc_tgc")
SWEEP_METRICS = ("swap", "compositional_avg", "zeroshot_avg")


def run_sweep(settings: Settings, output: str | Path, weights: list[float], decays: list[float],
              progress: bool = False) -> dict:
    """DeGLA at every (distillation weight, EMA decay) of ``weights`` x ``decays`` beside NegCLIP and
    +IGC+TGC, each for ``settings.seeds`` on ``settings.split`` (choose on ``val``), from the same
    cached start point as :func:`run_experiment` into the same ``output`` (its runs are reused
    where their settings match). Writes ``sweep.md``, ``sweep.png`` (swap and zero-shot against the
    distillation weight, one line per decay) and ``sweep.json``; returns the JSON's dict."""
    import torch

    from . import stages

    settings.validate()
    if not weights or not decays or any(not 0 <= w for w in weights) or any(not 0 <= d < 1 for d in decays):
        raise ConfigError("--sweep-distill / --sweep-decay: weights >= 0 and decays in [0, 1), at least one of each")
    output = check_output_folder(output, "--output")
    previous_threads = torch.get_num_threads()
    threads = set_threads(settings.threads, processes=settings.jobs)
    try:
        started = time.perf_counter()
        log(f"sweep: {threads} per process, {settings.jobs} fine-tuning process(es) at a time")
        data, start, depends = prepare(settings, output, progress)
        stamp = {**depends, "start": str(start)}
        keys, jobs = [], []
        for seed in settings.seeds:
            curve = seed == settings.seeds[0]  # the fields run_experiment gives them: its runs are reused
            for v in SWEEP_REFERENCES:
                keys.append((v, seed))
                jobs.append((output / "runs" / f"{v}-seed{seed}", finetune_fields(settings, data, start, v, seed, curve),
                             stamp, data, settings.split))
            for d in decays:
                for w in weights:
                    point = replace(settings, loss=replace(settings.loss, distill_weight=w), ema_decay=d)
                    keys.append((f"degla w={w:g} d={d:g}", seed))
                    jobs.append((output / "runs" / f"degla-w{w:g}-d{d:g}-seed{seed}",
                                 finetune_fields(point, data, start, "degla", seed), stamp, data, settings.split))
        log(f"{len(jobs)} fine-tuning runs ({len(weights)} weights x {len(decays)} decays + "
            f"{len(SWEEP_REFERENCES)} references, x {len(settings.seeds)} seeds)")

        results = stages.train_and_evaluate(jobs, settings.jobs, torch.get_num_threads(), settings.device,
                                            _log_run([f"{name} seed {seed}" for name, seed in keys]))
    finally:
        torch.set_num_threads(previous_threads)
    per_point: dict[str, list[dict]] = {}
    for (name, _), metrics in zip(keys, results):
        per_point.setdefault(name, []).append(metrics)
    summary = summarize(per_point)
    points = [{"weight": w, "decay": d, "name": f"degla w={w:g} d={d:g}"} for d in decays for w in weights]
    out = {"settings": {**asdict(settings), "loss": {n: getattr(settings.loss, n) for n in LOSS_WEIGHTS}},
           "weights": weights, "decays": decays, "points": points, "summary": summary, "per_seed": per_point,
           "seconds": time.perf_counter() - started}
    lines = ["| run | " + " | ".join(_label(m) for m in SWEEP_METRICS) + " |", "|---|" + "---:|" * len(SWEEP_METRICS)]
    for name in [VARIANTS[v][0] for v in SWEEP_REFERENCES] + [p["name"] for p in points]:
        key = next((v for v in SWEEP_REFERENCES if VARIANTS[v][0] == name), name)
        lines.append(f"| {name} | " + " | ".join(_mean_std(summary[key][m]) for m in SWEEP_METRICS) + " |")
    seeds = ", ".join(map(str, settings.seeds))
    head = (f"DeGLA's distillation weight (w) and EMA decay (d) on the **{settings.split}** split, fine-tuned "
            f"{settings.finetune_steps} steps, seeds {seeds} (mean ± sample std over seeds), accuracies in %.")
    write_bytes_atomic(output / "sweep.md", f"{head}\n\n" .encode() + "\n".join(lines).encode() +
                       b"\n\n![sweep](sweep.png)\n")
    write_bytes_atomic(output / "sweep.png", sweep_chart(summary, points, weights, decays, head.replace("**", "")))
    write_json_atomic(output / "sweep.json", out)
    print("\n".join(lines))
    print(f"wrote {output / 'sweep.md'}, {output / 'sweep.png'}, {output / 'sweep.json'} ({out['seconds']:.0f} s)")
    return out


def _mean_std(s: dict) -> str:
    return f"{s['mean']:.1f}" if s["n"] == 1 else f"{s['mean']:.1f} ± {s['std']:.1f}"


def sweep_chart(summary: dict, points: list[dict], weights: list[float], decays: list[float], title: str) -> bytes:
    """PNG bytes: swap and zero-shot average against the distillation weight, one line per decay,
    NegCLIP and +IGC+TGC as horizontal lines (the two targets)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, ("swap", "zeroshot_avg")):
        for d in decays:
            ys = [summary[p["name"]][metric]["mean"] for w in weights for p in points if p["weight"] == w and p["decay"] == d]
            ax.plot(weights, ys, marker="o", label=f"DeGLA, decay {d:g}")
        for v, style in zip(SWEEP_REFERENCES, ("--", ":")):
            ax.axhline(summary[v][metric]["mean"], color="grey", linestyle=style, label=VARIANTS[v][0])
        ax.set_xlabel("distillation weight")
        ax.set_title(_label(metric) + " (%)")
        ax.grid(alpha=0.3)
    return _png(fig, axes[0], title, top=0.95)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``degla-fast experiment``."""
    defaults = Settings()
    parser.add_argument("--output", default="runs/experiment", help="output folder (default runs/experiment)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run with tiny sizes")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help=f"fine-tuning seeds ({defaults.seeds})")
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help=f"subset of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--split", default=None, help="val (choosing settings) or test (reporting; default)")
    for name in ("images", "pretrain_images", "eval_items", "zeroshot_items", "batch_size", "num_negatives",
                 "pretrain_steps", "finetune_steps", "warmup_steps", "curve_every", "threads", "jobs", "data_seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help="CPU threads per process (default: OMP_NUM_THREADS when set, else the cores this "
                                 "process may use divided by --jobs)" if name == "threads" else
                            f"default {getattr(defaults, name)}")
    for name in ("pretrain_lr", "finetune_lr", "ema_decay"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=None,
                            help=f"default {getattr(defaults, name)}")
    for name in LOSS_WEIGHTS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=None,
                            help=f"default {getattr(defaults.loss, name)}")
    parser.add_argument("--device", default=None, help="cpu or cuda (default cpu)")
    parser.add_argument("--sweep-distill", type=float, nargs="+", default=None, metavar="W",
                        help="instead of the ablation: DeGLA at each of these distillation weights (and each "
                             "--sweep-decay) beside NegCLIP and +IGC+TGC; writes sweep.md/.png/.json")
    parser.add_argument("--sweep-decay", type=float, nargs="+", default=None, metavar="D",
                        help="the EMA decays of --sweep-distill (default: --ema-decay's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings: defaults, then ``--quick`` sizes, then explicit flags."""
    settings = Settings(**(QUICK if args.quick else {}))
    for name in [f.name for f in fields(settings) if f.name != "loss"]:
        value = getattr(args, name, None)
        if value is not None:
            setattr(settings, name, value)
    weights = {name: getattr(args, name) for name in LOSS_WEIGHTS if getattr(args, name, None) is not None}
    settings.loss = replace(settings.loss, **weights)  # LossSpec checks them (>= 0)
    return settings


def run(args: argparse.Namespace) -> int:
    """``degla-fast experiment``: returns 0."""
    settings = settings_from_args(args)
    if args.sweep_distill is not None or args.sweep_decay is not None:
        run_sweep(settings, args.output, args.sweep_distill or [settings.loss.distill_weight],
                  args.sweep_decay or [settings.ema_decay], progress=not args.no_progress)
    else:
        run_experiment(settings, args.output, progress=not args.no_progress)
    return 0
