"""Part-of-speech tagging of captions with the project's own lexicon (no model download).

Captions are short descriptive sentences, so a lexicon of common caption words with two
context rules is enough to find nouns, adjectives and relations: a word that can be an
adjective or a noun ("orange", "glass") is an adjective when a noun or adjective follows,
and a quantity word followed by "of" ("a group of") makes "of" part of the determiner.
Tags: NOUN, ADJ, VERB, AUX, ADP (relation), DET, NUM, CONJ, PUNCT, X (unknown).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from . import lexicon

_TOKEN_RE = re.compile(r"[^\W\d_]+(?:['-][^\W\d_]+)*|\d+(?:[.,]\d+)*|\S")
_MULTIWORD = {
    phrase: tag
    for tag, phrases in (
        ("ADP", lexicon.RELATIONS),
        ("NOUN", tuple(lexicon.NOUN_TO_GROUP) + tuple(lexicon.pluralize(n) for n in lexicon.NOUN_TO_GROUP)),
    )
    for phrase in phrases
    if " " in phrase
}
_MAX_PHRASE = max(len(phrase.split()) for phrase in _MULTIWORD)
_CLOSED_CLASSES = (
    ("DET", frozenset(lexicon.DETERMINERS)),
    ("NUM", frozenset(lexicon.NUMBERS)),
    ("CONJ", frozenset(lexicon.CONJUNCTIONS)),
    ("AUX", frozenset(lexicon.AUXILIARIES)),
)
_RELATIONS = frozenset(lexicon.RELATIONS)
_VERBS = frozenset(lexicon.VERBS)


@dataclass(frozen=True)
class Token:
    """One word, multi-word phrase or punctuation mark of a caption.

    ``text`` is as written (the sentence-initial capital removed for known words); ``lemma``
    is the lower-case singular form for nouns and the lower-case text otherwise.
    """

    text: str
    tag: str
    lemma: str
    plural: bool = False


@dataclass(frozen=True)
class Tagged:
    """A tagged caption: ``tokens`` plus whether its first letter was a capital."""

    tokens: tuple[Token, ...]
    capitalized: bool


def _noun_lemma(word: str) -> tuple[str, bool] | None:
    if word in lexicon.NOUN_TO_GROUP:
        return word, False
    single = lexicon.singularize(word)
    return (single, True) if single else None


def _split(caption: str) -> list[str]:
    """Words and punctuation, with the lexicon's multi-word phrases joined into one item."""
    words = _TOKEN_RE.findall(caption)
    out, i = [], 0
    while i < len(words):
        for size in range(min(_MAX_PHRASE, len(words) - i), 1, -1):
            phrase = " ".join(words[i : i + size])
            if phrase.lower() in _MULTIWORD:
                out.append(phrase)
                i += size
                break
        else:
            out.append(words[i])
            i += 1
    return out


def _candidates(word: str) -> set[str]:
    if word in _MULTIWORD:
        return {_MULTIWORD[word]}
    if not any(ch.isalnum() for ch in word):
        return {"PUNCT"}
    if word[0].isdigit():
        return {"NUM"}
    for tag, words in _CLOSED_CLASSES:
        if word in words:
            return {tag}
    tags = set()
    if _noun_lemma(word):
        tags.add("NOUN")
    if word in lexicon.ADJECTIVE_TO_GROUP:
        tags.add("ADJ")
    if word in _RELATIONS:
        tags.add("ADP")
    if word in _VERBS or (word.endswith("ing") and len(word) > 5 and not tags):
        tags.add("VERB")
    return tags or {"X"}


@lru_cache(maxsize=4096)  # each caption is tagged once for all five types
def tag(caption: str) -> Tagged:
    """Tag ``caption`` (str) -> :class:`Tagged` with one :class:`Token` per word or phrase."""
    words = _split(caption.strip())
    lowered = [word.lower() for word in words]
    options = [_candidates(word) for word in lowered]
    tokens: list[Token] = []
    for i, (word, low, tags) in enumerate(zip(words, lowered, options)):
        after = options[i + 1] if i + 1 < len(options) else set()
        if len(tags) > 1:
            if "ADJ" in tags and (after & {"NOUN", "ADJ"}):
                tags = {"ADJ"}
            elif "NOUN" in tags:
                tags = {"NOUN"}
            elif "VERB" in tags:
                tags = {"VERB"}
            else:
                tags = {sorted(tags)[0]}
        (chosen,) = tags
        if low == "of" and tokens and tokens[-1].tag == "NUM":
            chosen = "DET"  # "a group of", "a couple of": a quantity, not a relation
        lemma, plural = (_noun_lemma(low) or (low, False)) if chosen == "NOUN" else (low, False)
        tokens.append(Token(word, chosen, lemma, plural))
    capitalized = bool(words) and words[0][:1].isupper()
    if capitalized and tokens[0].tag != "X":
        first = tokens[0]
        tokens[0] = Token(first.text[:1].lower() + first.text[1:], first.tag, first.lemma, first.plural)
    return Tagged(tuple(tokens), capitalized)


def render(tokens: list[Token] | tuple[Token, ...], capitalized: bool) -> str:
    """Join tokens back into a caption: no space before punctuation, sentence case kept."""
    text = ""
    for token in tokens:
        if text and not (token.tag == "PUNCT" and token.text in ".,!?;:)'\"") and not text.endswith(("(", "-")):
            text += " "
        text += token.text
    return text[:1].upper() + text[1:] if capitalized else text


def needs_an(word: str) -> bool:
    """Whether the article before ``word`` is "an" (spelling rule with common exceptions)."""
    low = word.lower()
    if low.startswith(("uni", "use", "usu", "one", "eu")):
        return False
    return low[:1] in "aeiou" or low.startswith(("hour", "honest"))


def words_of(text: str) -> list[str]:
    """Lower-case words of ``text`` with punctuation dropped and "an" read as "a"."""
    return ["a" if w == "an" else w for w in re.findall(r"[^\W_]+(?:['-][^\W_]+)*", text.lower())]


def same_words(first: str, second: str) -> bool:
    """True when the two texts hold the same words, counted with multiplicity, in any order."""
    return Counter(words_of(first)) == Counter(words_of(second))
