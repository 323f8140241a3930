"""``degla-fast eval``: score one model on one benchmark, print a table, optionally write JSON."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import DataError
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
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    """Load the model, run the benchmark, print its table, write ``--json-out``. Returns 0."""
    import torch

    from ..model import load_model
    from . import run_benchmark
    from .encode import Encoder

    for flag, value in (("--data", args.data), ("--image-root", args.image_root)):
        if value is not None and not Path(value).exists():
            raise DataError(f"{value}: file not found ({flag})")
    model_path = Path(args.model)
    if args.pretrained is None and not model_path.exists() and (model_path.suffix in (".pt", ".pth", ".bin")
                                                                or os.sep in args.model):
        raise DataError(f"{args.model}: file not found (--model)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
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
        print(f"wrote {result.save(args.json_out)}")
    return 0
