"""``python tests/stop_probe.py ARGS...`` runs ``degla-fast ARGS...`` and pauses at one moment, so
that a test can signal the process group exactly then (tests/test_train_preemption.py).

``STOP_PROBE_AT`` names the moment: ``imports`` (the command line has started, the trainer's
modules are not imported yet), ``build`` (start-up: before the model and data are built),
``step:N`` (inside the N-th training step, before its work), ``save:N`` (inside the write of
step N's checkpoint, the file written but not yet renamed into place) or ``worker-start`` (a
spawned worker process, such as DALI's readers, is starting: the trainer waits for it). There
the process writes ``STOP_PROBE_DIR/<moment>.rank<RANK>`` (``:`` as ``-``; the file holds its
pid) and sleeps ``STOP_PROBE_PAUSE`` seconds (default 3); then it goes on.
"""
import importlib
import os
import sys
import time
from pathlib import Path


def _pause(moment: str) -> None:
    marker = Path(os.environ["STOP_PROBE_DIR"]) / f"{moment.replace(':', '-')}.rank{os.environ.get('RANK', '0')}"
    marker.write_text(str(os.getpid()))
    time.sleep(float(os.environ.get("STOP_PROBE_PAUSE", "3")))


def _before_trainer_imports(moment: str) -> None:
    real_import = importlib.import_module

    def import_module(name, *args, **kwargs):
        if name == "degla_fast.train.main" and name not in sys.modules:
            _pause(moment)
        return real_import(name, *args, **kwargs)

    importlib.import_module = import_module


def _in_build(moment: str) -> None:
    from degla_fast.train import loop

    real_build = loop.build_run

    def build_run(*args, **kwargs):
        _pause(moment)
        return real_build(*args, **kwargs)

    loop.build_run = build_run


def _in_step(moment: str, n: int) -> None:
    from degla_fast.train import loop

    real_step, calls = loop.train_step, [0]

    def train_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            _pause(moment)
        return real_step(*args, **kwargs)

    loop.train_step = train_step


def _in_save(moment: str, n: int) -> None:
    from degla_fast import checkpoint

    real_write = checkpoint.atomic_write

    def atomic_write(path, write):
        if Path(path).name != checkpoint.checkpoint_name(n):
            return real_write(path, write)

        def write_then_pause(handle):
            write(handle)
            _pause(moment)

        return real_write(path, write_then_pause)

    checkpoint.atomic_write = atomic_write


def install(moment: str) -> None:
    kind, _, n = moment.partition(":")
    if kind == "imports":
        _before_trainer_imports(moment)
    elif kind == "build":
        _in_build(moment)
    elif kind == "step":
        _in_step(moment, int(n))
    elif kind == "save":
        _in_save(moment, int(n))
    elif kind != "worker-start":  # that one is done where spawned children import this file
        raise SystemExit(f"stop_probe: unknown STOP_PROBE_AT {moment!r}")


if __name__ == "__mp_main__" and os.environ.get("STOP_PROBE_AT") == "worker-start":
    # A spawned child (multiprocessing runs the parent's main file as __mp_main__ first).
    _pause("worker-start")


if __name__ == "__main__":
    if os.environ.get("STOP_PROBE_AT"):
        install(os.environ["STOP_PROBE_AT"])
    from degla_fast.cli import main

    sys.exit(main(sys.argv[1:]))
