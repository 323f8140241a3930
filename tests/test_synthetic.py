"""Synthetic dataset: file formats, determinism, held-out evaluation scenes, and captions checked
against the rendered pixels by an independent detector and caption parser."""
import json
import re
from collections import deque

import numpy as np
import pytest
from PIL import Image

from degla_fast import cli
from degla_fast.data import synthetic as S

COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 215),
           "yellow": (235, 205, 35), "purple": (140, 60, 185), "orange": (245, 135, 25)}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
RELATIONS = ("to the left of", "to the right of", "above", "below")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    # 128 pixels: the detector below reads shapes reliably at this size
    S.generate(out, num_images=60, seed=3, eval_items=8, zeroshot_items=3, image_size=128, progress=False)
    assert (out / "pretrain.json").is_file()
    return out


# ---- an independent reading of the images ---------------------------------------------------

def detect(path):
    """Objects in an image as dicts (colour, shape, extent, cx, cy), found by colour and flood fill."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int32)
    found = []
    for name, rgb in COLOURS.items():
        mask = (np.abs(pixels - np.array(rgb)).max(axis=-1) <= 45)
        seen = np.zeros_like(mask)
        for y, x in zip(*np.nonzero(mask)):
            if seen[y, x]:
                continue
            component, queue = [], deque([(y, x)])
            seen[y, x] = True
            while queue:
                cy, cx = queue.popleft()
                component.append((cy, cx))
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            if len(component) >= 0.01 * mask.size:  # antialiased JPEG fringes are thin slivers
                found.append(describe(name, np.array(component)))
    return found


def describe(colour, points):
    ys, xs = points[:, 0], points[:, 1]
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(points) / (height * width)
    widths = np.array([(ys == y).sum() for y in range(ys.min(), ys.max() + 1)]) / width
    # a cross's row widths jump between its arm and its full width; a diamond's and a triangle's slope
    sloped_rows = ((widths > 0.5) & (widths < 0.85)).mean()
    middle, low = widths[height // 2], widths[int(height * 0.8)]
    if fill > 0.9:
        shape = "square"
    elif fill > 0.72:
        shape = "circle"
    elif sloped_rows < 0.15:
        shape = "cross"
    else:
        shape = "triangle" if low > middle else "diamond"
    return {"colour": colour, "shape": shape, "extent": max(height, width), "cx": xs.mean(), "cy": ys.mean()}


def parse(caption):
    """caption text -> (mentions [(size, colour, shape)], relation or None)."""
    pattern = r"\ban? (?:(small|big) )?(?:(%s) )?(%s)\b" % ("|".join(COLOURS), "|".join(SHAPES))
    mentions = re.findall(pattern, caption)
    relation = next((r for r in RELATIONS if f" {r} " in caption), None)
    return [(s or None, c or None, sh) for s, c, sh in mentions], relation


def true_for(caption, objects, big_extent):
    mentions, relation = parse(caption)

    def ok(m, o):
        size = "big" if o["extent"] >= big_extent else "small"
        return m[2] == o["shape"] and m[1] in (None, o["colour"]) and m[0] in (None, size)

    def related(a, b):
        dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]
        along, across = {"to the left of": (dx, dy), "to the right of": (-dx, dy), "above": (dy, dx),
                         "below": (-dy, dx)}[relation]
        return along > 0 and abs(across) < along / 2

    def assign(i, used):
        if i == len(mentions):
            return relation is None or related(objects[used[0]], objects[used[1]])
        return any(assign(i + 1, used + [j]) for j, o in enumerate(objects) if j not in used and ok(mentions[i], o))

    return assign(0, [])


# Radii 0.14 and 0.21 of the side: a small shape spans at most 0.28 of the side, a big one at
# least 0.357 (the square's side is 1.7 radii).
BIG = 128 * 0.32


def test_train_captions_and_negatives_agree_with_the_pixels(data_dir):
    records = json.loads((data_dir / "train.json").read_text())
    assert len(records) == 60
    for record in records:
        assert re.fullmatch(r"train/\d{6}\.jpg", record["image"])
        objects = detect(data_dir / record["image"])
        assert 1 <= len(objects) <= 3, record
        assert true_for(record["original"], objects, BIG), (record["original"], objects)
        negatives = record["enhanced"]
        assert len(negatives) == 5 == len(set(negatives)) and record["original"] not in negatives
        for negative in negatives:
            assert not true_for(negative, objects, BIG), (record["image"], negative, objects)


@pytest.mark.parametrize("split", ["test", "val"])
def test_eval_sets_agree_with_the_pixels(data_dir, split):
    data_dir = data_dir if split == "test" else data_dir / "val"
    seen = set()
    for subset in S.EVAL_SUBSETS:
        items = json.loads((data_dir / "eval" / f"{subset}.json").read_text())
        assert len(items) == 8
        for key, item in items.items():
            assert set(item) == {"filename", "caption", "negative_caption"} and key.isdigit()
            assert item["filename"] not in seen
            seen.add(item["filename"])
            objects = detect(data_dir / "eval" / "images" / item["filename"])
            assert len(objects) == 2
            assert true_for(item["caption"], objects, BIG), (subset, item, objects)
            assert not true_for(item["negative_caption"], objects, BIG), (subset, item, objects)
            positive, negative = parse(item["caption"]), parse(item["negative_caption"])
            if subset == "replace_rel":
                assert positive[0] == negative[0] and positive[1] != negative[1]
            elif subset.startswith("swap"):
                # a swap keeps the bag of words
                assert sorted(item["caption"].split()) == sorted(item["negative_caption"].split())
                assert len(negative[0]) == 2 and positive[1] == negative[1]
            elif subset == "add_obj":
                assert len(negative[0]) == 3 and negative[0][:2] == positive[0]
            elif subset == "add_att":
                assert sum(c is None for _, c, _ in positive[0]) == 1
                assert all(c is not None for _, c, _ in negative[0])


def test_zeroshot_tasks_have_balanced_labels_in_both_splits(data_dir):
    for split in ("test", "val"):
        root = data_dir if split == "test" else data_dir / "val"
        for task, classes in S.ZEROSHOT_CLASSES.items():
            spec = json.loads((root / "zeroshot" / f"{task}.json").read_text())
            assert spec["classnames"] == list(classes)
            assert all("{}" in t for t in spec["templates"]) and len(spec["templates"]) >= 3
            labels = [item["label"] for item in spec["items"]]
            assert len(labels) == 3 * len(classes)
            assert {c: labels.count(c) for c in range(len(classes))} == {c: 3 for c in range(len(classes))}, (split, task)
            assert all((root / "zeroshot" / "images" / item["filename"]).is_file() for item in spec["items"])


def test_zeroshot_scenes_show_their_label():
    for task, classes in S.ZEROSHOT_CLASSES.items():
        for i in range(3 * len(classes)):
            scene, label = S.zeroshot_item(0, task, i, "val")
            if task == "count":
                assert len(scene) == label + 3 and len(set((o.shape, o.colour, o.size, o.texture) for o in scene)) == 1
            else:
                assert len(scene) == 1 and getattr(scene[0], task) == classes[label]


def test_broad_objects_are_drawn_as_described(tmp_path):
    # the detector reads the fine-tuning vocabulary's solid shapes: check the broad world's single
    # objects of that vocabulary, at every size
    checked = 0
    for i in range(300):
        scene, _ = S.pretrain_item(1, i)
        o = scene[0]
        if len(scene) != 1 or o.texture != "solid" or o.shape not in S.FT_SHAPES or o.colour not in S.FT_COLOURS:
            continue
        path = tmp_path / f"{i}.png"
        S.render(scene, 128, __import__("random").Random(i)).save(path)
        (found,) = detect(path)
        assert (found["shape"], found["colour"]) == (o.shape, o.colour), (o, found)
        checked += 1
    assert checked >= 5


def test_pretraining_captions_are_true_broad_and_mostly_without_relations(data_dir):
    records = json.loads((data_dir / "pretrain.json").read_text())
    assert len(records) == 60 and all("enhanced" not in r for r in records)
    assert all((data_dir / r["image"]).is_file() for r in records)
    kinds, words = [], set()
    for i in range(300):
        scene, caption = S.pretrain_item(3, i)
        assert S.is_true(caption, scene), caption
        kinds.append(caption.kind)
        words |= set(caption.text().split())
    assert kinds.count("rel") < 0.25 * len(kinds) and kinds.count("count") > 0.05 * len(kinds)
    # the broad vocabulary: shapes, colours, sizes, textures and counts the fine-tuning set never names
    assert {"star", "hexagon", "pink", "cyan", "striped", "dotted", "small", "big", "three"} <= words
    ft_words = set()
    for i in range(300):
        ft_words |= set(S.train_item(3, i)[1].text().split())
    assert not {"star", "hexagon", "semicircle", "pink", "cyan", "striped", "dotted", "checkered", "small", "big",
                "medium", "two", "three", "four", "five"} & ft_words


def test_images_are_rgb_jpegs_of_the_asked_size(tmp_path):
    S.generate(tmp_path, num_images=3, seed=0, eval_items=1, zeroshot_items=1, image_size=40, progress=False)
    image = Image.open(tmp_path / "train" / "000002.jpg")
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (40, 40))
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave nothing behind


def _files(out, seed, workers=1):
    S.generate(out, num_images=6, seed=seed, eval_items=2, zeroshot_items=1, val_eval_items=3, progress=False,
               workers=workers)
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_deterministic_by_seed(tmp_path):
    first, again, other = _files(tmp_path / "a", 5), _files(tmp_path / "b", 5), _files(tmp_path / "c", 6)
    assert first == again
    assert first.keys() == other.keys() and first["train.json"] != other["train.json"]
    assert first["train/000001.jpg"] != other["train/000001.jpg"]


def test_rendering_processes_write_the_same_world(tmp_path):
    # 3 processes over chunks of a few images each: every record lands in its file, in order
    one, three = _files(tmp_path / "a", 5), _files(tmp_path / "b", 5, workers=3)
    assert one == three and len(one) > 60
    with pytest.raises(S.ConfigError, match="workers: must be an integer >= 1"):
        S.generate(tmp_path / "c", num_images=6, progress=False, workers=0)


def _keys_of_eval(split):
    keys = set()
    for subset in S.EVAL_SUBSETS:
        for i in range(30):
            scene, _, _ = S.eval_item(0, subset, i, split)
            relation = next(r for r in RELATIONS if S.holds(r, scene[0], scene[1]))
            keys.add(S.combination_key(scene, relation))
    return keys


def test_splits_are_disjoint_in_their_held_out_combinations():
    train = set()
    for i in range(400):
        scene, _, _ = S.train_item(0, i)
        train |= set(S.scene_keys(scene))  # every related pair of objects, read back from where they were drawn
    pretrain = set()
    for i in range(400):
        pretrain |= set(S.scene_keys(S.pretrain_item(0, i)[0]))
    val, test = _keys_of_eval("val"), _keys_of_eval("test")
    assert len(train) > 200 and len(pretrain) > 200 and len(val) > 100 and len(test) > 100
    assert not (train | pretrain) & (val | test)
    assert not val & test
    assert {S.split_of(k) for k in val} == {"val"} and {S.split_of(k) for k in test} == {"test"}


def test_every_negative_type_is_used():
    reorders = swaps = 0
    for i in range(200):
        scene, caption, negatives = S.train_item(1, i)
        text = caption.text()
        if caption.kind == "rel":
            first, second = (m.text() for m in caption.mentions)
            reordered = text.replace(first, "\0").replace(second, first).replace("\0", second)
            reorders += reordered in negatives and first != second
        if len(caption.mentions) >= 2 and caption.mentions[0].colour and caption.mentions[1].colour \
                and caption.mentions[0].colour != caption.mentions[1].colour:
            a, b = caption.mentions[0].colour, caption.mentions[1].colour
            swapped = text.replace(f"{a} {caption.mentions[0].shape}", f"\0 {caption.mentions[0].shape}", 1) \
                .replace(f"{b} {caption.mentions[1].shape}", f"{a} {caption.mentions[1].shape}", 1).replace("\0", b)
            swaps += swapped in negatives
    assert reorders > 80 and swaps > 60


def test_cli(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path), "--images", "4", "--eval-items", "1",
                     "--zeroshot-items", "1", "--seed", "2", "--no-progress"]) == 0
    assert len(json.loads((tmp_path / "train.json").read_text())) == 4
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest == {"format": "degla-fast/synthetic", "version": S.VERSION, "images": 4, "pretrain_images": 4,
                        "seed": 2, "eval_items": 1, "zeroshot_items": 1, "val_eval_items": 1, "val_zeroshot_items": 1,
                        "image_size": 64, "zeroshot_tasks": list(S.ZEROSHOT_TASKS)}
    assert len(json.loads((tmp_path / "pretrain.json").read_text())) == 4
    assert "train.json" in capsys.readouterr().out
    assert cli.main(["synth", "--out", str(tmp_path / "x"), "--images", "0"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "images" in error
