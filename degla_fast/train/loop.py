"""The training run itself: :func:`train` builds a run from a :class:`~.config.TrainConfig`
(:func:`.builder.build_run`) and steps it to its end or a stop signal.

Kept apart from the command line (:mod:`.main`), which imports this module only when a run
starts: ``degla-fast train --help`` lists the flags without importing torch.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, DataError, NonFiniteError
from ..loss import resolve_backend
from ..stop_signals import stop_request
from . import distributed as dist_utils
from .builder import Run, build_run
from .config import TrainConfig
from .loglines import PREFIX, checkpoint_line
from .metrics import Window, metrics_row
from .step import train_step
from .step_account import StepAccount

@dataclass
class TrainResult:
    """What a finished (or stopped) run leaves: its last step and checkpoint, and why it stopped
    (``"done"``, ``"signal"``; ``"already"``: resumed at the end of its schedule, nothing trained)."""

    step: int
    checkpoint: Path | None
    reason: str


def _check_data_path(path: str) -> None:
    """One clear line for a missing local data file (shard patterns and URLs are checked by the loader)."""
    if "{" in path or "://" in path or path.startswith("pipe:"):
        return
    if not Path(path).exists():
        raise DataError(f"data.path: no such file {path}")


def train(config: TrainConfig) -> TrainResult:
    """Run the training ``config`` describes; see the module doc. Raises DeglaError on user errors,
    NonFiniteError (after saving) when the loss stays non-finite. SIGTERM and SIGINT are stop
    requests from here on (:mod:`degla_fast.stop_signals`; the command line handles them from
    before its imports). The CPU thread count the run sets (:func:`degla_fast.threads.set_threads`)
    is the caller's again afterwards."""
    installed = stop_request.install()
    threads = torch.get_num_threads()
    try:
        return _train(config)
    finally:
        torch.set_num_threads(threads)
        if installed:
            stop_request.restore()


def _train(config: TrainConfig) -> TrainResult:
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
        # ``trainer``: the built Run (``run`` is this module's command-line entry point).
        trainer = build_run(config, info, ds_config)
        try:
            return _train_loop(trainer)
        finally:
            trainer.close()
            del trainer  # the engine holds the process groups: teardown can end their threads
    finally:
        dist_utils.teardown()


def _train_loop(trainer: Run) -> TrainResult:
    """Step from the resume point until ``trainer.total_steps`` or a stop signal. The host reads
    the device every ``log_every`` steps (and when saving): losses, skipped steps and stop flags;
    ``account.step`` is provisional between those reads (:class:`.step_account.StepAccount`)."""
    config = trainer.config
    step, epoch, batch_index = trainer.start
    if trainer.logger is not None and trainer.logger.lines:  # (a terminal gets the progress bar instead)
        trainer.logger.say(start_line(trainer, trainer.checkpointer.resume_path))
    if step >= trainer.total_steps:  # resumed at the end: nothing left to do
        return TrainResult(step, trainer.checkpointer.last_path, "already")
    # One process reads its stop request after every batch (a host variable: no sync). Several
    # must stop at the same step (a save is a collective), so they agree on theirs where the host
    # reads the device anyway: at log steps and saves (StepAccount.read sums the flags with the
    # losses), at most log_every steps after the signal; no read is added to the steps between.
    alone = not trainer.info.distributed
    # A stop asked for during start-up ends the run before its first step (one collective here).
    if dist_utils.any_true(stop_request.requested, trainer.info):
        trainer.warn(f"stop signal received during start-up: no step trained; the last checkpoint is "
                     f"{trainer.checkpointer.last_path or 'none yet'}")
        return TrainResult(step, trainer.checkpointer.last_path, "signal")
    account = StepAccount(step, trainer.parts.scheduler, trainer.device)
    window = Window(step, time.perf_counter())
    result = lr = None
    tick = time.perf_counter()
    for batch_epoch, resume_at, batch in _batches(trainer, epoch, batch_index,
                                                  lambda: alone and stop_request.requested):
        if batch is not None:  # None: a stop signal while only unreadable batches came
            images = batch.images.to(trainer.device, non_blocking=True)
            tokens = batch.tokens.to(trainer.device, non_blocking=True)
            if trainer.parts.sync is not None:
                trainer.parts.sync()
            window.data_time += time.perf_counter() - tick
            lr = trainer.parts.optimizer.param_groups[0]["lr"]
            result = train_step(trainer.parts, images, tokens)
            account.took(result.applied)  # counted as applied until the host reads the counters
        step = account.step
        signalled = stop_request.requested
        due_save = bool(config.save_every) and step % config.save_every == 0
        if batch is None or (alone and signalled) or step % config.log_every == 0 or step >= trainer.total_steps \
                or due_save:
            # The one host sync of these log_every steps.
            stop_now, window = _log_step(trainer, account, result, signalled, batch_epoch, lr, window, resume_at)
            step = account.step
            path = _maybe_save(trainer, step, resume_at, force=stop_now or step >= trainer.total_steps)
            if alone and stop_request.requested and not stop_now:  # it came while logging or saving
                stop_now, path = True, _maybe_save(trainer, step, resume_at, force=True)
            if stop_now:
                trainer.warn(f"stop signal received: saved step {step} to {path}; resume with --resume latest")
                return TrainResult(step, path, "signal")
            if step >= trainer.total_steps:
                return TrainResult(step, path, "done")
        tick = time.perf_counter()
    raise AssertionError("the batch stream ended")  # _batches crosses epochs until the loop returns


def _batches(trainer: Run, epoch: int, batch: int, stopping):
    """``(epoch of the batch, resume point after it, Batch)`` from the resume point ``(epoch,
    batch)`` on, across epochs, without end. A resume point at or past the end of an epoch (the
    data set shrank) starts the next one. ``Batch`` is None when ``stopping()`` says a stop was
    asked for while only unreadable batches came (``data.skip_bad_images``), so that the stop is
    honoured; an epoch whose every image is unreadable is an error, never an endless loop."""
    data = trainer.data
    while True:
        if batch >= len(data):
            epoch, batch = epoch + 1, 0
        data.set_epoch(epoch, start_batch=batch)
        whole, trained = batch == 0, 0
        for item in data.batches():
            batch = item.position + 1
            resume_at = (epoch, batch) if batch < len(data) else (epoch + 1, 0)
            if batch == len(data) and data.bad_images:  # said before the last batch: the run may end with it
                trainer.warn(f"epoch {epoch}: skipped {data.bad_images} unreadable image(s) in {data.source}")
            if len(item.indices):
                trained += 1
                yield epoch, resume_at, item
            elif stopping():
                yield epoch, resume_at, None
        if whole and not trained:
            raise DataError(f"every image in epoch {epoch} was unreadable ({data.bad_images} images in "
                            f"{data.source}); check data.image_root and the image files")
        epoch, batch = epoch + 1, 0


def _log_step(trainer: Run, account: StepAccount, result, signalled: bool, epoch: int, lr, window: Window,
              resume_at: tuple[int, int]) -> tuple[bool, Window]:
    """The host's read of the device (``account.read``: skipped steps taken back from the step
    and the schedule), a metrics row, a stop when the loss stayed non-finite too long. Returns
    ``(stop, window)`` (``stop``: a stop signal reached some rank)."""
    if result is None:  # no step trained yet in this process: nothing to read
        return signalled, window
    config = trainer.config
    stats = account.read(result, signalled, trainer.info)
    step = account.step
    if stats["skipped"]:
        trainer.warn(f"step {step + 1}: non-finite loss ({stats['loss']}), {stats['skipped']} step(s) skipped "
                     f"since the last log ({stats['in_row']} in a row, limit {config.max_nonfinite_steps})")
    if stats["applied"] and step > window.logged:
        row = metrics_row(stats, result, step, epoch, lr, window, time.perf_counter(),
                          config.data.batch_size * trainer.info.world_size)
        if trainer.logger is not None:
            trainer.logger.log(row)
            trainer.logger.advance(step - window.logged, {"loss": f"{row['loss']:.4f}"})
        window = Window(step, time.perf_counter())
    if stats["max_in_row"] >= config.max_nonfinite_steps:
        path = _maybe_save(trainer, step, resume_at, force=True)
        raise NonFiniteError(f"loss was non-finite for {stats['max_in_row']} steps in a row (max_nonfinite_steps="
                             f"{config.max_nonfinite_steps}); state saved to {path}; lower optim.lr or check the data")
    return stats["stop"], window


def _maybe_save(trainer: Run, step: int, resume_at: tuple[int, int], force: bool) -> Path | None:
    """A checkpoint at ``step`` (resuming at ``resume_at``, ``(epoch, batch)``) when one is due
    (``save_every``) or ``force``d, unless this step is saved already; returns the newest
    checkpoint's path."""
    every = trainer.config.save_every
    if (force or (every and step % every == 0)) and trainer.checkpointer.last_step != step:
        trainer.train_state.move_to(step, *resume_at)
        path = trainer.checkpointer.save(trainer.states)
        if trainer.logger is not None:
            trainer.logger.say(checkpoint_line(step, path))
    return trainer.checkpointer.last_path


def loss_backend(run: Run) -> str:
    """The loss backend this run's batches get (:func:`degla_fast.loss.resolve_backend`, the rule
    each loss call applies), for the run's batch size and the features' dtype (the forward's
    autocast dtype, train_step) and device."""
    return resolve_backend(run.config.loss, batch=run.config.data.batch_size, device=run.device,
                           dtype=run.parts.autocast_dtype or torch.float32, world_size=run.info.world_size).name


def start_line(run: Run, resumed_from: Path | None) -> str:
    """What the run is: model, data, batch, K, loss backend, precision, processes, CPU threads,
    output, length; where it resumed from (``resumed_from``: the checkpoint, None on a fresh start)."""
    config, info = run.config, run.info
    batch = config.data.batch_size
    line = (f"{PREFIX} start: model {run.model_name}, data {config.data.path} ({run.data.num_samples} samples, "
            f"{len(run.data)} steps per epoch), batch {batch} per process ({batch * info.world_size} in all), "
            f"K={config.loss.num_negatives}, loss backend {loss_backend(run)} (asked: {config.loss.backend}), "
            f"precision {config.precision}, world size {info.world_size}, device {run.device}, {run.threads}, output "
            f"{config.output}, {run.total_steps} steps")
    if resumed_from is not None:
        line += f"; resumed from step {run.start[0]} of checkpoint {resumed_from}"
    return line
