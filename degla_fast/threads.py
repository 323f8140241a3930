"""How many CPU threads torch uses in a process: the one rule of every CPU-heavy command.

torch's default is one intra-op thread per core of the machine, in every process. Processes that
share a node (``torchrun --nproc_per_node 2`` on CPUs, the demo's side-by-side fine-tunes) then
run several times more busy-waiting OpenMP threads than there are cores, and each step waits for
the slowest of them (benchmarks/bench_threads.py measures the cost). The rule, first match:

1. the thread count the user asked for (a flag or configuration field);
2. ``OMP_NUM_THREADS`` when it is set (torch reads it at import; it is named in the start line);
3. the cores this process may run on (``os.sched_getaffinity``: a SLURM or cgroup CPU set,
   ``taskset``), divided by the processes of the job on this node (``LOCAL_WORLD_SIZE``, which
   torchrun and DeepSpeed's launcher set; a command that starts its own processes passes their
   number), at least 1.

:func:`choose_threads` is the rule without torch; :func:`set_threads` applies it and returns the
words a command's start line says it with.
"""
from __future__ import annotations

import os


def available_cores() -> int:
    """The cores this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _omp_threads() -> int | None:
    """``OMP_NUM_THREADS`` as a positive count (its first level when nested: ``"4,2"``), else None."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    try:
        threads = int(value)
    except ValueError:
        return None
    return threads if threads > 0 else None


def choose_threads(requested: int | None = None, processes: int | None = None) -> tuple[int, str]:
    """``(threads, why)`` by the module's rule. ``requested``: the user's count (None: not asked);
    ``processes``: this job's processes on this node (None: ``LOCAL_WORLD_SIZE``, else 1)."""
    if requested is not None:
        return int(requested), "as asked"
    omp = _omp_threads()
    if omp is not None:
        return omp, "OMP_NUM_THREADS"
    if processes is None:
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    processes = max(1, processes)
    cores = available_cores()
    return max(1, cores // processes), f"{cores} cores / {processes} local process{'es' if processes > 1 else ''}"


def set_threads(requested: int | None = None, processes: int | None = None) -> str:
    """Set torch's intra-op threads by :func:`choose_threads`; returns ``"N CPU threads (why)"``."""
    import torch

    threads, why = choose_threads(requested, processes)
    torch.set_num_threads(threads)
    return f"{threads} CPU thread{'s' if threads > 1 else ''} ({why})"


def lowest_cpu_priority() -> None:
    """Give the calling thread the lowest CPU priority, nice 19 (Linux keeps one per thread): it
    then runs on a core nothing else wants and yields to any other work, another process's
    included. A no-op where threads have no priority of their own or it may not be changed."""
    import sys
    import threading

    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass
