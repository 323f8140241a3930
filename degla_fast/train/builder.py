"""Everything a training run is made of, built once: :func:`build_run` returns a :class:`Run`.

Order matters in a few places, each said where it happens: the same initial weights on every
rank, the student's weights before any wrapping, the teacher before the fused optimiser (which
moves it) but after a DeepSpeed engine (a ZeRO-3 teacher is sharded like the engine's student),
the rest of the checkpoint map after everything it restores into.

The checkpoint map (:mod:`.checkpoint_map`) is made here, in the file's order, and handed to the
checkpointer, which saves and restores it: ``model_name``, ``pretrained``, ``student``; the
train state (``step``, ``epoch``, ``batch``, ``rng``, ``world_size``, at the file's top level);
``teacher``, ``optimizer``, ``deepspeed``, ``scheduler``, ``scaler``, ``config``.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..compat.deepspeed import release_zero3_module, zero_dim_safe_broadcasts
from ..errors import ConfigError, DataError
from ..loss import DeGLALoss
from ..model import random_modules
from . import distributed as dist_utils
from .checkpoint_map import (Absent, EngineFolder, IfSaved, ModelName, OptimizerState, Record, RunConfig, Schedule,
                             StudentWeights, TeacherWeights, TrainState)
from .checkpointer import Checkpointer, Stateful
from .config import TrainConfig, to_dict
from .metrics import MetricsLogger
from .output_folder import check_output, write_output
from .run_lock import RunLock, holder_error
from .optim import build_optimizer, build_scheduler
from ..precision import autocast_dtype
from ..threads import lowest_cpu_priority, set_threads
from .optim import MAX_LOGIT_SCALE
from .step import StepParts, clamp_logit_scale_


@dataclass
class Run:
    """One training run, ready to step: what :func:`build_run` made and where it starts.

    ``parts`` is the one owner of the optimiser, schedule, teacher, DeepSpeed engine and loss
    scaler (what ``train_step`` touches); ``states`` is the checkpoint map, what a checkpoint
    saves and restores (:mod:`.checkpoint_map`), ``train_state`` its entry for where the run is."""

    config: TrainConfig
    info: dist_utils.DistInfo
    model_name: str
    student: torch.nn.Module  # the bare model (also inside ``parts.engine`` or DDP)
    data: Any  # degla_fast.data.TrainData
    parts: StepParts  # what train_step touches: model, loss, optimiser, schedule, teacher, engine, scaler
    checkpointer: Checkpointer
    states: dict[str, Stateful]  # the checkpoint map: its named entries, in the file's order
    train_state: TrainState  # the map's step, epoch, batch and RNG (moved by the loop before each save)
    logger: MetricsLogger | None  # rank 0 only
    total_steps: int
    start: tuple[int, int, int] = (0, 0, 0)  # (step, epoch, batch) to continue from
    notes: list[str] = dataclasses.field(default_factory=list)  # what the resume changed: warning lines
    lock: RunLock | None = None  # the output folder's lock, rank 0 only
    threads: str = ""  # the CPU threads this process uses and why, for the start line (set_threads)

    @property
    def device(self) -> torch.device:
        return self.info.device

    def warn(self, message: str) -> None:
        if self.logger is not None:
            self.logger.warn(message)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
        if self.lock is not None:
            self.lock.release()
        self.data.close()
        if self.parts.tower_pool is not None:
            self.parts.tower_pool.shutdown()
        teacher, engine = self.parts.teacher, self.parts.engine
        if teacher is not None:
            teacher.close()
        if engine is not None:
            # Removes ZeRO's gradient hooks: closures that tie every parameter (and the process
            # groups it carries) into cycles through autograd nodes, which no gc can free.
            engine.destroy()
            release_zero3_module(engine.module)


def build_run(config: TrainConfig, info: dist_utils.DistInfo, ds_config: dict | None) -> Run:
    """The :class:`Run` ``config`` describes, restored from ``config.resume`` when it names a checkpoint."""
    from ..model import load_model

    # Before anything computes: torch's default (every core in every process) oversubscribes the
    # cores as soon as two processes share a node.
    threads = set_threads(config.threads)
    output = Path(config.output)
    checkpointer = Checkpointer(output / "checkpoints", config.resume, info, keep_last=config.keep_last)
    archive = check_output(output, config, resuming=checkpointer.resuming)
    # Another run writing this folder is said before the model and data are built (the lock
    # itself is taken before the first write, write_output).
    dist_utils.raise_on_any_rank(holder_error(output) if info.is_main else None, info)

    torch.manual_seed(config.seed)  # the same initial weights on every rank (random ones included)
    # On resume the weights come from the checkpoint: never fetch pretrained ones again.
    pretrained = None if checkpointer.resuming else config.model.pretrained
    bundle = load_model(config.model.name, pretrained, device="cpu", precision="fp32")
    student = bundle.model.to(info.device)
    if config.model.grad_checkpointing:
        student.set_grad_checkpointing(True)
    source = checkpointer.resume_path
    model_states = {"model_name": ModelName(bundle.name, source), "pretrained": Record(config.model.pretrained),
                    "student": StudentWeights(student, info, gathered=ds_config is not None,
                                              model_name=bundle.name, source=source)}
    # Restored into the bare model, before any wrapping (StudentWeights says why).
    checkpointer.restore(model_states)

    data = _train_data(config, info, bundle)
    total_steps = config.max_steps or config.epochs * len(data)
    parts = _step_parts(student, config, info, ds_config, total_steps)
    train_state, notes = TrainState(info, source), []
    run_states = _run_states(parts, checkpointer.folder, train_state, notes, config, total_steps=total_steps,
                             steps_per_epoch=len(data))
    checkpointer.restore(run_states)
    run = Run(config=config, info=info, model_name=bundle.name, student=student, data=data, parts=parts,
              checkpointer=checkpointer, states={**model_states, **run_states}, train_state=train_state,
              logger=None, total_steps=total_steps, start=train_state.position, notes=notes, threads=threads)
    if not checkpointer.resuming:
        torch.manual_seed(config.seed + info.rank)
    # Written once everything a user can get wrong has been read: a mistake leaves no trace.
    run.lock = write_output(output, config, info, archive)
    _start_logging(run)
    return run


def _run_states(parts: StepParts, folder: Path, train_state: TrainState, notes: list[str], config: TrainConfig, *,
                total_steps: int, steps_per_epoch: int) -> dict[str, Stateful]:
    """The checkpoint map's entries after the model's, in the order they are restored (and the
    file's): the train state first (a checkpoint of another world size is refused before any
    other part is loaded; nothing after it draws random numbers), the teacher before the
    optimiser or engine (as they always were), the engine before the schedule (which then sets
    the groups' rate), the config last (its notes say the restored step and rate). A part this
    run lacks is saved as None (:class:`Absent`): every checkpoint holds every key."""
    teacher, engine = parts.teacher, parts.engine
    return {
        "train": train_state,
        "teacher": TeacherWeights(teacher, train_state, notes) if teacher is not None else Absent(),
        "optimizer": OptimizerState(parts.optimizer, train_state.source) if engine is None else Absent(),
        "deepspeed": EngineFolder(engine, folder, train_state) if engine is not None else Absent(),
        "scheduler": Schedule(parts.scheduler),
        "scaler": IfSaved(parts.scaler) if parts.scaler is not None else Absent(),
        "config": RunConfig(config, parts.scheduler, train_state, notes, total_steps=total_steps,
                            steps_per_epoch=steps_per_epoch),
    }


def _train_data(config: TrainConfig, info: dist_utils.DistInfo, bundle):
    """This rank's share of ``data.path`` (at least one batch), prepared as ``bundle``'s model wants it."""
    from ..data import build_train_data

    data = build_train_data(
        config.data.path, tokenizer=bundle.tokenizer, image_size=bundle.image_size, mean=bundle.mean,
        std=bundle.std, batch_size=config.data.batch_size, num_negatives=config.loss.num_negatives,
        image_root=config.data.image_root, seed=config.seed, rank=info.rank, world_size=info.world_size,
        num_workers=config.data.num_workers, pipeline=config.data.pipeline, device=str(info.device),
        skip_bad_images=config.data.skip_bad_images, sample_with_replacement=config.data.sample_with_replacement,
        trim_text=config.data.trim_text, image_cache_bytes=config.data.image_cache_mib * 2**20)
    if len(data) == 0:
        raise DataError(f"data.path: {config.data.path} holds fewer than one batch per process "
                        f"({data.num_samples} samples, batch {config.data.batch_size} x {info.world_size} processes)")
    return data


def _start_logging(run: Run) -> None:
    """Rank 0's metrics logger (the lock let go if it cannot start), then the resume's notes."""
    config, checkpointer = run.config, run.checkpointer
    if run.info.is_main:
        try:
            run.logger = MetricsLogger(Path(config.output), total_steps=run.total_steps, start_step=run.start[0],
                                       resume_step=run.start[0] if checkpointer.resuming else None,
                                       progress=config.progress, report_to=config.report_to,
                                       run_config=to_dict(config), lines=config.log_lines)
        except BaseException:
            run.lock.release()
            raise
    for note in run.notes:
        run.warn(note)


def _step_parts(student, config: TrainConfig, info, ds_config, total_steps: int) -> StepParts:
    """Everything a step touches, built once: optimiser (or engine), teacher, schedule, compiled
    towers, loss scaler, loss."""
    teacher, optimizer, engine, model, sharded = _teacher_and_optimizer(student, config, info, ds_config)
    scheduler = build_scheduler(optimizer, warmup_steps=config.optim.warmup_steps, total_steps=total_steps,
                                min_ratio=config.optim.min_lr_ratio)
    if config.model.compile:
        # In place, so state-dict keys stay those of open_clip. A ZeRO-3 teacher keeps eager
        # towers: its parameters are gathered by hooks around each module's forward.
        for tower_owner in [student] + ([teacher.module] if teacher is not None and not sharded else []):
            tower_owner.visual.compile()
            tower_owner.transformer.compile()
    amp_dtype = autocast_dtype(config.precision, info.device, deepspeed=engine is not None)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    # No host read of the inputs (check_finite=False): the step checks the loss on the device.
    loss_fn = DeGLALoss.from_spec(dataclasses.replace(config.loss, check_finite=False), rank=info.rank,
                                  world_size=info.world_size)
    return StepParts(
        model=model, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler,
        clamp_logit_scale=(lambda: clamp_logit_scale_(student)) if engine is None else
        (lambda: dist_utils.clamp_logit_scale_deepspeed(student, MAX_LOGIT_SCALE)),
        teacher=teacher, engine=engine, scaler=scaler, autocast_dtype=amp_dtype,
        # A 16-bit teacher copy needs autocast even in an fp32 run (its inputs are fp32); autocast
        # leaves its 16-bit weights as they are.
        teacher_autocast_dtype=amp_dtype or (teacher.forward_dtype if teacher is not None else None),
        max_grad_norm=config.optim.max_grad_norm,
        # Phase times cover the device's work only with profile_phases (a device sync at each lap).
        sync=torch.cuda.synchronize if (info.device.type == "cuda" and config.profile_phases) else None,
        optimizer_moves_teacher=config.optim.fused_ema,
        all_finite=lambda t: dist_utils.all_true_tensor(torch.isfinite(t), info),
        tower_pool=_tower_pool(student, info, idle=config.tower_thread == "idle")
        if config.tower_thread != "none" else None)


def _tower_pool(student: torch.nn.Module, info, *, idle: bool = False) -> ThreadPoolExecutor:
    """The image tower's thread of ``tower_thread`` (``idle``: at the lowest CPU priority), after
    the checks that keep its step the one-thread step: one CPU process (no engine or DDP between
    the step and the towers) and a forward that draws no random numbers (two threads would draw
    them in either order)."""
    if info.device.type != "cpu" or info.distributed:
        raise ConfigError(f"tower_thread: CPU runs of one process only (this run: {info.device.type}, "
                          f"{info.world_size} process{'es' if info.world_size > 1 else ''}); use --tower-thread none")
    random = random_modules(student)
    if random:
        raise ConfigError(f"tower_thread: the model draws random numbers in its forward ({', '.join(random[:3])}); "
                          f"set its dropout to 0 or use --tower-thread none")
    return ThreadPoolExecutor(1, thread_name_prefix="image-tower", initializer=lowest_cpu_priority if idle else None)


def _teacher_and_optimizer(student, config: TrainConfig, info, ds_config):
    """``(teacher, optimizer, engine, model, sharded)``; ``model`` is what the step calls (the engine, DDP or
    the student); ``sharded``: the engine is a ZeRO-3 one (the one place this is asked).

    The teacher (None when the loss needs none) is a copy of the student made once, here: before
    the optimiser with ``optim.fused_ema`` (AdamWEMA moves it; never with DeepSpeed), after the
    engine under DeepSpeed (``EMATeacher.from_deepspeed``: under ZeRO-3 sharded like the student).
    """
    optim = config.optim
    kwargs = dict(lr=optim.lr, weight_decay=optim.weight_decay, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                  fused=optim.fused, ema_backend=config.ema.backend)
    engine = None
    if ds_config is not None:
        optimizer = build_optimizer(student, **kwargs)
        engine = dist_utils.wrap_deepspeed(student, optimizer, ds_config)
    sharded = engine is not None and engine.zero_optimization_stage() == 3
    teacher = _make_teacher(student, config, engine, sharded=sharded) if config.loss.needs_teacher else None
    if engine is not None:
        return teacher, optimizer, engine, engine, sharded
    optimizer = build_optimizer(student, teacher=teacher if optim.fused_ema else None, **kwargs)
    model = student
    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    return teacher, optimizer, None, model, False


def _teacher_dtype(name: str, forward: torch.dtype | None = None):
    """The dtype of the teacher's forward copy for ``ema.dtype`` (None: none) when the student's
    forward runs under autocast ``forward`` (None: fp32). The EMA state is always fp32: a bf16
    state would not move at decay 0.9996 (docs/ema.md)."""
    return {"same": forward, "fp32": None, "bf16": torch.bfloat16}[name]


def _make_teacher(student: torch.nn.Module, config: TrainConfig, engine, *, sharded: bool = False):
    """The EMA teacher, a copy of ``student`` as it is now (a replica; under ZeRO-3, ``sharded``,
    sharded like it)."""
    from ..ema import EMATeacher

    kwargs = dict(decay=config.ema.decay, backend=config.ema.backend)
    device = next(student.parameters()).device
    # ema.dtype same with precision bf16, or bf16: fp32 state + a bf16 forward copy
    forward_dtype = _teacher_dtype(config.ema.dtype, autocast_dtype(config.precision, device, deepspeed=engine is not None))
    if engine is None:
        return EMATeacher(student, forward_dtype=forward_dtype, **kwargs)
    fresh = None
    if sharded:
        # fp32 EMA shards plus a forward copy of forward_dtype (if any), which is what ZeRO-3
        # partitions and gathers for the teacher's forward (half the bytes of fp32 in bf16).
        from ..model import create_model

        fresh = create_model(config.model.name, None, device="cpu").model  # weights come from the shards
        dist_utils.mark_zero3_leaves(fresh)
    with zero_dim_safe_broadcasts():
        return EMATeacher.from_deepspeed(engine, fresh, forward_dtype=forward_dtype, **kwargs)
