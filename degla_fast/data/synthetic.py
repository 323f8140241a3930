"""The synthetic compositional dataset: coloured shapes in spatial relations.

``degla-fast synth --out DIR [--images N] [--seed S]`` renders scenes such as "a red circle to
the left of a blue square" and writes, all in the formats the rest of degla-fast reads:

- ``DIR/train.json``: DeGLA records ``{"image": "train/000000.jpg", "original": caption,
  "enhanced": [5 hard negatives]}``, one negative per type (swap objects, swap attributes,
  replace an attribute, replace an object, reorder the relation);
- ``DIR/eval/<subset>.json`` (SugarCrepe's format) for swap_obj, swap_att, replace_obj,
  replace_att, replace_rel, add_obj and add_att, over images in ``DIR/eval/images/``;
- ``DIR/zeroshot/{shape,colour}.json``: classification sets over images in ``DIR/zeroshot/images/``;
- ``DIR/manifest.json``: :data:`VERSION` and the arguments (compare it to skip re-rendering).

Captions are built from a structured description of the scene, and every negative is checked
against the scene: it is kept only when it is false for the image. The evaluation scenes use
object/relation combinations that never occur in training (a fixed hash split of the
combinations), so the compositional sets measure generalisation, not memory. Everything is a
pure function of the seed and the arguments.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import os
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ConfigError, DataError
from ..io import cannot_write, write_bytes_atomic, write_json_atomic

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 215),
           "yellow": (235, 205, 35), "purple": (140, 60, 185), "orange": (245, 135, 25)}
SIZES = {"small": 0.14, "big": 0.21}  # radius as a fraction of the image side
RELATIONS = ("to the left of", "to the right of", "above", "below")
EVAL_SUBSETS = ("swap_obj", "swap_att", "replace_obj", "replace_att", "replace_rel", "add_obj", "add_att")
ZEROSHOT_TEMPLATES = {
    "shape": ["a photo of a {}.", "a drawing of a {}.", "a {} shape.", "a coloured {}.", "a {} on a plain background."],
    "colour": ["a photo of a {} shape.", "a drawing of a {} shape.", "something coloured {}.",
               "a shape that is {}.", "the colour {}."],
}
REL_TEMPLATES = ("{0} {rel} {1}", "a photo of {0} {rel} {1}", "there is {0} {rel} {1}",
                 "{0} placed {rel} {1}", "an image of {0} {rel} {1}")
LIST_TEMPLATES = ("{all}", "a photo of {all}", "a picture with {all}", "{all} on a plain background",
                  "an image showing {all}")
SINGLE_TEMPLATES = ("{0}", "a photo of {0}", "a drawing of {0}", "{0} on a plain background", "there is {0}")
NUM_NEGATIVES = 5
VERSION = 1  # bumped whenever the same arguments would render a different dataset
_SUPERSAMPLE = 4  # draw at 4x and box-filter down: smooth edges at any image size
_HELD_OUT_PERCENT = 20  # share of two-object combinations reserved for evaluation


@dataclass(frozen=True)
class Obj:
    """One shape in a scene; ``x``, ``y``, ``radius`` in fractions of the image side."""

    shape: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def radius(self) -> float:
        return SIZES[self.size]


@dataclass(frozen=True)
class Mention:
    """A noun phrase of a caption: ``None`` attributes are not mentioned (and match anything)."""

    shape: str
    colour: str | None
    size: str | None

    def matches(self, obj: Obj) -> bool:
        return (self.shape == obj.shape and self.colour in (None, obj.colour)
                and self.size in (None, obj.size))

    def text(self) -> str:
        words = [w for w in (self.size, self.colour, self.shape) if w is not None]
        return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


@dataclass(frozen=True)
class Caption:
    """A structured caption: ``kind`` is "single" (1 mention), "list" (2-3 mentions joined with
    "and") or "rel" (mention 0, ``relation``, mention 1); ``template`` indexes the kind's templates."""

    kind: str
    mentions: tuple
    relation: str | None = None
    template: int = 0

    def text(self) -> str:
        phrases = [m.text() for m in self.mentions]
        if self.kind == "rel":
            return REL_TEMPLATES[self.template].format(*phrases, rel=self.relation)
        if self.kind == "single":
            return SINGLE_TEMPLATES[self.template].format(*phrases)
        joined = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return LIST_TEMPLATES[self.template].format(all=joined)


def holds(relation: str, a: Obj, b: Obj) -> bool:
    """Whether "a <relation> b" is true: the offset is clear and mostly along the relation's axis."""
    dx, dy = b.x - a.x, b.y - a.y  # image y grows downwards
    along, across = {"to the left of": (dx, dy), "to the right of": (-dx, dy),
                     "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along >= 0.1 and abs(across) <= along / 2


def is_true(caption: Caption, scene: tuple) -> bool:
    """Whether ``caption`` describes the scene (a tuple of :class:`Obj`): every mention matches a
    distinct object and, for "rel" captions, the relation holds between the two matched objects."""
    for chosen in itertools.permutations(scene, len(caption.mentions)):
        if all(m.matches(o) for m, o in zip(caption.mentions, chosen)):
            if caption.kind != "rel" or holds(caption.relation, chosen[0], chosen[1]):
                return True
    return False


# ---- negatives: each function lists every caption its rule can produce from ``c`` ----------

def swap_obj(c: Caption) -> list:
    out = []
    for i, j in itertools.combinations(range(len(c.mentions)), 2):
        m = list(c.mentions)
        m[i], m[j] = replace(m[i], shape=m[j].shape), replace(m[j], shape=m[i].shape)
        out.append(replace(c, mentions=tuple(m)))
    return out


def swap_att(c: Caption) -> list:
    out = []
    for (i, j), attr in itertools.product(itertools.combinations(range(len(c.mentions)), 2), ("colour", "size")):
        a, b = getattr(c.mentions[i], attr), getattr(c.mentions[j], attr)
        if a is not None and b is not None:
            m = list(c.mentions)
            m[i], m[j] = replace(m[i], **{attr: b}), replace(m[j], **{attr: a})
            out.append(replace(c, mentions=tuple(m)))
    return out


def replace_att(c: Caption) -> list:
    out = []
    for i, (attr, values) in itertools.product(range(len(c.mentions)), (("colour", COLOURS), ("size", SIZES))):
        if getattr(c.mentions[i], attr) is not None:
            out += [_with_mention(c, i, **{attr: v}) for v in values if v != getattr(c.mentions[i], attr)]
    return out


def replace_obj(c: Caption) -> list:
    return [_with_mention(c, i, shape=s) for i in range(len(c.mentions)) for s in SHAPES
            if s != c.mentions[i].shape]


def reorder_rel(c: Caption) -> list:
    return [replace(c, mentions=c.mentions[::-1])] if c.kind == "rel" else []


def replace_rel(c: Caption) -> list:
    return [replace(c, relation=r) for r in RELATIONS if r != c.relation] if c.kind == "rel" else []


def add_obj(c: Caption) -> list:
    if c.kind != "list" or len(c.mentions) >= 3:
        return []
    uses_size = c.mentions[0].size is not None
    return [replace(c, mentions=c.mentions + (Mention(s, col, size if uses_size else None),))
            for s, col, size in itertools.product(SHAPES, COLOURS, SIZES) if uses_size or size == "big"]


def add_att(c: Caption) -> list:
    return [_with_mention(c, i, colour=col) for i in range(len(c.mentions)) if c.mentions[i].colour is None
            for col in COLOURS]


def _with_mention(c: Caption, i: int, **change) -> Caption:
    m = list(c.mentions)
    m[i] = replace(m[i], **change)
    return replace(c, mentions=tuple(m))


TRAIN_NEGATIVE_TYPES = (swap_obj, swap_att, replace_att, replace_obj, reorder_rel)
EVAL_NEGATIVES = {"swap_obj": swap_obj, "swap_att": swap_att, "replace_obj": replace_obj,
                  "replace_att": replace_att, "replace_rel": replace_rel, "add_obj": add_obj, "add_att": add_att}


def false_negatives(rule, caption: Caption, scene: tuple) -> list:
    """The captions ``rule`` makes from ``caption`` that are false for the scene, as texts (sorted, unique)."""
    return sorted({n.text() for n in rule(caption) if not is_true(n, scene)} - {caption.text()})


def train_negatives(caption: Caption, scene: tuple, rng: random.Random) -> list:
    """:data:`NUM_NEGATIVES` distinct false captions: one per applicable type of
    :data:`TRAIN_NEGATIVE_TYPES` in that order, then more replacements for the types that do not apply."""
    chosen = []
    for rule in TRAIN_NEGATIVE_TYPES:
        options = [t for t in false_negatives(rule, caption, scene) if t not in chosen]
        if options:
            chosen.append(rng.choice(options))
    spare = [t for rule in (replace_att, replace_obj, replace_rel)
             for t in false_negatives(rule, caption, scene) if t not in chosen]
    rng.shuffle(spare)
    chosen += spare[: NUM_NEGATIVES - len(chosen)]
    assert len(chosen) == NUM_NEGATIVES, caption
    return chosen


# ---- scenes --------------------------------------------------------------------------------

def _random_object(rng: random.Random, x: float = 0.5, y: float = 0.5) -> Obj:
    return Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)), x, y)


def _place_free(rng: random.Random, objs: list) -> tuple:
    """Scatter ``objs`` without overlaps (rejection sampling; always succeeds for <= 3 objects)."""
    while True:
        placed = []
        for o in objs:
            margin = o.radius + 0.03
            placed.append(replace(o, x=rng.uniform(margin, 1 - margin), y=rng.uniform(margin, 1 - margin)))
        if all((a.x - b.x) ** 2 + (a.y - b.y) ** 2 >= (a.radius + b.radius + 0.04) ** 2
               for a, b in itertools.combinations(placed, 2)):
            return tuple(placed)


def _place_relation(rng: random.Random, a: Obj, b: Obj, relation: str) -> tuple:
    """Place ``a`` and ``b`` so that "a <relation> b" clearly holds (and no other relation does)."""
    while True:
        a2, b2 = _place_free(rng, [a, b])
        horizontal = relation in ("to the left of", "to the right of")
        # Snap the cross-axis offset to a small jitter so the relation is unambiguous.
        if horizontal:
            b2 = replace(b2, y=min(max(a2.y + rng.uniform(-0.06, 0.06), b.radius + 0.03), 1 - b.radius - 0.03))
        else:
            b2 = replace(b2, x=min(max(a2.x + rng.uniform(-0.06, 0.06), b.radius + 0.03), 1 - b.radius - 0.03))
        gap = abs(a2.x - b2.x) if horizontal else abs(a2.y - b2.y)
        if holds(relation, a2, b2) and gap >= a.radius + b.radius + 0.04:
            return a2, b2


def combination_key(scene: tuple, relation: str | None) -> str:
    """What a two-object scene shows, independent of layout: the objects and their relation,
    written with "to the left of" / "above" only (a right-of scene is its mirror left-of scene)."""
    a, b = scene
    if relation in ("to the right of", "below"):
        a, b, relation = b, a, {"to the right of": "to the left of", "below": "above"}[relation]
    return f"{a.size} {a.colour} {a.shape}|{relation}|{b.size} {b.colour} {b.shape}"


def is_held_out(key: str) -> bool:
    """Whether a two-object combination is reserved for evaluation (a fixed hash split)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100 < _HELD_OUT_PERCENT


def _pair_scene(rng: random.Random, held_out: bool) -> tuple:
    """Two objects in a relation, from the evaluation or the training side of the split."""
    while True:
        relation = rng.choice(RELATIONS)
        a, b = _random_object(rng), _random_object(rng)
        if is_held_out(combination_key((a, b), relation)) == held_out:
            return _place_relation(rng, a, b, relation), relation


def _mentions(rng: random.Random, scene: tuple, with_size: bool, drop_colour: bool) -> tuple:
    mentions = [Mention(o.shape, o.colour, o.size if with_size else None) for o in scene]
    if drop_colour:
        i = rng.randrange(len(mentions))
        mentions[i] = replace(mentions[i], colour=None)
    return tuple(mentions)


def _caption(rng: random.Random, scene: tuple, relation: str | None, kind: str, drop_colour: bool = False) -> Caption:
    """A true caption of ``scene`` (``relation`` is that of objects 0 and 1, or None)."""
    mentions = _mentions(rng, scene, rng.random() < 0.4, drop_colour)
    templates = {"rel": REL_TEMPLATES, "list": LIST_TEMPLATES, "single": SINGLE_TEMPLATES}[kind]
    if kind == "rel" and rng.random() < 0.5:
        # the same fact from the other object's side
        mentions, relation = mentions[::-1], {"to the left of": "to the right of", "to the right of": "to the left of",
                                              "above": "below", "below": "above"}[relation]
    caption = Caption(kind, mentions, relation if kind == "rel" else None, rng.randrange(len(templates)))
    assert is_true(caption, scene), caption
    return caption


def train_item(seed: int, index: int) -> tuple:
    """Training scene ``index`` -> (scene, caption, negatives). Mostly two objects in a relation,
    some single objects and some three-object scenes."""
    rng = random.Random(f"{seed}/train/{index}")
    draw = rng.random()
    if draw < 0.15:
        scene = _place_free(rng, [_random_object(rng)])
        caption = _caption(rng, scene, None, "single")
    elif draw < 0.3:
        scene = _place_free(rng, [_random_object(rng) for _ in range(3)])
        caption = _caption(rng, scene, None, "list", drop_colour=rng.random() < 0.1)
    else:
        scene, relation = _pair_scene(rng, held_out=False)
        caption = _caption(rng, scene, relation, "rel" if rng.random() < 0.75 else "list",
                           drop_colour=rng.random() < 0.1)
    return scene, caption, train_negatives(caption, scene, rng)


def eval_item(seed: int, subset: str, index: int) -> tuple:
    """Evaluation item ``index`` of ``subset`` -> (scene, caption, negative caption text), on a
    held-out two-object combination."""
    rng = random.Random(f"{seed}/eval/{subset}/{index}")
    while True:
        scene, relation = _pair_scene(rng, held_out=True)
        kind = "list" if subset == "add_obj" else "rel" if subset == "replace_rel" else rng.choice(("rel", "list"))
        caption = _caption(rng, scene, relation, kind, drop_colour=subset == "add_att")
        options = false_negatives(EVAL_NEGATIVES[subset], caption, scene)
        if options:
            return scene, caption, rng.choice(options)


def zeroshot_item(seed: int, task: str, index: int) -> tuple:
    """Zero-shot item ``index`` of ``task`` ("shape" or "colour") -> (one-object scene, label)."""
    rng = random.Random(f"{seed}/zeroshot/{task}/{index}")
    scene = _place_free(rng, [_random_object(rng)])
    classes = SHAPES if task == "shape" else tuple(COLOURS)
    return scene, classes.index(scene[0].shape if task == "shape" else scene[0].colour)


# ---- rendering and files -------------------------------------------------------------------

def render(scene: tuple, image_size: int, rng: random.Random):
    """Draw ``scene`` on a light, slightly tinted background -> RGB ``PIL.Image`` of ``image_size``^2."""
    from PIL import Image, ImageDraw

    side = image_size * _SUPERSAMPLE
    background = tuple(rng.randint(222, 250) for _ in range(3))
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)
    for o in scene:
        colour = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[o.colour])
        cx, cy, r = o.x * side, o.y * side, o.radius * side
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif o.shape == "square":
            h = r * 0.85  # similar area to the circle
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=colour)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)], fill=colour)
        elif o.shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
        else:  # cross
            w = r * 0.36
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    return image.reduce(_SUPERSAMPLE)


def _write_image(path: Path, scene: tuple, image_size: int, rng: random.Random) -> None:
    buffer = io.BytesIO()
    render(scene, image_size, rng).save(buffer, format="JPEG", quality=95)
    write_bytes_atomic(path, buffer.getvalue())


def generate(out_dir: str | os.PathLike, num_images: int = 2000, seed: int = 0, *, eval_items: int = 200,
             zeroshot_items: int = 40, image_size: int = 64, progress: bool | None = None) -> Path:
    """Render the dataset into ``out_dir`` and return the path of ``train.json``.

    ``num_images`` training scenes; ``eval_items`` items per evaluation subset; ``zeroshot_items``
    images per class of each zero-shot task; square JPEGs of ``image_size`` pixels. ``progress``:
    a progress bar on stderr (``None``: only when stderr is a terminal). Raises :class:`ConfigError`
    for counts below 1 or an image size below 16.
    """
    from tqdm import tqdm

    for name, value, low in (("images", num_images, 1), ("eval_items", eval_items, 1),
                             ("zeroshot_items", zeroshot_items, 1), ("image_size", image_size, 16)):
        if int(value) != value or value < low:
            raise ConfigError(f"{name}: must be an integer >= {low}, got {value!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"cannot write {out}: is a file, not a folder (--out names the dataset's folder)")
    for folder in ("train", "eval/images", "zeroshot/images"):
        try:
            (out / folder).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise cannot_write(out / folder, err) from None
    total = num_images + eval_items * len(EVAL_SUBSETS) + zeroshot_items * (len(SHAPES) + len(COLOURS))
    bar = tqdm(total=total, desc="synth", unit="img", disable=not (sys.stderr.isatty() if progress is None else progress))

    records = []
    for i in range(num_images):
        scene, caption, negatives = train_item(seed, i)
        _write_image(out / "train" / f"{i:06d}.jpg", scene, image_size, random.Random(f"{seed}/pixels/train/{i}"))
        records.append({"image": f"train/{i:06d}.jpg", "original": caption.text(), "enhanced": negatives})
        bar.update()
    write_json_atomic(out / "train.json", records)

    number = 0
    for subset in EVAL_SUBSETS:
        items = {}
        for i in range(eval_items):
            scene, caption, negative = eval_item(seed, subset, i)
            filename = f"{number:06d}.jpg"
            _write_image(out / "eval" / "images" / filename, scene, image_size,
                         random.Random(f"{seed}/pixels/eval/{number}"))
            items[str(number)] = {"filename": filename, "caption": caption.text(), "negative_caption": negative}
            number += 1
            bar.update()
        write_json_atomic(out / "eval" / f"{subset}.json", items)

    number = 0
    for task, classes in (("shape", SHAPES), ("colour", tuple(COLOURS))):
        items = []
        for i in range(zeroshot_items * len(classes)):
            scene, label = zeroshot_item(seed, task, i)
            filename = f"{number:06d}.jpg"
            _write_image(out / "zeroshot" / "images" / filename, scene, image_size,
                         random.Random(f"{seed}/pixels/zeroshot/{number}"))
            items.append({"filename": filename, "label": label})
            number += 1
            bar.update()
        write_json_atomic(out / "zeroshot" / f"{task}.json",
                    {"classnames": list(classes), "templates": ZEROSHOT_TEMPLATES[task], "items": items})
    bar.close()
    write_json_atomic(out / "manifest.json", {"format": "degla-fast/synthetic", "version": VERSION, "images": num_images,
                                        "seed": seed, "eval_items": eval_items, "zeroshot_items": zeroshot_items,
                                        "image_size": image_size})
    return out / "train.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``degla-fast synth``."""
    parser.add_argument("--out", required=True, help="output folder (created; existing files are overwritten)")
    parser.add_argument("--images", type=int, default=2000, help="training images (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="everything is a pure function of the seed (default 0)")
    parser.add_argument("--eval-items", type=int, default=200, help="items per evaluation subset (default 200)")
    parser.add_argument("--zeroshot-items", type=int, default=40, help="zero-shot images per class (default 40)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """``degla-fast synth``: render the dataset and print where it went."""
    try:
        train_json = generate(args.out, args.images, args.seed, eval_items=args.eval_items,
                              zeroshot_items=args.zeroshot_items, image_size=args.image_size,
                              progress=False if args.no_progress else None)
    except OSError as err:  # a full disk, a file where an image folder should be
        raise cannot_write(args.out, err) from None
    print(f"wrote {train_json} ({args.images} images), {train_json.parent / 'eval'} "
          f"({len(EVAL_SUBSETS)} subsets x {args.eval_items}) and {train_json.parent / 'zeroshot'}")
    return 0
