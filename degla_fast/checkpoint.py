"""The checkpoint format, in one place: its name and version, the safe reader, the resolution
of ``latest``, atomic writes, the newest N kept, RNG states. (What goes into a training
checkpoint, a run's checkpoint map, and how a run is restored from one:
:class:`degla_fast.train.checkpointer.Checkpointer`, :mod:`degla_fast.train.checkpoint_map`.)

Layout of ``OUTPUT/checkpoints/``::

    step_00000100.pt        torch.save dict (format "degla-fast/checkpoint", version 1): model_name,
                            pretrained, student, step, epoch, batch (next batch of that epoch),
                            rng (one entry per rank), world_size, teacher, optimizer, deepspeed
                            (the engine folder's name), scheduler, scaler, config (in the map's
                            order; a part the run lacked is None)
    step_00000100.ds/       DeepSpeed runs only: the engine's own (sharded) checkpoint
    latest                  text: the file name of the newest checkpoint

Everything is written to a temporary name in the same folder and renamed into place, so a run
killed mid-save leaves the previous checkpoint and ``latest`` intact.

A checkpoint holds only tensors and plain containers and values (RNG states as tensors, the
config as a dict), and is read with ``torch.load(weights_only=True)``: a file that needs
anything more is refused with one line, never unpickled, so a checkpoint cannot run code.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import struct
import warnings
from collections import OrderedDict
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

from .errors import DataError, first_line
from .io import atomic_write, cannot_write, write_text_atomic

CHECKPOINT_FORMAT = "degla-fast/checkpoint"
CHECKPOINT_VERSION = 1
_NAME = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_name(step: int) -> str:
    """``step_00000100.pt`` for step 100."""
    return f"step_{step:08d}.pt"


def is_checkpoint_name(name: str) -> bool:
    """Whether ``name`` is a training checkpoint's file name (``step_00000100.pt``)."""
    return _NAME.match(name) is not None


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step of a checkpoint file named by :func:`checkpoint_name` (100 for ``step_00000100.pt``)."""
    return int(_NAME.match(Path(path).name).group(1))


def rng_state() -> dict:
    """This process's Python, NumPy, torch CPU and CUDA generator states, as tensors and plain values
    (what the safe loader reads back: no NumPy arrays, no tuples of 625 ints)."""
    version, internal, gauss_next = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"kind": str(kind), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# What torch.load(weights_only=True) reads back without help.
_PLAIN = (str, bytes, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


def plain(value: Any, where: str = "checkpoint") -> Any:
    """``value`` with NumPy arrays and scalars turned into tensors and Python numbers (and paths
    into strings), so that the safe loader reads it back. Anything else that is not a tensor, a plain value, or a dict, list
    or tuple of them raises ``TypeError`` (a bug: a file we could not load again is never written)."""
    if torch.is_tensor(value) or isinstance(value, _PLAIN):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, PurePath):  # a path in the config: its text
        return str(value)
    if isinstance(value, dict):
        items = ((k, plain(v, f"{where}[{k!r}]")) for k, v in value.items())
        return OrderedDict(items) if isinstance(value, OrderedDict) else dict(items)
    if type(value) in (list, tuple):  # not namedtuples: the safe loader refuses their classes
        return type(value)(plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"{where}: a {type(value).__module__}.{type(value).__qualname__} cannot go into a checkpoint "
                    "(the safe loader reads only tensors and plain values)")


def save_checkpoint(folder: Path, payload: dict[str, Any], *, keep_last: int) -> Path:
    """Write ``payload`` (which must hold ``step``) as ``folder/step_XXXXXXXX.pt``, point ``latest``
    at it, and delete all but the newest ``keep_last`` checkpoints. Returns the file's path.

    ``format`` and ``version`` are added; the payload goes through :func:`plain`, so the file
    loads with ``weights_only=True``. Call on one process only (rank 0). A write that fails (a
    read-only folder, a full disk) is a :class:`DataError` ``cannot write PATH: reason``; the
    previous checkpoint and ``latest`` are left as they were.
    """
    folder = Path(folder)
    path = folder / checkpoint_name(int(payload["step"]))
    payload = plain({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload})
    try:
        atomic_write(path, lambda handle: torch.save(payload, handle))
        write_text_atomic(folder / "latest", path.name + "\n")
    except OSError as err:
        raise cannot_write(path, err) from None
    except RuntimeError as err:
        # torch.save reports a failed write (a full disk) as "[enforce fail at inline_container.cc] ...".
        if "inline_container" not in str(err) and "write" not in str(err).lower():
            raise
        raise DataError(f"cannot write {path}: {_write_failure(err)}") from None
    prune(folder, keep_last)
    return path


def _write_failure(err: RuntimeError) -> str:
    text = str(err)
    if "No space left" in text:
        return "No space left on device"
    if "write failed" in text or "inline_container" in text:
        return "the write failed (is the disk full?)"
    return text.splitlines()[0] if text.strip() else type(err).__name__


def prune(folder: Path, keep_last: int) -> None:
    """Delete checkpoints (and their DeepSpeed folders) older than the newest ``keep_last``,
    never the one ``latest`` names (a folder may hold another run's higher step numbers)."""
    folder = Path(folder)
    keep = latest_name(folder)
    steps = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _NAME.match(p.name)))
    for step in steps[:-keep_last] if keep_last > 0 else []:
        if checkpoint_name(step) == keep:
            continue
        (folder / checkpoint_name(step)).unlink(missing_ok=True)
        shutil.rmtree(folder / deepspeed_tag(step), ignore_errors=True)


def latest_name(folder: Path) -> str | None:
    """The file name ``folder/latest`` holds, or None when there is no readable one."""
    try:
        return (Path(folder) / "latest").read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


# What an interrupted atomic write leaves: ".step_00000100.pt.<random>.tmp", ".latest.<random>.tmp".
_TEMPORARY = re.compile(r"^\.(step_\d{8}\.pt|latest)\..+\.tmp$")


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files a killed run left in ``folder`` (torn checkpoint writes, up
    to a checkpoint's size each); returns what was removed. Call at start-up on the process that
    saves, before any save: a temporary file of a save in progress would be removed too."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        if _TEMPORARY.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return sorted(removed)


def deepspeed_tag(step: int) -> str:
    """Name of the DeepSpeed engine's checkpoint folder for ``step``."""
    return f"step_{step:08d}.ds"


def find_resume(resume: str | None, folder: Path) -> Path | None:
    """The checkpoint file to resume from: ``None`` for a fresh start.

    ``"latest"`` is this run's newest checkpoint (a fresh start when there is none yet, so that
    a preempted job can be resubmitted unchanged); anything else must name a checkpoint file,
    a ``checkpoints`` folder, an output folder or a ``latest`` file.
    """
    if resume is None:
        return None
    if resume == "latest":
        return resolve_checkpoint(folder) if (Path(folder) / "latest").is_file() else None
    return resolve_checkpoint(resume)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint path as users give it -> the checkpoint file.

    Accepts the file itself, a ``checkpoints/`` folder or a training output folder (both read
    ``checkpoints/latest``), or the ``latest`` file. Raises :class:`DataError` when nothing is found.
    """
    path = Path(path)
    if path.is_dir():
        for latest in (path / "latest", path / "checkpoints" / "latest"):
            if latest.is_file():
                return resolve_checkpoint(latest)
        raise DataError(f"{path}: folder holds no 'latest' or 'checkpoints/latest' file")
    if path.name == "latest" and path.is_file():
        try:
            name = path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not a 'latest' pointer (not UTF-8 text at byte {err.start})") from None
        except OSError as err:
            raise DataError(f"{path}: cannot read ({err.strerror or type(err).__name__})") from None
        if not name or "\n" in name or len(name) > 255:
            raise DataError(f"{path}: not a 'latest' pointer (expected one checkpoint file name)")
        if "/" in name or "\\" in name or name in (".", ".."):
            # An absolute path or one through '..' would resume (or export) another run's file.
            raise DataError(f"{path}: names {name!r}, outside its folder {path.parent}; 'latest' holds the file "
                            "name of a checkpoint next to it")
        target = path.parent / name
        if not target.is_file():
            raise DataError(f"{path}: names {target.name!r}, which does not exist in {path.parent}")
        return target
    if not path.is_file():
        raise DataError(f"{path}: no such checkpoint file or folder")
    return path


# The first bytes of what torch.save writes: its zip format, or the legacy format (a pickle, protocol >= 2).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; every failure is a one-line :class:`DataError`.

    Only tensors and plain containers and values are unpickled: a file that needs anything
    else (a class, a function such as ``os.system``, NumPy arrays) is refused and never
    retried with the unsafe loader, so no checkpoint a user is handed can run code.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or type(err).__name__})") from None
    if not head:
        raise DataError(f"{path}: empty file, not a torch checkpoint")
    if not head.startswith(_TORCH_MAGIC):
        raise DataError(f"{path}: not a torch checkpoint (it starts with {head!r}, not torch.save's zip or "
                        "pickle header: a text or JSON file?)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the refusal below says it all
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "weights_only" not in text and "Weights only" not in text:
            raise DataError(f"{path}: not a readable torch checkpoint ({first_line(err)})") from None
        found = _REFUSED_GLOBAL.search(text)
        what = f"it names {found.group(1)}" if found else "it holds pickle instructions beyond tensors and plain values"
        raise DataError(f"{path}: refused by the safe loader (weights_only=True): {what}; a checkpoint holds only "
                        "tensors and plain values, and this file is not loaded") from None
    except (OSError, RuntimeError, EOFError, ValueError, LookupError, TypeError, struct.error) as err:
        # A corrupt or truncated file: the zip reader and the unpickler raise all of these.
        raise DataError(f"{path}: not a readable torch checkpoint ({first_line(err)})") from None


def check_format(path: Path, state: Any) -> bool:
    """Whether ``state`` (read from ``path``) is a degla-fast checkpoint; a :class:`DataError` when
    it is one of another version."""
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        return False
    if state.get("version") != CHECKPOINT_VERSION:
        raise DataError(f"{path}: checkpoint version {state.get('version')!r}, expected {CHECKPOINT_VERSION}")
    return True


def load_checkpoint(path: Path) -> dict:
    """Read a training checkpoint written by :func:`save_checkpoint` with the safe loader
    (``weights_only=True``: tensors and plain values only; anything else is refused, never
    retried unsafely). Every problem is a one-line :class:`DataError` naming the file."""
    state = read_checkpoint(path)
    if not check_format(path, state):
        raise DataError(f"{path}: not a degla-fast training checkpoint (no format {CHECKPOINT_FORMAT!r})")
    for key in ("student", "optimizer", "step", "epoch", "batch"):
        if key not in state:
            raise DataError(f"{path}: training checkpoint lacks {key!r} (written by export, not by train?)")
    return state


def cpu_copy(state: dict) -> dict:
    """``state`` with every tensor detached and copied to the CPU: what a checkpoint keeps of a
    state dict (no view into live device memory, no autograd history)."""
    return {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v for k, v in state.items()}
