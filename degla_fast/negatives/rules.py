"""Rule-based hard negatives: the five DeGLA types from a tagged caption.

Swaps and reorders keep exactly the caption's words in another order (only "a"/"an" may
follow its new neighbour); replacements change one word or phrase (plus that article).
No negative equals the caption. Candidates are ranked by a generator seeded from
(seed, caption, type), so a run is reproducible, and rendered lazily: only as many as asked.
"""
from __future__ import annotations

import hashlib
import random
from typing import Iterator

from . import NEGATIVE_TYPES, lexicon
from .summary import Summary
from .tagger import Tagged, Token, needs_an, render, tag, words_of

_NP_START = {"DET", "NUM"}
# Swap candidates considered per caption: all pairs of up to 100 nouns (adjectives), which no
# ordinary caption reaches; longer texts pair each word with its next neighbours only.
MAX_PAIRS = 4950


def _noun_phrases(tokens: tuple[Token, ...]) -> list[tuple[int, int]]:
    """Spans [start, end) of determiner/number + adjectives + one or more nouns."""
    spans, i = [], 0
    while i < len(tokens):
        j = i
        while j < len(tokens) and tokens[j].tag in _NP_START:
            j += 1
        while j < len(tokens) and tokens[j].tag == "ADJ":
            j += 1
        k = j
        while k < len(tokens) and tokens[k].tag == "NOUN":
            k += 1
        if k > j:
            spans.append((i, k))
            i = k
        else:
            i = max(i + 1, j)  # no noun after these determiners/adjectives: resume after them
    return spans


def _fix_articles(tokens: list[Token], changed: set[int]) -> None:
    """Make "a"/"an" before each changed position agree with the word now after it."""
    for pos in changed:
        before = pos - 1
        if before >= 0 and tokens[before].lemma in ("a", "an") and pos < len(tokens):
            article = "an" if needs_an(tokens[pos].text) else "a"
            if article != tokens[before].lemma:
                text = article.capitalize() if tokens[before].text[:1].isupper() else article
                tokens[before] = Token(text, "DET", article)


def _swap_tokens(tagged: Tagged, first: int, second: int) -> str:
    tokens = list(tagged.tokens)
    tokens[first], tokens[second] = tokens[second], tokens[first]
    _fix_articles(tokens, {first, second})
    return render(tokens, tagged.capitalized)


def _swap_spans(tagged: Tagged, first: tuple[int, int], second: tuple[int, int]) -> str:
    (a0, a1), (b0, b1) = first, second
    t = tagged.tokens
    tokens = list(t[:a0] + t[b0:b1] + t[a1:b0] + t[a0:a1] + t[b1:])
    return render(tokens, tagged.capitalized)


def _replace(tagged: Tagged, pos: int, word: str, tag_name: str) -> str:
    tokens = list(tagged.tokens)
    tokens[pos] = Token(word, tag_name, word)
    _fix_articles(tokens, {pos})
    return render(tokens, tagged.capitalized)


def _reorder_relation(tagged: Tagged, rng: random.Random) -> Iterator[str]:
    """Swap the two noun phrases around a relation: "a cat on a mat" -> "a mat on a cat"."""
    tokens, spans = tagged.tokens, _noun_phrases(tagged.tokens)
    pairs = []
    for first, second in zip(spans, spans[1:]):
        gap = tokens[first[1] : second[0]]
        if not gap or any(t.tag not in ("VERB", "ADP", "AUX") for t in gap):
            continue
        if not any(t.tag in ("VERB", "ADP") for t in gap):
            continue
        pairs.append((first, second))
    rng.shuffle(pairs)  # the order only depends on the count: rendered lazily, as many as asked
    return (_swap_spans(tagged, first, second) for first, second in pairs)


def _owners(tokens: tuple[Token, ...], spans: list[tuple[int, int]]) -> list[int]:
    """For every position, the noun phrase an adjective there describes: the one holding it,
    else the last one before it (-1: none). One pass over the (sorted, disjoint) spans."""
    owners, index = [-1] * len(tokens), -1
    for pos in range(len(tokens)):
        while index + 1 < len(spans) and spans[index + 1][0] <= pos:
            index += 1
        owners[pos] = index
    return owners


def _is_head(tokens: tuple[Token, ...], pos: int) -> bool:
    """A noun not followed by another noun: "counter", not "kitchen", in "kitchen counter"."""
    return tokens[pos].tag == "NOUN" and (pos + 1 == len(tokens) or tokens[pos + 1].tag != "NOUN")


def _position_pairs(positions: list[int]) -> Iterator[tuple[int, int]]:
    """Every pair of ``positions`` in ``combinations`` order while there are at most
    :data:`MAX_PAIRS`; beyond that (captions of thousands of characters) each position is
    paired with the next few only, so that the work stays linear in the caption's length."""
    count = len(positions)
    window = count if count * (count - 1) // 2 <= MAX_PAIRS else max(1, MAX_PAIRS // count)
    for a in range(count):
        for b in range(a + 1, min(count, a + 1 + window)):
            yield positions[a], positions[b]


def _swap_pairs(tagged: Tagged, tag_name: str, rng: random.Random) -> Iterator[str]:
    tokens = tagged.tokens
    positions = [i for i, t in enumerate(tokens) if t.tag == tag_name and (tag_name != "NOUN" or _is_head(tokens, i))]
    lowered = {i: tokens[i].text.lower() for i in positions}
    pairs = [(i, j) for i, j in _position_pairs(positions) if lowered[i] != lowered[j]]
    if tag_name == "NOUN":
        # Same grammatical number first: "two dogs and a cat" must not become "two cat ...".
        same = [(i, j) for i, j in pairs if tokens[i].plural == tokens[j].plural]
        pairs = same or pairs
    else:
        # Adjectives of one noun phrase ("a big red car") are no negative once swapped.
        owners = _owners(tokens, _noun_phrases(tokens))
        pairs = [(i, j) for i, j in pairs if owners[i] != owners[j]]
    rng.shuffle(pairs)
    return (_swap_tokens(tagged, i, j) for i, j in pairs)


def _replace_adjective(tagged: Tagged, rng: random.Random) -> list[str]:
    """Antonyms first; other members only of groups whose members exclude each other."""
    used = {t.lemma for t in tagged.tokens}
    ranked = []
    for pos, token in enumerate(tagged.tokens):
        group = lexicon.ADJECTIVE_TO_GROUP.get(token.lemma) if token.tag == "ADJ" else None
        if group is None:
            continue
        options = []
        if token.lemma in lexicon.ANTONYMS:
            options.append((0, lexicon.ANTONYMS[token.lemma]))
        if group in lexicon.EXCLUSIVE_ADJECTIVE_GROUPS:
            options += [(1, word) for word in lexicon.ADJECTIVE_GROUPS[group]]
        for rank, word in options:
            if word not in used and not lexicon.related(word, token.lemma):
                ranked.append((rank, rng.random(), pos, word))
    ranked.sort()
    return (_replace(tagged, pos, word, "ADJ") for _, _, pos, word in ranked)


def _replace_noun(tagged: Tagged, rng: random.Random) -> list[str]:
    """Another noun of the same group (animal for animal), in the same grammatical number."""
    used = {t.lemma for t in tagged.tokens}
    options = []
    for pos, token in enumerate(tagged.tokens):
        group = lexicon.NOUN_TO_GROUP.get(token.lemma) if _is_head(tagged.tokens, pos) else None
        if group is None:
            continue
        for word in lexicon.NOUN_GROUPS[group]:
            if word in used or word in lexicon.NOT_REPLACEMENTS or lexicon.related(word, token.lemma):
                continue
            if token.plural and word in lexicon.MASS_NOUNS:
                continue
            options.append((rng.random(), pos, lexicon.pluralize(word) if token.plural else word))
    options.sort()
    return (_replace(tagged, pos, word, "NOUN") for _, pos, word in options)


_GENERATORS = {
    "reorder_relation": _reorder_relation,
    "swap_nouns": lambda tagged, rng: _swap_pairs(tagged, "NOUN", rng),
    "swap_adjectives": lambda tagged, rng: _swap_pairs(tagged, "ADJ", rng),
    "replace_adjective": _replace_adjective,
    "replace_noun": _replace_noun,
}
assert set(_GENERATORS) == set(NEGATIVE_TYPES)


def _rng(seed: int, caption: str, neg_type: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}\0{neg_type}\0{caption}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def rule_negatives(
    caption: str, neg_type: str, n: int = 1, *, seed: int = 0, exclude: set[str] | None = None
) -> list[str]:
    """Up to ``n`` distinct negatives of ``neg_type`` (one of NEGATIVE_TYPES) for ``caption``.

    Returns fewer (possibly none) when the caption lacks what the type needs (two nouns,
    a relation between two noun phrases...). ``exclude`` holds texts already produced
    for this caption by other types; they are not returned again. Deterministic in
    (caption, neg_type, n, seed).
    """
    if neg_type not in _GENERATORS:
        raise ValueError(f"unknown negative type {neg_type!r}; expected one of {NEGATIVE_TYPES}")
    tagged = tag(caption)
    seen = {" ".join(words_of(caption))} | {" ".join(words_of(text)) for text in exclude or ()}
    out = []
    for candidate in _GENERATORS[neg_type](tagged, _rng(seed, caption, neg_type)):
        key = " ".join(words_of(candidate))
        if key not in seen:
            seen.add(key)
            out.append(candidate)
            if len(out) == n:
                break
    return out


def generate_rule(
    captions: list, types: tuple[str, ...], per_type: int = 1, *, seed: int = 0, progress: bool = True
) -> tuple[dict[str, list[str]], Summary]:
    """Rule negatives for every caption (``list[io.Caption]``).

    Returns (caption id -> negatives in ``types`` order, up to ``per_type`` each; summary).
    A type a caption cannot support is counted as missing.
    """
    from ..console import progress_bar

    summary = Summary(types, captions=len(captions))
    negatives: dict[str, list[str]] = {}
    with progress_bar(len(captions), desc="negatives", unit="caption", enabled=progress) as bar:
        for caption in captions:
            produced: list[str] = []
            for neg_type in types:
                found = rule_negatives(caption.caption, neg_type, per_type, seed=seed, exclude=set(produced))
                summary.kept[neg_type] += len(found)
                summary.missing[neg_type] += not found
                produced += found
            if produced:
                negatives[caption.id] = produced
            bar.update(1)
    summary.records = len(negatives)
    return negatives, summary
