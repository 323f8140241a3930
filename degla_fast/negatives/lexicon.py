"""The project's own English lexicon for caption tagging and word replacement.

Word lists are grouped by meaning so that a replacement stays plausible (a colour becomes
another colour, an animal another animal). Nouns are stored in the singular; plurals come
from :func:`pluralize` / :func:`singularize`. Multi-word entries ("fire hydrant", "next to")
are matched as one token by the tagger.
"""
from __future__ import annotations


def _words(text: str) -> tuple[str, ...]:
    return tuple(word.strip() for word in text.split(",") if word.strip())


NOUN_GROUPS: dict[str, tuple[str, ...]] = {
    "person": _words(
        "man, woman, boy, girl, child, person, baby, kid, lady, guy, teenager, mother, father, "
        "family, crowd, team"
    ),
    # Roles any person may have: replaced only by another role, never by "man" or "woman".
    "role": _words(
        "player, skier, surfer, skateboarder, snowboarder, rider, chef, cook, officer, soldier, "
        "worker, student, batter, pitcher, catcher, umpire, tourist, policeman, farmer, vendor, "
        "customer, passenger, driver"
    ),
    "animal": _words(
        "dog, cat, horse, cow, sheep, bird, elephant, bear, zebra, giraffe, duck, goat, pig, "
        "puppy, kitten, pigeon, seagull, deer, lamb, calf, pony, bull, chicken, monkey, "
        "squirrel, rabbit, owl, parrot, swan, goose, fish, mouse, lion, tiger, turtle"
    ),
    "vehicle": _words(
        "car, truck, bus, train, bicycle, bike, motorcycle, airplane, plane, boat, van, taxi, "
        "scooter, tractor, jeep, ship, helicopter, jet, cart, wagon, trolley, canoe, kayak"
    ),
    "food": _words(
        "pizza, sandwich, cake, donut, banana, apple, orange, broccoli, carrot, hot dog, "
        "salad, bread, cheese, egg, soup, rice, meat, chicken wing, burger, hamburger, fries, "
        "cookie, pie, pasta, noodle, tomato, potato, onion, pepper, lettuce, strawberry, "
        "grape, lemon, muffin, bagel, steak, sausage, vegetable, fruit, dessert, coffee, "
        "tea, wine, beer, juice, milk, water, food"
    ),
    "plant": _words("tree, flower, bush, plant, palm tree, leaf, branch"),
    "furniture": _words(
        "table, chair, couch, sofa, bed, bench, desk, shelf, cabinet, dresser, stool, "
        "counter, sink, toilet, bathtub, mirror, lamp, pillow, blanket, rug, carpet, "
        "curtain, window, door, fireplace, refrigerator, fridge, oven, microwave, stove"
    ),
    "object": _words(
        "umbrella, bag, backpack, handbag, suitcase, kite, frisbee, ball, bat, glove, "
        "racket, tennis racket, skateboard, surfboard, snowboard, ski, book, clock, vase, "
        "bottle, cup, mug, glass, bowl, plate, fork, knife, spoon, laptop, computer, "
        "keyboard, phone, cell phone, remote, television, tv, monitor, scissors, teddy bear, "
        "toothbrush, box, basket, hat, helmet, shirt, jacket, coat, dress, tie, scarf, "
        "sign, stop sign, fire hydrant, traffic light, parking meter, pole, flag, fence, "
        "candle, towel, toy, camera, wheel, tire, paper, pen, newspaper, tray, pot, pan, "
        "leash, collar, sunglasses, shoe, boot, sock, cap"
    ),
    "place": _words(
        "street, road, field, beach, ocean, sea, lake, river, park, kitchen, bathroom, "
        "bedroom, room, building, house, city, snow, grass, water, sky, mountain, hill, "
        "forest, sidewalk, track, court, tennis court, airport, runway, station, "
        "platform, parking lot, yard, garden, wall, floor, ground, shore, wave, dirt, "
        "restaurant, store, shop, market, office, zoo, farm, pasture, stadium, bridge, "
        "tower, church, corner, highway, intersection, alley, desert, rock, fountain"
    ),
}

# Groups whose members may replace each other; "place" nouns stay with places, etc.
NOUN_TO_GROUP: dict[str, str] = {noun: group for group, nouns in NOUN_GROUPS.items() for noun in nouns}

ADJECTIVE_GROUPS: dict[str, tuple[str, ...]] = {
    "colour": _words(
        "red, blue, green, yellow, black, white, brown, orange, pink, purple, grey, gray, "
        "silver, gold, golden, tan, beige, dark, colorful"
    ),
    "size": _words("big, small, large, little, tiny, huge, tall, short, long, giant, wide, narrow"),
    "material": _words("wooden, metal, plastic, glass, stone, brick, leather, paper, concrete, ceramic"),
    "age": _words("old, young, new, modern, antique, ancient"),
    "state": _words(
        "empty, full, open, closed, wet, dry, clean, dirty, broken, hot, cold, busy, "
        "crowded, quiet, sunny, cloudy, snowy, grassy, sandy, rocky, fresh, ripe, cooked, "
        "raw, sliced, frozen, lit, parked, covered, striped, spotted, fluffy"
    ),
    "quality": _words("happy, sad, cute, pretty, beautiful, ugly, fancy, shiny, bright, messy, neat"),
}

ADJECTIVE_TO_GROUP: dict[str, str] = {
    adj: group for group, adjs in ADJECTIVE_GROUPS.items() for adj in adjs
}

# Antonyms make the strongest replacements; preferred over any other member of the group.
ANTONYMS: dict[str, str] = {}
for _a, _b in (
    ("big", "small"), ("large", "small"), ("tall", "short"), ("long", "short"), ("huge", "tiny"),
    ("wide", "narrow"), ("old", "young"), ("new", "old"), ("empty", "full"), ("open", "closed"),
    ("wet", "dry"), ("clean", "dirty"), ("hot", "cold"), ("black", "white"), ("dark", "bright"),
    ("busy", "quiet"), ("happy", "sad"), ("pretty", "ugly"), ("messy", "neat"), ("raw", "cooked"),
    ("sunny", "cloudy"), ("modern", "antique"),
):
    ANTONYMS.setdefault(_a, _b)
    ANTONYMS.setdefault(_b, _a)

# Relations: spatial phrases and prepositions. Longer phrases are matched first.
RELATIONS: tuple[str, ...] = _words(
    "on top of, in front of, next to, close to, on the side of, in the middle of, "
    "to the left of, to the right of, at the top of, at the bottom of, on, in, under, "
    "above, below, behind, beside, near, by, inside, outside, over, beneath, underneath, "
    "across, along, through, against, around, between, with, without, into, onto, toward, "
    "towards, at, from, atop, of"
)

# Verbs common in captions; unknown words ending in "-ing" are tagged as verbs too.
VERBS: tuple[str, ...] = _words(
    "sitting, standing, riding, holding, eating, walking, playing, lying, laying, looking, "
    "flying, carrying, running, wearing, watching, parked, driving, using, talking, "
    "pulling, pushing, throwing, catching, hitting, swinging, jumping, grazing, sleeping, "
    "drinking, cutting, cooking, waiting, crossing, resting, leaning, hanging, covered, "
    "filled, topped, surrounded, sits, stands, rides, holds, eats, walks, plays, lies, "
    "looks, flies, carries, runs, wears, watches, drives, uses, pulls, pushes, throws, "
    "catches, hits, jumps, grazes, sleeps, drinks, cuts, waits, crosses, rests, leans, "
    "hangs, has, have, chasing, chases, feeding, feeds, petting, pets, touching, touches"
)

AUXILIARIES: tuple[str, ...] = _words("is, are, was, were, be, been, being")
DETERMINERS: tuple[str, ...] = _words(
    "a, an, the, this, these, those, his, her, their, its, my, your, our, some, "
    "another, each, every"
)
NUMBERS: tuple[str, ...] = _words(
    "one, two, three, four, five, six, seven, eight, nine, ten, several, many, few, "
    "multiple, couple, lots, lot, bunch, group, pair"
)
CONJUNCTIONS: tuple[str, ...] = _words("and, or, but, while, as, that, which, who")

# Adjective groups whose members exclude each other (a car cannot be both red and blue);
# in the other groups only an antonym is a safe replacement ("empty" -> "dirty" is not false).
EXCLUSIVE_ADJECTIVE_GROUPS: frozenset[str] = frozenset({"colour", "material"})

# Words that describe the same thing: never used to replace each other.
SYNONYMS: tuple[frozenset[str], ...] = tuple(
    frozenset(_words(group))
    for group in (
        "bike, bicycle", "plane, airplane, jet", "couch, sofa", "fridge, refrigerator",
        "tv, television, monitor", "cup, mug", "dog, puppy", "cat, kitten", "cow, calf, bull",
        "sheep, lamb", "horse, pony", "burger, hamburger", "phone, cell phone", "hat, cap",
        "road, street, highway", "sea, ocean, water, wave", "boat, ship", "car, taxi, jeep",
        "truck, van", "computer, laptop", "rug, carpet", "grass, field, pasture, yard, lawn",
        "shore, beach", "store, shop, market", "kid, child", "man, guy", "woman, lady",
        "donut, muffin", "plate, tray", "shoe, boot", "policeman, officer", "bus, trolley",
        "grey, gray, silver", "gold, golden, yellow", "tan, beige, brown", "dark, black",
        "stone, rock, concrete, brick",
    )
)

# Generic words and the specific ones they cover: replacing one by the other is not false.
HYPERNYMS: dict[str, frozenset[str]] = {
    "person": frozenset(NOUN_GROUPS["person"] + NOUN_GROUPS["role"]),
    "child": frozenset(_words("boy, girl, baby, kid, teenager")),
    "man": frozenset(_words("father, policeman, guy")),
    "woman": frozenset(_words("mother, lady")),
    "bird": frozenset(_words("pigeon, seagull, duck, owl, parrot, swan, goose, chicken")),
    "animal": frozenset(NOUN_GROUPS["animal"]),
    "vehicle": frozenset(NOUN_GROUPS["vehicle"]),
    "food": frozenset(NOUN_GROUPS["food"]),
    "fruit": frozenset(_words("banana, apple, orange, strawberry, grape, lemon, tomato")),
    "vegetable": frozenset(_words("broccoli, carrot, tomato, potato, onion, pepper, lettuce")),
    "dessert": frozenset(_words("cake, donut, cookie, pie, muffin")),
    "meat": frozenset(_words("steak, sausage, chicken wing, burger, hamburger")),
    "room": frozenset(_words("kitchen, bathroom, bedroom")),
    "building": frozenset(_words("house, church, tower, station, store, shop, restaurant, office")),
}

# Nouns recognised in captions but never chosen as a replacement (too generic or a role
# that any person may have, so the negative would often still be true).
NOT_REPLACEMENTS: frozenset[str] = frozenset(
    _words(
        "person, kid, guy, lady, mother, father, family, crowd, team, player, rider, worker, "
        "customer, passenger, tourist, vendor, fruit, vegetable, dessert, meat, food, water, "
        "room, building, ground, floor, wall, sky, fries, hill, track"
    )
)


def _related_table() -> dict[str, frozenset[str]]:
    table: dict[str, set[str]] = {}
    for group in SYNONYMS:
        for word in group:
            table.setdefault(word, set()).update(group)
    for generic, specific in HYPERNYMS.items():
        table.setdefault(generic, set()).update(specific)
        for word in specific:
            table.setdefault(word, set()).add(generic)
    return {word: frozenset(words) for word, words in table.items()}


_RELATED = _related_table()


def related(first: str, second: str) -> bool:
    """True when the two lexicon words may describe the same thing (same, synonym, hypernym)."""
    return first == second or second in _RELATED.get(first, ())


# Nouns without a natural plural: never put in place of a plural noun ("coffees").
MASS_NOUNS: frozenset[str] = frozenset(
    _words(
        "broccoli, salad, bread, cheese, soup, rice, meat, pasta, lettuce, coffee, tea, wine, "
        "beer, juice, milk, water, food, fries, snow, grass, water, sky, dirt, paper, scissors, "
        "sunglasses, ocean, sea, sand"
    )
)


# Irregular plurals; everything else follows :func:`pluralize`'s spelling rules.
IRREGULAR_PLURALS: dict[str, str] = {
    "man": "men", "woman": "women", "child": "children", "person": "people",
    "mouse": "mice", "goose": "geese", "foot": "feet", "tooth": "teeth", "sheep": "sheep",
    "fish": "fish", "deer": "deer", "knife": "knives", "shelf": "shelves", "leaf": "leaves",
    "calf": "calves", "scarf": "scarves", "policeman": "policemen", "fries": "fries",
    "scissors": "scissors", "sunglasses": "sunglasses", "glass": "glasses", "bus": "buses",
    "potato": "potatoes", "tomato": "tomatoes", "lady": "ladies", "puppy": "puppies",
    "pony": "ponies", "strawberry": "strawberries", "family": "families", "city": "cities",
    "cookie": "cookies", "pie": "pies", "tie": "ties",
}
_IRREGULAR_SINGULARS = {plural: single for single, plural in IRREGULAR_PLURALS.items()}


def pluralize(noun: str) -> str:
    """Plural of a singular English noun or phrase (the last word is inflected)."""
    head, _, last = noun.rpartition(" ")
    if last in IRREGULAR_PLURALS:
        plural = IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        plural = last + "es"
    elif last.endswith("y") and last[-2:-1] not in tuple("aeiou"):
        plural = last[:-1] + "ies"
    else:
        plural = last + "s"
    return f"{head} {plural}" if head else plural


def singularize(word: str) -> str | None:
    """Singular form of ``word`` when it is a plural noun of the lexicon, else ``None``."""
    head, _, last = word.rpartition(" ")
    candidates = []
    if last in _IRREGULAR_SINGULARS:
        candidates.append(_IRREGULAR_SINGULARS[last])
    if last.endswith("ies"):
        candidates.append(last[:-3] + "y")
    if last.endswith("es"):
        candidates.append(last[:-2])
    if last.endswith("s"):
        candidates.append(last[:-1])
    for candidate in candidates:
        full = f"{head} {candidate}" if head else candidate
        if full in NOUN_TO_GROUP and pluralize(full) == word:
            return full
    return None
