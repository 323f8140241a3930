"""What the commands print while they work: timestamped log lines, and progress bars that draw
only on a terminal.

A job's log (SLURM, nohup, ``> log 2>&1``) is read after the fact: each line carries the local
wall-clock time with its UTC offset (ISO 8601), so that a hung job shows when it last spoke and
step times can be read off the file. A progress bar redraws its line with carriage returns; in a
file that is one endless line, so every bar of the project is made here and stays silent unless
its stream is a terminal.
"""
from __future__ import annotations

import sys
from datetime import datetime
from typing import TextIO


def timestamp() -> str:
    """Now, in local time with the UTC offset, to the second: ``2026-12-07T04:05:06+01:00``."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def stamped(line: str) -> str:
    """``line`` behind the current :func:`timestamp`."""
    return f"{timestamp()} {line}"


def log(line: str, file: TextIO | None = None) -> None:
    """Print one timestamped line (stdout by default) and flush it, so that a job's log is current."""
    print(stamped(line), file=file or sys.stdout, flush=True)


def draws(enabled: bool = True, file: TextIO | None = None) -> bool:
    """Whether a progress bar on ``file`` (stderr by default) draws: asked for, and a terminal."""
    stream = file or sys.stderr
    return bool(enabled) and hasattr(stream, "isatty") and stream.isatty()


def progress_bar(total: int | None = None, *, desc: str | None = None, unit: str = "it", enabled: bool = True,
                 initial: int = 0, file: TextIO | None = None):
    """A tqdm bar (rate and ETA) on ``file`` (stderr by default) that draws only where
    :func:`draws` says so; elsewhere a silent one (its ``update`` and ``write`` cost nothing)."""
    from tqdm import tqdm

    stream = file or sys.stderr
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, file=stream,
                disable=not draws(enabled, stream))
