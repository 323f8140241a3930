"""Rule-based hard negatives: properties of each type on COCO-like captions, input/output."""
import csv
import json
from collections import Counter

import pytest

from degla_fast.cli import main as cli_main
from degla_fast.errors import DataError
from degla_fast.negatives import NEGATIVE_TYPES, lexicon
from degla_fast.negatives.io import build_records, read_captions
from degla_fast.negatives.rules import generate_rule, rule_negatives
from degla_fast.negatives.tagger import tag

CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "A black cat sitting on a wooden table next to a red apple.",
    "Two dogs playing with a frisbee in the grass.",
    "A young boy holding an orange umbrella in front of a large building.",
    "A fire hydrant on the side of a street near a yellow taxi.",
    "A woman in a blue dress standing next to a white horse.",
    "An elephant and a giraffe near a tall tree.",
    "A small brown dog lying on a green couch beside a pillow.",
    "Three sheep grazing in a field near a wooden fence.",
    "A large pizza with cheese on a metal plate next to a glass of wine.",
]


def _words(text):
    """Independent word split for the checks: lower case, punctuation dropped, an -> a."""
    out = []
    for raw in text.lower().replace(".", " ").replace(",", " ").split():
        out.append("a" if raw == "an" else raw)
    return out


def _changed_span(before, after):
    """(removed words, added words) between the longest common prefix and suffix."""
    start = 0
    while start < min(len(before), len(after)) and before[start] == after[start]:
        start += 1
    end = 0
    while end < min(len(before), len(after)) - start and before[-1 - end] == after[-1 - end]:
        end += 1
    return before[start : len(before) - end], after[start : len(after) - end]


@pytest.mark.parametrize("neg_type", ["reorder_relation", "swap_nouns", "swap_adjectives"])
def test_swaps_keep_the_same_words_in_another_order(neg_type):
    produced = 0
    for caption in CAPTIONS:
        for negative in rule_negatives(caption, neg_type, n=3):
            produced += 1
            assert Counter(_words(negative)) == Counter(_words(caption)), (caption, negative)
            assert _words(negative) != _words(caption)
            assert negative[0].isupper() and negative.endswith(".")
    assert produced >= 5  # the captions above support every swap type several times


def test_swap_nouns_exchanges_exactly_two_nouns():
    nouns = set(lexicon.NOUN_TO_GROUP) | {lexicon.pluralize(n) for n in lexicon.NOUN_TO_GROUP}
    checked = 0
    for caption in CAPTIONS:
        if any(" " in noun and noun in caption.lower() for noun in nouns):
            continue  # a multi-word noun moves as one: covered by the same-words check
        for negative in rule_negatives(caption, "swap_nouns", n=3):
            checked += 1
            before, after = _words(caption), _words(negative)
            diff = [i for i, (x, y) in enumerate(zip(before, after)) if x != y]
            assert len(diff) == 2, (caption, negative)
            i, j = diff
            assert before[i] == after[j] and before[j] == after[i]
            assert before[i] in nouns and before[j] in nouns
    assert checked >= 5


def test_swap_adjectives_exchanges_attributes_of_different_objects():
    assert rule_negatives("A black dog lying on a white couch.", "swap_adjectives", n=5) == [
        "A white dog lying on a black couch."
    ]
    # Two adjectives of one noun are no attribute-binding negative.
    assert rule_negatives("A big red car.", "swap_adjectives", n=5) == []


def test_reorder_relation_swaps_the_related_noun_phrases():
    assert rule_negatives("A man riding a horse.", "reorder_relation") == ["A horse riding a man."]
    got = rule_negatives("A black cat sitting on a wooden table.", "reorder_relation")
    assert got == ["A wooden table sitting on a black cat."]
    # "and" relates nothing: swapping around it keeps the meaning, so no negative.
    assert rule_negatives("A cat and a dog.", "reorder_relation") == []


@pytest.mark.parametrize("neg_type,groups", [
    ("replace_adjective", lexicon.ADJECTIVE_TO_GROUP),
    ("replace_noun", lexicon.NOUN_TO_GROUP),
])
def test_replacements_change_one_word_within_its_group(neg_type, groups):
    produced = 0
    for caption in CAPTIONS:
        for negative in rule_negatives(caption, neg_type, n=3):
            produced += 1
            removed, added = _changed_span(_words(caption), _words(negative))
            # One word or phrase; the article before it may follow ("a red" -> "an orange").
            if removed[:1] == ["a"] and added[:1] == ["a"]:
                removed, added = removed[1:], added[1:]
            old, new = " ".join(removed), " ".join(added)
            single_old = lexicon.singularize(old) or old
            single_new = lexicon.singularize(new) or new
            assert single_old in groups and single_new in groups, (caption, negative)
            assert groups[single_old] == groups[single_new]
            assert not lexicon.related(single_old, single_new)
            assert _words(negative) != _words(caption)
    assert produced >= 10


def test_replacements_keep_number_and_fix_the_article():
    for negative in rule_negatives("Two dogs playing in the snow.", "replace_noun", n=10):
        removed, added = _changed_span(_words("Two dogs playing in the snow."), _words(negative))
        if removed == ["dogs"]:
            assert added[0].endswith("s") or added[0] in ("sheep", "deer", "fish", "mice", "geese")
    for negative in rule_negatives("A red apple on a table.", "replace_adjective", n=20):
        first, second = negative.split()[:2]
        assert first == ("An" if second[0] in "aeiou" else "A"), negative


def test_antonym_is_the_first_adjective_replacement():
    assert rule_negatives("An empty glass on a table.", "replace_adjective") == ["A full glass on a table."]


def test_rule_negatives_pass_the_llm_validation():
    from degla_fast.negatives.validate import check_negative

    for caption in CAPTIONS:
        for neg_type in NEGATIVE_TYPES:
            for negative in rule_negatives(caption, neg_type, n=3):
                assert check_negative(caption, negative, neg_type) is None, (neg_type, negative)


def test_per_type_gives_distinct_negatives_and_is_deterministic():
    caption = CAPTIONS[1]
    for neg_type in NEGATIVE_TYPES:
        first = rule_negatives(caption, neg_type, n=3, seed=1)
        assert first == rule_negatives(caption, neg_type, n=3, seed=1)
        assert len(first) == len(set(first)) >= 2
        assert caption not in first


def test_captions_without_the_needed_words_get_none():
    assert rule_negatives("A dog.", "swap_nouns") == []
    assert rule_negatives("A dog on the grass.", "swap_adjectives") == []
    assert rule_negatives("Some clouds over it.", "replace_noun") == []


def test_tagger_finds_phrases_and_resolves_ambiguous_words():
    tokens = tag("A glass of orange juice next to a fire hydrant.").tokens
    assert [(t.text, t.tag) for t in tokens] == [
        ("a", "DET"), ("glass", "NOUN"), ("of", "ADP"), ("orange", "ADJ"), ("juice", "NOUN"),
        ("next to", "ADP"), ("a", "DET"), ("fire hydrant", "NOUN"), (".", "PUNCT"),
    ]
    group = tag("A group of men").tokens
    assert [t.tag for t in group] == ["DET", "NUM", "DET", "NOUN"] and group[-1].plural


def test_read_captions_formats(tmp_path):
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [], "annotations": [
        {"image_id": 7, "id": 70, "caption": " A dog on a bench. "},
        {"image_id": 8, "id": 71, "caption": "A cat."},
    ]}))
    got = read_captions(coco)
    assert [(c.id, c.caption, c.image_id, c.image) for c in got] == [
        ("coco:70", "A dog on a bench.", 7, None), ("coco:71", "A cat.", 8, None)
    ]
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"image": "a.jpg", "caption": "A dog."}]))
    assert [(c.id, c.image) for c in read_captions(listed)] == [("0", "a.jpg")]
    table = tmp_path / "caps.csv"
    with table.open("w", newline="") as handle:
        csv.writer(handle).writerows([["filepath", "title"], ["x/1.jpg", "A red car."], ["x/2.jpg", "A boat."]])
    assert [(c.image, c.caption) for c in read_captions(table)] == [("x/1.jpg", "A red car."), ("x/2.jpg", "A boat.")]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "a.jpg", "caption": "ok"}, {"image": "b.jpg"}]))
    with pytest.raises(DataError, match=r"bad\.json: record 1: missing field"):
        read_captions(bad)


def test_records_keep_the_image_key_and_drop_captions_without_negatives(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"image": "a.jpg", "caption": CAPTIONS[1]}, {"image": "b.jpg", "caption": "Hello."}]))
    captions = read_captions(listed)
    negatives, summary = generate_rule(captions, NEGATIVE_TYPES, 1, progress=False)
    records = build_records(captions, negatives)
    assert [r["image"] for r in records] == ["a.jpg"]
    assert records[0]["original"] == CAPTIONS[1] and len(records[0]["enhanced"]) == 5
    assert summary.records == 1 and summary.missing["swap_nouns"] == 1
    assert sum(summary.kept.values()) == 5


def test_cli_rule_writes_degla_records(tmp_path, capsys):
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"annotations": [
        {"image_id": i, "id": i, "caption": caption} for i, caption in enumerate(CAPTIONS)
    ]}))
    out = tmp_path / "out" / "negatives.json"
    assert cli_main(["negatives", "--input", str(coco), "--output", str(out), "--no-progress"]) == 0
    records = json.loads(out.read_text())
    assert [r["image_id"] for r in records] == list(range(len(CAPTIONS)))
    for record in records:
        assert record["original"] == CAPTIONS[record["image_id"]]
        assert record["enhanced"] and record["original"] not in record["enhanced"]
        assert len(set(record["enhanced"])) == len(record["enhanced"])
    assert "replace_noun" in capsys.readouterr().err
    assert not list(out.parent.glob(".*.tmp"))


def test_cli_user_errors_exit_2(tmp_path, capsys):
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"annotations": [{"image_id": 1, "id": 1, "caption": "A dog."}]}))
    assert cli_main(["negatives", "--input", str(coco), "--output", str(tmp_path / "o.json"), "--types", "swap_verbs"]) == 2
    assert "--types: unknown swap_verbs" in capsys.readouterr().err
    assert cli_main(["negatives", "--input", str(tmp_path / "missing.json"), "--output", str(tmp_path / "o.json")]) == 2
