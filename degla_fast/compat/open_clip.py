"""Shims into open_clip's internals: its model-name parser and its CLIP text tower's inner steps.

Written against open_clip_torch 3.x (checked on 3.3.0; ``setup.py`` asks for >= 2.24, and each
shim here says which internal it reads). ``parse_model_name`` lives in ``open_clip.factory`` and
is not exported; the trimmed text path repeats ``CLIP.encode_text``'s body (token embedding,
positional embedding, causal transformer, final norm, ``text_global_pool``, projection) on fewer
positions, reading the model's ``attn_mask`` and ``text_pool_type``, none of which open_clip
documents. A missing internal is a one-line RuntimeError naming the open_clip version.
"""
from __future__ import annotations

import torch

from ._versions import missing

#: Pooling types that read a position at or before the end-of-text token: a token batch cut
#: after its longest caption pools the same feature as the full-length one.
TRIM_SAFE_POOLING = ("argmax", "eos", "first")

#: What the trimmed text path reads of a CLIP model besides its submodules' forwards.
_TEXT_TOWER = ("attn_mask", "text_pool_type", "token_embedding", "positional_embedding", "transformer",
               "ln_final", "text_projection")


def _version() -> str:
    import open_clip

    return getattr(open_clip, "__version__", "(unknown version)")


def parse_model_name(name: str) -> tuple[str | None, str]:
    """``(schema, rest)`` of an open_clip model name: ``("hf-hub", "org/repo")`` for
    ``"hf-hub:org/repo"``, ``(None, name)`` for a built-in or registered config name.

    Reads ``open_clip.factory.parse_model_name``, the parser ``create_model`` itself uses (so a
    schema open_clip adds is known here too); it is not exported from ``open_clip``.
    """
    from open_clip import factory

    parse = getattr(factory, "parse_model_name", None)
    if parse is None:
        raise missing("open_clip", _version(), "open_clip.parse_model_name", "factory.parse_model_name")
    return parse(name)


def _check_text_tower(net: torch.nn.Module) -> None:
    absent = [name for name in _TEXT_TOWER if not hasattr(net, name)]
    if absent:
        raise missing("open_clip", _version(), "open_clip.text_tower", f"CLIP.{absent[0]}")


def trims_exactly(net: torch.nn.Module) -> bool:
    """Whether ``net`` (an open_clip ``CLIP``) encodes a token batch cut after its longest caption
    to the same features as the full-length one: a causal text tower (``attn_mask`` set) that
    pools a position at or before the end-of-text token (:data:`TRIM_SAFE_POOLING`)."""
    _check_text_tower(net)
    return net.attn_mask is not None and net.text_pool_type in TRIM_SAFE_POOLING


def encode_text_prefix(net: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``CLIP.encode_text(net, tokens)`` (not normalised) on ``tokens``' own ``L`` positions:
    the positional embedding and the causal mask cut to ``L``. Exact where :func:`trims_exactly`
    holds: a position never attends to later ones."""
    from open_clip import transformer

    pool = getattr(transformer, "text_global_pool", None)
    if pool is None:
        raise missing("open_clip", _version(), "open_clip.encode_text_prefix", "transformer.text_global_pool")
    _check_text_tower(net)
    length = tokens.shape[1]
    cast_dtype = net.transformer.get_cast_dtype()
    x = net.token_embedding(tokens).to(cast_dtype) + net.positional_embedding[:length].to(cast_dtype)
    # open_clip's Transformer takes [N, L, D] whatever its batch_first setting and transposes
    # internally when it runs sequence-first.
    x = net.transformer(x, attn_mask=net.attn_mask[:length, :length])
    x = net.ln_final(x)
    x = pool(x, tokens, net.text_pool_type, eos_token_id=getattr(net, "text_eos_id", None))
    if net.text_projection is not None:
        x = net.text_projection(x) if isinstance(net.text_projection, torch.nn.Linear) else x @ net.text_projection
    return x


def replace_token_embedding(net: torch.nn.Module, weight: torch.Tensor, eos_id: int) -> None:
    """Give a CLIP model the token embedding ``weight`` (``[vocab, width]``) and the end-of-text
    id ``eos_id`` of a new vocabulary: its ``token_embedding`` module, the ``vocab_size`` and
    ``text_eos_id`` attributes ``CLIP.__init__`` copies from the text tower (the ``eos`` pooling
    reads the last one)."""
    _check_text_tower(net)
    net.token_embedding = torch.nn.Embedding.from_pretrained(weight, freeze=False)
    net.vocab_size = weight.shape[0]
    net.text_eos_id = eos_id
