"""Stop signals (SIGTERM, SIGINT) in degla-fast's processes: the training process turns them into
a stop request; the processes it starts for data leave them to it.

Schedulers stop a job by signalling a whole process group (SLURM, Kubernetes, ``timeout``;
torchrun signals each rank's group), so every data worker gets the signal too. A worker that died
of it turned a stop into a crash (the DataLoader raised "worker killed by signal", DALI hung), so:

- the trainer records a stop request (:data:`stop_request`): the current step finishes, a
  checkpoint is written, the run exits 0. A repeat within :data:`REPEAT_WINDOW` seconds is the
  same request (one event can reach a process twice: a scheduler's signal and a launcher
  forwarding it); a later one stops at once (:class:`StopNow`), without a checkpoint;
- data worker processes are started while the signals are held (:func:`held`), so that none can
  reach a worker before it is ready for it, and each worker calls :func:`leave_to_parent`: SIGINT
  ignored, SIGTERM taken from its parent only (``Process.terminate``, how the DataLoader, DALI and
  process pools end a worker that does not stop by itself).

Nothing here acts at import: the trainer installs the handlers (``degla_fast.train``).
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Seconds after a first stop signal in which another one is the same request (SLURM signals every
#: process of a step and torchrun forwards to each rank: milliseconds apart), not an insistence.
REPEAT_WINDOW = 2.0


class StopNow(KeyboardInterrupt):
    """A stop signal repeated after :data:`REPEAT_WINDOW`: stop at once, without a checkpoint. A
    ``KeyboardInterrupt``, so that code which cleans up after Ctrl-C (DataLoader, process pools)
    does so; the command line prints :meth:`__str__` as one line and exits with :attr:`status`."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def status(self) -> int:
        """The shell's status for a process ended by this signal: 128 + its number."""
        return 128 + self.signum

    def __str__(self) -> str:
        return (f"stopped at once by a repeated {signal.Signals(self.signum).name} (no stop checkpoint; "
                "--resume latest continues from the last one)")


class StopRequest:
    """The process's stop request: set by the first SIGTERM or SIGINT once :meth:`install`\\ ed.

    ``requested`` is a host variable the training loop may read after every step at no cost;
    ``clock`` (seconds) is there for tests of the repeat window."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.signum: int | None = None
        self.first_at = 0.0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def install(self) -> bool:
        """Handle the stop signals from now on. Returns whether this call installed the handlers
        (its caller then :meth:`restore`\\ s them); False when they are installed already (a
        request made since stays) or off the main thread (Python handles signals there only)."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return False
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def restore(self) -> None:
        """The handlers from before :meth:`install`; the request is forgotten."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self.signum = None

    def _handle(self, signum, frame) -> None:
        now = self.clock()
        if self.signum is None:
            self.signum, self.first_at = signum, now
        elif now - self.first_at >= REPEAT_WINDOW:  # the user (or the scheduler) insists
            raise StopNow(signum)


#: The one stop request of this process (signal handlers are per process).
stop_request = StopRequest()


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Within: the stop signals are blocked in the calling thread. A process started here, forked
    or spawned (a signal mask survives exec), starts with them blocked, so a signal sent to the
    process group cannot end it before it has called :func:`leave_to_parent`; threads started
    here keep them blocked too. One meant for this process waits for the end of the block (or is
    taken by another thread: the handler runs on the main thread either way)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def leave_to_parent(*_) -> None:
    """Worker set-up (a DataLoader ``worker_init_fn``, a pool ``initializer``): this process
    ignores SIGINT and takes SIGTERM only from its parent, which owns shutdown. A SIGTERM from
    anyone else (a scheduler signalling the process group) is dropped; one from the parent
    (``Process.terminate``), or any once the parent is gone, ends the process at once. Nothing
    happens in a process that is not a multiprocessing child (the trainer itself)."""
    if multiprocessing.parent_process() is None:
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Blocked in this thread and (held() at the start) in every other: the SIGTERMs queue up for
    # the thread below, which alone learns who sent them (a Python handler cannot).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    parent = os.getppid()
    threading.Thread(target=_sigterm_from_parent_only, args=(parent,), name="degla-sigterm", daemon=True).start()


def _sigterm_from_parent_only(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent or os.getppid() != parent:
            os._exit(0)  # as torch's own worker handler does when its parent ends it
