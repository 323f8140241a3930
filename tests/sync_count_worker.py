"""Count every tensor-to-host read a training run makes, per step (used by tests/test_train_syncs.py).

``python tests/sync_count_worker.py OUT.json TRAIN_ARGS...`` (or under torchrun, one file per
rank: ``OUT.json`` becomes ``OUT.rank<N>.json``) runs ``degla-fast train TRAIN_ARGS`` while a
``TorchFunctionMode`` records ``Tensor.item``, ``__bool__``, ``__float__``, ``__int__``,
``__index__``, ``tolist``, ``cpu``, ``numpy`` and ``__format__`` calls and a patch records
``torch.cuda.synchronize``: on a GPU each of them waits for the device. A ``TorchDispatchMode``
also records ATen's ``_local_scalar_dense`` (as ``item``) where no recorded call made it: the
function mode does not see the backward passes of custom autograd Functions, where a
``float(tensor)`` once read the logit scale per row block. ``SYNC_COUNT_NAN_AT=N``
makes the N-th loss NaN (on every rank), a step the trainer must skip.

Reads made by DeepSpeed's own code are named ``deepspeed:NAME``. Reads are attributed to the step that precedes them (reads before the first step are set-up,
left out). Not recorded: the data loader's own work (CPU tensors that never reach the device
before the loader hands them over), the text tower's trim of CPU tokens (a branch taken only
for CPU tensors) and checkpoint writes (a save copies everything to the
host by design, every ``save_every`` steps).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

HOST_READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
              torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
              torch.Tensor.__format__}


class HostReads(TorchFunctionMode):
    """Records host reads into ``self.steps[i]`` (a list of names) for the current step ``i``."""

    def __init__(self):
        super().__init__()
        self.step = 0
        self.paused = 0
        self.inside = 0
        self.steps: dict[int, list[str]] = {}

    def note(self, name: str) -> None:
        if not self.paused and self.step > 0 and not _cpu_only_branch():
            caller = sys._getframe(2).f_code.co_filename  # who called the Tensor method
            if f"{os.sep}deepspeed{os.sep}" in caller:
                name = f"deepspeed:{name}"  # DeepSpeed's own reads, told apart from the trainer's
            if os.environ.get("SYNC_COUNT_WHERE"):  # debugging: where each read comes from
                import traceback

                frames = traceback.extract_stack()[:-3][-4:]
                name += " @ " + " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))
            self.steps.setdefault(self.step, []).append(name)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.note(func.__name__)
            self.inside += 1  # its own _local_scalar_dense is already counted
            try:
                return func(*args, **(kwargs or {}))
            finally:
                self.inside -= 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


class ScalarReads(TorchDispatchMode):
    """``_local_scalar_dense`` calls that no recorded Tensor method made (backward passes included)."""

    def __init__(self, recorder: HostReads):
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.recorder.inside:
            self.recorder.note("item")
        return func(*args, **(kwargs or {}))


def _cpu_only_branch() -> bool:
    """Whether the read comes from code that runs only for CPU tensors (free there, never taken
    on a GPU): the text tower's own trim of CPU tokens (model.py, ``tokens.device.type == "cpu"``)."""
    frame = sys._getframe(3)
    for _ in range(4):
        if frame is None:
            return False
        if frame.f_code.co_name == "trim_tokens" and frame.f_back is not None \
                and frame.f_back.f_code.co_name == "_encode_text_trimmed":
            return True
        frame = frame.f_back
    return False


class _QuietData:
    """The training data with the recorder paused while a batch is produced."""

    def __init__(self, data, recorder: HostReads):
        self._data, self._recorder = data, recorder

    def __len__(self):
        return len(self._data)

    def __getattr__(self, name):
        return getattr(self._data, name)

    def __iter__(self):
        return self.batches(iter(self._data))

    def batches(self, it=None):
        it = self._data.batches() if it is None else it
        while True:
            with self._recorder.pause():
                try:
                    batch = next(it)
                except StopIteration:
                    return
            yield batch


def run(train_args: list[str]) -> dict[int, list[str]]:
    """Run ``degla-fast train train_args`` in this process; {step: [host reads after it]}."""
    import degla_fast.data as data_module
    from degla_fast.train import builder
    from degla_fast.train import loop
    from degla_fast.train import main as train_main
    from degla_fast.train.checkpointer import Checkpointer

    recorder = HostReads()
    real_build, real_step, real_save = data_module.build_train_data, loop.train_step, Checkpointer.save
    real_sync = torch.cuda.synchronize

    def build(*args, **kwargs):
        return _QuietData(real_build(*args, **kwargs), recorder)

    def step(*args, **kwargs):
        recorder.step += 1
        return real_step(*args, **kwargs)

    def save(self, *args, **kwargs):
        with recorder.pause():
            return real_save(self, *args, **kwargs)

    def synchronize(*args, **kwargs):
        recorder.note("torch.cuda.synchronize")
        return real_sync(*args, **kwargs)

    real_from_spec, real_descriptor = builder.DeGLALoss.from_spec, builder.DeGLALoss.__dict__["from_spec"]
    nan_at = int(os.environ.get("SYNC_COUNT_NAN_AT", "0"))  # this loss call (1-based) is made NaN, on every rank

    def from_spec(spec, **kwargs):
        loss_fn = real_from_spec(spec, **kwargs)
        calls = [0]

        def loss(*args):
            out = loss_fn(*args)
            calls[0] += 1
            if calls[0] == nan_at:
                out.total = out.total * float("nan")
            return out

        return loss

    if nan_at:
        builder.DeGLALoss.from_spec = from_spec
    data_module.build_train_data, loop.train_step, Checkpointer.save = build, step, save
    torch.cuda.synchronize = synchronize
    try:
        with recorder, ScalarReads(recorder):
            status = train_main.main(train_args)
    finally:
        data_module.build_train_data, loop.train_step, Checkpointer.save = real_build, real_step, real_save
        builder.DeGLALoss.from_spec = real_descriptor
        torch.cuda.synchronize = real_sync
    if status != 0:
        raise SystemExit(f"training failed with status {status}")
    return {i: recorder.steps.get(i, []) for i in range(1, recorder.step + 1)}


def main() -> int:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    steps = run(args)
    if "RANK" in os.environ:
        out = out.with_suffix(f".rank{os.environ['RANK']}.json")
    out.write_text(json.dumps({str(k): v for k, v in steps.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
