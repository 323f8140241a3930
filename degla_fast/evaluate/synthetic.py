"""The synthetic dataset's held-out tests (``degla-fast synth``): compositional choices and zero-shot tasks.

``DIR/eval/<subset>.json`` are SugarCrepe-format files (images in ``DIR/eval/images``), scored and averaged
exactly as SugarCrepe; ``DIR/zeroshot/<task>.json`` are zero-shot task files (images in
``DIR/zeroshot/images``), the tasks those the world's ``manifest.json`` lists (shape, colour, size,
texture, count), or the task files present in a folder without one.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError
from .compositional import SUGARCREPE_CATEGORIES, evaluate_sugarcrepe
from .encode import Encoder
from .metrics import mean
from .report import Result
from .zeroshot import evaluate_zeroshot

def zeroshot_tasks(data_dir: str | Path) -> list[str]:
    """The zero-shot tasks of a rendered world: its manifest's list (the manifest of ``data_dir``
    or of the world above a split folder such as ``val/``), else the task files in ``zeroshot/``."""
    data_dir = Path(data_dir)
    for manifest in (data_dir / "manifest.json", data_dir.parent / "manifest.json"):
        if manifest.is_file():
            tasks = json.loads(manifest.read_text(encoding="utf-8")).get("zeroshot_tasks")
            if tasks:
                return list(tasks)
    return sorted(p.stem for p in (data_dir / "zeroshot").glob("*.json"))


def zeroshot_chance(data_dir: str | Path) -> dict[str, float]:
    """Chance accuracy (%) of each zero-shot task of :func:`zeroshot_tasks`: 100 / its classes
    (the rendered worlds' labels are balanced)."""
    root = Path(data_dir) / "zeroshot"
    return {t: 100.0 / len(json.loads((root / f"{t}.json").read_text(encoding="utf-8"))["classnames"])
            for t in zeroshot_tasks(data_dir)}


def compositional_result(encoder: Encoder, data_dir: str | Path) -> Result:
    """The compositional half of :func:`synthetic_result` (per subset, swap / replace / add,
    compositional_avg): what a learning curve follows."""
    data_dir = Path(data_dir)
    if not (data_dir / "eval").is_dir():
        raise DataError(f"{data_dir / 'eval'}: folder not found (expected the output of `degla-fast synth`)")
    comp = evaluate_sugarcrepe(encoder, data_dir / "eval", data_dir / "eval" / "images")
    missing = [c for c in SUGARCREPE_CATEGORIES if c not in comp.metrics]
    if missing:
        raise DataError(f"{data_dir / 'eval'}: no subset files for {', '.join(missing)}")
    result = Result("synthetic", metrics=dict(comp.metrics), counts=dict(comp.counts), info={"data": str(data_dir)})
    result.metrics["compositional_avg"] = mean(comp.metrics[c] for c in SUGARCREPE_CATEGORIES)
    return result


def synthetic_result(encoder: Encoder, data_dir: str | Path) -> Result:
    """All synthetic metrics (per subset, swap / replace / add, compositional_avg, zero-shot) as a Result."""
    data_dir = Path(data_dir)
    result = compositional_result(encoder, data_dir)
    tasks = zeroshot_tasks(data_dir)
    if not tasks:
        raise DataError(f"{data_dir / 'zeroshot'}: no zero-shot task files (expected the output of `degla-fast synth`)")
    for task in tasks:
        zs = evaluate_zeroshot(encoder, data_dir / "zeroshot" / f"{task}.json", data_dir / "zeroshot" / "images")
        result.metrics[f"zeroshot_{task}"] = zs.metrics["top1"]
        result.counts[f"zeroshot_{task}"] = zs.counts["top1"]
    result.metrics["zeroshot_avg"] = mean(result.metrics[f"zeroshot_{t}"] for t in tasks)
    # What the numbers are measured against: a model that learned nothing scores these.
    chance = zeroshot_chance(data_dir)
    result.notes.append("chance: 50.0 per compositional choice; zero-shot " + ", ".join(
        f"{t} {chance[t]:.1f}" for t in tasks) + f" (average {mean(chance.values()):.1f})")
    return result


def evaluate_synthetic(bundle, data_dir: str | Path, *, device: str = "cpu", batch_size: int = 64,
                       progress: bool = False) -> dict:
    """Evaluate a ``ModelBundle`` on a synthetic dataset folder.

    Returns {"swap", "replace", "add", "compositional_avg" (mean of the three), "zeroshot_<task>"
    for every task of :func:`zeroshot_tasks`, "zeroshot_avg"}: floats in [0, 100].
    """
    encoder = Encoder(bundle, device=device, batch_size=batch_size, progress=progress)
    metrics = synthetic_result(encoder, data_dir).metrics
    keys = (("swap", "replace", "add", "compositional_avg") + tuple(f"zeroshot_{t}" for t in zeroshot_tasks(data_dir))
            + ("zeroshot_avg",))
    return {key: float(metrics[key]) for key in keys}
