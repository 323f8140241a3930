"""Training checkpoints: atomic files, the newest N kept, a ``latest`` pointer, exact resume.

Layout of ``OUTPUT/checkpoints/``::

    step_00000100.pt        torch.save dict (format "degla-fast/checkpoint", version 1): model_name,
                            pretrained, student, teacher, optimizer, scheduler, scaler, step, epoch,
                            batch (next batch of that epoch), rng (one entry per rank), config
    step_00000100.ds/       DeepSpeed runs only: the engine's own (sharded) checkpoint
    latest                  text: the file name of the newest checkpoint

Everything is written to a temporary name in the same folder and renamed into place, so a run
killed mid-save leaves the previous checkpoint and ``latest`` intact.
"""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..io import atomic_write, write_text_atomic
from ..model import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, resolve_checkpoint

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_name(step: int) -> str:
    """``step_00000100.pt`` for step 100."""
    return f"step_{step:08d}.pt"


def rng_state() -> dict:
    """This process's Python, NumPy, torch CPU and CUDA generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, payload: dict[str, Any], *, keep_last: int) -> Path:
    """Write ``payload`` (which must hold ``step``) as ``folder/step_XXXXXXXX.pt``, point ``latest``
    at it, and delete all but the newest ``keep_last`` checkpoints. Returns the file's path.

    ``format`` and ``version`` are added. Call on one process only (rank 0).
    """
    folder = Path(folder)
    path = folder / checkpoint_name(int(payload["step"]))
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    atomic_write(path, lambda handle: torch.save(payload, handle))
    write_text_atomic(folder / "latest", path.name + "\n")
    prune(folder, keep_last)
    return path


def prune(folder: Path, keep_last: int) -> None:
    """Delete checkpoints (and their DeepSpeed folders) older than the newest ``keep_last``."""
    steps = sorted(int(m.group(1)) for p in Path(folder).iterdir() if (m := _NAME.match(p.name)))
    for step in steps[:-keep_last] if keep_last > 0 else []:
        (Path(folder) / checkpoint_name(step)).unlink(missing_ok=True)
        shutil.rmtree(Path(folder) / deepspeed_tag(step), ignore_errors=True)


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


def load_checkpoint(path: Path) -> dict:
    """Read a training checkpoint written by :func:`save_checkpoint` (our own file: full unpickling)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as err:
        raise DataError(f"{path}: not a readable checkpoint ({type(err).__name__})") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: not a degla-fast training checkpoint (no format {CHECKPOINT_FORMAT!r})")
    if state.get("version") != CHECKPOINT_VERSION:
        raise DataError(f"{path}: checkpoint version {state.get('version')!r}, expected {CHECKPOINT_VERSION}")
    for key in ("student", "optimizer", "step", "epoch", "batch"):
        if key not in state:
            raise DataError(f"{path}: training checkpoint lacks {key!r} (written by export, not by train?)")
    return state
