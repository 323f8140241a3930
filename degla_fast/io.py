"""File I/O shared by every command: atomic writes and configuration-file reads.

Atomic writes: every file the project writes goes through here.

A crash or a preemption in the middle of a write must never leave a half-written checkpoint,
dataset index or results file behind a name that readers trust. Each writer fills a temporary
file in the destination's folder (same file system, so the rename is atomic), syncs it, gives
it ordinary permissions (``mkstemp`` creates files readable by the owner only) and renames it.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import ConfigError

FILE_MODE = 0o644


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on a clean exit it is renamed onto ``path``,
    on an exception it is removed. For writers that want a file name (``savefig``, profilers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Any], object]) -> Path:
    """Call ``write(binary_file)`` on a temporary file, fsync it, then rename it onto ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int = 1) -> Path:
    """Write ``data`` as indented UTF-8 JSON (non-ASCII kept as is) to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def decode_utf8(path, data: bytes, error: type[Exception] = ConfigError, hint: str = "", skip: int = 0) -> str:
    """``data[skip:]`` decoded as UTF-8, or ``error`` in one line naming ``path``, the byte and its
    offset in the file (``skip``: bytes already dropped, such as a byte-order mark) and ``hint``."""
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        at = skip + err.start
        raise error(f"{path}: not UTF-8 text (byte 0x{data[at]:02x} at byte offset {at}: {err.reason}){hint}") from None


def read_config_mapping(path: str | os.PathLike, what: str) -> dict:
    """The mapping held by a configuration file: JSON for ``.json``, YAML otherwise (an empty
    YAML file is ``{}``). ``what`` names the setting that pointed at the file. Raises
    :class:`ConfigError`: ``WHAT: no such file PATH``, ``PATH:LINE: not valid JSON (why)`` (or
    YAML), ``PATH: expected a JSON object`` (or a YAML mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: no such file {path}")
    text = decode_utf8(path, path.read_bytes(), ConfigError, "; save it as UTF-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return data
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping")
    return data


def check_output_folder(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as a Path when it is a folder or can be made one; when it, or a folder on the way
    to it, is a file: ``cannot write PATH: is a file, not a folder (FLAG names a folder)`` or
    ``cannot write PATH: BLOCKER is a file, not a folder`` (a :class:`DataError`). Writes nothing,
    so that a command refuses its output before any work."""
    from .errors import DataError

    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker == path:
        raise DataError(f"cannot write {path}: is a file, not a folder ({flag} names a folder)")
    if blocker is not None:
        raise DataError(f"cannot write {path}: {blocker} is a file, not a folder")
    return path


def cannot_write(path: str | os.PathLike, err: OSError) -> "DataError":
    """The one-line error for an output that could not be written: ``cannot write PATH: reason``
    (a folder on the way that is a file is named as such, rather than ``File exists``)."""
    from .errors import DataError

    path = Path(path)
    reason = err.strerror or str(err) or type(err).__name__
    if isinstance(err, IsADirectoryError):
        reason = "is a folder"
    elif isinstance(err, (FileExistsError, NotADirectoryError)):
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            reason = f"{blocker} is a file, not a folder"
        elif path.is_dir():
            reason = "is a folder"
    return DataError(f"cannot write {path}: {reason}")
