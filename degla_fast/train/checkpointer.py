"""The one owner of a run's checkpoints: what a training checkpoint holds, writing it, and
restoring a run from it (the file format itself: :mod:`degla_fast.checkpoint`).

A run hands the checkpointer a map of named stateful parts (torchtitan's pattern): each entry is
saved under its name from its ``state_dict()`` and restored by its ``load_state_dict(saved)``, so
save and restore mirror each other by construction. The entries (:meth:`Checkpointer.states`):
``model_name``, ``pretrained``, ``config`` (facts, checked where they matter), ``student``,
``teacher``, ``optimizer`` (or, under DeepSpeed, the engine's own folder named by ``deepspeed``),
``scheduler``, ``scaler``; the checkpointer itself adds the data position ``step``, ``epoch``,
``batch``, the RNG (``rng``, one entry per rank) and ``world_size``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from .. import checkpoint as files
from ..errors import ConfigError, DataError
from . import distributed as dist_utils
from .config import TrainConfig, to_dict
from .optim import apply_schedule, cosine_with_warmup
from .step import StepParts

# Every part's key in the file, in the file's order (a part a run lacks is saved as None).
_PARTS = ("model_name", "pretrained", "student", "teacher", "optimizer", "scheduler", "scaler")


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, saved: Any) -> None: ...


class Checkpointer:
    """Checkpoints of the run in ``folder`` (``OUTPUT/checkpoints``).

    ``resume`` (``None``, ``"latest"`` or a path, see :func:`degla_fast.checkpoint.find_resume`)
    is read once here; :meth:`restore_weights` and :meth:`restore_state` take what they need from
    it, and :meth:`restore_state` lets it go. ``keep_last``: checkpoints kept on disk. Every
    method is a collective under DeepSpeed and DDP: every rank calls it.
    """

    def __init__(self, folder: Path, resume: str | None, info: dist_utils.DistInfo, *, keep_last: int):
        self.folder, self.info, self.keep_last = Path(folder), info, keep_last
        self.saving_step = 0  # the step save() is writing (it names the DeepSpeed engine's folder)
        self.resume_path = files.find_resume(resume, self.folder)
        self._state = files.load_checkpoint(self.resume_path) if self.resume_path is not None else None
        # The newest checkpoint of this run and its step (the resume point's until the first save).
        self.last_path: Path | None = self.resume_path
        self.last_step: int | None = int(self._state["step"]) if self._state is not None else None
        self.notes: list[str] = []  # warnings about the resume (restore_state), for the run's log
        written_by = self._state.get("world_size", 1) if self._state is not None else info.world_size
        if written_by != info.world_size:
            # The data position (epoch, batch) and the sharded engine state are per world size.
            raise ConfigError(f"resume: {self.resume_path} was written by {written_by} processes, this run has "
                              f"{info.world_size}; resume with the same number, or start a new run with "
                              f"--pretrained {self.resume_path}")

    @property
    def resuming(self) -> bool:
        return self.resume_path is not None

    def restore_weights(self, student: torch.nn.Module, model_name: str) -> None:
        """The student's weights from the resume checkpoint (before any wrapping); nothing on a
        fresh start. ``model_name``: the configured open_clip model; a checkpoint of another model
        (or weights that do not fit it) is a one-line error naming both."""
        if self._state is None:
            return
        saved = self._state.get("model_name")
        if isinstance(saved, str) and saved.replace("/", "-") != model_name.replace("/", "-"):
            raise ConfigError(f"resume: {self.resume_path} holds a {saved!r} model, this run is configured for "
                              f"{model_name!r}; resume it with --model {saved} (model.name)")
        from ..model import load_student

        load_student(student, self._state["student"], self.resume_path, model_name)

    def states(self, parts: StepParts, student: torch.nn.Module, *, model_name: str,
               config: TrainConfig) -> dict[str, Stateful]:
        """The run's map of named stateful parts, in the order they are restored (the teacher
        before the optimiser or engine, as they always were). ``student``: the bare model."""
        facts = {"model_name": _Fact(model_name), "pretrained": _Fact(config.model.pretrained),
                 "config": _Fact(to_dict(config))}
        states: dict[str, Stateful] = {**facts, "student": _Student(student, self.info, parts.engine is not None)}
        if parts.teacher is not None:
            states["teacher"] = _IfSaved(parts.teacher)  # a Teacher keeps (and filters) its own state
        if parts.engine is not None:
            states["deepspeed"] = _EngineFolder(parts.engine, self)
        else:
            states["optimizer"] = _Optimizer(parts.optimizer, self.resume_path)
        states["scheduler"] = parts.scheduler
        if parts.scaler is not None:
            states["scaler"] = _IfSaved(parts.scaler)
        return states

    def restore_state(self, states: dict[str, Stateful], config: TrainConfig, *, total_steps: int,
                      steps_per_epoch: int) -> tuple[int, int, int]:
        """Every part of ``states`` (:meth:`states`) and this rank's RNG from the resume
        checkpoint; returns its ``(step, epoch, batch)``, ``(0, 0, 0)`` on a fresh start. A loss
        configured otherwise than the checkpoint's (K, a weight) is allowed, and so is another
        schedule (``total_steps``, the run's length; ``steps_per_epoch``: what the checkpoint's
        ``epochs`` meant); :attr:`notes` then holds one warning line for each, which says so."""
        state, self._state = self._state, None
        if state is None:
            return 0, 0, 0
        self.notes = _loss_changes(self.resume_path, state, config.loss)
        for name, part in states.items():
            part.load_state_dict(state.get(name))
        scheduler = states["scheduler"]
        apply_schedule(scheduler)  # the lr this run's schedule has at the resume step
        self.notes += _schedule_change(self.resume_path, state, config, scheduler, total_steps, steps_per_epoch)
        rngs = state["rng"]
        files.set_rng_state(rngs[self.info.rank] if self.info.rank < len(rngs) else rngs[0])
        return int(state["step"]), int(state["epoch"]), int(state["batch"])

    def save(self, states: dict[str, Stateful], step: int, epoch: int, batch: int) -> Path:
        """A complete checkpoint of ``states`` at ``step``, resuming at batch ``batch`` of
        ``epoch``. A write that fails on rank 0 is a :class:`DataError` on every rank (none is
        left waiting)."""
        rngs = dist_utils.gather_objects(files.rng_state(), self.info)
        self.saving_step = step
        saved = {name: part.state_dict() for name, part in states.items()}  # collectives: every rank
        path, error = self.folder / files.checkpoint_name(step), None
        if self.info.is_main:
            payload = {name: saved.get(name) for name in _PARTS}
            payload.update(step=step, epoch=epoch, batch=batch, rng=rngs, deepspeed=saved.get("deepspeed"),
                           world_size=self.info.world_size, config=saved["config"])
            try:
                path = files.save_checkpoint(self.folder, payload, keep_last=self.keep_last)
            except DataError as err:
                error = str(err)
        dist_utils.raise_on_any_rank(error, self.info)
        self.last_path, self.last_step = path, step
        return path


class _Fact:
    """A fact about the run saved as is (the model's name, its config); restoring it is checking
    it, which :meth:`Checkpointer.restore_weights` (the model) and the loss-change note do."""

    def __init__(self, value: Any):
        self.value = value

    def state_dict(self) -> Any:
        return self.value

    def load_state_dict(self, saved: Any) -> None:
        pass


class _Student:
    """The student's weights: on the CPU on rank 0 (None elsewhere), gathered from the engine's
    partitions under DeepSpeed (a collective). Restored before any wrapping instead, by
    :meth:`Checkpointer.restore_weights`: a ZeRO-3 engine partitions them as it is built."""

    def __init__(self, student: torch.nn.Module, info: dist_utils.DistInfo, gathered: bool):
        self.student, self.info, self.gathered = student, info, gathered

    def state_dict(self) -> dict | None:
        if self.gathered:
            return dist_utils.full_state_dict(self.student, self.info)
        return files.cpu_copy(self.student.state_dict()) if self.info.is_main else None

    def load_state_dict(self, saved: dict | None) -> None:
        pass


class _IfSaved:
    """A part the run that wrote the checkpoint may have lacked (no teacher, no loss scaler:
    saved as None): restored only when the checkpoint holds it."""

    def __init__(self, part: Stateful):
        self.part = part

    def state_dict(self) -> Any:
        return self.part.state_dict()

    def load_state_dict(self, saved: Any) -> None:
        if saved:
            self.part.load_state_dict(saved)


class _Optimizer:
    """The optimiser, whose parameter groups must match the checkpoint's (``resume_path``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, resume_path: Path | None):
        self.optimizer, self.resume_path = optimizer, resume_path

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, saved: dict) -> None:
        ours, groups = len(saved["param_groups"]), len(self.optimizer.param_groups)
        if ours != groups:  # e.g. optim.fused_ema switched: AdamWEMA gives logit_scale its own group
            raise ConfigError(f"resume: {self.resume_path} holds an optimiser of {ours} parameter groups, this "
                              f"run's has {groups}; resume with the optim.fused_ema setting it was written with")
        self.optimizer.load_state_dict(saved)


class _EngineFolder:
    """A DeepSpeed engine (the student's partitions and the optimiser's): written to a folder of
    its own next to the checkpoint, whose name (the tag) the checkpoint holds under ``deepspeed``."""

    def __init__(self, engine, checkpointer: Checkpointer):
        self.engine, self.checkpointer = engine, checkpointer

    def state_dict(self) -> str:
        tag = files.deepspeed_tag(self.checkpointer.saving_step)
        self.engine.save_checkpoint(str(self.checkpointer.folder), tag=tag, save_latest=False)
        return tag

    def load_state_dict(self, tag: str) -> None:
        self.engine.load_checkpoint(str(self.checkpointer.folder), tag=tag, load_optimizer_states=True,
                                    load_lr_scheduler_states=False)


# The loss settings a resumed run may change, with a warning: the loss changes from the resume step on.
_LOSS_FIELDS = ("num_negatives", "igc_weight", "tgc_weight", "distill_weight", "tgc_scale")


def _loss_changes(path: Path, state: dict, loss) -> list[str]:
    """One warning line when ``loss`` (the run's LossSpec) differs from the loss ``state`` (the
    checkpoint) was trained with in any of :data:`_LOSS_FIELDS`; none otherwise, or when the
    checkpoint holds no config."""
    saved = (state.get("config") or {}).get("loss") or {}
    changed = [name for name in _LOSS_FIELDS if name in saved and saved[name] != getattr(loss, name)]
    if not changed:
        return []
    was = ", ".join(f"{name}={saved[name]}" for name in changed)
    now = ", ".join(f"{name}={getattr(loss, name)}" for name in changed)
    return [f"resume: {path} was trained with {was}; this run uses {now} from step {int(state['step']) + 1} on"]



def _schedule_change(path: Path, state: dict, config: TrainConfig, scheduler, total_steps: int,
                     steps_per_epoch: int) -> list[str]:
    """One warning line when this run's learning-rate schedule (its length ``total_steps``, warm-up
    or final ratio) differs from the one the checkpoint ``state`` was trained under: what the
    learning rate is at the first resumed step, under each, and where it goes now. None when the
    schedule is the same, or the checkpoint holds no config."""
    saved = state.get("config") or {}
    optim = saved.get("optim") or {}
    if not saved or not optim:
        return []
    old_total = int(saved.get("max_steps") or 0) or int(saved.get("epochs", 0)) * steps_per_epoch
    old = (old_total, optim.get("warmup_steps"), optim.get("min_lr_ratio"))
    new = (total_steps, config.optim.warmup_steps, config.optim.min_lr_ratio)
    if old == new or not old_total:
        return []
    step, base = int(state["step"]), scheduler.base_lrs[0]
    was = base * cosine_with_warmup(step, warmup_steps=old[1], total_steps=old_total, min_ratio=old[2])
    now = scheduler.get_last_lr()[0]
    length = (f"was scheduled for {old_total} steps, this run for {total_steps}" if old_total != total_steps
              else f"was scheduled with warm-up {old[1]} and min_lr_ratio {old[2]}, this run with {new[1]} and "
                   f"{new[2]}")
    return [f"resume: {path} {length}: the learning rate at step {step + 1} is {now:.3g} (the old schedule's "
            f"{was:.3g}) and follows the cosine to {base * config.optim.min_lr_ratio:.3g} at step {total_steps}"]
