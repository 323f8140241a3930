"""build_train_data end to end with the torch and the DALI CPU pipelines on small JPEG fixtures."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from degla_fast.data import Batch, build_train_data
from degla_fast.data.dali import dali_available
from degla_fast.data.sampling import choose_negatives
from degla_fast.data.text import tokenize_captions
from degla_fast.errors import ConfigError, DataError

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
PIPES = ["torch"] + (["dali"] if dali_available() else [])


def _data(path, tokenizer, pipeline, **kw):
    opts = dict(tokenizer=tokenizer, image_size=32, mean=MEAN, std=STD, batch_size=4, num_negatives=3,
                pipeline=pipeline, num_workers=0 if pipeline == "torch" else 1, seed=5, text_workers=0)
    opts.update(kw)
    return build_train_data(path, **opts)


def _epoch(data, epoch, start=0):
    data.set_epoch(epoch, start_batch=start)
    return list(data)


@pytest.mark.parametrize("pipeline", PIPES)
def test_batches_contract(degla_json, tokenizer, pipeline):
    data = _data(degla_json, tokenizer, pipeline)
    assert len(data) == 2 and data.num_samples == 10
    batches = _epoch(data, 0)
    assert len(batches) == 2
    records = json.loads(degla_json.read_text())
    for b in batches:
        assert isinstance(b, Batch)
        assert b.images.shape == (4, 3, 32, 32) and b.images.dtype == torch.float32
        idx = b.indices.tolist()
        negs = [choose_negatives(data.records[i], i, 3, seed=5, epoch=0) for i in idx]
        expected = tokenize_captions(tokenizer, [records[i]["original"] for i in idx], negs)
        assert torch.equal(b.tokens, expected) and b.tokens.shape[0] == 16
        # Solid-colour JPEGs: every crop is the colour, normalised with the model's mean/std.
        for row, i in enumerate(idx):
            rgb = torch.tensor(Image.open(degla_json.parent / records[i]["image"]).convert("RGB").getpixel((20, 20)))
            want = (rgb / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
            got = b.images[row].mean(dim=(1, 2))
            assert torch.allclose(got, want, atol=0.05), (got, want)
    seen = [i for b in batches for i in b.indices.tolist()]
    assert len(set(seen)) == 8


def _noise_json(tmp_path, n=12):
    # Textured images of a few shapes (one far outside the aspect range) so that crops differ between draws.
    (tmp_path / "img").mkdir()
    names = [f"{i}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        Image.effect_noise([(40, 30), (30, 40), (64, 12)][i % 3], 60).convert("RGB").save(tmp_path / "img" / name)
    items = [{"image": f"img/{n}", "original": f"c {i}", "enhanced": ["a", "b", "c", "d"]} for i, n in enumerate(names)]
    (tmp_path / "t.json").write_text(json.dumps(items))
    return tmp_path / "t.json"


def _by_index(batches):
    return {i: b.images[row] for b in batches for row, i in enumerate(b.indices.tolist())}


@pytest.mark.parametrize("pipeline", PIPES)
def test_resume_mid_epoch_is_exact(tmp_path, tokenizer, pipeline):
    # Both pipelines crop each sample from (seed, epoch, index) alone: resuming is bit-exact.
    data = _data(_noise_json(tmp_path), tokenizer, pipeline)
    full = _epoch(data, 1)
    resumed = _epoch(data, 1, start=1)
    assert len(full) == 3 and len(resumed) == 2
    for a, b in zip(full[1:], resumed):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.tokens, b.tokens)
        assert torch.equal(a.images, b.images)
    assert len(_epoch(data, 1, start=3)) == 0
    again = _epoch(data, 1)
    for a, b in zip(full, again):
        assert torch.equal(a.images, b.images)
    other = _epoch(data, 2)
    assert not all(torch.equal(a.indices, b.indices) for a, b in zip(full, other))
    # A sample seen in both epochs gets a different crop in each (except the 64x12 images: the
    # fallback window of an aspect far outside the range is the same centred crop every time).
    mine, theirs = _by_index(full), _by_index(other)
    common = sorted(i for i in set(mine) & set(theirs) if i % 3 != 2)
    assert common and all(not torch.equal(mine[i], theirs[i]) for i in common)


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_dali_crop_independent_of_batch_and_rank(tmp_path, tokenizer):
    # Same (seed, epoch, index) -> same pixels, whichever batch size or rank the sample lands in.
    path = _noise_json(tmp_path)
    whole = _by_index(_epoch(_data(path, tokenizer, "dali", batch_size=6), 0))
    for rank in range(2):
        part = _by_index(_epoch(_data(path, tokenizer, "dali", batch_size=2, rank=rank, world_size=2), 0))
        assert part and all(torch.equal(img, whole[i]) for i, img in part.items() if i in whole)
        assert set(part) & set(whole)


def test_dali_crop_windows():
    from degla_fast.data.dali import CROP_ATTEMPTS, crop_draws, crop_windows

    shapes = [(30, 40, 3), (40, 30, 3), (480, 640, 3), (20, 300, 3), (300, 20, 1), (1, 1, 3)]
    draws = [crop_draws(5, 0, i) for i in range(60)]
    assert all(c.shape == (CROP_ATTEMPTS, 2) and c.dtype == np.float32 and 0 <= p.min() and p.max() < 1
               for c, p in draws)
    assert not np.array_equal(crop_draws(5, 0, 1)[0], crop_draws(5, 1, 1)[0])
    hwc = [np.array(shapes[i % len(shapes)]) for i in range(60)]
    anchors, sizes = crop_windows(hwc, [c for c, _ in draws], [p for _, p in draws])
    for (c, p), shape, anchor, size in zip(draws, hwc, anchors, sizes):
        hw = shape[:2].astype(np.float32)
        assert np.all(anchor >= 0) and np.all(size >= 1) and np.all(anchor + size <= hw)
        assert np.array_equal(anchor, np.round(anchor)) and np.array_equal(size, np.round(size))
        dims = np.floor(np.sqrt(c * hw.prod()) + np.float32(0.5))
        fits = [k for k in range(CROP_ATTEMPTS) if np.all(dims[k] <= hw) and np.all(dims[k] >= 1)]
        if fits:  # the first candidate that fits, placed by the drawn position
            assert np.array_equal(size, dims[fits[0]])
            assert np.array_equal(anchor, np.floor(p * (hw - size + 1)))
        else:  # torchvision's fallback: centred, aspect clamped to [3/4, 4/3]
            assert size[0] == hw[0] or size[1] == hw[1]  # it spans the image one way
            assert 3 / 4 - 0.05 <= size[1] / size[0] <= 4 / 3 + 0.05 or tuple(shape[:2]) == (1, 1)
            assert np.array_equal(anchor, np.floor((hw - size) / 2))


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_dali_text_workers_give_the_same_tokens(degla_json, tokenizer):
    inline = _epoch(_data(degla_json, tokenizer, "dali"), 0)
    data = _data(degla_json, tokenizer, "dali", text_workers=1)
    pooled = _epoch(data, 0)
    data.close()
    for a, b in zip(inline, pooled):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.tokens, b.tokens)


def test_torch_pipeline_same_batches_with_workers(degla_json, tokenizer):
    one = _epoch(_data(degla_json, tokenizer, "torch", num_workers=0), 0)
    two = _epoch(_data(degla_json, tokenizer, "torch", num_workers=1), 0)
    for a, b in zip(one, two):
        assert torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("pipeline", PIPES)
def test_bad_image_error_or_skip(degla_json, tokenizer, pipeline):
    images = degla_json.parent / "images"
    (images / "img_003.jpg").unlink()
    (images / "img_006.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match=r"img_00[36]\.jpg: cannot read image"):
        _epoch(_data(degla_json, tokenizer, pipeline), 0)
    # A cut-off JPEG alone: its decode fails, and the error names it.
    (images / "img_006.jpg").write_bytes((images / "img_001.jpg").read_bytes())
    (images / "img_003.jpg").write_bytes((images / "img_004.jpg").read_bytes()[:300])
    with pytest.raises(DataError, match=r"img_003\.jpg: cannot read image"):
        _epoch(_data(degla_json, tokenizer, pipeline), 0)
    (images / "img_006.jpg").write_bytes(b"not a jpeg at all")
    data = _data(degla_json, tokenizer, pipeline, skip_bad_images=True)
    data.set_epoch(0)
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image"):
        batches = list(data)
    kept = [i for b in batches for i in b.indices.tolist()]
    assert 3 not in kept and 6 not in kept
    assert data.bad_images == 2
    for b in batches:
        assert b.images.shape[0] == len(b.indices) and b.tokens.shape[0] == 4 * len(b.indices)


def test_short_negatives_and_options(degla_json, tokenizer):
    with pytest.raises(DataError, match=r"train\.json: 10 of 10 records have fewer than 6 negatives"):
        _data(degla_json, tokenizer, "torch", num_negatives=6)
    data = _data(degla_json, tokenizer, "torch", num_negatives=6, sample_with_replacement=True)
    assert _epoch(data, 0)[0].tokens.shape[0] == 4 * 7
    plain = _epoch(_data(degla_json, tokenizer, "torch", num_negatives=0, trim_text=False), 0)[0]
    assert plain.tokens.shape == (4, 77)
    with pytest.raises(ConfigError, match="pipeline"):
        _data(degla_json, tokenizer, "nope")
    ranks = [_epoch(_data(degla_json, tokenizer, "torch", batch_size=2, rank=r, world_size=2), 0) for r in range(2)]
    assert len(ranks[0]) == 2
    assert not set(ranks[0][0].indices.tolist()) & set(ranks[1][0].indices.tolist())
