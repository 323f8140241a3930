"""``python -m degla_fast.integrations.open_clip_train ARGS...``: open_clip_train's own ``main(ARGS)``
with the DeGLA loss in place of open_clip's; see :mod:`degla_fast.integrations.open_clip`.

ARGS are open_clip_train's (``python -m open_clip_train.main --help``), passed through unchanged,
plus the flags below (docs/open_clip.md). Without ``--num-negatives`` (K = 0) it is the drop-in:
the values and gradients of open_clip's ``ClipLoss`` through our backends. With K > 0 the
training CSV's column ``--csv-hard-captions-key`` gives each caption K hard negatives, the loss is
DeGLA's, and an EMA teacher follows the student. Its first log line says which loss runs. Exit
status: 0, 1 when open_clip_train's ``main`` returns an error status (it does so for an existing
experiment name), 2 after a one-line error of ours.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from ..errors import ConfigError, DeglaError
from ..loss.spec import LossSpec

#: LossSpec field -> launcher flag (the names ``degla-fast train`` uses, ``--loss-`` where
#: open_clip_train's own flags would make a bare name unclear).
LOSS_FLAGS = {"num_negatives": "--num-negatives", "igc_weight": "--igc-weight", "tgc_weight": "--tgc-weight",
              "distill_weight": "--distill-weight", "tgc_scale": "--tgc-scale", "backend": "--loss-backend",
              "official_tgc_indexing": "--official-tgc-indexing"}
#: The one default that differs from LossSpec's: open_clip_train's CSVs have no negatives, so the
#: launcher without flags stays the plain-CLIP drop-in.
LAUNCHER_DEFAULTS = {"num_negatives": 0}


METAVARS = {"num_negatives": "K", "igc_weight": "W", "tgc_weight": "W", "distill_weight": "W", "tgc_scale": "SCALE"}


def _default(f: dataclasses.Field):
    return LAUNCHER_DEFAULTS.get(f.name, f.default)


def build_parser() -> argparse.ArgumentParser:
    """Our flags only (every other argument is open_clip_train's); defaults and docs from LossSpec's
    fields and the trainer's ``ema.decay``. No abbreviations: a prefix of ours must not swallow one of
    open_clip_train's (``--distill`` is neither ``--distill-weight`` nor ``--distill-model``)."""
    from ..train.config import EMAConfig

    parser = argparse.ArgumentParser(
        prog="python -m degla_fast.integrations.open_clip_train", add_help=False, allow_abbrev=False,
        description="open_clip_train's own main(ARGS) with the DeGLA loss; these flags, then every open_clip_train "
                    "argument (python -m open_clip_train.main --help).")
    group = parser.add_argument_group("DeGLA (degla-fast)")
    group.add_argument("--csv-hard-captions-key", metavar="COL",
                       help="the training CSV's column of hard-negative captions (needed with --num-negatives > 0)")
    group.add_argument("--csv-negatives-separator", metavar="SEP", default="|",
                       help="what joins a row's hard negatives in that column (default: |)")
    fields = {f.name: f for f in dataclasses.fields(LossSpec)}
    for name, flag in LOSS_FLAGS.items():
        f, default = fields[name], _default(fields[name])
        doc = f"{f.metadata['doc']} (default: {default})"
        if isinstance(default, bool):
            group.add_argument(flag, dest=name, action="store_true", help=doc)
        else:
            choices = f.metadata.get("choices")
            group.add_argument(flag, dest=name, type=type(default), default=default, help=doc, choices=choices,
                               metavar=METAVARS.get(name) or "{" + ",".join(choices) + "}")
    decay = next(f for f in dataclasses.fields(EMAConfig) if f.name == "decay")
    group.add_argument("--ema-decay", type=float, default=decay.default, metavar="DECAY",
                       help=f"{decay.metadata['doc']} (default: {decay.default})")
    return parser


def split_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(our flags, open_clip_train's arguments, in their order)."""
    return build_parser().parse_known_args(argv)


def _flagged(err: ConfigError) -> ConfigError:
    """A LossSpec message that starts with a field name, with the launcher's flag in its place."""
    message = str(err)
    for name, flag in LOSS_FLAGS.items():
        if message.startswith(name):
            return ConfigError(f"{flag}: {message}")
    return err


def main(argv: list[str] | None = None) -> int:
    from .open_clip import DeglaOptions, run_open_clip_train

    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:  # ours, then open_clip_train's own (its parser exits)
        build_parser().print_help()
        print()
    try:
        ours, rest = split_args(argv)
        options = DeglaOptions(hard_captions_key=ours.csv_hard_captions_key,
                               negatives_separator=ours.csv_negatives_separator, ema_decay=ours.ema_decay)
        loss_kwargs = {name: getattr(ours, name) for name in LOSS_FLAGS}
        try:
            status = run_open_clip_train(rest, options=options, **loss_kwargs)
        except ConfigError as err:
            raise _flagged(err) from None
    except DeglaError as err:
        print(f"degla-fast: error: {err}", file=sys.stderr)
        return 2
    return 0 if status in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
