"""Where training metrics go: ``OUTPUT/metrics.jsonl`` (always), a progress bar (stderr a
terminal) or plain lines (stdout not a terminal, :mod:`.loglines`), TensorBoard or wandb.

Only rank 0 creates a :class:`MetricsLogger`; rows hold plain numbers (means over ranks are
taken by the caller).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..console import progress_bar, stamped
from ..errors import ConfigError
from ..io import write_text_atomic
from .loglines import step_line


def read_metrics(path: Path) -> list[dict]:
    """All rows of a ``metrics.jsonl`` file (an empty list when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class MetricsLogger:
    """Rows to ``metrics.jsonl`` (one JSON object per line, flushed per row), plus an optional
    progress bar and TensorBoard/wandb writer.

    ``resume_step``: on resume, rows logged after that step (by the interrupted run, past its last
    checkpoint) are dropped so that the file reads as one uninterrupted run. ``lines``: print each
    row and :meth:`say`'s lines on stdout (default: when stdout is not a terminal, a job's log).
    """

    def __init__(self, output: Path, *, total_steps: int, start_step: int = 0, resume_step: int | None = None,
                 progress: bool = True, report_to: str = "none", run_config: dict | None = None,
                 lines: bool | None = None):
        self.total_steps = total_steps
        self.lines = not sys.stdout.isatty() if lines is None else lines
        self.path = Path(output) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            write_text_atomic(self.path, "")
        else:
            kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        self._file = open(self.path, "a", encoding="utf-8")
        self.bar = None
        if progress and sys.stderr.isatty():  # (no bar object at all elsewhere: warnings then print plainly)
            self.bar = progress_bar(total_steps, initial=start_step, unit="step")
        self.writer = self.wandb = None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("report_to: 'tensorboard' needs the tensorboard package "
                                  "(pip install 'degla-fast[logging]')") from None
            self.writer = SummaryWriter(str(Path(output) / "tensorboard"))
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise ConfigError("report_to: 'wandb' needs the wandb package (pip install wandb)") from None
            self.wandb = wandb.init(dir=str(output), config=run_config or {}, resume="allow")

    def log(self, row: dict) -> None:
        """Write one row (must hold ``step``) everywhere it goes."""
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.lines:
            self.say(step_line(row, self.total_steps))
        step = row["step"]
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(f"train/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)

    def say(self, line: str) -> None:
        """``line`` on stdout, behind the time (:func:`~degla_fast.console.stamped`), when the run
        reports itself in lines (see ``lines``)."""
        if self.lines:
            print(stamped(line), flush=True)

    def advance(self, steps: int, postfix: dict | None = None) -> None:
        """Move the progress bar (if any) and show ``postfix``."""
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def warn(self, message: str) -> None:
        """A warning line, behind the time, that does not break the progress bar."""
        if self.bar is not None:
            self.bar.write(stamped(f"warning: {message}"), file=sys.stderr)
        else:
            print(stamped(f"warning: {message}"), file=sys.stderr, flush=True)

    def close(self) -> None:
        self._file.close()
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


@dataclass
class Window:
    """The steps since the last metrics row: where it started (step, time) and the data time in it."""

    logged: int
    start: float
    data_time: float = 0.0


def metrics_row(stats: dict, result, step: int, epoch: int, lr: float, window: "Window", now: float,
                 global_batch: int) -> dict:
    """A metrics row from the host's read of the counters: the last step's losses (means over
    ranks), and throughput and data time averaged over the steps since the previous row."""
    steps = max(1, step - window.logged)
    elapsed = now - window.start
    row = {"step": step, "epoch": epoch, "loss": stats["loss"], "clip": stats["clip"], "igc": stats["igc"],
           "tgc": stats["tgc"], "distill": stats["distill"], "lr": lr, "logit_scale": stats["logit_scale"],
           "samples_per_s": global_batch * steps / elapsed if elapsed > 0 else float("inf"),
           "time_data": window.data_time / steps, "time_step": elapsed / steps}
    row.update({f"time_{phase}": seconds for phase, seconds in result.times.items()})
    return row
