"""``degla-fast train``: fine-tune an open_clip model with DeGLA on a CPU, a GPU or a cluster.

Single process::

    degla-fast train --config configs/demo-cpu.yaml --output runs/demo

Several processes (one per GPU; gloo on CPUs): ``torchrun --nproc_per_node 8 -m degla_fast train ...``
or ``deepspeed --num_gpus 8 -m degla_fast train --deepspeed configs/ds_zero2.json ...``.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, DataError, DeglaError, NonFiniteError
from ..io import write_text_atomic
from . import checkpoint as ckpt
from . import distributed as dist_utils
from .config import TrainConfig, describe, load_config, to_dict
from .metrics import MetricsLogger
from .optim import build_optimizer, build_scheduler, rewind_scheduler
from .step import MAX_LOGIT_SCALE, StepParts, autocast_dtype, clamp_logit_scale_, make_loss, needs_teacher, train_step

# flag -> dotted config field
FLAG_FIELDS = {
    "data": "data.path", "image_root": "data.image_root", "output": "output", "model": "model.name",
    "pretrained": "model.pretrained", "max_steps": "max_steps", "epochs": "epochs", "batch_size": "data.batch_size",
    "num_negatives": "loss.num_negatives", "resume": "resume", "deepspeed": "deepspeed", "seed": "seed",
    "precision": "precision", "report_to": "report_to", "igc_weight": "loss.igc_weight",
    "tgc_weight": "loss.tgc_weight", "distill_weight": "loss.distill_weight", "lr": "optim.lr",
    "device": "device", "num_workers": "data.num_workers", "save_every": "save_every",
    "compile": "model.compile", "grad_checkpointing": "model.grad_checkpointing", "fused_ema": "optim.fused_ema",
    "profile_phases": "profile_phases", "log_every": "log_every",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``degla-fast train`` flags; each overrides one configuration field."""
    parser.add_argument("--config", help="YAML configuration file (see configs/ and --help-config)")
    parser.add_argument("--data", help="training data (data.path)")
    parser.add_argument("--image-root", help="folder relative image paths start from (data.image_root)")
    parser.add_argument("--output", help="output folder (output)")
    parser.add_argument("--model", help="open_clip model name (model.name)")
    parser.add_argument("--pretrained", help="pretrained tag, weights file or checkpoint; 'none' for random weights")
    parser.add_argument("--max-steps", type=int, help="stop after N optimiser steps (max_steps)")
    parser.add_argument("--epochs", type=int, help="passes over the data (epochs)")
    parser.add_argument("--batch-size", type=int, help="images per process per step (data.batch_size)")
    parser.add_argument("--num-negatives", type=int, help="hard negatives per caption, 0 = plain CLIP (loss.num_negatives)")
    parser.add_argument("--igc-weight", type=float, help="loss.igc_weight")
    parser.add_argument("--tgc-weight", type=float, help="loss.tgc_weight")
    parser.add_argument("--distill-weight", type=float, help="loss.distill_weight")
    parser.add_argument("--lr", type=float, help="peak learning rate (optim.lr)")
    parser.add_argument("--resume", help="'latest' or a checkpoint path (resume)")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON config, e.g. configs/ds_zero2.json (deepspeed)")
    parser.add_argument("--seed", type=int, help="seed")
    parser.add_argument("--precision", help="fp32, bf16 or amp (precision)")
    parser.add_argument("--device", help="auto, cpu or cuda (device)")
    parser.add_argument("--num-workers", type=int, help="data-loading workers per process (data.num_workers)")
    parser.add_argument("--save-every", type=int, help="checkpoint every N steps (save_every)")
    parser.add_argument("--report-to", help="none, tensorboard or wandb (report_to)")
    parser.add_argument("--compile", action="store_const", const=True, help="torch.compile the towers (model.compile)")
    parser.add_argument("--grad-checkpointing", action="store_const", const=True,
                        help="activation checkpointing in both towers (model.grad_checkpointing)")
    parser.add_argument("--fused-ema", action="store_const", const=True,
                        help="AdamW and the EMA teacher update in one pass (optim.fused_ema)")
    parser.add_argument("--log-every", type=int, help="metrics row (and the one host sync) every N steps (log_every)")
    parser.add_argument("--profile-phases", action="store_const", const=True,
                        help="synchronise the device at each phase for exact phase times (profile_phases)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="set any configuration field, e.g. --set loss.tgc_weight=0 (repeatable)")
    parser.add_argument("--help-config", action="store_true", help="list every configuration field and exit")
    # DeepSpeed's launcher appends --local_rank=N; the environment carries the same information.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults <- ``--config`` YAML <- the flags (``--set`` last)."""
    overrides = {field: getattr(args, flag, None) for flag, field in FLAG_FIELDS.items()}
    if getattr(args, "no_progress", False):
        overrides["progress"] = False
    for item in getattr(args, "set", None) or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set: expected FIELD=VALUE, got {item!r}")
        overrides[key.strip()] = value
    return load_config(getattr(args, "config", None), overrides)


def run(args: argparse.Namespace) -> int:
    """``degla-fast train``: returns the exit status (user errors propagate as DeglaError)."""
    if getattr(args, "help_config", False):
        print("\n".join(describe()))
        return 0
    started = time.perf_counter()
    config = config_from_args(args)
    result = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        # One closing line: where the run ended and what to resume or export from.
        what = "stopped by a signal" if result.reason == "signal" else "finished"
        print(f"degla-fast train: {what} at step {result.step} in {time.perf_counter() - started:.0f} s; "
              f"checkpoint {result.checkpoint}; metrics {Path(config.output) / 'metrics.jsonl'}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``degla-fast train ARGS`` as a function: 0 on success, 2 after printing a user error."""
    parser = argparse.ArgumentParser(prog="degla-fast train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except DeglaError as err:
        print(f"degla-fast: error: {err}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------- the run


@dataclass
class TrainResult:
    """What a finished (or stopped) run leaves: its last step and checkpoint, and why it stopped
    (``"done"``, ``"signal"``)."""

    step: int
    checkpoint: Path | None
    reason: str


class _StopFlag:
    """Set by SIGTERM/SIGINT: the current step finishes, a checkpoint is written, the run exits 0.
    A second signal interrupts at once."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: the user insists, stop now
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_data_path(path: str) -> None:
    """One clear line for a missing local data file (shard patterns and URLs are checked by the loader)."""
    if "{" in path or "://" in path or path.startswith("pipe:"):
        return
    if not Path(path).exists():
        raise DataError(f"data.path: no such file {path}")


def _teacher_dtype(name: str, forward: torch.dtype | None = None):
    """The dtype of the teacher's forward copy for ``ema.dtype`` (None: none) when the student's
    forward runs under autocast ``forward`` (None: fp32). The EMA state is always fp32: a bf16
    state would not move at decay 0.9996 (docs/ema.md)."""
    return {"same": forward, "fp32": None, "bf16": torch.bfloat16}[name]


def train(config: TrainConfig) -> TrainResult:
    """Run the training ``config`` describes; see the module doc. Raises DeglaError on user errors,
    NonFiniteError (after saving) when the loss stays non-finite."""
    from ..data import build_train_data
    from ..model import load_model

    _check_data_path(config.data.path)
    ds_config = None
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if config.deepspeed is not None:
        ds_config = dist_utils.read_deepspeed_config(
            config.deepspeed, micro_batch=config.data.batch_size, world_size=world_size,
            max_grad_norm=config.optim.max_grad_norm)
        for key in ("optimizer", "scheduler"):
            if key in ds_config:
                raise ConfigError(f"deepspeed: {config.deepspeed}: remove the {key!r} section; the trainer builds "
                                  "AdamW and the cosine schedule from the optim section")
    info = dist_utils.setup(config.device, use_deepspeed=ds_config is not None)
    try:
        return _train(config, info, ds_config, build_train_data, load_model)
    finally:
        dist_utils.teardown()


def _train(config: TrainConfig, info: dist_utils.DistInfo, ds_config, build_train_data, load_model) -> TrainResult:
    device = info.device
    output = Path(config.output)
    ckpt_dir = output / "checkpoints"
    resume_path = ckpt.find_resume(config.resume, ckpt_dir)
    state = ckpt.load_checkpoint(resume_path) if resume_path is not None else None
    if state is not None and state.get("world_size", 1) != info.world_size:
        # The data position (epoch, batch) and the sharded engine state are per world size.
        raise ConfigError(f"resume: {resume_path} was written by {state.get('world_size', 1)} processes, this run "
                          f"has {info.world_size}; resume with the same number, or start a new run with "
                          f"--pretrained {resume_path}")

    # Same initial weights on every rank (random initialisations included).
    torch.manual_seed(config.seed)
    # On resume the weights come from the checkpoint: never fetch pretrained ones again.
    pretrained = None if state is not None else config.model.pretrained
    bundle = load_model(config.model.name, pretrained, device="cpu", precision="fp32")
    student = bundle.model.to(device)
    if config.model.grad_checkpointing:
        student.set_grad_checkpointing(True)
    if state is not None:
        student.load_state_dict({k.removeprefix("module."): v for k, v in state["student"].items()})

    data = build_train_data(
        config.data.path, tokenizer=bundle.tokenizer, image_size=bundle.image_size, mean=bundle.mean,
        std=bundle.std, batch_size=config.data.batch_size, num_negatives=config.loss.num_negatives,
        image_root=config.data.image_root, seed=config.seed, rank=info.rank, world_size=info.world_size,
        num_workers=config.data.num_workers, pipeline=config.data.pipeline, device=str(device),
        skip_bad_images=config.data.skip_bad_images, sample_with_replacement=config.data.sample_with_replacement,
        trim_text=config.data.trim_text)
    steps_per_epoch = len(data)
    if steps_per_epoch == 0:
        raise DataError(f"data.path: {config.data.path} holds fewer than one batch per process "
                        f"({data.num_samples} samples, batch {config.data.batch_size} x {info.world_size} processes)")
    total_steps = config.max_steps or config.epochs * steps_per_epoch

    use_teacher = needs_teacher(config.loss.num_negatives, config.loss.tgc_weight, config.loss.distill_weight)
    teacher = None
    if config.optim.fused_ema:  # the optimiser moves the teacher, so it exists first (never DeepSpeed: see config)
        teacher = _make_teacher(student, config, None)
    optimizer = build_optimizer(student, lr=config.optim.lr, weight_decay=config.optim.weight_decay,
                                betas=(config.optim.beta1, config.optim.beta2), eps=config.optim.eps,
                                fused=config.optim.fused, teacher=teacher, ema_backend=config.ema.backend)
    scheduler = build_scheduler(optimizer, warmup_steps=config.optim.warmup_steps, total_steps=total_steps,
                                min_ratio=config.optim.min_lr_ratio)
    engine = None
    model: torch.nn.Module = student
    if ds_config is not None:
        engine = dist_utils.wrap_deepspeed(student, optimizer, ds_config)
        model = engine
    elif info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)

    if use_teacher:
        if teacher is None:
            teacher = _make_teacher(engine.module if engine is not None else student, config, engine)
        if state is not None and state.get("teacher") is not None:
            saved = state["teacher"]
            if _sharded(engine):  # its loader also wants the non-persistent buffers, which are not saved
                saved = {**dict(teacher.module.named_buffers()), **saved}
            teacher.load_state_dict(saved)

    if config.model.compile:
        # In place, so state-dict keys stay those of open_clip. A ZeRO-3 teacher keeps eager
        # towers: its parameters are gathered by hooks around each module's forward.
        towers = [student] + ([teacher.module] if teacher is not None and not _sharded(engine) else [])
        for model_ in towers:
            model_.visual.compile()
            model_.transformer.compile()

    scaler = None
    amp_dtype = autocast_dtype(config.precision, device, engine is not None)
    if amp_dtype == torch.float16:
        scaler = torch.amp.GradScaler("cuda")
    if state is not None:
        if engine is not None:
            engine.load_checkpoint(str(resume_path.parent), tag=state["deepspeed"], load_optimizer_states=True,
                                   load_lr_scheduler_states=False)
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[info.rank] if info.rank < len(rngs) else rngs[0])
    else:
        torch.manual_seed(config.seed + info.rank)

    loss_fn = make_loss(num_negatives=config.loss.num_negatives, igc_weight=config.loss.igc_weight,
                        tgc_weight=config.loss.tgc_weight, distill_weight=config.loss.distill_weight,
                        tgc_scale=config.loss.tgc_scale, backend=config.loss.backend,
                        official_tgc_indexing=config.loss.official_tgc_indexing, local_loss=config.loss.local_loss,
                        gather_with_grad=config.loss.gather_with_grad, rank=info.rank, world_size=info.world_size)
    # Phase times cover the device's work only with profile_phases (a device sync at each lap).
    sync = torch.cuda.synchronize if (device.type == "cuda" and config.profile_phases) else None
    parts = StepParts(
        model=model, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler,
        clamp_logit_scale=_logit_scale_clamp(student, engine), teacher=teacher, engine=engine, scaler=scaler,
        autocast_dtype=amp_dtype,
        # A 16-bit teacher copy needs autocast even in an fp32 run (its inputs are fp32); autocast
        # leaves its 16-bit weights as they are.
        teacher_autocast_dtype=amp_dtype or getattr(teacher, "forward_dtype", None),
        max_grad_norm=config.optim.max_grad_norm, sync=sync, optimizer_moves_teacher=config.optim.fused_ema,
        all_finite=lambda t: dist_utils.all_true_tensor(torch.isfinite(t), info))

    step = int(state["step"]) if state else 0
    epoch = int(state["epoch"]) if state else 0
    batch_in_epoch = int(state["batch"]) if state else 0
    del state

    saver = _Saver(config, info, ckpt_dir, bundle, student, teacher, optimizer, scheduler, scaler, engine)
    logger = None
    if info.is_main:
        output.mkdir(parents=True, exist_ok=True)
        import yaml

        write_text_atomic(output / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
        logger = MetricsLogger(output, total_steps=total_steps, start_step=step,
                               resume_step=step if resume_path is not None else None,
                               progress=config.progress, report_to=config.report_to, run_config=to_dict(config))
    stop = _StopFlag().install()
    last_saved = step if resume_path is not None else None
    counters = _Counters(device)
    window = _Window(step, time.perf_counter())
    try:
        while step < total_steps:
            data.set_epoch(epoch, start_batch=batch_in_epoch)
            tick = time.perf_counter()
            for batch in data:
                images = batch.images.to(device, non_blocking=True)
                tokens = batch.tokens.to(device, non_blocking=True)
                if sync is not None:
                    sync()
                window.data_time += time.perf_counter() - tick
                lr = optimizer.param_groups[0]["lr"]
                result = train_step(parts, images, tokens)
                counters.add(result.applied)
                # Counted as applied until the host reads the counters (every log_every steps).
                step, batch_in_epoch, batch_epoch = step + 1, batch_in_epoch + 1, epoch
                if batch_in_epoch >= steps_per_epoch:
                    epoch, batch_in_epoch = epoch + 1, 0
                due_save = bool(config.save_every) and step % config.save_every == 0
                if step % config.log_every == 0 or step >= total_steps or due_save:
                    # The one host sync of these log_every steps: losses, skip counters, stop flags.
                    stats = counters.read(result, stop.signum is not None, info)
                    if stats["skipped"]:
                        step -= stats["skipped"]
                        rewind_scheduler(scheduler, stats["skipped"])
                        _warn(logger, f"step {step + 1}: non-finite loss ({stats['loss']}), {stats['skipped']} "
                                      f"step(s) skipped since the last log ({stats['in_row']} in a row, limit "
                                      f"{config.max_nonfinite_steps})")
                    if stats["applied"] and step > window.logged:
                        row = _metrics_row(stats, result, step, batch_epoch, lr, window, time.perf_counter(),
                                           config.data.batch_size * info.world_size)
                        if logger is not None:
                            logger.log(row)
                            logger.advance(step - window.logged, {"loss": f"{row['loss']:.4f}"})
                        window = _Window(step, time.perf_counter())
                    if stats["max_in_row"] >= config.max_nonfinite_steps:
                        path = saver.save(step, epoch, batch_in_epoch)
                        raise NonFiniteError(f"loss was non-finite for {stats['max_in_row']} steps in a row "
                                             f"(max_nonfinite_steps={config.max_nonfinite_steps}); state saved to "
                                             f"{path}; lower optim.lr or check the data")
                    due_save = bool(config.save_every) and step % config.save_every == 0 and step != last_saved
                    if stats["stop"] or step >= total_steps or due_save:
                        path = saver.save(step, epoch, batch_in_epoch)
                        last_saved = step
                    if stats["stop"]:
                        _warn(logger, f"stop signal received: saved step {step} to {path}; resume with --resume latest")
                        return TrainResult(step, path, "signal")
                if step >= total_steps or batch_in_epoch == 0:
                    break
                tick = time.perf_counter()
        path = saver.save(step, epoch, batch_in_epoch) if last_saved != step else (saver.last_path or resume_path)
        return TrainResult(step, path, "done")
    finally:
        stop.restore()
        if logger is not None:
            logger.close()


class _Counters:
    """Device-side step counters read by the host once per log interval: steps skipped since
    the last read, the current and longest run of consecutive skips. Updating them is three tiny
    device ops per step; reading them (with the losses and the stop flags) is one all-reduce and
    one ``tolist``."""

    def __init__(self, device: torch.device):
        self.skipped = torch.zeros((), device=device)
        self.in_row = torch.zeros((), device=device)
        self.max_in_row = torch.zeros((), device=device)

    def add(self, applied: torch.Tensor) -> None:
        skip = (~applied).float()
        self.skipped += skip
        self.in_row.add_(skip).mul_(skip)
        torch.maximum(self.max_in_row, self.in_row, out=self.max_in_row)

    def read(self, result, stopping: bool, info: dist_utils.DistInfo) -> dict:
        """The host's view (one sync): mean losses over ranks, the counters (the same on every
        rank), whether the last step was applied and whether any rank got a stop signal; then
        the interval counters start again."""
        losses = result.losses
        values = torch.stack([losses.total, losses.clip, losses.igc, losses.tgc, losses.distill,
                              result.logit_scale, self.skipped, self.max_in_row, self.in_row,
                              (~result.applied).float(), torch.full_like(self.skipped, float(stopping))]).float()
        values = dist_utils.sum_across(values, info).tolist()
        n = info.world_size
        self.skipped.zero_()
        self.max_in_row.copy_(self.in_row)
        names = ("loss", "clip", "igc", "tgc", "distill", "logit_scale")
        stats = {name: v / n for name, v in zip(names, values)}
        stats.update(skipped=round(values[6] / n), max_in_row=round(values[7] / n), in_row=round(values[8] / n),
                     applied=values[9] == 0, stop=values[10] > 0)
        return stats


@dataclass
class _Window:
    """The steps since the last metrics row: where it started (step, time) and the data time in it."""

    logged: int
    start: float
    data_time: float = 0.0


def _warn(logger: MetricsLogger | None, message: str) -> None:
    if logger is not None:
        logger.warn(message)


def _metrics_row(stats: dict, result, step: int, epoch: int, lr: float, window: _Window, now: float,
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


def _make_teacher(student: torch.nn.Module, config: TrainConfig, engine):
    """The EMA teacher, a copy of ``student`` as it is now (a replica; under ZeRO-3 sharded like it)."""
    from ..ema import EMATeacher

    kwargs = dict(decay=config.ema.decay, backend=config.ema.backend)
    device = next(student.parameters()).device
    # ema.dtype same with precision bf16, or bf16: fp32 state + a bf16 forward copy
    forward_dtype = _teacher_dtype(config.ema.dtype, autocast_dtype(config.precision, device, engine is not None))
    if engine is None:
        return EMATeacher(student, forward_dtype=forward_dtype, **kwargs)
    fresh = None
    if not _sharded(engine):
        kwargs["forward_dtype"] = forward_dtype
    else:  # fp32 shards and no copy: the teacher's forward runs under bf16 autocast instead
        from ..model import create_model

        fresh = create_model(config.model.name, None, device="cpu").model  # weights come from the shards
        dist_utils.mark_zero3_leaves(fresh)
    with dist_utils.zero_dim_safe_broadcasts():
        return EMATeacher.from_deepspeed(engine, fresh, **kwargs)


def _sharded(engine) -> bool:
    return engine is not None and engine.zero_optimization_stage() == 3


def _logit_scale_clamp(student: torch.nn.Module, engine):
    if engine is None:
        return lambda: clamp_logit_scale_(student)
    return lambda: dist_utils.clamp_logit_scale_deepspeed(student, MAX_LOGIT_SCALE)


class _Saver:
    """Writes a complete checkpoint (a collective call under DeepSpeed and DDP: every rank calls it)."""

    def __init__(self, config, info, folder, bundle, student, teacher, optimizer, scheduler, scaler, engine):
        self.config, self.info, self.folder = config, info, Path(folder)
        self.bundle, self.student, self.teacher = bundle, student, teacher
        self.optimizer, self.scheduler, self.scaler, self.engine = optimizer, scheduler, scaler, engine
        self.last_path: Path | None = None

    def save(self, step: int, epoch: int, batch: int) -> Path:
        rngs = dist_utils.gather_objects(ckpt.rng_state(), self.info)
        tag = None
        if self.engine is not None:
            tag = ckpt.deepspeed_tag(step)
            self.engine.save_checkpoint(str(self.folder), tag=tag, save_latest=False)
            student_sd = dist_utils.full_state_dict(self.student, self.info)
        else:
            student_sd = _cpu(self.student.state_dict()) if self.info.is_main else None
        teacher_sd = None
        if self.teacher is not None:  # a collective for a ZeRO-3 teacher
            keys = self.teacher.module.state_dict().keys()  # what open_clip saves: no non-persistent buffers
            teacher_sd = {k: v for k, v in self.teacher.state_dict().items() if k in keys}
        path = self.folder / ckpt.checkpoint_name(step)
        if self.info.is_main:
            payload = {
                "model_name": self.bundle.name, "pretrained": self.config.model.pretrained,
                "student": student_sd, "teacher": _cpu(teacher_sd) if teacher_sd is not None else None,
                "optimizer": self.optimizer.state_dict() if self.engine is None else None,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "step": step, "epoch": epoch, "batch": batch, "rng": rngs, "deepspeed": tag,
                "world_size": self.info.world_size, "config": to_dict(self.config),
            }
            path = ckpt.save_checkpoint(self.folder, payload, keep_last=self.config.keep_last)
        dist_utils.barrier(self.info)
        self.last_path = path
        return path


def _cpu(state_dict: dict) -> dict:
    return {k: (v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v) for k, v in state_dict.items()}
