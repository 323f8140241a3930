"""``degla-fast export CHECKPOINT OUT.pt``: a training checkpoint's student (or teacher) as a
plain open_clip state dict, which ``open_clip.create_model_and_transforms(name, pretrained=OUT.pt)``
and clip_benchmark (``--pretrained OUT.pt``) load directly.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..console import log
from ..errors import ConfigError, DataError
from ..io import atomic_write, cannot_write


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, which: str = "student",
                      overwrite: bool = False) -> tuple[Path, str]:
    """Write ``which`` ("student" or "teacher") weights of ``checkpoint`` (a file, a checkpoints or
    output folder, or a ``latest`` file) to ``out`` as a plain state dict of CPU fp32 tensors,
    atomically. An existing ``out`` is a :class:`ConfigError` unless ``overwrite``.

    Returns ``(out path, open_clip model name)``.
    """
    import torch  # here, not at the top: ``degla-fast export --help`` answers without it

    from ..checkpoint import is_checkpoint_name, load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    out = Path(out)
    if out.exists() and _same_file(out, path):
        raise ConfigError(f"export: the output {out} is the checkpoint being exported; choose another file name "
                          "(the training checkpoint would be replaced and the run could not resume)")
    if (out.parent / "latest").is_file() and (out.name == "latest" or is_checkpoint_name(out.name)):
        raise ConfigError(f"export: the output {out} is part of a run's checkpoints folder (it holds 'latest'); "
                          "choose a file outside it")
    if out.is_dir():
        raise DataError(f"cannot write {out}: is a folder (give a file name such as {out / 'student.pt'})")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ConfigError(f"export: {out} exists; pass --overwrite to replace it, or choose another file name")
    state = load_checkpoint(path)
    weights = state.get(which)
    if weights is None:
        raise DataError(f"{path}: holds no {which} weights (a plain CLIP run has no teacher)")
    plain = {k.removeprefix("module."): (v.detach().float() if v.is_floating_point() else v).cpu()
             for k, v in weights.items()}
    try:
        atomic_write(out, lambda handle: torch.save(plain, handle))
    except OSError as err:
        raise cannot_write(out, err) from None
    except RuntimeError as err:  # torch.save's "file write failed" (a full disk)
        raise DataError(f"cannot write {out}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return out, state["model_name"]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return a.resolve() == b.resolve()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``degla-fast export`` flags."""
    parser.add_argument("checkpoint", help="training checkpoint file, its checkpoints/ or output folder, or 'latest'")
    parser.add_argument("out", help="output .pt file (a plain open_clip state dict)")
    parser.add_argument("--teacher", action="store_true", help="export the EMA teacher instead of the student")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file (atomically)")


def run(args: argparse.Namespace) -> int:
    """Export and print where the weights went and how to load them."""
    out, name = export_checkpoint(args.checkpoint, args.out, which="teacher" if args.teacher else "student",
                                  overwrite=args.overwrite)
    log(f"wrote {out} (load with open_clip.create_model_and_transforms({name!r}, pretrained={str(out)!r}))")
    return 0
