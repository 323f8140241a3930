"""Rule negatives stay near-linear in the caption's length: a 10,000-character caption takes
well under a second for all five types (a 20,000-character one took 29 s when every pair of
positions was tried and every noun phrase scanned per pair), and what they make is still a swap
or a single replacement."""
import difflib
import random
import time

import pytest

from degla_fast.negatives import NEGATIVE_TYPES, SWAP_TYPES, lexicon
from degla_fast.negatives.io import Caption
from degla_fast.negatives.rules import MAX_PAIRS, generate_rule, rule_negatives
from degla_fast.negatives.tagger import same_words, tag, words_of

SENTENCES = ["A black dog next to a white cat on a wooden table.",
             "Two young men holding red umbrellas behind a small car.",
             "An old woman is sitting on a green bench near a big tree.",
             "A group of people standing in front of a large building."]


def _long_captions(length: int) -> dict[str, str]:
    rng = random.Random(0)
    nouns, adjectives = sorted(lexicon.NOUN_TO_GROUP), sorted(lexicon.ADJECTIVE_TO_GROUP)
    captions = {
        "sentences": " ".join(SENTENCES[i % 4] for i in range(length // 40)),
        "nouns only": " ".join(rng.choice(nouns) for _ in range(length // 3)),
        "adjectives": " ".join(f"a {rng.choice(adjectives)} {rng.choice(adjectives)} {rng.choice(nouns)} on"
                               for _ in range(length // 10)),
        "plurals": " ".join(f"two {lexicon.pluralize(rng.choice(nouns))} and a {rng.choice(nouns)}"
                            for _ in range(length // 10)),
        "one noun": "dog " * (length // 4),
    }
    return {name: text[:length] for name, text in captions.items()}


@pytest.mark.parametrize("name", list(_long_captions(100)))
def test_a_10000_character_caption_takes_under_a_second_for_all_types(name):
    caption = _long_captions(10_000)[name]
    assert len(caption) == 10_000
    tag.cache_clear()
    start = time.perf_counter()
    negatives, _ = generate_rule([Caption("0", caption, image="x.jpg")], NEGATIVE_TYPES, 2, progress=False)
    assert time.perf_counter() - start < 1.0
    if name != "one noun":
        assert len(negatives["0"]) >= 4


def test_long_caption_negatives_are_still_swaps_and_single_replacements():
    # (check_negative rejects anything over 300 characters, so check the rules' contract directly)
    caption = _long_captions(10_000)["sentences"]
    words = words_of(caption)
    tag.cache_clear()
    for neg_type in NEGATIVE_TYPES:
        found = rule_negatives(caption, neg_type, 2, seed=3)
        assert len(found) == 2 and caption not in found, neg_type
        for text in found:
            if neg_type in SWAP_TYPES:
                assert same_words(caption, text), neg_type
            else:
                changed = [op for op in difflib.SequenceMatcher(a=words, b=words_of(text), autojunk=False).get_opcodes()
                           if op[0] != "equal"]
                assert len(changed) == 1, neg_type


def test_time_grows_about_linearly_with_length():
    def seconds(length):
        caption = _long_captions(length)["adjectives"]
        tag.cache_clear()
        start = time.perf_counter()
        for neg_type in NEGATIVE_TYPES:
            rule_negatives(caption, neg_type, 2)
        return time.perf_counter() - start

    seconds(2_000)  # warm-up
    small, large = min(seconds(5_000) for _ in range(2)), min(seconds(20_000) for _ in range(2))
    assert large < 12 * small + 0.05  # 4x the length: about 4x the time (cubic was 64x)


def test_all_pairs_are_used_below_the_limit():
    # Up to 100 candidate words (MAX_PAIRS pairs) every pair is a candidate, as before.
    assert MAX_PAIRS == 100 * 99 // 2
