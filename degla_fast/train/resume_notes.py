"""What a resumed run changed from the checkpoint's run, said in one warning line each: the loss
(:func:`loss_changes`) and the learning-rate schedule (:func:`schedule_change`). Both are allowed;
the run's log says so (the checkpoint's ``config`` entry, :class:`.checkpoint_map.RunConfig`)."""
from __future__ import annotations

from pathlib import Path

from .config import TrainConfig
from .optim import cosine_with_warmup

# The loss settings a resumed run may change, with a warning: the loss changes from the resume step on.
_LOSS_FIELDS = ("num_negatives", "igc_weight", "tgc_weight", "distill_weight", "tgc_scale", "official_tgc_indexing")


def loss_changes(path: Path, saved: dict, loss, step: int) -> list[str]:
    """One warning line when ``loss`` (the run's LossSpec) differs from the loss the checkpoint
    ``path`` (its config ``saved``, written at ``step``) was trained with in any of
    :data:`_LOSS_FIELDS`; none otherwise, or when the checkpoint holds no config (or lacks a field)."""
    saved = saved.get("loss") or {}
    changed = [name for name in _LOSS_FIELDS if name in saved and saved[name] != getattr(loss, name)]
    if not changed:
        return []
    was = ", ".join(f"{name}={saved[name]}" for name in changed)
    now = ", ".join(f"{name}={getattr(loss, name)}" for name in changed)
    return [f"resume: {path} was trained with {was}; this run uses {now} from step {step + 1} on"]


def schedule_change(path: Path, saved: dict, config: TrainConfig, scheduler, step: int, *, total_steps: int,
                    steps_per_epoch: int) -> list[str]:
    """One warning line when this run's learning-rate schedule (its length ``total_steps``, warm-up
    or final ratio) differs from the one the checkpoint ``path`` (its config ``saved``, written at
    ``step``) was trained under: what the learning rate is at the first resumed step, under each
    (``scheduler``: this run's, restored), and where it goes now. None when the schedule is the
    same, or the checkpoint holds no config. ``steps_per_epoch``: what the checkpoint's ``epochs``
    meant."""
    optim = saved.get("optim") or {}
    if not saved or not optim:
        return []
    old_total = int(saved.get("max_steps") or 0) or int(saved.get("epochs", 0)) * steps_per_epoch
    old = (old_total, optim.get("warmup_steps"), optim.get("min_lr_ratio"))
    new = (total_steps, config.optim.warmup_steps, config.optim.min_lr_ratio)
    if old == new or not old_total:
        return []
    base = scheduler.base_lrs[0]
    was = base * cosine_with_warmup(step, warmup_steps=old[1], total_steps=old_total, min_ratio=old[2])
    now = scheduler.get_last_lr()[0]
    length = (f"was scheduled for {old_total} steps, this run for {total_steps}" if old_total != total_steps
              else f"was scheduled with warm-up {old[1]} and min_lr_ratio {old[2]}, this run with {new[1]} and "
                   f"{new[2]}")
    return [f"resume: {path} {length}: the learning rate at step {step + 1} is {now:.3g} (the old schedule's "
            f"{was:.3g}) and follows the cosine to {base * config.optim.min_lr_ratio:.3g} at step {total_steps}"]
