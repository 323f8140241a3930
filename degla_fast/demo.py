"""``make train`` (``python -m degla_fast.demo``): the whole DeGLA story on a CPU in minutes.

1. render the synthetic world: a broad pre-training distribution and a narrow, relation-rich
   fine-tuning one with 5 hard negatives per caption (docs/synthetic.md);
2. pre-train the tiny CLIP (``degla-synth``) from random weights with the plain CLIP loss on the
   broad distribution: the stand-in for a web-pretrained CLIP (a bag-of-words start point);
3. fine-tune it twice on the narrow distribution, with NegCLIP (hard negatives only) and with
   DeGLA (hard negatives, IGC, TGC, EMA self-distillation);
4. print one table (start point, NegCLIP and DeGLA side by side, chance levels beside them) of
   held-out compositional accuracy, every zero-shot task, and the pairwise accuracy on the
   fine-tuning set's own hard negatives; write it with a bar chart (``OUTPUT/results.png``).

The recipe is the experiment's (:class:`degla_fast.experiment.Settings`, one seed); every stage is
a normal ``degla-fast`` run under ``OUTPUT/`` (default ``runs/demo``) cached by
:mod:`degla_fast.stages`: running the demo again reuses finished stages and resumes an interrupted one.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .errors import DeglaError

ROWS = (("compositional: swap objects", "swap_obj"), ("compositional: swap attributes", "swap_att"),
        ("compositional: swap", "swap"), ("compositional: replace", "replace"), ("compositional: add", "add"),
        ("compositional: average", "compositional_avg"))
TRAIN_ROW = ("train set's own hard negatives (pairwise)", "train_pairwise")


def settings(quick: bool):
    """The experiment's recipe with one seed (``quick``: seconds-long smoke sizes)."""
    from .experiment import QUICK, Settings

    if quick:
        return Settings(**{**QUICK, "pretrain_steps": 4, "finetune_steps": 3, "seeds": [0]})
    return Settings(seeds=[0])


def table(columns: dict[str, dict], chance: dict) -> str:
    """Markdown table: one row per metric, a chance column, then one column per model (percentages)."""
    names = list(columns)
    zs = [k for k in chance if k.startswith("zeroshot_") and k != "zeroshot_avg"]
    rows = list(ROWS) + [(f"zero-shot: {k[len('zeroshot_'):]}", k) for k in zs] + [("zero-shot: average", "zeroshot_avg"),
                                                                                   TRAIN_ROW]
    lines = ["| metric (accuracy %) | chance | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for label, key in rows:
        lines.append(f"| {label} | {chance[key]:.1f} | " + " | ".join(f"{columns[n][key]:.1f}" for n in names) + " |")
    return "\n".join(lines)


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    from .cli import HelpFormatter

    parser = argparse.ArgumentParser(prog="python -m degla_fast.demo", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--output", default="runs/demo", help="folder for the dataset, runs and table")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, meaningless numbers)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--jobs", type=int, default=2,
                        help="fine-tuning runs at a time, in separate processes (default 2: NegCLIP and DeGLA)")
    parser.add_argument("--threads", type=_positive, default=None,
                        help="CPU threads for torch per process (default: OMP_NUM_THREADS when set, else the "
                             "cores this process may use divided by --jobs; degla_fast/threads.py)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from . import stages
    from .console import log
    from .experiment import bar_chart, finetune_fields, pretrain_fields
    from .io import write_bytes_atomic, write_text_atomic
    from .threads import set_threads

    # The fine-tunes run --jobs processes side by side: each gets its share of the cores.
    threads = set_threads(args.threads, processes=max(1, args.jobs))
    s = settings(args.quick)
    progress = not args.no_progress
    out = Path(args.output)
    start = time.perf_counter()
    try:
        from .data.synthetic import VERSION

        log(f"make train: {threads} per process, {max(1, args.jobs)} fine-tuning process(es) at a time")
        log(f"[1/4] synthetic world (pre-training + fine-tuning distributions) -> {out / 'synth'}")
        data = stages.synth_stage(out / "synth", progress=progress, **s.data_sizes())
        depends = {"synthetic_version": VERSION, "data": s.data_sizes()}
        log(f"[2/4] pre-train {s.model} from random weights with the plain CLIP loss on the broad distribution "
            f"({s.pretrain_steps} steps) -> {out / 'pretrain'}")
        pre = stages.train_stage(out / "pretrain", pretrain_fields(s, data), progress=progress, depends=depends)
        seed = s.seeds[0]
        log(f"[3/4] fine-tune with NegCLIP and with DeGLA on the narrow distribution, side by side "
            f"({s.finetune_steps} steps, K={s.num_negatives}) -> {out / 'negclip'}, {out / 'degla'}")
        names = {"negclip": "NegCLIP", "degla": "DeGLA"}
        # DeGLA's run has the teacher's forward on top of NegCLIP's step: it ends last.
        jobs = [(out / v, {**finetune_fields(s, data, pre, v, seed), **stages.speed_fields(args.jobs, ends_last=v == "degla")},
                 {**depends, "start": str(pre)}, data, "test") for v in names]
        # The start point's evaluation is the pool's last job: it takes the core the first
        # fine-tune to finish frees.
        jobs.append((pre, None, {}, data, "test"))
        labels = [(names[v], "finished") for v in names] + [("start point on test", "evaluated")]

        def done(i: int, metrics: dict, seconds: float | None) -> None:
            name, verb = labels[i]
            log(f"  {name}: " + (f"reused ({jobs[i][0]})" if seconds is None else f"{verb} ({seconds:.0f} s)"))

        *finetuned, start_point = stages.train_and_evaluate(jobs, args.jobs, torch.get_num_threads(), "cpu", done)
        log("[4/4] the table: held-out test split")
        columns = {"start point (CLIP loss)": start_point, **{names[v]: m for v, m in zip(names, finetuned)}}
        chance = stages.chance_levels(data)
    except DeglaError as err:
        print(f"degla-fast demo: error: {err}", file=sys.stderr)
        return 2
    result = table(columns, chance)
    labels = {k: k for k in columns}
    summary = {k: {m: {"mean": v, "std": 0.0, "n": 1} for m, v in metrics.items()} for k, metrics in columns.items()}
    write_bytes_atomic(out / "results.png", bar_chart(summary, labels, chance, title="make train: one seed, test split"))
    note = (f"{s.model}: pre-trained {s.pretrain_steps} steps, fine-tuned {s.finetune_steps} steps (lr "
            f"{s.finetune_lr:g}, batch {s.batch_size}, K={s.num_negatives}, distillation {s.loss.distill_weight:g}, "
            f"EMA decay {s.ema_decay:g}); seed {seed}; held-out test split.")
    write_text_atomic(out / "results.md", f"{note}\n\n{result}\n")
    print(f"\n{note}\n\n{result}\n\n(table saved to {out / 'results.md'}, chart to {out / 'results.png'}; "
          f"{time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
