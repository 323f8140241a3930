"""Named ranges and phase laps for profilers, shared by the trainer's step and the benchmarks.

A :func:`profile_range` is a ``torch.profiler`` range (chrome traces from ``--profile``) and, on
CUDA, an NVTX range too (``nsys profile -t cuda,nvtx``), so both tools see the same names.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch


def profile_range(name: str) -> contextlib.ExitStack:
    """A ``record_function`` range that is also an NVTX range on CUDA; next to nothing when no
    profiler runs."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.profiler.record_function(name))
    if torch.cuda.is_available():
        stack.enter_context(torch.cuda.nvtx.range(name))
    return stack


class PhaseClock:
    """Lap timer; ``sync`` (e.g. ``torch.cuda.synchronize``) makes laps cover the device's work,
    None keeps them host times (no sync). ``phase(name)`` is a :func:`profile_range` whose lap,
    in seconds, lands in ``times[key or name]``."""

    def __init__(self, sync: Callable[[], None] | None = None):
        self.sync = sync
        self.last = time.perf_counter()
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str, key: str | None = None):
        with profile_range(name):
            yield
        self.times[key or name] = self.lap()

    def lap(self) -> float:
        if self.sync is not None:
            self.sync()
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed
