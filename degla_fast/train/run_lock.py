"""One writer per run folder: the process that writes a run's files holds ``OUTPUT/.lock``.

Two trainers writing one folder (a job resubmitted while the first still runs, a copy-pasted
command) would interleave ``metrics.jsonl`` and race on ``checkpoints/latest``. So the writer
(rank 0: one process per run, however many nodes share the folder) takes an advisory lock,
``fcntl.flock``, on ``OUTPUT/.lock`` before its first write and holds it until the run ends; the
file holds its pid and host, so that a second writer's one-line refusal names the holder. The
kernel drops the lock with its holder's last open descriptor: a killed run leaves a stale file,
never a stale lock. (Forked data workers share the descriptor, and with it the lock, until they
exit, seconds after their trainer.)
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from ..console import log
from ..errors import DataError
from ..io import cannot_write

LOCK_NAME = ".lock"

# flock on a file system that does not support it (some network file systems) fails with these.
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
# A second writer's early look (holder_error) holds a shared lock for microseconds: the writer's
# own attempt is retried this long before it counts as refused.
_RETRY_SECONDS = 1.0


def holder_error(folder: Path) -> str | None:
    """Why ``folder`` cannot take this run's files: another process holds its lock (one line
    naming that process), else None. Reads only, so a run can say so before building anything;
    :meth:`RunLock.acquire` decides (a run may start between the two)."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # no lock file (a new folder), or one the writer will fail to open itself
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _in_use(path, fd)
    except OSError:
        return None  # a file system without flock: RunLock.acquire warns
    finally:
        os.close(fd)  # also lets go of the shared lock
    return None


class RunLock:
    """The lock on ``folder/.lock`` (:meth:`acquire`), held until :meth:`release`."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, folder: Path) -> "RunLock":
        """Lock ``folder`` (created if missing) for this process and write its pid and host into
        the lock file. Raises :class:`DataError` naming the holder's pid when another process
        holds it, ``cannot write PATH`` when the file cannot be created. Where the file system
        has no ``flock``, a warning says that a second writer goes undetected, and the run goes on."""
        folder, path = Path(folder), Path(folder) / LOCK_NAME
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise cannot_write(err.filename or path, err) from None
        deadline = time.monotonic() + _RETRY_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                message = _in_use(path, fd)
                os.close(fd)
                raise DataError(message) from None
            except OSError as err:
                os.close(fd)
                if err.errno not in _UNSUPPORTED:
                    raise cannot_write(path, err) from None
                log(f"warning: {path}: this file system cannot lock files ({os.strerror(err.errno)}); a second "
                    "run writing into the same folder will not be detected", file=sys.stderr)
                return cls(path, None)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError as err:
            os.close(fd)
            raise cannot_write(path, err) from None
        return cls(path, fd)

    def release(self) -> None:
        """Empty the lock file (no holder) and let the lock go (forked workers' copies included)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # the lock goes anyway; the file names a process that has ended
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _in_use(path: Path, fd: int) -> str:
    """The refusal when another process holds ``path``: its first line names the holder."""
    try:
        lines = os.pread(fd, 200, 0).decode("utf-8", "replace").splitlines()
    except OSError:
        lines = []
    holder = lines[0].strip() if lines and lines[0].startswith("pid ") else "its pid is not written yet"
    return (f"output: {path.parent} is in use by another run ({holder}, holding {path}); wait for it to end or "
            "stop it, or choose another --output")
