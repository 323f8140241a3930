"""The run's step number and its skipped steps, owned by one object: :class:`StepAccount`."""
from __future__ import annotations

import torch

from .distributed import sum_across
from .optim import rewind_scheduler


class StepAccount:
    """The step number, the device-side skip counters, and their correction at each host read.

    The invariant: ``step`` is the number of optimiser steps applied as of the host's last
    :meth:`read`, plus every step taken since (:meth:`took`), each counted as applied, because
    whether the device skipped a step (a non-finite loss, the loss scaler's inf/NaN gradients) is
    only known at the next read; ``train_step`` steps the schedule on every call, skipped or
    not. :meth:`read` takes the steps skipped since the last read back from ``step`` and from the
    schedule, so right after a read (a log step, a save: the only places the host reads the
    device, every ``log_every`` steps) ``step`` counts applied steps only and the schedule has
    advanced once per applied step: metrics rows and checkpoints, written right after a read, name
    that step.

    The counters live on the device: steps skipped since the last read, the current and the
    longest run of consecutive skips. Updating them is three tiny device ops per step; reading
    them (with the losses and the stop flags) is one all-reduce and one ``tolist``.
    """

    def __init__(self, step: int, scheduler, device: torch.device):
        self.step, self.scheduler = step, scheduler
        self.skipped = torch.zeros((), device=device)
        self.in_row = torch.zeros((), device=device)
        self.max_in_row = torch.zeros((), device=device)

    def took(self, applied: torch.Tensor) -> None:
        """One step taken, ``applied`` (a 0-d bool tensor on the device) telling whether it was."""
        skip = (~applied).float()
        self.skipped += skip
        self.in_row.add_(skip).mul_(skip)
        torch.maximum(self.max_in_row, self.in_row, out=self.max_in_row)
        self.step += 1

    def read(self, result, stopping: bool, info) -> dict:
        """The host's view (one sync): mean losses over ranks, the counters (the same on every
        rank), whether the last step was applied and whether any rank got a stop signal; the
        skipped steps are taken back (see the class doc), then the interval counters start again."""
        losses = result.losses
        values = torch.stack([losses.total, losses.clip, losses.igc, losses.tgc, losses.distill,
                              result.logit_scale, self.skipped, self.max_in_row, self.in_row,
                              (~result.applied).float(), torch.full_like(self.skipped, float(stopping))]).float()
        values = sum_across(values, info).tolist()
        n = info.world_size
        self.skipped.zero_()
        self.max_in_row.copy_(self.in_row)
        names = ("loss", "clip", "igc", "tgc", "distill", "logit_scale")
        stats = {name: v / n for name, v in zip(names, values)}
        stats.update(skipped=round(values[6] / n), max_in_row=round(values[7] / n), in_row=round(values[8] / n),
                     applied=values[9] == 0, stop=values[10] > 0)
        if stats["skipped"]:
            self.step -= stats["skipped"]
            rewind_scheduler(self.scheduler, stats["skipped"])
        return stats
