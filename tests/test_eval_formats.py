"""Every benchmark format on tiny hand-made fixtures, scored by a colour "model" whose answers are known.

The stub model sees an image as its mean RGB colour and a caption as the position-weighted sum of its
colour words (first colour word weight 1, second 0.5, ...), so each similarity can be worked out by hand:
a red image scores 1 against "red" and 0 against "blue"; "red square" and "square red" tie.
"""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from degla_fast.errors import DataError
from degla_fast.evaluate import run_benchmark
from degla_fast.evaluate.aro import evaluate_aro
from degla_fast.evaluate.encode import Encoder
from degla_fast.evaluate.synthetic import evaluate_synthetic

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellowish": (200, 255, 0)}
VOCAB = {"red": 1, "green": 2, "blue": 3}  # every other word is id 4; 0 pads


class ColourModel(torch.nn.Module):
    context_length = 16

    def encode_image(self, images, normalize=True):
        return F.normalize(images.mean(dim=(2, 3)), dim=-1)

    def encode_text(self, tokens, normalize=True):
        basis = torch.cat([torch.zeros(1, 3), torch.eye(3), torch.zeros(1, 3)])  # id -> RGB direction
        is_colour = (tokens >= 1) & (tokens <= 3)
        rank = is_colour.long().cumsum(dim=1) - 1
        weights = torch.where(is_colour, 0.5 ** rank.clamp(min=0).float(), torch.zeros(()))
        return F.normalize((weights.unsqueeze(-1) * basis[tokens]).sum(dim=1), dim=-1)


def tokenize(texts):
    rows = [[VOCAB.get(word.strip(".,").lower(), 4) for word in text.split()][:16] for text in texts]
    out = torch.zeros(len(rows), 16, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row)
    return out


def to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255


@pytest.fixture
def encoder():
    bundle = SimpleNamespace(model=ColourModel(), tokenizer=tokenize, preprocess_val=to_tensor)
    return Encoder(bundle, batch_size=2)


def solid(folder: Path, name: str, colour: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), COLOURS[colour]).save(folder / name)
    return name


def red_left_blue_right(folder: Path, name: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (8, 8), COLOURS["blue"])
    image.paste(COLOURS["red"], (0, 0, 4, 8))
    image.save(folder / name)
    return name


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_stub_model_scores_as_documented(encoder):
    feats = encoder.texts(["red", "red square", "square red", "red on blue", "blue on red"])
    assert torch.allclose(feats[0], torch.tensor([1.0, 0, 0]))
    assert torch.equal(feats[1], feats[2])
    assert torch.allclose(feats[3], F.normalize(torch.tensor([1.0, 0, 0.5]), dim=0))
    assert torch.allclose(feats[4], F.normalize(torch.tensor([0.5, 0, 1.0]), dim=0))


def sugarcrepe_fixture(folder: Path) -> Path:
    images = folder / "images"
    write(folder / "swap_att.json", {
        "0": {"filename": solid(images, "r.png", "red"), "caption": "red", "negative_caption": "blue"},     # right
        "1": {"filename": "r.png", "caption": "red square", "negative_caption": "square red"},            # tie
    })
    write(folder / "add_obj.json", {
        "0": {"filename": solid(images, "b.png", "blue"), "caption": "blue", "negative_caption": "green"},  # right
        "1": {"filename": solid(images, "g.png", "green"), "caption": "blue", "negative_caption": "green"}, # wrong
        "2": {"filename": "g.png", "caption": "green", "negative_caption": "red"},                          # right
    })
    return folder


def test_sugarcrepe_per_file_and_category_averages(encoder, tmp_path):
    result = run_benchmark(encoder, "sugarcrepe", sugarcrepe_fixture(tmp_path))
    assert result.metrics["swap_att"] == pytest.approx(50.0)   # the tie counts as wrong
    assert result.metrics["add_obj"] == pytest.approx(200 / 3)
    assert result.metrics["swap"] == pytest.approx(50.0)
    assert result.metrics["add"] == pytest.approx(200 / 3)
    assert "replace" not in result.metrics
    assert result.counts == {"swap_att": 2, "add_obj": 3}
    # a single file is accepted as well
    single = run_benchmark(encoder, "sugarcrepe", tmp_path / "add_obj.json")
    assert list(single.metrics) == ["add_obj", "add"]


def test_valse_vote_filter_and_averages(encoder, tmp_path):
    images = tmp_path / "images"
    write(tmp_path / "existence.json", {
        "a": {"image_file": solid(images, "r.png", "red"), "caption": "red", "foil": "blue",
              "mturk": {"foil": 0, "caption": 3, "other": 0}},                                   # right
        "b": {"image_file": "r.png", "caption": "blue", "foil": "red",
              "mturk": {"foil": 2, "caption": 1, "other": 0}},                                   # filtered
        "c": {"image_file": solid(images, "b.png", "blue"), "caption": "red", "foil": "blue",
              "mturk": {"foil": 1, "caption": 2, "other": 0}},                                   # wrong
    })
    write(tmp_path / "plurals.json", {
        "x": {"image_file": "b.png", "caption": "blue", "foil": "green", "mturk": {"caption": 2}},  # right
    })
    result = run_benchmark(encoder, "valse", tmp_path)
    assert result.metrics["existence"] == pytest.approx(50.0)
    assert result.metrics["plurals"] == pytest.approx(100.0)
    assert result.metrics["average"] == pytest.approx(75.0)
    assert result.metrics["all_items"] == pytest.approx(200 / 3)
    assert result.counts["existence"] == 2
    assert any("1 items" in note for note in result.notes)


def aro_relation_fixture(folder: Path) -> Path:
    name = red_left_blue_right(folder / "images", "2343.png")
    left, right, full = (0, 0, 4, 8), (4, 0, 4, 8), (0, 0, 8, 8)

    def record(relation, box, true, false):
        x, y, w, h = box
        return {"image_id": "2343", "relation_name": relation, "image_path": name, "bbox_x": x, "bbox_y": y,
                "bbox_w": w, "bbox_h": h, "true_caption": true, "false_caption": false}

    return write(folder / "visual_genome_relation.json", [
        record("on", left, "the red", "the blue"),        # crop shows red: right (uncropped it would tie)
        record("on", right, "the red", "the blue"),       # crop shows blue: wrong
        record("holding", full, "the red", "the blue"),   # purple image: a tie, wrong
        record("with", left, "the red", "the blue"),      # right, but "with" is dropped by ARO
    ])


def test_aro_relation_crops_and_macro_averages_without_dropped_relations(encoder, tmp_path):
    aro_relation_fixture(tmp_path)
    result = run_benchmark(encoder, "aro-relation", tmp_path)   # the ARO folder; images in <folder>/images
    assert result.metrics["macro_accuracy"] == pytest.approx((50.0 + 0.0) / 2)
    assert result.metrics["all_items"] == pytest.approx(50.0)
    assert set(result.info["groups"]) == {"on", "holding"}
    assert result.counts["macro_accuracy"] == 3


def test_aro_attribution_groups_attribute_pairs(encoder, tmp_path):
    name = solid(tmp_path / "images", "1.png", "red")
    box = {"bbox_x": 1, "bbox_y": 1, "bbox_w": 4, "bbox_h": 4}

    def record(attrs, true, false):
        return {"image_path": name, "attributes": attrs, "true_caption": true, "false_caption": false, **box}

    path = write(tmp_path / "visual_genome_attribution.json", [
        record(["red", "blue"], "the red", "the blue"),
        record(["red", "blue"], "red and blue", "blue and red"),   # position-weighted: right
        record(["green", "blue"], "the green", "the red"),        # wrong
    ])
    result = evaluate_aro(encoder, path, kind="attribution", min_group_count=1)
    assert result.metrics["macro_accuracy"] == pytest.approx(50.0)
    assert result.metrics["all_items"] == pytest.approx(200 / 3)
    assert evaluate_aro(encoder, path, kind="attribution", min_group_count=2).metrics["macro_accuracy"] == 100.0
    # ARO's default skips pairs with fewer than 25 items: nothing is left here
    assert math.isnan(run_benchmark(encoder, "aro-attribution", path).metrics["macro_accuracy"])


def test_order_precision_at_one(encoder, tmp_path):
    images = tmp_path / "images"
    path = write(tmp_path / "coco_order.json", [
        {"image": solid(images, "r.png", "red"), "caption_options": ["red", "blue", "green", "a blue", "square"]},
        {"image": solid(images, "b.png", "blue"),
         "caption_options": ["red square blue", "blue square red", "square red blue", "red blue", "blue red"]},
    ])
    result = run_benchmark(encoder, "coco-order", path)
    assert result.metrics["precision@1"] == pytest.approx(50.0)
    assert result.counts["precision@1"] == 2


def zeroshot_fixture(folder: Path) -> Path:
    images = folder / "images"
    items = [("r.png", "red", 0), ("g.png", "green", 1), ("b.png", "blue", 2), ("y.png", "yellowish", 0)]
    return write(folder / "colour.json", {
        "classnames": ["red", "green", "blue"], "templates": ["a photo of a {}.", "a {} thing."],
        "items": [{"filename": solid(images, name, colour), "label": label} for name, colour, label in items]})


def test_zeroshot_json_task(encoder, tmp_path):
    result = run_benchmark(encoder, "zeroshot", zeroshot_fixture(tmp_path))
    assert result.metrics["top1"] == pytest.approx(75.0)      # yellowish is nearer to green
    assert result.metrics["mean_per_class_recall"] == pytest.approx((50 + 100 + 100) / 3)
    assert "top5" not in result.metrics                       # fewer than 5 classes


def test_zeroshot_image_folder_uses_folder_names_and_clip_benchmark_templates(encoder, tmp_path):
    for colour in ("blue", "green", "red"):
        solid(tmp_path / colour, "1.png", colour)
    solid(tmp_path / "red", "2.png", "yellowish")
    result = run_benchmark(encoder, "zeroshot", tmp_path)
    assert result.metrics["top1"] == pytest.approx(75.0)
    assert result.info["templates"] > 1


def test_retrieval_both_layouts(encoder, tmp_path):
    images = tmp_path / "images"
    records = [
        {"image": solid(images, "r.png", "red"), "caption": ["red", "a red one"]},
        {"image": solid(images, "g.png", "green"), "caption": ["green"]},
        {"image": solid(images, "b.png", "blue"), "caption": ["blue", "red green"]},  # 2nd finds the red image
    ]
    result = run_benchmark(encoder, "retrieval", write(tmp_path / "test.json", records))
    assert result.metrics["image_retrieval_recall@1"] == pytest.approx(80.0)
    assert result.metrics["image_retrieval_recall@5"] == pytest.approx(100.0)
    assert result.metrics["text_retrieval_recall@1"] == pytest.approx(100.0)
    karpathy = {"images": [{"filepath": "images", "filename": r["image"], "split": "test",
                            "sentences": [{"raw": c} for c in r["caption"]]} for r in records]
                + [{"filepath": "images", "filename": "r.png", "split": "train", "sentences": [{"raw": "blue"}]}]}
    again = run_benchmark(encoder, "retrieval", write(tmp_path / "k" / "dataset_coco.json", karpathy),
                          image_root=tmp_path)
    assert again.metrics == result.metrics


def test_synthetic_dataset_layout(encoder, tmp_path):
    sugarcrepe_fixture(tmp_path / "eval")
    images = tmp_path / "eval" / "images"
    write(tmp_path / "eval" / "replace_rel.json", {
        "0": {"filename": "r.png", "caption": "red", "negative_caption": "green"}})   # right
    zeroshot_fixture(tmp_path / "zeroshot")
    write(tmp_path / "zeroshot" / "shape.json", {
        "classnames": ["red", "blue"], "templates": ["{}"],
        "items": [{"filename": "r.png", "label": 1}]})                                   # wrong
    assert images.is_dir()
    out = evaluate_synthetic(encoder.bundle, tmp_path)
    assert out == pytest.approx({
        "swap": 50.0, "replace": 100.0, "add": 200 / 3, "compositional_avg": (50 + 100 + 200 / 3) / 3,
        "zeroshot_shape": 0.0, "zeroshot_colour": 75.0, "zeroshot_avg": 37.5})


def test_missing_image_names_the_file(encoder, tmp_path):
    write(tmp_path / "swap_obj.json", {"7": {"filename": "nope.jpg", "caption": "a", "negative_caption": "b"}})
    with pytest.raises(DataError, match=r"nope\.jpg: image file not found \(record 7 of .*swap_obj\.json\)"):
        run_benchmark(encoder, "sugarcrepe", tmp_path)


def test_missing_field_and_bad_json_name_the_record(encoder, tmp_path):
    solid(tmp_path / "images", "r.png", "red")
    write(tmp_path / "a.json", {"3": {"filename": "r.png", "caption": "red"}})
    with pytest.raises(DataError, match=r"a\.json: record 3: missing field 'negative_caption'"):
        run_benchmark(encoder, "sugarcrepe", tmp_path / "a.json")
    (tmp_path / "b.json").write_text("{\n  oops")
    with pytest.raises(DataError, match=r"b\.json:2: not valid JSON"):
        run_benchmark(encoder, "valse", tmp_path / "b.json")
    with pytest.raises(DataError, match="file not found"):
        run_benchmark(encoder, "coco-order", tmp_path / "missing.json")
