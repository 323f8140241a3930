"""The synthetic compositional world: a broad pre-training distribution and a narrow fine-tuning one.

``degla-fast synth --out DIR`` renders two training distributions, the way CLIP is pre-trained on
the web and then fine-tuned on COCO:

- **pre-training** (``DIR/pretrain.json``, images in ``DIR/pretrain/``): 8 shapes, 8 colours, 3
  sizes, 4 textures (solid, striped, dotted, checkered), 1-4 objects, tinted backgrounds; captions
  name objects and some of their attributes ("a big striped red star", "three small blue
  circles", "a dotted green hexagon and a pink cross"), only about a sixth state a relation.
  Records carry no hard negatives: this is the CLIP-loss start point's data.
- **fine-tuning** (``DIR/train.json``, images in ``DIR/train/``): narrower (5 shapes, 6 colours,
  one size, solid, near-grey backgrounds), relation-rich captions of two or three objects
  ("a red circle to the left of a blue square"), each with 5 hard negatives, one of each type of
  the method doc (section 6): swap objects, swap attributes, replace an attribute, replace an
  object, reorder the relation (DeGLA records ``{"image", "original", "enhanced"}``).

Held-out tests, each in a validation and a test split (settings are chosen on ``val/``, results
reported on the test split):

- ``DIR/eval/<subset>.json`` and ``DIR/val/eval/<subset>.json`` (SugarCrepe's format): swap_obj,
  swap_att, replace_obj, replace_att, replace_rel, add_obj, add_att on fine-tuning-style scenes
  whose object/relation combination never occurs in any training image (a fixed hash split of the
  combinations into train / val / test: the splits are disjoint);
- ``DIR/zeroshot/<task>.json`` and ``DIR/val/zeroshot/<task>.json``: shape (the three shapes
  fine-tuning never shows), colour (8-way), size (3-way), texture (4-way) and count (3, 4 or 5
  objects) classification, balanced classes. Sizes, textures, counts and those shapes never
  appear in fine-tuning: these are the abilities pre-training teaches and fine-tuning can make
  the model forget.
- ``DIR/manifest.json``: :data:`VERSION` and the arguments (compare it to skip re-rendering).

Captions are built from a structured description of the scene, and every negative is checked
against the scene: it is kept only when it is false for the image. Everything is a pure function
of the seed and the arguments.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import math
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

from ..console import log
from ..threads import available_cores
from ..errors import ConfigError
from ..io import cannot_write, check_output_folder, write_bytes_atomic, write_json_atomic

# The broad (pre-training) vocabulary; the fine-tuning world uses the first entries only.
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "hexagon", "semicircle")
COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 215),
           "yellow": (235, 205, 35), "purple": (140, 60, 185), "orange": (245, 135, 25),
           "pink": (245, 120, 190), "cyan": (40, 200, 215)}
SIZES = {"small": 0.10, "medium": 0.15, "big": 0.21}  # radius as a fraction of the image side
TEXTURES = ("solid", "striped", "dotted", "checkered")
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
PLURALS = {"cross": "crosses"}
FT_SHAPES = SHAPES[:5]
FT_COLOURS = tuple(COLOURS)[:6]
FT_SIZE = "medium"
FT_TEXTURE = "solid"
RELATIONS = ("to the left of", "to the right of", "above", "below")
EVAL_SUBSETS = ("swap_obj", "swap_att", "replace_obj", "replace_att", "replace_rel", "add_obj", "add_att")
ZEROSHOT_CLASSES = {
    "shape": SHAPES[5:], "colour": tuple(COLOURS), "size": tuple(SIZES), "texture": TEXTURES,
    "count": ("three", "four", "five"),
}
_FIRST_COUNT = 3  # label 0 of the count task
ZEROSHOT_TASKS = tuple(ZEROSHOT_CLASSES)
ZEROSHOT_TEMPLATES = {
    "shape": ["a {}", "a photo of a {}", "a drawing of a {}", "there is a {}", "an image of a {}"],
    "colour": ["a {} shape", "a photo of a {} shape", "a drawing of a {} shape", "there is a {} shape",
               "an image of a {} shape"],
    "size": ["a {} shape", "a photo of a {} shape", "a drawing of a {} shape", "there is a {} shape",
             "an image of a {} shape"],
    "texture": ["a {} shape", "a photo of a {} shape", "a drawing of a {} shape", "there is a {} shape",
                "an image of a {} shape"],
    "count": ["{} shapes", "a photo of {} shapes", "a drawing of {} shapes", "there are {} shapes",
              "an image of {} shapes"],
}
REL_TEMPLATES = ("{0} {rel} {1}", "a photo of {0} {rel} {1}", "there is {0} {rel} {1}",
                 "{0} placed {rel} {1}", "an image of {0} {rel} {1}")
LIST_TEMPLATES = ("{all}", "a photo of {all}", "a drawing of {all}", "there is {all}", "an image of {all}")
SINGLE_TEMPLATES = ("{0}", "a photo of {0}", "a drawing of {0}", "there is {0}", "an image of {0}")
COUNT_TEMPLATES = ("{0}", "a photo of {0}", "a drawing of {0}", "there are {0}", "an image of {0}")
NUM_NEGATIVES = 5
VERSION = 2  # bumped whenever the same arguments would render a different dataset
_SUPERSAMPLE = 4  # draw at 4x and box-filter down: smooth edges at any image size
_VAL_PERCENT, _TEST_PERCENT = 15, 15  # shares of two-object combinations reserved for val and test


@dataclass(frozen=True)
class Obj:
    """One shape in a scene; ``x``, ``y`` in fractions of the image side."""

    shape: str
    colour: str
    size: str
    x: float = 0.5
    y: float = 0.5
    texture: str = FT_TEXTURE

    @property
    def radius(self) -> float:
        return SIZES[self.size]


@dataclass(frozen=True)
class Mention:
    """A noun phrase of a caption: ``None`` attributes are not mentioned (and match anything);
    ``shape`` None is the generic noun "shape"; ``count`` > 1 is a plural ("three red circles")."""

    shape: str | None
    colour: str | None = None
    size: str | None = None
    texture: str | None = None
    count: int = 1

    def matches(self, obj: Obj) -> bool:
        return (self.shape in (None, obj.shape) and self.colour in (None, obj.colour)
                and self.size in (None, obj.size) and self.texture in (None, obj.texture))

    def text(self) -> str:
        noun = self.shape or "shape"
        if self.count > 1:
            noun = PLURALS.get(noun, noun + "s")
        words = [w for w in (self.size, self.texture, self.colour) if w is not None] + [noun]
        if self.count > 1:
            return COUNT_WORDS[self.count] + " " + " ".join(words)
        return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


@dataclass(frozen=True)
class Caption:
    """A structured caption: ``kind`` is "single" (1 mention), "list" (2-3 mentions joined with
    "and"), "rel" (mention 0, ``relation``, mention 1) or "count" (one plural mention, true when
    exactly that many objects match); ``template`` indexes the kind's templates."""

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
        if self.kind == "count":
            return COUNT_TEMPLATES[self.template].format(*phrases)
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
    distinct object and, for "rel" captions, the relation holds between the two matched objects;
    a "count" caption is true when exactly ``count`` objects match its mention."""
    if caption.kind == "count":
        m = caption.mentions[0]
        return sum(m.matches(o) for o in scene) == m.count
    for chosen in itertools.permutations(scene, len(caption.mentions)):
        if all(m.matches(o) for m, o in zip(caption.mentions, chosen)):
            if caption.kind != "rel" or holds(caption.relation, chosen[0], chosen[1]):
                return True
    return False


# ---- negatives: each function lists every caption its rule can produce from ``c`` ----------
# (within the fine-tuning vocabulary: negatives are made for fine-tuning and evaluation captions)

def swap_obj(c: Caption) -> list:
    out = []
    for i, j in itertools.combinations(range(len(c.mentions)), 2):
        m = list(c.mentions)
        m[i], m[j] = replace(m[i], shape=m[j].shape), replace(m[j], shape=m[i].shape)
        out.append(replace(c, mentions=tuple(m)))
    return out


def swap_att(c: Caption) -> list:
    out = []
    for (i, j), attr in itertools.product(itertools.combinations(range(len(c.mentions)), 2),
                                          ("colour", "size", "texture")):
        a, b = getattr(c.mentions[i], attr), getattr(c.mentions[j], attr)
        if a is not None and b is not None:
            m = list(c.mentions)
            m[i], m[j] = replace(m[i], **{attr: b}), replace(m[j], **{attr: a})
            out.append(replace(c, mentions=tuple(m)))
    return out


def replace_att(c: Caption) -> list:
    return [_with_mention(c, i, colour=v) for i in range(len(c.mentions)) if c.mentions[i].colour is not None
            for v in FT_COLOURS if v != c.mentions[i].colour]


def replace_obj(c: Caption) -> list:
    return [_with_mention(c, i, shape=s) for i in range(len(c.mentions)) for s in FT_SHAPES
            if s != c.mentions[i].shape]


def reorder_rel(c: Caption) -> list:
    return [replace(c, mentions=c.mentions[::-1])] if c.kind == "rel" else []


def replace_rel(c: Caption) -> list:
    return [replace(c, relation=r) for r in RELATIONS if r != c.relation] if c.kind == "rel" else []


def add_obj(c: Caption) -> list:
    if c.kind != "list" or len(c.mentions) >= 3:
        return []
    return [replace(c, mentions=c.mentions + (Mention(s, col),)) for s, col in itertools.product(FT_SHAPES, FT_COLOURS)]


def add_att(c: Caption) -> list:
    return [_with_mention(c, i, colour=col) for i in range(len(c.mentions)) if c.mentions[i].colour is None
            for col in FT_COLOURS]


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


# ---- the split of two-object combinations ----------------------------------------------------

def combination_key(scene: tuple, relation: str | None) -> str:
    """What two objects in a relation show, independent of layout, size and texture: the objects'
    colours and shapes and their relation, written with "to the left of" / "above" only (a
    right-of scene is its mirror left-of scene)."""
    a, b = scene
    if relation in ("to the right of", "below"):
        a, b, relation = b, a, {"to the right of": "to the left of", "below": "above"}[relation]
    return f"{a.colour} {a.shape}|{relation}|{b.colour} {b.shape}"


def split_of(key: str) -> str:
    """"val", "test" or "train": the fixed hash split of two-object combinations."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    return "val" if bucket < _VAL_PERCENT else "test" if bucket < _VAL_PERCENT + _TEST_PERCENT else "train"


def is_held_out(key: str) -> bool:
    """Whether a two-object combination is reserved for evaluation (validation or test)."""
    return split_of(key) != "train"


def scene_keys(scene: tuple) -> list:
    """The combination keys of every pair of objects in ``scene`` that stand in a relation."""
    return [combination_key((a, b), r) for a, b in itertools.permutations(scene, 2) for r in RELATIONS
            if holds(r, a, b)]


def trainable(scene: tuple) -> bool:
    """Whether a scene may appear in training: no pair of its objects shows a held-out combination."""
    return not any(is_held_out(k) for k in scene_keys(scene))


# ---- scenes --------------------------------------------------------------------------------

def _broad_object(rng: random.Random, sizes=tuple(SIZES)) -> Obj:
    return Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(sizes), texture=rng.choice(TEXTURES))


def _ft_object(rng: random.Random) -> Obj:
    return Obj(rng.choice(FT_SHAPES), rng.choice(FT_COLOURS), FT_SIZE)


def _place_free(rng: random.Random, objs: list) -> tuple:
    """Scatter ``objs`` without overlaps (rejection sampling)."""
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


def _pair_scene(rng: random.Random, split: str, make=_ft_object) -> tuple:
    """Two objects in a relation whose combination belongs to ``split`` ("train", "val", "test")."""
    while True:
        relation = rng.choice(RELATIONS)
        a, b = make(rng), make(rng)
        if split_of(combination_key((a, b), relation)) == split:
            return _place_relation(rng, a, b, relation), relation


def _train_scene(rng: random.Random, objs_fn) -> tuple:
    """A scattered scene of the objects ``objs_fn()`` that shows no held-out combination (a few
    layouts are tried, then new objects are drawn)."""
    while True:
        objs = objs_fn()
        for _ in range(5):
            scene = _place_free(rng, objs)
            if trainable(scene):
                return scene


_FLIP = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}


def _ft_caption(rng: random.Random, scene: tuple, relation: str | None, kind: str, drop_colour: bool = False) -> Caption:
    """A true fine-tuning-style caption of ``scene`` (colours and shapes only; ``relation`` is that
    of objects 0 and 1, or None)."""
    mentions = [Mention(o.shape, o.colour) for o in scene]
    if drop_colour:
        i = rng.randrange(len(mentions))
        mentions[i] = replace(mentions[i], colour=None)
    mentions = tuple(mentions)
    templates = {"rel": REL_TEMPLATES, "list": LIST_TEMPLATES, "single": SINGLE_TEMPLATES}[kind]
    if kind == "rel" and rng.random() < 0.5:
        mentions, relation = mentions[::-1], _FLIP[relation]  # the same fact from the other object's side
    if kind == "list":
        mentions = tuple(rng.sample(mentions, len(mentions)))
    caption = Caption(kind, mentions, relation if kind == "rel" else None, rng.randrange(len(templates)))
    assert is_true(caption, scene), caption
    return caption


def _broad_mention(rng: random.Random, o: Obj, count: int = 1) -> Mention:
    """A web-style noun phrase: each attribute named or not (the colour in 40 %: colour alone would
    tell most images of a batch apart, and a model that can read colour would never need shape),
    sometimes the generic noun "shape"."""
    return Mention(o.shape if rng.random() < 0.95 else None, o.colour if rng.random() < 0.4 else None,
                   o.size if rng.random() < 0.5 else None, o.texture if rng.random() < 0.5 else None, count)


def pretrain_item(seed: int, index: int) -> tuple:
    """Pre-training scene ``index`` -> (scene, caption): one object (35 %), 2-5 identical objects
    with a count caption (12 %), 2-3 objects with a list caption (38 %) or two objects with a
    relation caption (15 %); broad attributes throughout."""
    rng = random.Random(f"{seed}/pretrain/{index}")
    draw = rng.random()
    if draw < 0.35:
        scene = _place_free(rng, [_broad_object(rng)])
        caption = Caption("single", (_broad_mention(rng, scene[0]),), template=rng.randrange(len(SINGLE_TEMPLATES)))
    elif draw < 0.47:
        n = rng.randint(2, 5)
        scene = _train_scene(rng, lambda: [_broad_object(rng, ("small", "medium") if n <= 3 else ("small",))] * n)
        caption = Caption("count", (_broad_mention(rng, scene[0], n),), template=rng.randrange(len(COUNT_TEMPLATES)))
    elif draw < 0.85:
        n = rng.randint(2, 3)
        scene = _train_scene(rng, lambda: [_broad_object(rng, ("small", "medium") if n == 3 else tuple(SIZES))
                                           for _ in range(n)])
        caption = Caption("list", tuple(_broad_mention(rng, o) for o in rng.sample(scene, n)),
                          template=rng.randrange(len(LIST_TEMPLATES)))
    else:
        scene, relation = _pair_scene(rng, "train", lambda r: _broad_object(r, ("small", "medium")))
        mentions = tuple(_broad_mention(rng, o) for o in scene)
        if rng.random() < 0.5:
            mentions, relation = mentions[::-1], _FLIP[relation]
        caption = Caption("rel", mentions, relation, rng.randrange(len(REL_TEMPLATES)))
    if not is_true(caption, scene):  # a generic mention that happens to match another object too
        return pretrain_item(seed, index + 1_000_003)
    return scene, caption


def train_item(seed: int, index: int) -> tuple:
    """Fine-tuning scene ``index`` -> (scene, caption, negatives): two objects in a relation (80 %,
    a relation caption) or three objects (20 %: half the time a relation caption of two of them,
    else a list caption of all three)."""
    rng = random.Random(f"{seed}/train/{index}")
    if rng.random() < 0.8:
        scene, relation = _pair_scene(rng, "train")
        caption = _ft_caption(rng, scene, relation, "rel", drop_colour=rng.random() < 0.1)
    else:
        while True:
            pair, relation = _pair_scene(rng, "train")
            third = _place_free(rng, [_ft_object(rng)])[0]
            scene = pair + (third,)
            if all((third.x - o.x) ** 2 + (third.y - o.y) ** 2 >= (2 * third.radius + 0.04) ** 2 for o in pair) \
                    and trainable(scene):
                break
        if rng.random() < 0.5:
            caption = _ft_caption(rng, scene[:2], relation, "rel")
            if not is_true(caption, scene) or any(is_true(n, scene) for n in reorder_rel(caption)):
                caption = _ft_caption(rng, scene, None, "list")
        else:
            caption = _ft_caption(rng, scene, None, "list")
    return scene, caption, train_negatives(caption, scene, rng)


def eval_item(seed: int, subset: str, index: int, split: str = "test") -> tuple:
    """Evaluation item ``index`` of ``subset`` -> (scene, caption, negative caption text), on a
    two-object combination of the ``split`` ("val" or "test") side of the hash split."""
    rng = random.Random(f"{seed}/eval/{split}/{subset}/{index}")
    while True:
        scene, relation = _pair_scene(rng, split)
        kind = "list" if subset == "add_obj" else "rel" if subset == "replace_rel" else rng.choice(("rel", "list"))
        caption = _ft_caption(rng, scene, relation, kind, drop_colour=subset == "add_att")
        options = false_negatives(EVAL_NEGATIVES[subset], caption, scene)
        if options:
            return scene, caption, rng.choice(options)


def zeroshot_item(seed: int, task: str, index: int, split: str = "test") -> tuple:
    """Zero-shot item ``index`` of ``task`` -> (scene, label); labels cycle through the classes,
    so every class has the same number of items; the other attributes are random."""
    rng = random.Random(f"{seed}/zeroshot/{split}/{task}/{index}")
    classes = ZEROSHOT_CLASSES[task]
    label = index % len(classes)
    if task == "count":
        o = _broad_object(rng, ("small",))
        return _place_free(rng, [o] * (label + _FIRST_COUNT)), label
    o = _broad_object(rng)
    o = replace(o, **{task: classes[label]})
    return _place_free(rng, [o]), label


# ---- rendering and files -------------------------------------------------------------------

_PATTERNS: dict = {}


def _pattern(texture: str, side: int):
    """An "L" mask of ``side``^2: 255 where a texture shows the object's light tint."""
    key = (texture, side)
    if key not in _PATTERNS:
        from PIL import Image, ImageDraw

        image = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(image)
        p = max(4, side // 16)  # the texture's period
        if texture == "striped":
            for k in range(-side, side, p):
                draw.polygon([(k, 0), (k + p // 2, 0), (k + p // 2 + side, side), (k + side, side)], fill=255)
        elif texture == "dotted":
            for y in range(0, side, p):
                for x in range(0, side, p):
                    c = p / 2
                    draw.ellipse((x + c - p * 0.28, y + c - p * 0.28, x + c + p * 0.28, y + c + p * 0.28), fill=255)
        elif texture == "checkered":
            for y in range(0, side, p):
                for x in range(0, side, p):
                    if (x // p + y // p) % 2:
                        draw.rectangle((x, y, x + p - 1, y + p - 1), fill=255)
        _PATTERNS[key] = image
    return _PATTERNS[key]


def _draw_shape(draw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = r * 0.85  # similar area to the circle
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        w = r * 0.36
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif shape == "star":
        points = [(cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                   cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
        draw.polygon(points, fill=fill)
    elif shape == "hexagon":
        draw.polygon([(cx + r * math.cos(k * math.pi / 3), cy + r * math.sin(k * math.pi / 3)) for k in range(6)],
                     fill=fill)
    else:  # semicircle: the upper half of a disc, centred on its area
        draw.pieslice((cx - r * 1.1, cy - r * 0.7, cx + r * 1.1, cy + r * 1.5), 180, 360, fill=fill)


def render(scene: tuple, image_size: int, rng: random.Random, background: str = "plain"):
    """Draw ``scene`` -> RGB ``PIL.Image`` of ``image_size``^2. ``background``: "plain" (light,
    slightly tinted: the fine-tuning and evaluation images) or "tinted" (any light colour)."""
    from PIL import Image, ImageDraw

    side = image_size * _SUPERSAMPLE
    low = 222 if background == "plain" else 175
    base = rng.randint(low, 250)
    spread = 14 if background == "plain" else 60
    bg = tuple(min(255, max(low, base + rng.randint(-spread, spread))) for _ in range(3))
    image = Image.new("RGB", (side, side), bg)
    for o in scene:
        jitter = 15 if background == "plain" else 35  # the broad world's lighting varies more
        colour = tuple(min(255, max(0, c + rng.randint(-jitter, jitter))) for c in COLOURS[o.colour])
        cx, cy, r = o.x * side, o.y * side, o.radius * side
        if o.texture == "solid":
            _draw_shape(ImageDraw.Draw(image), o.shape, cx, cy, r, colour)
            continue
        mask = Image.new("L", (side, side), 0)
        _draw_shape(ImageDraw.Draw(mask), o.shape, cx, cy, r, 255)
        light = tuple(int(c + (255 - c) * 0.6) for c in colour)
        fill = Image.composite(Image.new("RGB", (side, side), light), Image.new("RGB", (side, side), colour),
                               _pattern(o.texture, side))
        image.paste(fill, (0, 0), mask)
    return image.reduce(_SUPERSAMPLE)


def _write_image(path: Path, scene: tuple, image_size: int, rng: random.Random, background: str = "plain") -> None:
    buffer = io.BytesIO()
    render(scene, image_size, rng, background).save(buffer, format="JPEG", quality=95)
    write_bytes_atomic(path, buffer.getvalue())


def generate(out_dir: str | os.PathLike, num_images: int = 2000, seed: int = 0, *, eval_items: int = 200,
             zeroshot_items: int = 40, image_size: int = 64, pretrain_images: int | None = None,
             val_eval_items: int | None = None, val_zeroshot_items: int | None = None,
             progress: bool | None = None, workers: int = 1) -> Path:
    """Render the dataset into ``out_dir`` and return the path of ``train.json`` (fine-tuning).

    ``num_images`` fine-tuning scenes; ``pretrain_images`` pre-training scenes (default: as many);
    ``eval_items`` items per compositional subset and ``zeroshot_items`` images per zero-shot class
    in the test split (``val_eval_items`` / ``val_zeroshot_items`` in the validation split, default
    the same); square JPEGs of ``image_size`` pixels. ``progress``: a progress bar on stderr
    when stderr is a terminal (False or None: never; True: where there is a terminal; never in a
    file, where its carriage returns would make one endless line, :mod:`degla_fast.console`).
    ``workers``: processes rendering images (each image is a pure function of the seed and its
    own index, so the files are byte for byte the same for any number). Raises
    :class:`ConfigError` for counts below 1 or an image size below 16.
    """
    from ..console import progress_bar

    pretrain_images = num_images if pretrain_images is None else pretrain_images
    val_eval_items = eval_items if val_eval_items is None else val_eval_items
    val_zeroshot_items = zeroshot_items if val_zeroshot_items is None else val_zeroshot_items
    _check_counts((("images", num_images, 1), ("pretrain_images", pretrain_images, 1),
                   ("eval_items", eval_items, 1), ("zeroshot_items", zeroshot_items, 1),
                   ("val_eval_items", val_eval_items, 1), ("val_zeroshot_items", val_zeroshot_items, 1),
                   ("image_size", image_size, 16), ("workers", workers, 1)))
    out = check_output_folder(out_dir, "--out")
    splits = {"test": (out, eval_items, zeroshot_items), "val": (out / "val", val_eval_items, val_zeroshot_items)}
    _make_folders(out, ["train", "pretrain"] + [str((base / sub).relative_to(out)) for base, _, _ in splits.values()
                                                for sub in ("eval/images", "zeroshot/images")])
    jobs = _image_jobs(out, num_images, pretrain_images, splits)
    bar = progress_bar(len(jobs), desc="synth", unit="img", enabled=progress is not False)
    files: dict[Path, object] = {}  # each JSON file of the world -> its content, in job order
    for chunk, records in _render(jobs, seed, image_size, workers):
        for job, record in zip(chunk, records):
            _file_content(files, out, job, record)
        bar.update(len(chunk))
    bar.close()
    for path, content in files.items():
        write_json_atomic(path, content)
    write_json_atomic(out / "manifest.json", {
        "format": "degla-fast/synthetic", "version": VERSION, "images": num_images, "pretrain_images": pretrain_images,
        "seed": seed, "eval_items": eval_items, "zeroshot_items": zeroshot_items, "val_eval_items": val_eval_items,
        "val_zeroshot_items": val_zeroshot_items, "image_size": image_size, "zeroshot_tasks": list(ZEROSHOT_TASKS)})
    return out / "train.json"


def _check_counts(limits) -> None:
    """A ConfigError for the first ``(name, value, low)`` whose value is not an integer >= low."""
    for name, value, low in limits:
        if int(value) != value or value < low:
            raise ConfigError(f"{name}: must be an integer >= {low}, got {value!r}")


def _make_folders(out: Path, folders: list[str]) -> None:
    for folder in folders:
        try:
            (out / folder).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise cannot_write(out / folder, err) from None


# One image of the world: (kind, base folder, split, subset or task, index in it, file number in
# the base folder's eval/ or zeroshot/ images); kinds "pretrain", "train", "eval", "zeroshot".
Job = tuple


def _image_jobs(out: Path, num_images: int, pretrain_images: int, splits: dict) -> list[Job]:
    """Every image of the world, in the order of its files: pre-training, fine-tuning, then each
    split's compositional subsets and zero-shot tasks (numbered across subsets, across tasks)."""
    jobs = [("pretrain", str(out), "", "", i, i) for i in range(pretrain_images)]
    jobs += [("train", str(out), "", "", i, i) for i in range(num_images)]
    for split, (base, n_eval, n_zero) in splits.items():
        jobs += [("eval", str(base), split, subset, i, k * n_eval + i)
                 for k, subset in enumerate(EVAL_SUBSETS) for i in range(n_eval)]
        number = 0
        for task, classes in ZEROSHOT_CLASSES.items():
            jobs += [("zeroshot", str(base), split, task, i, number + i) for i in range(n_zero * len(classes))]
            number += n_zero * len(classes)
    return jobs


def _render(jobs: list[Job], seed: int, image_size: int, workers: int):
    """Yield ``(chunk of jobs, their records)`` in job order, rendered by ``workers`` processes
    (1: in this one). Spawned, not forked: the caller may hold threads (torch's, a trainer's)."""
    size = max(1, min(256, len(jobs) // (8 * workers) or 1))
    chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    if workers == 1 or len(chunks) == 1:
        for chunk in chunks:
            yield chunk, _render_chunk(chunk, seed, image_size)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=mp.get_context("spawn")) as pool:
        yield from zip(chunks, pool.map(_render_chunk, chunks, itertools.repeat(seed), itertools.repeat(image_size)))


def _render_chunk(jobs: list[Job], seed: int, image_size: int) -> list[dict]:
    """Write the images of ``jobs`` and return their records (what their JSON files hold)."""
    return [_render_one(job, seed, image_size) for job in jobs]


def _render_one(job: Job, seed: int, image_size: int) -> dict:
    kind, base, split, group, i, number = job
    base = Path(base)
    if kind == "pretrain":
        scene, caption = pretrain_item(seed, i)
        _write_image(base / "pretrain" / f"{i:06d}.jpg", scene, image_size,
                     random.Random(f"{seed}/pixels/pretrain/{i}"), "tinted")
        return {"image": f"pretrain/{i:06d}.jpg", "original": caption.text()}
    if kind == "train":
        scene, caption, negatives = train_item(seed, i)
        _write_image(base / "train" / f"{i:06d}.jpg", scene, image_size, random.Random(f"{seed}/pixels/train/{i}"))
        return {"image": f"train/{i:06d}.jpg", "original": caption.text(), "enhanced": negatives}
    filename = f"{number:06d}.jpg"
    if kind == "eval":
        scene, caption, negative = eval_item(seed, group, i, split)
        _write_image(base / "eval" / "images" / filename, scene, image_size,
                     random.Random(f"{seed}/pixels/{split}/eval/{number}"))
        return {"filename": filename, "caption": caption.text(), "negative_caption": negative}
    scene, label = zeroshot_item(seed, group, i, split)
    _write_image(base / "zeroshot" / "images" / filename, scene, image_size,
                 random.Random(f"{seed}/pixels/{split}/zeroshot/{number}"), "tinted")
    return {"filename": filename, "label": label}


def _file_content(files: dict, out: Path, job: Job, record: dict) -> None:
    """Add ``record`` of ``job`` to the content of its JSON file in ``files``: ``pretrain.json`` and
    ``train.json`` (lists of records), ``eval/<subset>.json`` (file number -> item, SugarCrepe's
    format) and ``zeroshot/<task>.json`` (class names, templates, items)."""
    kind, base, _, group, _, number = job
    if kind in ("pretrain", "train"):
        files.setdefault(out / f"{kind}.json", []).append(record)
    elif kind == "eval":
        files.setdefault(Path(base) / "eval" / f"{group}.json", {})[str(number)] = record
    else:
        task = files.setdefault(Path(base) / "zeroshot" / f"{group}.json", {
            "classnames": list(ZEROSHOT_CLASSES[group]), "templates": ZEROSHOT_TEMPLATES[group], "items": []})
        task["items"].append(record)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``degla-fast synth``."""
    parser.add_argument("--out", required=True, help="output folder (created; existing files are overwritten)")
    parser.add_argument("--images", type=int, default=2000, help="fine-tuning images (default 2000)")
    parser.add_argument("--pretrain-images", type=int, default=None,
                        help="pre-training images (default: as many as --images)")
    parser.add_argument("--seed", type=int, default=0, help="everything is a pure function of the seed (default 0)")
    parser.add_argument("--eval-items", type=int, default=200, help="items per compositional subset, per split "
                                                                    "(default 200)")
    parser.add_argument("--zeroshot-items", type=int, default=40, help="zero-shot images per class, per split "
                                                                       "(default 40)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes rendering images (default: the cores this process may use; the files "
                             "are the same for any number)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """``degla-fast synth``: render the dataset and print where it went."""
    try:
        train_json = generate(args.out, args.images, args.seed, eval_items=args.eval_items,
                              zeroshot_items=args.zeroshot_items, image_size=args.image_size,
                              pretrain_images=args.pretrain_images,
                              progress=False if args.no_progress else None,
                              workers=available_cores() if args.workers is None else args.workers)
    except OSError as err:  # a full disk, a file where an image folder should be
        raise cannot_write(args.out, err) from None
    root = train_json.parent
    log(f"wrote {root / 'pretrain.json'} (pre-training), {train_json} ({args.images} fine-tuning images), "
        f"{root / 'eval'} and {root / 'zeroshot'} (test), {root / 'val'} (validation)")
    return 0
