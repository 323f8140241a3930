"""Evaluation of CLIP models on compositional, zero-shot and retrieval benchmarks.

One module per benchmark family (``compositional``: SugarCrepe, VALSE, word order; ``aro``: VG-Relation and
VG-Attribution; ``zeroshot``; ``retrieval``; ``synthetic``), sharing ``encode`` (batched no-grad features,
caption-choice scores), ``metrics`` (the math) and ``report`` (table and JSON).

    from degla_fast.evaluate import run_benchmark, BENCHMARKS
    from degla_fast.evaluate.encode import Encoder
    result = run_benchmark(Encoder(bundle, device="cuda"), "sugarcrepe", "data/sugarcrepe", "coco/val2017")
    print(result.table())
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

BENCHMARKS = ("sugarcrepe", "aro-relation", "aro-attribution", "coco-order", "flickr-order", "valse",
              "zeroshot", "retrieval", "synthetic")


def run_benchmark(encoder, benchmark: str, data: str | Path, image_root: str | Path | None = None, *,
                  dataset_name: str | None = None, split: str = "test"):
    """Run ``benchmark`` (one of :data:`BENCHMARKS`) on ``data`` with an ``encode.Encoder``; returns a
    ``report.Result``. ``dataset_name`` is used by zeroshot (clip_benchmark class names and templates),
    ``split`` by retrieval (Karpathy split)."""
    if benchmark == "sugarcrepe":
        from .compositional import evaluate_sugarcrepe
        return evaluate_sugarcrepe(encoder, data, image_root)
    if benchmark in ("aro-relation", "aro-attribution"):
        from .aro import evaluate_aro
        return evaluate_aro(encoder, data, image_root, kind=benchmark.split("-")[1])
    if benchmark in ("coco-order", "flickr-order"):
        from .compositional import evaluate_order
        return evaluate_order(encoder, data, image_root, name=benchmark)
    if benchmark == "valse":
        from .compositional import evaluate_valse
        return evaluate_valse(encoder, data, image_root)
    if benchmark == "zeroshot":
        from .zeroshot import evaluate_zeroshot
        return evaluate_zeroshot(encoder, data, image_root, dataset_name=dataset_name)
    if benchmark == "retrieval":
        from .retrieval import evaluate_retrieval
        return evaluate_retrieval(encoder, data, image_root, split=split)
    if benchmark == "synthetic":
        from .synthetic import synthetic_result
        return synthetic_result(encoder, data)
    raise ConfigError(f"unknown benchmark '{benchmark}'; choose from: {', '.join(BENCHMARKS)}")


__all__ = ["BENCHMARKS", "run_benchmark"]
