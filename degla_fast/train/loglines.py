"""The plain lines a run prints when stdout is not a terminal (a job log: SLURM, nohup, ``> log``).

Each is printed behind the local time (:func:`degla_fast.console.stamped`, by the metrics
logger's ``say``), so that a job's log can be timed and a hung job seen; this module builds the
text after the time.

Where a terminal gets the progress bar, a log file gets a start line (what runs, on what, where
to), one line per metrics row (every ``log_every`` steps) and one per checkpoint written; the
closing summary is :func:`degla_fast.train.main.run`'s, printed in both cases; the start line
(:func:`degla_fast.train.main.start_line`) is built where the run is, so that this module, which
the metrics logger uses, does not import the builder. The lines are built
from values the host already holds (the metrics row of the ``log_every`` read, the config): they
read nothing from the device.
"""
from __future__ import annotations

from pathlib import Path

PREFIX = "degla-fast train:"
#: The loss terms of a metrics row, in the order they are printed.
TERMS = ("loss", "clip", "igc", "tgc", "distill")


def clock(seconds: float) -> str:
    """``H:MM:SS`` for a duration in seconds."""
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def step_line(row: dict, total_steps: int) -> str:
    """One metrics row as a line: step/total, epoch, samples/s, each loss term, lr, logit scale,
    ETA (the remaining steps at the mean step time since the previous row)."""
    step = row["step"]
    terms = " ".join(f"{name} {row[name]:.4g}" for name in TERMS)
    eta = clock((total_steps - step) * row["time_step"])
    return (f"{PREFIX} step {step}/{total_steps} ({100 * step / total_steps:.0f}%) epoch {row['epoch']} | "
            f"{row['samples_per_s']:.1f} "
            f"samples/s | {terms} | lr {row['lr']:.3g} | logit scale {row['logit_scale']:.2f} | ETA {eta}")


def checkpoint_line(step: int, path: Path) -> str:
    return f"{PREFIX} step {step}: checkpoint written to {path}"
