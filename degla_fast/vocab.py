"""Compact vocabularies: open_clip's BPE tokenizer with its ids mapped onto the few a model needs.

``degla-synth`` is trained on the synthetic world only (:mod:`degla_fast.data.synthetic`), which
speaks a few dozen words. With CLIP's 49,408-row token embedding, 87 % of its 5.4 M parameters were rows
no caption ever reads, which AdamW, the gradient clip and the EMA teacher still touched on every
step. Its config gives ``vocab_size`` 128 instead, and its tokenizer is :class:`CompactTokenizer`:
the same BPE, each id then looked up in a table. The model is built with CLIP's vocabulary and
then keeps only the rows its ids read (:func:`shrink_token_embedding`): the same random draws as
the full-vocabulary model, so the same initial weights and the same features for every text of
the world, and so the same start point, with an eighth of the parameters to update each step.

The table keeps what the text tower relies on: 0 is padding, 1 the start token, then the BPE ids of
:data:`WORDS` in increasing order, ``vocab_size - 2`` any other id (unknown) and ``vocab_size - 1``
end-of-text. End-of-text stays the largest id, so open_clip's ``argmax`` pooling still reads the
feature at the end of each caption.
"""
from __future__ import annotations

import torch

#: Every word (and the comma) of the synthetic world's captions, hard negatives, evaluation
#: captions and zero-shot prompts; tests/test_vocab.py renders the world and checks that each one
#: maps without an unknown id.
WORDS = (
    ",", "a", "above", "an", "and", "are", "below", "big", "blue", "checkered", "circle", "circles", "cross",
    "crosses", "cyan", "diamond", "diamonds", "dotted", "drawing", "five", "four", "green", "hexagon", "hexagons",
    "image", "is", "left", "medium", "of", "one", "orange", "photo", "pink", "placed", "purple", "red", "right",
    "semicircle", "semicircles", "shape", "shapes", "small", "solid", "square", "squares", "star", "stars",
    "striped", "the", "there", "three", "to", "triangle", "triangles", "two", "yellow",
)

#: model name -> the words of its compact vocabulary (models not listed keep CLIP's vocabulary)
COMPACT_MODELS = {"degla-synth": WORDS}

#: the vocabulary of open_clip's BPE tokenizer (CLIP's token embedding rows)
CLIP_VOCAB_SIZE = 49408


class CompactTokenizer:
    """``texts -> LongTensor[N, context_length]``: ``base``'s ids (open_clip's ``SimpleTokenizer``)
    mapped onto ``vocab_size`` ids that keep padding (0), start (1) and end-of-text (the largest)."""

    def __init__(self, base, words, vocab_size: int):
        self.base, self.vocab_size = base, vocab_size
        self.context_length = base.context_length
        kept = sorted({i for word in words for i in base.encode(word)})
        if len(kept) + 4 > vocab_size:
            raise ValueError(f"{len(kept)} word pieces and 4 special ids do not fit in vocab_size {vocab_size}")
        self.unknown_id, self.eot_token_id, self.sot_token_id = vocab_size - 2, vocab_size - 1, 1
        table = torch.full((len(base.encoder),), self.unknown_id, dtype=torch.long)
        table[0], table[base.sot_token_id], table[base.eot_token_id] = 0, self.sot_token_id, self.eot_token_id
        table[torch.tensor(kept)] = torch.arange(2, 2 + len(kept))
        self.table = table
        # compact id -> the BPE id whose CLIP embedding row it takes (padding's row for the unknown
        # id and the unused ones: no world text reads them)
        rows = torch.zeros(vocab_size, dtype=torch.long)
        rows[1], rows[2:2 + len(kept)], rows[-1] = base.sot_token_id, torch.tensor(kept), base.eot_token_id
        self.bpe_rows = rows

    def __call__(self, texts, context_length: int | None = None) -> torch.Tensor:
        return self.table[self.base(texts, context_length)]

    def __repr__(self) -> str:
        return f"CompactTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"


def compact_tokenizer(name: str) -> CompactTokenizer | None:
    """The compact tokenizer of model ``name`` (its config's ``vocab_size`` ids), None where
    :data:`COMPACT_MODELS` does not list it."""
    import open_clip

    words = COMPACT_MODELS.get(name)
    if words is None:
        return None
    vocab_size = open_clip.get_model_config(name)["text_cfg"]["vocab_size"]
    return CompactTokenizer(open_clip.get_tokenizer(name), words, vocab_size)


def clip_vocabulary_overrides(name: str) -> dict:
    """open_clip ``create_model`` keywords that build compact model ``name`` with CLIP's full
    vocabulary, as :func:`shrink_token_embedding` expects: drawn from the same random stream as
    before the compact vocabulary, its weights (and so a start point trained from them) are the
    ones the full-vocabulary model had."""
    import open_clip

    text_cfg = open_clip.get_model_config(name)["text_cfg"]
    return {"text_cfg": {**text_cfg, "vocab_size": CLIP_VOCAB_SIZE}}


def shrink_token_embedding(model: torch.nn.Module, tokenizer: CompactTokenizer) -> None:
    """Keep only the rows of ``model``'s full-vocabulary token embedding that ``tokenizer``'s ids
    read, in its order: the compact model's features of every world text are the full model's."""
    from .compat.open_clip import replace_token_embedding

    weight = model.token_embedding.weight.detach().index_select(0, tokenizer.bpe_rows.to(model.token_embedding.weight.device))
    replace_token_embedding(model, weight, tokenizer.eot_token_id)


def model_fingerprint(name: str) -> str:
    """A short hash of what builds model ``name``: its open_clip config and its compact words.
    Part of every cached training stage's stamp (:mod:`degla_fast.stages`): a start point trained
    with another vocabulary is retrained, not loaded into a model whose rows it lacks."""
    import hashlib
    import json

    import open_clip

    spec = {"config": open_clip.get_model_config(name.replace("/", "-")), "words": COMPACT_MODELS.get(name)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
