"""Checks every generated negative must pass (both backends), returning a reject reason."""
from __future__ import annotations

import difflib

from . import SWAP_TYPES
from .tagger import same_words, words_of

MAX_CHARS = 300


def check_negative(caption: str, negative: str, neg_type: str) -> str | None:
    """``None`` when ``negative`` is an acceptable ``neg_type`` negative of ``caption``, else
    the reason: "empty", "length", "identical", "not_a_swap" (swap types must hold the same
    words in another order) or "not_one_replacement" (replacements change one span of words).
    """
    words, original = words_of(negative), words_of(caption)
    if not words:
        return "empty"
    if len(negative) > MAX_CHARS or not (len(original) / 2 <= len(words) <= 2 * len(original) + 4):
        return "length"
    if words == original:
        return "identical"
    if neg_type in SWAP_TYPES:
        return None if same_words(caption, negative) else "not_a_swap"
    changed = [op for op in difflib.SequenceMatcher(a=original, b=words, autojunk=False).get_opcodes() if op[0] != "equal"]
    if len(changed) != 1 or max(changed[0][2] - changed[0][1], changed[0][4] - changed[0][3]) > 4:
        return "not_one_replacement"
    return None
