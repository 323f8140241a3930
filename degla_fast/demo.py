"""``make train`` (``python -m degla_fast.demo``): the whole DeGLA story on a CPU in minutes.

1. render the synthetic compositional dataset (coloured shapes in spatial relations);
2. pre-train the tiny CLIP (``degla-tiny``) from random weights with the plain CLIP loss: the
   stand-in for a pretrained CLIP;
3. fine-tune it with DeGLA (4 hard negatives per caption, IGC, TGC, EMA self-distillation);
4. print a before/after table of compositional accuracy (held-out swap / replace / add choices)
   and zero-shot accuracy (shape and colour classification).

Every stage is a normal ``degla-fast`` run under ``OUTPUT/`` (default ``runs/demo``); running
the demo again reuses finished stages and resumes an interrupted one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import DeglaError


@dataclass
class DemoSettings:
    """Sizes of the demo (defaults: a few minutes on 2 CPU cores)."""

    images: int = 2000
    eval_items: int = 200
    zeroshot_items: int = 40
    batch_size: int = 32
    pretrain_steps: int = 600
    pretrain_lr: float = 1e-3
    finetune_steps: int = 150
    finetune_lr: float = 5e-5
    num_negatives: int = 4
    seed: int = 0


QUICK = DemoSettings(images=64, eval_items=4, zeroshot_items=2, batch_size=8, pretrain_steps=4, finetune_steps=3)


def _synth(folder: Path, s: DemoSettings, progress: bool) -> Path:
    """The dataset in ``folder``, rendered unless the same one is already there."""
    from .data.synthetic import VERSION, generate
    from .io import write_text_atomic

    stamp = {"version": VERSION, "images": s.images, "eval_items": s.eval_items, "zeroshot_items": s.zeroshot_items, "seed": s.seed}
    stamp_file = folder / "demo-stamp.json"
    if not (stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp):
        generate(folder, s.images, s.seed, eval_items=s.eval_items, zeroshot_items=s.zeroshot_items,
                 progress=progress)
        write_text_atomic(stamp_file, json.dumps(stamp))
    return folder


def _train_stage(output: Path, data: Path, s: DemoSettings, *, pretrained: str | None, negatives: bool,
                 progress: bool) -> Path:
    """One training run; ``resume: latest`` makes a finished run a no-op and an interrupted one continue."""
    from .train.config import load_config
    from .train.main import train

    steps = s.finetune_steps if negatives else s.pretrain_steps
    config = load_config(None, {
        "data.path": str(data / "train.json"), "data.batch_size": s.batch_size, "data.num_workers": 0,
        "data.pipeline": "torch", "model.name": "degla-tiny", "model.pretrained": pretrained or "none",
        "loss.num_negatives": s.num_negatives if negatives else 0,
        "optim.lr": s.finetune_lr if negatives else s.pretrain_lr,
        "optim.warmup_steps": max(1, min(50, steps // 10)),
        "epochs": 10_000, "max_steps": steps, "seed": s.seed, "precision": "fp32", "device": "cpu",
        "output": str(output), "resume": "latest", "save_every": max(1, steps // 4), "keep_last": 1,
        "log_every": 10 if steps >= 10 else 1, "progress": progress, "profile_phases": False,
    })
    train(config)
    return output


def _evaluate(run: Path, data: Path) -> dict:
    """Synthetic metrics of ``run``'s newest checkpoint, cached next to it."""
    from .model import load_model
    from .model import resolve_checkpoint
    from .io import write_text_atomic

    checkpoint = resolve_checkpoint(run)
    cache = run / "demo-eval.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("checkpoint") == checkpoint.name:
            return cached["metrics"]
    from .evaluate.synthetic import evaluate_synthetic

    metrics = evaluate_synthetic(load_model(None, checkpoint), data, device="cpu")
    write_text_atomic(cache, json.dumps({"checkpoint": checkpoint.name, "metrics": metrics}, indent=1))
    return metrics


def table(before: dict, after: dict) -> str:
    """Markdown before/after table of the synthetic metrics (percentages)."""
    rows = [("compositional: swap", "swap"), ("compositional: replace", "replace"), ("compositional: add", "add"),
            ("compositional: average", "compositional_avg"), ("zero-shot: shape", "zeroshot_shape"),
            ("zero-shot: colour", "zeroshot_colour"), ("zero-shot: average", "zeroshot_avg")]
    lines = ["| metric (accuracy %) | before (CLIP loss) | after (DeGLA) | change |", "|---|---:|---:|---:|"]
    for label, key in rows:
        lines.append(f"| {label} | {before[key]:.1f} | {after[key]:.1f} | {after[key] - before[key]:+.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m degla_fast.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/demo", help="folder for the dataset, runs and table")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, meaningless numbers)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: the tiny model gains little from more, and "
                             "spinning threads cost much when other work shares the cores)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(max(1, args.threads))
    settings = QUICK if args.quick else DemoSettings()
    progress = not args.no_progress
    out = Path(args.output)
    start = time.perf_counter()
    try:
        print(f"[1/4] synthetic dataset -> {out / 'synth'}", flush=True)
        data = _synth(out / "synth", settings, progress)
        print(f"[2/4] pre-train degla-tiny with the plain CLIP loss ({settings.pretrain_steps} steps) "
              f"-> {out / 'pretrain'}", flush=True)
        pre = _train_stage(out / "pretrain", data, settings, pretrained=None, negatives=False, progress=progress)
        print(f"[3/4] fine-tune with DeGLA ({settings.finetune_steps} steps, K={settings.num_negatives}) "
              f"-> {out / 'degla'}", flush=True)
        post = _train_stage(out / "degla", data, settings, pretrained=str(pre), negatives=True, progress=progress)
        print("[4/4] evaluate on held-out compositional and zero-shot sets", flush=True)
        result = table(_evaluate(pre, data), _evaluate(post, data))
    except DeglaError as err:
        print(f"degla-fast demo: error: {err}", file=sys.stderr)
        return 2
    from .io import write_text_atomic

    write_text_atomic(out / "results.md", result + "\n")
    print(f"\n{result}\n\n(table saved to {out / 'results.md'}; {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
