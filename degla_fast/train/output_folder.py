"""A run's output folder: refusing one that holds another run, moving an old run aside
(``overwrite``: to ``OUTPUT/previous/<date-time>/``) and writing ``config.yaml``. Its lock (one
writer per folder) is :mod:`.run_lock`'s.
"""
from __future__ import annotations

import time
from pathlib import Path

from .. import checkpoint as files
from ..console import log
from ..errors import ConfigError, DataError
from ..io import cannot_write, check_output_folder, write_text_atomic
from . import distributed as dist_utils
from .config import TrainConfig, to_dict
from .run_lock import RunLock

# What a run leaves in its output folder (besides wandb's own folder).
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "tensorboard")


def check_output(output: Path, config: TrainConfig, *, resuming: bool) -> list[str]:
    """Refuse an output folder that holds another run when this one does not resume it (unless
    ``overwrite``); returns the files :func:`write_output` moves aside (``overwrite``). Read-only,
    on every rank."""
    check_output_folder(output, "--output")  # found before any work, so nothing is written
    if resuming or not _holds_run(output):
        return []
    held = [name for name in RUN_FILES if (output / name).exists()]
    if config.overwrite:
        return held
    if config.resume == "latest":  # a preempted job resubmitted before its first checkpoint
        return []
    raise ConfigError(f"output: {output} already holds a run ({', '.join(held)}); resume it with --resume latest, "
                      f"choose another --output, or pass --overwrite to move its files to {output / 'previous'}/ "
                      "and start again")


def _holds_run(output: Path) -> bool:
    """Whether ``output`` holds a run's metrics or checkpoints (a config alone is no run yet)."""
    checkpoints = output / "checkpoints"
    has_checkpoint = checkpoints.is_dir() and any(files.is_checkpoint_name(p.name) or p.name == "latest"
                                                  for p in checkpoints.iterdir())
    metrics = output / "metrics.jsonl"
    return has_checkpoint or (metrics.is_file() and metrics.stat().st_size > 0)


def write_output(output: Path, config: TrainConfig, info, archive: list[str]) -> RunLock | None:
    """On rank 0: the output folder and its lock (one writer per run folder; returned, None on
    other ranks), the previous run's files moved to ``previous/<time>/`` (``archive``), torn
    temporary files of a killed save removed, ``config.yaml``. A failure (``cannot write PATH:
    reason``, another run holding the folder) is one line on every rank."""
    error = lock = None
    if info.is_main:
        try:
            lock = RunLock.acquire(output)
            _write_output_files(output, config, archive)
        except DataError as err:
            error = str(err)
            if lock is not None:
                lock.release()
    dist_utils.raise_on_any_rank(error, info)
    return lock


def _write_output_files(output: Path, config: TrainConfig, archive: list[str]) -> None:
    import yaml

    try:
        output.mkdir(parents=True, exist_ok=True)
        if archive:
            _archive(output, archive)
        (output / "checkpoints").mkdir(exist_ok=True)
        for path in files.remove_stale_temporaries(output / "checkpoints"):
            log(f"degla-fast train: removed {path}, left by an interrupted save")
        write_text_atomic(output / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
    except OSError as err:
        raise cannot_write(err.filename or output, err) from None


def _archive(output: Path, names: list[str]) -> None:
    """Move ``names`` (a previous run's files) to ``output/previous/<date-time>/``."""
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
    previous = output / "previous" / stamp
    while previous.exists():  # two overwrites within a second
        n += 1
        previous = output / "previous" / f"{stamp}-{n}"
    previous.mkdir(parents=True)
    for name in names:
        (output / name).rename(previous / name)
    log(f"degla-fast train: moved the previous run's {', '.join(names)} to {previous}")
