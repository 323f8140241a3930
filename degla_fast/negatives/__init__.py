"""Hard-negative captions: a rule-based generator and an LLM backend (``degla-fast negatives``).

The five negative types of the DeGLA paper, in the order they appear in output records.
"""

# reorder the relation, swap two nouns, swap two adjectives, replace an adjective, replace a noun
NEGATIVE_TYPES: tuple[str, ...] = (
    "reorder_relation",
    "swap_nouns",
    "swap_adjectives",
    "replace_adjective",
    "replace_noun",
)

# Types whose negative must hold exactly the caption's words in another order.
SWAP_TYPES: frozenset[str] = frozenset({"reorder_relation", "swap_nouns", "swap_adjectives"})
