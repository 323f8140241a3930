"""Caption tokenisation into the loss's text layout, trimmed to the batch's longest caption."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def tokenize_captions(tokenizer: Callable[[list[str]], torch.Tensor], positives: Sequence[str],
                      negatives: Sequence[Sequence[str]] = (), *, trim: bool = True) -> torch.Tensor:
    """Token ids ``[B*(1+K), L]``: ``B`` positives, then the ``B*K`` negatives sample-major
    (sample 0's K negatives first).

    ``tokenizer`` maps a list of strings to ``[N, context_length]`` ids padded with 0 (open_clip's).
    With ``trim``, ``L`` is the longest caption of this batch including its end-of-text token, so
    the text tower encodes no all-padding columns; otherwise ``L = context_length``.
    """
    texts = list(positives)
    for negs in negatives:
        texts.extend(negs)
    tokens = tokenizer(texts)
    if trim:
        tokens = trim_tokens(tokens)
    return tokens


def trim_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """``tokens[:, :L]`` with ``L`` the last non-padding column of any row (pad id 0)."""
    nonpad = (tokens != 0).any(dim=0).nonzero()
    length = int(nonpad[-1]) + 1 if nonpad.numel() else 1
    return tokens[:, :length].contiguous()


def batch_tokens(records, indices: Sequence[int], tokenizer, num_negatives: int, *, seed: int, epoch: int,
                 with_replacement: bool = False, trim: bool = True) -> torch.Tensor:
    """Tokens ``[B*(1+K), L]`` of the records at ``indices``: their captions, then the K negatives
    each one draws for this (seed, epoch)."""
    from .sampling import choose_negatives

    chosen = [records[i] for i in indices]
    negatives = [choose_negatives(r, i, num_negatives, seed=seed, epoch=epoch, with_replacement=with_replacement)
                 for r, i in zip(chosen, indices)]
    return tokenize_captions(tokenizer, [r.caption for r in chosen], negatives, trim=trim)
