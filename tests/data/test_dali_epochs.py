"""DALI: one pipeline for the whole run, re-seeded per epoch through the reader processes' plan;
resumed and repeated epochs stay exact."""
import json

import pytest
import torch
from PIL import Image

from degla_fast.data import build_train_data
from degla_fast.data.dali import dali_available

pytestmark = pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def _noise_json(tmp_path, n=12):
    (tmp_path / "img").mkdir()
    for i in range(n):
        Image.effect_noise([(40, 30), (30, 40), (64, 12)][i % 3], 60).convert("RGB").save(tmp_path / "img" / f"{i}.jpg")
    items = [{"image": f"img/{i}.jpg", "original": f"c {i}", "enhanced": ["a", "b", "c", "d"]} for i in range(n)]
    (tmp_path / "t.json").write_text(json.dumps(items))
    return tmp_path / "t.json"


def _epoch(data, epoch, start=0):
    data.set_epoch(epoch, start_batch=start)
    return [(b.indices.clone(), b.tokens.clone(), b.images.clone()) for b in data]


def _same(a, b):
    assert len(a) == len(b)
    for (ia, ta, xa), (ib, tb, xb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(ta, tb) and torch.equal(xa, xb)


def test_one_pipeline_for_the_run_and_exact_resume(tmp_path, tokenizer):
    path = _noise_json(tmp_path)
    opts = dict(tokenizer=tokenizer, image_size=32, mean=MEAN, std=STD, batch_size=4, num_negatives=3,
                pipeline="dali", seed=5, text_workers=0)
    data = build_train_data(path, num_workers=2, **opts)  # 2 reader processes
    e1, e2 = _epoch(data, 1), _epoch(data, 2)
    resumed = _epoch(data, 1, start=2)
    _same(e1[2:], resumed)
    _same(e1, _epoch(data, 1))
    _same(e2, _epoch(data, 2))
    assert data._dali.builds == 1  # re-seeded per epoch, never rebuilt
    # An epoch left midway (the trainer's max_steps): the next one starts a fresh pipeline, still exact.
    data.set_epoch(2)
    next(iter(data))
    _same(e2[1:], _epoch(data, 2, start=1))
    assert data._dali.builds == 2
    # A fresh loader with one reader process gives the same batches (a resumed run).
    other = build_train_data(path, num_workers=1, **opts)
    _same(resumed, _epoch(other, 1, start=2))
    data.close()
    other.close()
