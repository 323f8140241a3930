"""Training-data throughput: DALI (GPU and CPU decode) against the torch DataLoader, and the share
of text-encoder tokens saved by trimming each batch to its longest caption.

Images are generated JPEGs of COCO size (640x480, smooth random patterns); every pipeline does a
random resized crop to 224 and normalises, with the same number of CPU threads/workers. ``--quick``
uses a few small images to prove the benchmark runs; it says nothing about GPU throughput.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import add_ratios, markdown_table, measure, percentiles, write_results

_SUBJECTS = ["a man", "a woman", "two dogs", "a cat", "a young boy", "a group of people", "a large bus", "a plate"]
_VERBS = ["sitting on", "standing next to", "riding", "holding", "walking down", "lying on", "looking at"]
_OBJECTS = ["a wooden bench", "a busy city street", "a red motorcycle", "a white table with food",
            "a grassy field near the water", "a kitchen counter", "the side of a road"]
_TAILS = ["", "", " in the snow", " at night", " while it rains", " with a blue umbrella", " on a sunny day"]


def coco_like_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` captions shaped like COCO's (about 10 words, 12-20 BPE tokens)."""
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}."
            for _ in range(n)]


def make_dataset(folder: Path, n: int, size: tuple[int, int], negatives: int) -> Path:
    """``n`` JPEGs with DeGLA-JSON captions under ``folder``; returns the JSON path."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    w, h = size
    caps = coco_like_captions(n * (1 + negatives))
    items = []
    for i in range(n):
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        noise = rng.integers(-12, 12, (h, w, 3))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
        img.save(folder / "img" / f"{i:06d}.jpg", quality=90)
        items.append({"image": f"img/{i:06d}.jpg", "original": caps[i * (1 + negatives)],
                      "enhanced": caps[i * (1 + negatives) + 1:(i + 1) * (1 + negatives)]})
    path = folder / "train.json"
    path.write_text(json.dumps(items))
    return path


def batch_times_ms(data, epochs: int, tokens: list | None = None) -> tuple[list[float], int]:
    """Milliseconds per batch over ``epochs`` full epochs after one warm-up epoch (tokens
    included), and the number of images they held; ``tokens`` gets each batch's token count."""
    data.set_epoch(0)
    for _ in data:
        pass
    samples, count = [], 0
    for e in range(1, epochs + 1):
        data.set_epoch(e)
        t0 = time.perf_counter()
        for batch in data:
            if batch.images.is_cuda:
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            samples.append((t1 - t0) * 1e3)
            count += batch.images.shape[0]
            if tokens is not None:
                tokens.append(batch.tokens.numel())
            t0 = t1
    return samples, count


def text_rows(batch_size: int, negatives: int, iters: int) -> list[dict]:
    """Tokenising one batch of ``batch_size * (1 + negatives)`` COCO-like captions padded to 77
    (open_clip's tokenizer as is) against trimmed to the longest caption: time and tokens."""
    import open_clip

    from degla_fast.data.text import tokenize_captions

    tok = open_clip.get_tokenizer("ViT-B-32")
    caps = coco_like_captions(batch_size * (1 + negatives), seed=1)
    positives = caps[:batch_size]
    groups = [caps[batch_size + i * negatives:batch_size + (i + 1) * negatives] for i in range(batch_size)]
    padded = tok(positives + [c for g in groups for c in g])
    trimmed = tokenize_captions(tok, positives, groups)
    fields = {"batch": batch_size, "num_negatives": negatives}
    rows = [measure("text_tokens", "pad to 77", lambda: tok(positives + [c for g in groups for c in g]),
                    iters=iters, memory=False, tokens_per_batch=padded.numel(), **fields),
            measure("text_tokens", "trim", lambda: tokenize_captions(tok, positives, groups),
                    iters=iters, memory=False, tokens_per_batch=trimmed.numel(), **fields)]
    rows[1]["tokens_saved_share"] = 1 - trimmed.numel() / padded.numel()
    try:  # the per-data-set token cache (absent before it existed: the "before" run has no such row)
        from degla_fast.data.sources import Record
        from degla_fast.data.text import TokenCache
    except ImportError:
        TokenCache = None
    if TokenCache is not None:
        records = [Record(f"{i}.jpg", positives[i], tuple(groups[i]), f"record {i}") for i in range(batch_size)]
        cache = TokenCache.build(records, tok)
        ids = [int(cache.first[i]) for i in range(batch_size)]
        ids += [int(cache.first[i]) + 1 + j for i in range(batch_size) for j in range(negatives)]
        assert torch.equal(cache.rows(ids), trimmed)
        # Timed as the loader uses it: the (seed, epoch, index) negative draws, then the gather.
        cached = cache.batch(list(range(batch_size)), negatives)
        rows.append(measure("text_tokens", "token cache + trim", lambda: cache.batch(list(range(batch_size)), negatives),
                            iters=iters, memory=False, tokens_per_batch=cached.numel(), **fields))
        rows[-1]["tokens_saved_share"] = rows[1]["tokens_saved_share"]
    for row in rows:
        row["tokens_per_s"] = row["tokens_per_batch"] / (row["p50_ms"] * 1e-3)
    return add_ratios(rows, "pad to 77")


def run(quick: bool, images: int | None = None, workers: list[int] | None = None, epochs: int | None = None,
        batch: int | None = None) -> list[dict]:
    """Rows: time per batch and images/s per pipeline and worker count (ratio against the torch
    DataLoader with as many workers), then the text rows. ``images``/``workers``/``epochs``/``batch``
    override the full-size defaults (4096 images, 4/8/16 workers, 2 epochs, batch 256)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip

    from degla_fast.data import build_train_data
    from degla_fast.data.dali import dali_available

    batch_override = batch
    n, size, batch, k = (48, (160, 120), 16, 4) if quick else (4096, (640, 480), 256, 4)
    workers_list = [2] if quick else [4, 8, 16]
    epochs = epochs or (1 if quick else 2)
    n, workers_list, batch = images or n, workers or workers_list, batch_override or batch
    tok = open_clip.get_tokenizer("ViT-B-32")
    mean, std = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_dataset(Path(tmp), n, size, k)
        kb = sum(p.stat().st_size for p in (Path(tmp) / "img").iterdir()) / n / 1024
        cases = [("torch", "cpu")]
        if dali_available():
            cases.append(("dali", "cpu"))
            if torch.cuda.is_available():
                cases.append(("dali", "cuda"))
        for pipeline, device in cases:
            for workers in workers_list:
                data = build_train_data(path, tokenizer=tok, image_size=224, mean=mean, std=std, batch_size=batch,
                                        num_negatives=k, pipeline=pipeline, device=device, num_workers=workers)
                tokens = []
                try:
                    samples, count = batch_times_ms(data, epochs, tokens)
                finally:
                    data.close()
                rows.append({"name": "images_per_s", "impl": f"{pipeline}-{'gpu' if device == 'cuda' else 'cpu'}",
                             "workers": workers, "batch": batch, "image": f"{size[0]}x{size[1]}",
                             "jpeg_kb": round(kb, 1), "images_per_s": count / (sum(samples) * 1e-3),
                             "tokens_per_s": sum(tokens) / (sum(samples) * 1e-3),
                             **percentiles(samples)})
    add_ratios(rows, "torch-cpu", group_by=("workers",))
    return rows + text_rows(32 if quick else 256, k, 5 if quick else 20)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CPU sizes (proves it runs)")
    parser.add_argument("--images", type=int, help="images in the generated data set (default 4096)")
    parser.add_argument("--workers", type=int, nargs="+", help="worker/thread counts (default 4 8 16)")
    parser.add_argument("--epochs", type=int, help="timed epochs after the warm-up one (default 2)")
    parser.add_argument("--batch", type=int, help="batch size (default 256)")
    parser.add_argument("--out", help="results file name under benchmarks/results (default bench_data)")
    args = parser.parse_args(argv)
    rows = run(args.quick, args.images, args.workers, args.epochs, args.batch)
    print(markdown_table([r for r in rows if r["name"] == "images_per_s"],
                         ["impl", "workers", "batch", "image", "jpeg_kb", "p50_ms", "images_per_s",
                          "tokens_per_s", "speedup_vs_torch-cpu"]))
    print(markdown_table([r for r in rows if r["name"] == "text_tokens"],
                         ["impl", "batch", "num_negatives", "tokens_per_batch", "tokens_saved_share", "p50_ms", "tokens_per_s"]))
    print(write_results(args.out or ("bench_data_quick" if args.quick else "bench_data"), rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
