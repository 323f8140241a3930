"""``degla-fast train``: fine-tune an open_clip model with DeGLA on a CPU, a GPU or a cluster.

Single process::

    degla-fast train --config configs/demo-cpu.yaml --output runs/demo

Several processes (one per GPU; gloo on CPUs): ``torchrun --nproc_per_node 8 -m degla_fast train ...``
or ``deepspeed --num_gpus 8 -m degla_fast train --deepspeed configs/ds_zero2.json ...``.

The command line only: this module imports neither torch nor the run (:mod:`.loop`) until a
run starts, so that ``--help`` and ``--help-config`` answer at once.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ..console import log
from ..errors import ConfigError, DeglaError
from ..stop_signals import StopNow
from .config import TrainConfig, add_flags, describe, flag_overrides, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``degla-fast train`` flags: one per configuration field declared with ``flag``
    (:func:`.config.add_flags`), plus these few that are not fields."""
    parser.add_argument("--config", help="YAML configuration file (see configs/ and --help-config)")
    add_flags(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="set any configuration field, e.g. --set loss.tgc_weight=0 (repeatable)")
    parser.add_argument("--help-config", action="store_true", help="list every configuration field and exit")
    # DeepSpeed's launcher appends --local_rank=N; the environment carries the same information.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults <- ``--config`` YAML <- the flags (``--set`` last)."""
    overrides = flag_overrides(args)
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
        metrics = Path(config.output) / "metrics.jsonl"
        if result.reason == "already":  # resumed at the end of its schedule
            log(f"degla-fast train: the run had already finished at step {result.step}: nothing trained (a larger "
                f"--max-steps trains on from it); checkpoint {result.checkpoint}; metrics {metrics}")
        else:
            what = "stopped by a signal" if result.reason == "signal" else "finished"
            log(f"degla-fast train: {what} at step {result.step} in {time.perf_counter() - started:.0f} s; "
                f"checkpoint {result.checkpoint or 'none yet'}; metrics {metrics}")
    return 0


def train(config: TrainConfig):
    """Run the training ``config`` describes (:func:`.loop.train`, imported here: the command
    line's ``--help`` never loads it); returns its :class:`.loop.TrainResult`."""
    from .loop import train as run_training

    return run_training(config)


def main(argv: list[str] | None = None) -> int:
    """``degla-fast train ARGS`` as a function: 0 on success, 2 after printing a user error."""
    from ..cli import Parser

    parser = Parser(prog="degla-fast train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except DeglaError as err:
        print(f"degla-fast: error: {err}", file=sys.stderr)
        return 2
    except StopNow as stop:
        print(f"degla-fast: {stop}", file=sys.stderr)
        return stop.status


