"""The torch pipeline ships uint8 crops and normalises them where the batch goes: the same pixels
as open_clip's float transform (same crop, ToTensor then Normalize)."""
import json

import torch
from PIL import Image

from degla_fast.data import build_train_data
from degla_fast.data.sampling import _rng
from degla_fast.data.torch_pipeline import BatchDataset, normalize, train_transform

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def _noise_json(tmp_path, n=8):
    (tmp_path / "img").mkdir()
    for i in range(n):
        Image.effect_noise([(40, 30), (30, 40)][i % 2], 60).convert("RGB").save(tmp_path / "img" / f"{i}.jpg")
    items = [{"image": f"img/{i}.jpg", "original": f"c {i}", "enhanced": ["a", "b"]} for i in range(n)]
    (tmp_path / "t.json").write_text(json.dumps(items))
    return tmp_path / "t.json"


def test_uint8_items_normalised_equal_the_float_transform(tmp_path, tokenizer):
    path = _noise_json(tmp_path)
    data = build_train_data(path, tokenizer=tokenizer, image_size=24, mean=MEAN, std=STD, batch_size=4,
                            num_negatives=2, pipeline="torch", num_workers=0, seed=3)
    data.set_epoch(1)
    batches = list(data)
    assert all(b.images.dtype == torch.float32 and b.images.shape == (4, 3, 24, 24) for b in batches)
    # The workers' items are uint8; the float transform under the same per-sample seed gives the same.
    dataset = BatchDataset(data.records, [b.indices.tolist() for b in batches], tokenizer=tokenizer,
                           transform=train_transform(24, MEAN, STD, uint8=True), num_negatives=2, seed=3, epoch=1)
    full = train_transform(24, MEAN, STD)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (MEAN, STD))
    for b, batch in enumerate(batches):
        item = dataset[b]
        assert item.images.dtype == torch.uint8
        assert torch.equal(normalize(item.images, mean, std), batch.images)
        for row, i in enumerate(batch.indices.tolist()):
            pil = Image.open(path.parent / f"img/{i}.jpg").convert("RGB")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(_rng(3, 1, i, 0xC0B).integers(2**62)))
                want = full(pil)
            assert torch.allclose(batch.images[row], want, atol=1e-5)
