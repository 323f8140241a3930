"""``python -m degla_fast.integrations.open_clip_train ARGS...``: open_clip_train's own ``main(ARGS)``
with the DeGLA loss in place of open_clip's (plain CLIP, K = 0: the values and gradients of its
``ClipLoss`` through our backends); see :mod:`degla_fast.integrations.open_clip`.

ARGS are open_clip_train's, unchanged (``python -m open_clip_train.main --help``). Its first log
line says which loss runs. Exit status: 0, 1 when open_clip_train's ``main`` returns an error
status (it does so for an existing experiment name), 2 after a one-line error of ours.
"""
from __future__ import annotations

import sys

from ..errors import DeglaError
from .open_clip import run_open_clip_train


def main(argv: list[str] | None = None) -> int:
    try:
        status = run_open_clip_train(sys.argv[1:] if argv is None else argv)
    except DeglaError as err:
        print(f"degla-fast: error: {err}", file=sys.stderr)
        return 2
    return 0 if status in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
