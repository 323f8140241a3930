"""The decoded-image cache and the crop seed of the torch pipeline: the batches are those of
decoding every image on every read under ``torch.manual_seed``, bit for bit."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from degla_fast.data import build_train_data, torch_pipeline

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
SIZE = (40, 36)  # w, h: one image holds 40 * 36 * 4 bytes of pixels in the cache


@pytest.fixture
def noise_json(tmp_path):
    """10 records of noise PNGs (a crop of noise differs wherever it is taken, unlike a solid colour)."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    items = []
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)).save(tmp_path / f"images/{i}.png")
        items.append({"image": f"images/{i}.png", "original": f"caption {i}", "enhanced": [f"neg {j} of {i}" for j in range(4)]})
    path = tmp_path / "train.json"
    path.write_text(json.dumps(items))
    return path


def _epochs(path, tokenizer, epochs=3, **kw):
    opts = dict(tokenizer=tokenizer, image_size=24, mean=MEAN, std=STD, batch_size=4, num_negatives=2,
                pipeline="torch", num_workers=0, seed=5, text_workers=0, token_cache=False)
    data = build_train_data(path, **{**opts, **kw})
    out = []
    for epoch in range(epochs):
        data.set_epoch(epoch)
        out += [(b.images, b.tokens, b.indices) for b in data]
    return data, out


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x, y))


def test_cached_images_give_the_batches_of_decoding_each_read_under_manual_seed(noise_json, tokenizer, monkeypatch):
    cached, fast = _epochs(noise_json, tokenizer)
    seen = {int(i) for _, _, indices in fast for i in indices}
    assert len(cached.image_cache) == len(seen) and len(fast) == 6  # each image read decoded once
    # Before: every image decoded on every read, each crop under torch.manual_seed.
    monkeypatch.setattr(torch_pipeline, "seed_cpu_rng", torch.manual_seed)
    plain, before = _epochs(noise_json, tokenizer, image_cache_bytes=0)
    assert plain.image_cache is None
    _same(fast, before)
    assert not torch.equal(before[0][0], before[2][0])  # epochs differ: the test sees the crops


def test_the_cache_stops_at_its_bound_and_the_rest_is_decoded(noise_json, tokenizer):
    bounded, got = _epochs(noise_json, tokenizer, image_cache_bytes=3 * SIZE[0] * SIZE[1] * 4)
    assert len(bounded) and len(bounded.image_cache) == 3 and bounded.image_cache.used == 3 * SIZE[0] * SIZE[1] * 4
    _same(got, _epochs(noise_json, tokenizer, image_cache_bytes=0)[1])


def test_no_cache_where_worker_processes_decode(noise_json, tokenizer):
    data = build_train_data(noise_json, tokenizer=tokenizer, image_size=24, mean=MEAN, std=STD, batch_size=4,
                            num_negatives=2, pipeline="torch", num_workers=1, token_cache=False)
    assert data.image_cache is None  # each epoch's workers would fill a copy and drop it
