"""``degla-fast eval``: score one model on one benchmark, print a table, optionally write JSON."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import ConfigError, DataError
from . import BENCHMARKS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``degla-fast eval``."""
    parser.add_argument("--model", required=True,
                        help="open_clip model name (with --pretrained), a degla-fast checkpoint file or folder")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag or a local state-dict file")
    parser.add_argument("--benchmark", required=True, choices=BENCHMARKS, metavar="NAME",
                        help=f"one of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--data", required=True, help="benchmark file or folder (formats: docs/evaluation.md)")
    parser.add_argument("--image-root", default=None,
                        help="folder the records' image paths are relative to (default: <data folder>/images "
                             "if it exists, else the data folder)")
    parser.add_argument("--json-out", default=None, help="write the result as JSON here")
    parser.add_argument("--dataset-name", default=None,
                        help="zeroshot: clip_benchmark dataset whose class names / templates to use")
    parser.add_argument("--split", default="test", help="retrieval: Karpathy split to use (default test)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=128, help="images or captions per forward pass")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="image-decoding worker processes")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: OMP_NUM_THREADS when set, else the cores this process "
                             "may use divided by LOCAL_WORLD_SIZE; degla_fast/threads.py)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def check_device(value: str | None) -> str:
    """``--device`` -> the device to use: ``cpu``, ``cuda`` or ``cuda:N`` (N an existing GPU),
    ``mps`` where available; ``None`` picks cuda when there is a GPU. A ConfigError otherwise."""
    import torch

    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = value.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"--device: {value!r} is not cpu, cuda, cuda:N or mps")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {value}: no CUDA GPU is available here (use --device cpu)")
        if index and int(index) >= count:
            raise ConfigError(f"--device {value}: only {count} CUDA GPU(s) here (cuda:0 to cuda:{count - 1})")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {value}: the MPS backend is not available here (use --device cpu)")
    return value


def check_output(value: str | None, flag: str) -> None:
    """An output file that cannot be written is refused before any model work:
    ``cannot write PATH: reason``."""
    if value is None:
        return
    path = Path(value)
    if path.is_dir():
        raise DataError(f"cannot write {path}: is a folder ({flag} names a file)")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise DataError(f"cannot write {path}: {blocker} is a file, not a folder")
    folder = next((p for p in path.parents if p.exists()), None)
    if folder is not None and not os.access(folder if not path.exists() else path, os.W_OK):
        raise DataError(f"cannot write {path}: permission denied")


def run(args: argparse.Namespace) -> int:
    """Load the model, run the benchmark, print its table, write ``--json-out``. Returns 0."""
    from ..console import log
    from ..io import cannot_write
    from ..model import load_model
    from ..threads import set_threads
    from . import run_benchmark
    from .encode import Encoder

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    device = check_device(args.device)
    check_output(args.json_out, "--json-out")
    for flag, value in (("--data", args.data), ("--image-root", args.image_root)):
        if value is not None and not Path(value).exists():
            raise DataError(f"{value}: file not found ({flag})")
    model_path = Path(args.model)
    if args.pretrained is None and not model_path.exists() and (model_path.suffix in (".pt", ".pth", ".bin")
                                                                or os.sep in args.model):
        raise DataError(f"{args.model}: file not found (--model)")
    log(f"degla-fast eval: {args.model} on {args.benchmark} ({args.data}), device {device}, "
        f"{set_threads(args.threads)}")
    if args.pretrained is None and Path(args.model).exists():
        bundle = load_model(None, args.model, device=device)  # --model names a checkpoint of ours
    else:
        bundle = load_model(args.model, args.pretrained, device=device)
    encoder = Encoder(bundle, device=device, batch_size=args.batch_size, num_workers=args.workers,
                      progress=not args.no_progress)
    result = run_benchmark(encoder, args.benchmark, args.data, args.image_root,
                           dataset_name=args.dataset_name, split=args.split)
    result.info.update({"model": args.model, "pretrained": args.pretrained, "device": device})
    print(result.table())
    if args.json_out:
        try:
            log(f"wrote {result.save(args.json_out)}")
        except OSError as err:
            raise cannot_write(args.json_out, err) from None
    return 0
