"""Small on-the-fly image fixtures for the data tests."""
import json

import pytest
from PIL import Image


def write_images(folder, n, size=(48, 40)):
    """``n`` solid-colour JPEGs ``folder/img_000.jpg``...; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img_{i:03d}.jpg"
        Image.new("RGB", size, ((37 * i) % 256, (91 * i) % 256, (13 * i) % 256)).save(folder / name, quality=90)
        names.append(name)
    return names


@pytest.fixture
def degla_json(tmp_path):
    """A DeGLA JSON of 10 records with 5 negatives each; images under ``tmp_path/images``."""
    names = write_images(tmp_path / "images", 10)
    items = [{"image": f"images/{n}", "original": f"caption number {i}",
              "enhanced": [f"negative {j} of caption {i}" for j in range(5)]} for i, n in enumerate(names)]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(items))
    return path


@pytest.fixture(scope="session")
def tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")
