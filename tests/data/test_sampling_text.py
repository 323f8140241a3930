"""Epoch order, rank split, K-negative choice and the token layout given to the loss."""
import pytest
import torch

from degla_fast.data.sampling import check_negatives, choose_negatives, epoch_batches
from degla_fast.data.sources import Record
from degla_fast.data.text import batch_tokens, tokenize_captions
from degla_fast.errors import DataError


def test_epoch_batches_split_ranks_and_drop_last():
    per_rank = [epoch_batches(23, 4, seed=1, epoch=0, rank=r, world_size=2) for r in range(2)]
    assert all(len(b) == 2 and all(len(x) == 4 for x in b) for b in per_rank)
    flat = [i for b in per_rank for x in b for i in x]
    assert len(set(flat)) == 16 and set(flat) <= set(range(23))
    assert per_rank[0] == epoch_batches(23, 4, seed=1, epoch=0, rank=0, world_size=2)
    assert per_rank[0] != epoch_batches(23, 4, seed=1, epoch=1, rank=0, world_size=2)
    assert per_rank[0] != epoch_batches(23, 4, seed=2, epoch=0, rank=0, world_size=2)


def _rec(i, n):
    return Record(f"{i}.jpg", f"caption {i}", tuple(f"neg {j} of {i}" for j in range(n)), f"f: record {i}")


def test_choose_negatives_deterministic_distinct_and_in_pool():
    r = _rec(0, 6)
    a = choose_negatives(r, 7, 4, seed=0, epoch=3)
    assert a == choose_negatives(r, 7, 4, seed=0, epoch=3)
    assert len(set(a)) == 4 and set(a) <= set(r.negatives)
    draws = {tuple(choose_negatives(r, 7, 4, seed=0, epoch=e)) for e in range(10)}
    assert len(draws) > 1
    short = _rec(1, 2)
    b = choose_negatives(short, 1, 4, seed=0, epoch=0, with_replacement=True)
    assert len(b) == 4 and set(b) <= set(short.negatives)


def test_check_negatives_counts_short_records():
    recs = [_rec(0, 5), _rec(1, 2), _rec(2, 3), _rec(3, 0)]
    with pytest.raises(DataError, match=r"data\.json: 3 of 4 records have fewer than 4 negatives.*record 1 with 2"):
        check_negatives(recs, 4, source="data.json", with_replacement=False)
    with pytest.raises(DataError, match=r"1 of 4 records have fewer than 1 negatives"):
        check_negatives(recs, 4, source="data.json", with_replacement=True)
    check_negatives(recs[:3], 4, source="data.json", with_replacement=True)
    check_negatives(recs, 0, source="data.json", with_replacement=False)


def test_tokenize_layout_sample_major_and_trimmed(tokenizer):
    pos = ["a dog", "a very long caption about a red circle left of a blue square"]
    neg = [["a cat", "a cow"], ["x", "y z"]]
    tokens = tokenize_captions(tokenizer, pos, neg)
    order = pos + neg[0] + neg[1]
    full = torch.cat([tokenizer([t]) for t in order])
    longest = int((full != 0).sum(1).max())
    assert tokens.shape == (6, longest) and longest < 77
    assert torch.equal(tokens, full[:, :longest])
    assert (full[:, longest:] == 0).all()
    padded = tokenize_captions(tokenizer, pos, neg, trim=False)
    assert torch.equal(padded, full)


def test_batch_tokens_zero_negatives_gives_b_rows(tokenizer):
    recs = [_rec(i, 3) for i in range(4)]
    t = batch_tokens(recs, [2, 0], tokenizer, 0, seed=0, epoch=0)
    assert t.shape[0] == 2
    assert torch.equal(t, tokenize_captions(tokenizer, ["caption 2", "caption 0"]))
    t2 = batch_tokens(recs, [2, 0], tokenizer, 2, seed=0, epoch=0)
    negs = [choose_negatives(recs[i], i, 2, seed=0, epoch=0) for i in (2, 0)]
    assert torch.equal(t2, tokenize_captions(tokenizer, ["caption 2", "caption 0"], negs))
