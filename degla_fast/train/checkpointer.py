"""The one owner of a run's checkpoints: what a training checkpoint holds, writing it, and
restoring a run from it (the file format itself: :mod:`degla_fast.checkpoint`).

Save and restore mirror each other field by field: ``student``, ``teacher``, ``optimizer``
(or the DeepSpeed engine's own folder, ``deepspeed``), ``scheduler``, ``scaler``, ``rng`` (one
entry per rank) and the data position ``step``, ``epoch``, ``batch``.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import checkpoint as files
from ..errors import ConfigError, DataError
from . import distributed as dist_utils
from .config import to_dict

if TYPE_CHECKING:
    from .builder import Run


class Checkpointer:
    """Checkpoints of the run in ``folder`` (``OUTPUT/checkpoints``).

    ``resume`` (``None``, ``"latest"`` or a path, see :func:`degla_fast.checkpoint.find_resume`)
    is read once here; :meth:`restore_weights` and :meth:`restore_state` take what they need from
    it, and :meth:`restore_state` lets it go. Every method is a collective under DeepSpeed and DDP:
    every rank calls it.
    """

    def __init__(self, folder: Path, resume: str | None, info: dist_utils.DistInfo):
        self.folder, self.info = Path(folder), info
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

    def restore_state(self, run: "Run") -> tuple[int, int, int]:
        """Teacher, optimiser (or engine), schedule, loss scaler and this rank's RNG from the
        resume checkpoint; returns its ``(step, epoch, batch)``, ``(0, 0, 0)`` on a fresh start.
        A loss configured otherwise than the checkpoint's (K, a weight) is allowed; :attr:`notes`
        then holds the one warning line that says so."""
        state, self._state = self._state, None
        if state is None:
            return 0, 0, 0
        self.notes = _loss_changes(self.resume_path, state, run.config.loss)
        if run.teacher is not None and state.get("teacher") is not None:
            saved = state["teacher"]
            if run.sharded:  # its loader also wants the non-persistent buffers, which are not saved
                saved = {**dict(run.teacher.module.named_buffers()), **saved}
            run.teacher.load_state_dict(saved)
        if run.engine is not None:
            run.engine.load_checkpoint(str(self.folder), tag=state["deepspeed"], load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
        else:
            saved, groups = len(state["optimizer"]["param_groups"]), len(run.optimizer.param_groups)
            if saved != groups:  # e.g. optim.fused_ema switched: AdamWEMA gives logit_scale its own group
                raise ConfigError(f"resume: {self.resume_path} holds an optimiser of {saved} parameter groups, this "
                                  f"run's has {groups}; resume with the optim.fused_ema setting it was written with")
            run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        if run.scaler is not None and state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        files.set_rng_state(rngs[self.info.rank] if self.info.rank < len(rngs) else rngs[0])
        return int(state["step"]), int(state["epoch"]), int(state["batch"])

    def save(self, run: "Run", step: int, epoch: int, batch: int) -> Path:
        """A complete checkpoint of ``run`` at ``step``, resuming at batch ``batch`` of ``epoch``.
        A write that fails on rank 0 is a :class:`DataError` on every rank (none is left waiting)."""
        rngs = dist_utils.gather_objects(files.rng_state(), self.info)
        tag = None
        if run.engine is not None:
            tag = files.deepspeed_tag(step)
            run.engine.save_checkpoint(str(self.folder), tag=tag, save_latest=False)
            student = dist_utils.full_state_dict(run.student, self.info)
        else:
            student = _cpu(run.student.state_dict()) if self.info.is_main else None
        teacher = None
        if run.teacher is not None:  # a collective for a ZeRO-3 teacher
            keys = run.teacher.module.state_dict().keys()  # what open_clip saves: no non-persistent buffers
            teacher = _cpu({k: v for k, v in run.teacher.state_dict().items() if k in keys})
        path, error = self.folder / files.checkpoint_name(step), None
        if self.info.is_main:
            payload = {
                "model_name": run.model_name, "pretrained": run.config.model.pretrained,
                "student": student, "teacher": teacher,
                "optimizer": run.optimizer.state_dict() if run.engine is None else None,
                "scheduler": run.scheduler.state_dict(),
                "scaler": run.scaler.state_dict() if run.scaler is not None else None,
                "step": step, "epoch": epoch, "batch": batch, "rng": rngs, "deepspeed": tag,
                "world_size": self.info.world_size, "config": to_dict(run.config),
            }
            try:
                path = files.save_checkpoint(self.folder, payload, keep_last=run.config.keep_last)
            except DataError as err:
                error = str(err)
        dist_utils.raise_on_any_rank(error, self.info)
        self.last_path, self.last_step = path, step
        return path


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


def _cpu(state_dict: dict) -> dict:
    return {k: (v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v) for k, v in state_dict.items()}
