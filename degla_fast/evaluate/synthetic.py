"""The synthetic dataset's held-out tests (``degla-fast synth``): compositional choices and zero-shot tasks.

``DIR/eval/<subset>.json`` are SugarCrepe-format files (images in ``DIR/eval/images``), scored and averaged
exactly as SugarCrepe; ``DIR/zeroshot/shape.json`` and ``DIR/zeroshot/colour.json`` are zero-shot task files
(images in ``DIR/zeroshot/images``).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .compositional import SUGARCREPE_CATEGORIES, evaluate_sugarcrepe
from .encode import Encoder
from .metrics import mean
from .report import Result
from .zeroshot import evaluate_zeroshot

ZEROSHOT_TASKS = ("shape", "colour")


def synthetic_result(encoder: Encoder, data_dir: str | Path) -> Result:
    """All synthetic metrics (per subset, swap / replace / add, compositional_avg, zero-shot) as a Result."""
    data_dir = Path(data_dir)
    if not (data_dir / "eval").is_dir():
        raise DataError(f"{data_dir / 'eval'}: folder not found (expected the output of `degla-fast synth`)")
    comp = evaluate_sugarcrepe(encoder, data_dir / "eval", data_dir / "eval" / "images")
    missing = [c for c in SUGARCREPE_CATEGORIES if c not in comp.metrics]
    if missing:
        raise DataError(f"{data_dir / 'eval'}: no subset files for {', '.join(missing)}")
    result = Result("synthetic", metrics=dict(comp.metrics), counts=dict(comp.counts), info={"data": str(data_dir)})
    result.metrics["compositional_avg"] = mean(comp.metrics[c] for c in SUGARCREPE_CATEGORIES)
    for task in ZEROSHOT_TASKS:
        zs = evaluate_zeroshot(encoder, data_dir / "zeroshot" / f"{task}.json", data_dir / "zeroshot" / "images")
        result.metrics[f"zeroshot_{task}"] = zs.metrics["top1"]
        result.counts[f"zeroshot_{task}"] = zs.counts["top1"]
    result.metrics["zeroshot_avg"] = mean(result.metrics[f"zeroshot_{t}"] for t in ZEROSHOT_TASKS)
    return result


def evaluate_synthetic(bundle, data_dir: str | Path, *, device: str = "cpu", batch_size: int = 64,
                       progress: bool = False) -> dict:
    """Evaluate a ``ModelBundle`` on a synthetic dataset folder.

    Returns {"swap", "replace", "add", "compositional_avg" (mean of the three), "zeroshot_shape",
    "zeroshot_colour", "zeroshot_avg"}: floats in [0, 100].
    """
    encoder = Encoder(bundle, device=device, batch_size=batch_size, progress=progress)
    metrics = synthetic_result(encoder, data_dir).metrics
    keys = ("swap", "replace", "add", "compositional_avg") + tuple(f"zeroshot_{t}" for t in ZEROSHOT_TASKS) + ("zeroshot_avg",)
    return {key: float(metrics[key]) for key in keys}
