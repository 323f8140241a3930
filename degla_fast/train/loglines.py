"""The plain lines a run prints when stdout is not a terminal (a job log: SLURM, nohup, ``> log``).

Where a terminal gets the progress bar, a log file gets a start line (what runs, on what, where
to), one line per metrics row (every ``log_every`` steps) and one per checkpoint written; the
closing summary is :func:`degla_fast.train.main.run`'s, printed in both cases. The lines are built
from values the host already holds (the metrics row of the ``log_every`` read, the config): they
read nothing from the device.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..functional import _resolve_for

if TYPE_CHECKING:
    from .builder import Run

PREFIX = "degla-fast train:"
#: The loss terms of a metrics row, in the order they are printed.
TERMS = ("loss", "clip", "igc", "tgc", "distill")


def clock(seconds: float) -> str:
    """``H:MM:SS`` for a duration in seconds."""
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def loss_backend(run: "Run") -> str:
    """The loss backend this run's batches get: the loss's own per-call rule
    (:func:`degla_fast.functional._resolve_for`) on the shapes, dtype and device of one batch's
    features, with the run's loss settings."""
    config, world = run.config, run.info.world_size
    rows = config.data.batch_size
    # Only shapes, dtype and device count: empty rows of width 0 stand for the features, which
    # reach the loss in the forward's autocast dtype (train_step).
    dtype = run.parts.autocast_dtype or torch.float32
    image = torch.empty((rows, 0), device=run.device, dtype=dtype)
    text = torch.empty((rows * (1 + config.loss.num_negatives), 0), device=run.device, dtype=dtype)
    return _resolve_for(config.loss, image, text, world)


def start_line(run: "Run", resumed_from: Path | None) -> str:
    """What the run is: model, data, batch, K, loss backend, precision, processes, output, length;
    where it resumed from (``resumed_from``: the checkpoint, None on a fresh start)."""
    config, info = run.config, run.info
    batch = config.data.batch_size
    line = (f"{PREFIX} start: model {run.model_name}, data {config.data.path} ({run.data.num_samples} samples, "
            f"{len(run.data)} steps per epoch), batch {batch} per process ({batch * info.world_size} in all), "
            f"K={config.loss.num_negatives}, loss backend {loss_backend(run)} (asked: {config.loss.backend}), "
            f"precision {config.precision}, world size {info.world_size}, device {run.device}, output "
            f"{config.output}, {run.total_steps} steps")
    if resumed_from is not None:
        line += f"; resumed from step {run.start[0]} of checkpoint {resumed_from}"
    return line


def step_line(row: dict, total_steps: int) -> str:
    """One metrics row as a line: step/total, samples/s, each loss term, lr, logit scale, ETA
    (the remaining steps at the mean step time since the previous row)."""
    step = row["step"]
    terms = " ".join(f"{name} {row[name]:.4g}" for name in TERMS)
    eta = clock((total_steps - step) * row["time_step"])
    return (f"{PREFIX} step {step}/{total_steps} ({100 * step / total_steps:.0f}%) | {row['samples_per_s']:.1f} "
            f"samples/s | {terms} | lr {row['lr']:.3g} | logit scale {row['logit_scale']:.2f} | ETA {eta}")


def checkpoint_line(step: int, path: Path) -> str:
    return f"{PREFIX} step {step}: checkpoint written to {path}"
