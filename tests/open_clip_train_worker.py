"""``python tests/open_clip_train_worker.py OUT_DIR ARGS...``: the open_clip_train launcher's
``main(ARGS)`` for tests/test_open_clip.py, one process of a run (``RANK``/``WORLD_SIZE`` from the
environment). Writes every step's loss terms to ``OUT_DIR/losses-rank<RANK>.json``.

Two test-only workarounds, both here: open_clip_train wraps its model in DDP with
``device_ids=[device]``, which torch refuses for a CPU module, so that argument is dropped for
CPU devices (the wrapper is otherwise torch's DistributedDataParallel); and the loss records its
terms through a forward hook on the ``DeGLALoss`` the launcher builds.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.parallel

_DDP = torch.nn.parallel.DistributedDataParallel


class _CpuDDP(_DDP):
    def __init__(self, module, device_ids=None, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None  # what DDP needs for a CPU module
        super().__init__(module, device_ids=device_ids, **kwargs)


def main() -> int:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    torch.nn.parallel.DistributedDataParallel = _CpuDDP  # open_clip_train.main looks it up at call time
    import degla_fast.integrations.open_clip as integration
    from degla_fast.integrations.open_clip_train import main as launcher

    steps: list[dict] = []
    build = integration.degla_loss_from_args

    def degla_loss_from_args(args, **kwargs):
        loss = build(args, **kwargs)
        loss.register_forward_hook(lambda module, inputs, output: steps.append(
            {name: float(value) for name, value in output.items()}))
        return loss

    integration.degla_loss_from_args = degla_loss_from_args
    status = launcher(argv)
    (out / f"losses-rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(steps))
    return status


if __name__ == "__main__":
    sys.exit(main())
