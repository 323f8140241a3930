"""The entries of a run's checkpoint map: one class per part a training checkpoint holds, each
saving itself with ``state_dict()`` and restoring itself with ``load_state_dict(saved)``
(torchtitan's stateful pattern; its trainer is one more entry, here :class:`TrainState`).

The builder makes the entries and orders the map (:func:`.builder.build_run`); the checkpointer
saves and restores whatever map it is handed (:class:`.checkpointer.Checkpointer`). An entry
that needs another's state is handed that entry when it is made (the DeepSpeed folder's tag and
the resume notes take the step from :class:`TrainState`); none reads the checkpointer.

Restoring a fact (:class:`ModelName`, :class:`RunConfig`) is checking it against this run: a
mismatch is an error, or a warning line in the run's resume ``notes``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as files
from ..errors import ConfigError
from . import distributed as dist_utils
from .config import TrainConfig, to_dict
from .optim import apply_schedule
from .resume_notes import loss_changes, schedule_change


class ModelName:
    """The open_clip model's name. Restoring it checks it: a checkpoint of another model is a
    one-line error naming both (restored before the student, whose weights would not fit)."""

    def __init__(self, name: str, source: Path | None):
        self.name, self.source = name, source

    def state_dict(self) -> str:
        return self.name

    def load_state_dict(self, saved: str | None) -> None:
        if isinstance(saved, str) and saved.replace("/", "-") != self.name.replace("/", "-"):
            raise ConfigError(f"resume: {self.source} holds a {saved!r} model, this run is configured for "
                              f"{self.name!r}; resume it with --model {saved} (model.name)")


class Record:
    """A value saved for the file's readers (``pretrained``: where the run's first weights came
    from, which ``export`` and ``load_model`` report). Nothing to restore: a resumed run's weights
    come from ``student``, and ``model.pretrained`` is not fetched again."""

    def __init__(self, value: Any):
        self.value = value

    def state_dict(self) -> Any:
        return self.value

    def load_state_dict(self, saved: Any) -> None:
        """Nothing: see the class doc."""


class StudentWeights:
    """The student's weights: on the CPU on rank 0 (None elsewhere), ``gathered`` from the
    engine's partitions under DeepSpeed (a collective: every rank calls it).

    Restore it into the bare model, before any wrapping: a ZeRO-3 engine partitions the
    parameters as it is built, and DDP copies rank 0's to every rank. The builder restores the
    model's entries (:class:`ModelName`, this one) by themselves, before the engine, the teacher
    (a copy of the restored student) and the optimiser exist."""

    def __init__(self, student: torch.nn.Module, info: dist_utils.DistInfo, *, gathered: bool, model_name: str,
                 source: Path | None):
        self.student, self.info, self.gathered = student, info, gathered
        self.model_name, self.source = model_name, source

    def state_dict(self) -> dict | None:
        if self.gathered:
            return dist_utils.full_state_dict(self.student, self.info)
        return files.cpu_copy(self.student.state_dict()) if self.info.is_main else None

    def load_state_dict(self, saved: dict) -> None:
        from ..model import load_student

        load_student(self.student, saved, self.source, self.model_name)


class TrainState:
    """Where the run is: ``step``, the next ``batch`` of ``epoch``, every rank's RNG states and
    the world size (the position and the engine's shards are per world size). Its keys stay at
    the checkpoint's top level (``top_level_keys``: format version 1). The training loop moves
    it (:meth:`move_to`) before each save; a resume restores it, this rank's RNG included."""

    top_level_keys = ("step", "epoch", "batch", "rng", "world_size")

    def __init__(self, info: dist_utils.DistInfo, source: Path | None):
        self.info, self.source = info, source
        self.step = self.epoch = self.batch = 0

    @property
    def position(self) -> tuple[int, int, int]:
        """``(step, epoch, batch)``."""
        return self.step, self.epoch, self.batch

    def move_to(self, step: int, epoch: int, batch: int) -> None:
        self.step, self.epoch, self.batch = step, epoch, batch

    def state_dict(self) -> dict:
        rngs = dist_utils.gather_objects(files.rng_state(), self.info)  # a collective: every rank
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch, "rng": rngs,
                "world_size": self.info.world_size}

    def load_state_dict(self, saved: dict) -> None:
        written_by = saved.get("world_size") or 1  # (checkpoints from before the key: one process)
        if written_by != self.info.world_size:
            raise ConfigError(f"resume: {self.source} was written by {written_by} processes, this run has "
                              f"{self.info.world_size}; resume with the same number, or start a new run with "
                              f"--pretrained {self.source}")
        self.move_to(int(saved["step"]), int(saved["epoch"]), int(saved["batch"]))
        files.set_rng_state(saved["rng"][self.info.rank])


class Absent:
    """A part this run lacks (no teacher, no loss scaler, the optimiser's place under DeepSpeed or
    the engine's without it): saved as None, as every checkpoint holds every key. What a
    checkpoint holds of it has nowhere to go in this run."""

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, saved: Any) -> None:
        """Nothing: see the class doc."""


class TeacherWeights:
    """The EMA teacher (a :class:`~degla_fast.ema.Teacher` keeps and filters its own state). A
    checkpoint without one (its run needed none, e.g. K = 0) leaves the teacher as built, a copy
    of the restored student, and says so in one line of ``notes``."""

    def __init__(self, teacher, train_state: TrainState, notes: list[str]):
        self.teacher, self.train_state, self.notes = teacher, train_state, notes

    def state_dict(self) -> dict:
        return self.teacher.state_dict()

    def load_state_dict(self, saved: dict | None) -> None:
        if saved:
            self.teacher.load_state_dict(saved)
            return
        self.notes.append(f"resume: {self.train_state.source} holds no EMA teacher (its loss needed none); the "
                          f"teacher starts from the student's weights at step {self.train_state.step}")


class IfSaved:
    """A part the run that wrote the checkpoint may have lacked (the loss scaler of an fp16 run):
    restored when the checkpoint holds it, left as built otherwise."""

    def __init__(self, part):
        self.part = part

    def state_dict(self) -> Any:
        return self.part.state_dict()

    def load_state_dict(self, saved: Any) -> None:
        if saved:
            self.part.load_state_dict(saved)


class OptimizerState:
    """The optimiser, whose parameter groups must match the checkpoint's (``source``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, source: Path | None):
        self.optimizer, self.source = optimizer, source

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, saved: dict) -> None:
        ours, groups = len(saved["param_groups"]), len(self.optimizer.param_groups)
        if ours != groups:  # e.g. optim.fused_ema switched: AdamWEMA gives logit_scale its own group
            raise ConfigError(f"resume: {self.source} holds an optimiser of {ours} parameter groups, this "
                              f"run's has {groups}; resume with the optim.fused_ema setting it was written with")
        self.optimizer.load_state_dict(saved)


class EngineFolder:
    """A DeepSpeed engine (the student's partitions and the optimiser's): written to a folder of
    its own in ``folder``, named (its tag) for ``train_state``'s step; the checkpoint holds the tag."""

    def __init__(self, engine, folder: Path, train_state: TrainState):
        self.engine, self.folder, self.train_state = engine, Path(folder), train_state

    def state_dict(self) -> str:
        tag = files.deepspeed_tag(self.train_state.step)
        self.engine.save_checkpoint(str(self.folder), tag=tag, save_latest=False)
        return tag

    def load_state_dict(self, tag: str) -> None:
        self.engine.load_checkpoint(str(self.folder), tag=tag, load_optimizer_states=True,
                                    load_lr_scheduler_states=False)


class Schedule:
    """The learning-rate schedule; restored, it gives the optimiser's groups the rate this run's
    schedule has at the resume step (:func:`.optim.apply_schedule`: the schedule may be another)."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LambdaLR):
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, saved: dict) -> None:
        self.scheduler.load_state_dict(saved)
        apply_schedule(self.scheduler)


class RunConfig:
    """The run's configuration (a dict). Restoring it compares it with this run's: another loss
    (K, a weight, the TGC indexing) or another schedule is allowed, with one warning line each in
    ``notes``. Restore it after the schedule (the line says the restored rate) and the train state
    (the resume step). ``total_steps``: this run's length; ``steps_per_epoch``: what the
    checkpoint's ``epochs`` meant."""

    def __init__(self, config: TrainConfig, scheduler, train_state: TrainState, notes: list[str], *,
                 total_steps: int, steps_per_epoch: int):
        self.config, self.scheduler, self.train_state, self.notes = config, scheduler, train_state, notes
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch

    def state_dict(self) -> dict:
        return to_dict(self.config)

    def load_state_dict(self, saved: dict | None) -> None:
        saved, source, step = saved or {}, self.train_state.source, self.train_state.step
        self.notes += loss_changes(source, saved, self.config.loss, step)
        self.notes += schedule_change(source, saved, self.config, self.scheduler, step, total_steps=self.total_steps,
                                      steps_per_epoch=self.steps_per_epoch)
