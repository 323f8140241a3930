"""The one owner of a run's checkpoint files: writing a run's checkpoint map to one, and
restoring the map from the one the run resumes (the file format itself:
:mod:`degla_fast.checkpoint`).

A run hands the checkpointer a map of named stateful entries (torchtitan's pattern; the
entries: :mod:`.checkpoint_map`, the map: :func:`.builder.build_run`). Each entry is saved under
its name from its ``state_dict()`` and restored by its ``load_state_dict(saved)``, so save and
restore mirror each other by construction; the file's keys, and their order, are the map's. An
entry with ``top_level_keys`` (the train state: step, epoch, batch, RNG, world size) saves a
dict whose keys are the file's own, as checkpoint format version 1 has always kept them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from .. import checkpoint as files
from ..errors import DataError
from . import distributed as dist_utils


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, saved: Any) -> None: ...


class Checkpointer:
    """Checkpoints of the run in ``folder`` (``OUTPUT/checkpoints``).

    ``resume`` (``None``, ``"latest"`` or a path, see :func:`degla_fast.checkpoint.find_resume`)
    is read once here; :meth:`restore` hands each entry its part of it. ``keep_last``:
    checkpoints kept on disk. Every method is a collective under DeepSpeed and DDP: every rank
    calls it.
    """

    def __init__(self, folder: Path, resume: str | None, info: dist_utils.DistInfo, *, keep_last: int):
        self.folder, self.info, self.keep_last = Path(folder), info, keep_last
        self.resume_path = files.find_resume(resume, self.folder)
        self._state = files.load_checkpoint(self.resume_path) if self.resume_path is not None else None
        # The newest checkpoint of this run and its step (the file's name: the resume point's until the first save).
        self.last_path: Path | None = self.resume_path
        self.last_step: int | None = int(self._state["step"]) if self._state is not None else None

    @property
    def resuming(self) -> bool:
        return self.resume_path is not None

    def restore(self, states: dict[str, Stateful]) -> None:
        """Every entry of ``states`` from the resume checkpoint, in the map's order; nothing on a
        fresh start. A run may restore its map in parts, each entry once (the student's weights
        before any wrapping, the rest once built: :func:`.builder.build_run`); what is restored is
        let go here."""
        if self._state is None:
            return
        for name, part in states.items():
            keys = _top_level_keys(part)
            part.load_state_dict(self._state.pop(name, None) if keys is None else
                                 {key: self._state.pop(key, None) for key in keys})

    def save(self, states: dict[str, Stateful]) -> Path:
        """A complete checkpoint of ``states``, named for its ``step`` (the train state's). A write
        that fails on rank 0 is a :class:`DataError` on every rank (none is left waiting)."""
        payload: dict[str, Any] = {}
        for name, part in states.items():  # collectives (gathers, the engine's save): every rank
            saved = part.state_dict()
            if _top_level_keys(part) is None:
                payload[name] = saved
            else:
                payload.update(saved)
        step = int(payload["step"])
        path, error = self.folder / files.checkpoint_name(step), None
        if self.info.is_main:
            try:
                path = files.save_checkpoint(self.folder, payload, keep_last=self.keep_last)
            except DataError as err:
                error = str(err)
        dist_utils.raise_on_any_rank(error, self.info)
        self.last_path, self.last_step = path, step
        return path


def _top_level_keys(part: Stateful) -> tuple[str, ...] | None:
    """The file's top-level keys an entry's state is kept under; None: its own name's."""
    return getattr(part, "top_level_keys", None)
