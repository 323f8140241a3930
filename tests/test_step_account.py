"""StepAccount: the step number is provisional between host reads; a read takes the skipped
steps back from it and from the schedule, which ``train_step`` advanced on every call."""
from __future__ import annotations

import torch

from degla_fast.loss import LossOutput
from degla_fast.train.distributed import DistInfo
from degla_fast.train.optim import build_scheduler
from degla_fast.train.step import StepResult
from degla_fast.train.step_account import StepAccount


def test_a_read_takes_skipped_steps_back_from_the_step_and_the_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, warmup_steps=10, total_steps=100)
    scheduler.last_epoch = 5  # resumed at step 5
    account = StepAccount(5, scheduler, torch.device("cpu"))
    zero = torch.zeros(())
    for applied in (True, False, False, True):
        optimizer.step()
        scheduler.step()  # as train_step does, skipped or not
        account.took(torch.tensor(applied))
    assert account.step == 9 and scheduler.last_epoch == 9  # provisional: every step counted
    result = StepResult(LossOutput(zero, zero, zero, zero, zero), torch.tensor(True), zero, {})
    stats = account.read(result, False, DistInfo())
    assert (stats["skipped"], stats["max_in_row"], stats["in_row"], stats["applied"]) == (2, 2, 0, True)
    assert account.step == 7 and scheduler.last_epoch == 7
    assert optimizer.param_groups[0]["lr"] == scheduler.get_last_lr()[0] == 0.8  # (7 + 1) / 10
    assert account.read(result, False, DistInfo())["skipped"] == 0 and account.step == 7
