"""The per-data-set token cache: equal to tokenising each batch, reused, rebuilt when stale or torn."""
import json

import pytest
import torch

from degla_fast.data import build_train_data
from degla_fast.data import text as text_mod
from degla_fast.data.sampling import choose_negatives
from degla_fast.data.text import TokenCache, batch_tokens, cache_path, cached_tokens, tokenizer_fingerprint

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def _data(path, tokenizer, **kw):
    opts = dict(tokenizer=tokenizer, image_size=32, mean=MEAN, std=STD, batch_size=4, num_negatives=3,
                pipeline="torch", num_workers=0, seed=5)
    opts.update(kw)
    return build_train_data(path, **opts)


def _cache_file(path, tokenizer):
    return cache_path(path, tokenizer_fingerprint(tokenizer)[0])


def _count_builds(monkeypatch):
    calls = []
    build = TokenCache.build.__func__

    def counting(cls, *a, **kw):
        calls.append(1)
        return build(cls, *a, **kw)

    monkeypatch.setattr(TokenCache, "build", classmethod(counting))
    return calls


def test_cache_equals_batch_tokens(degla_json, tokenizer):
    data = _data(degla_json, tokenizer)
    cache = data.token_cache
    assert cache is not None and cache.num_records == 10
    for trim in (True, False):
        for k, rep in ((0, False), (3, False), (7, True)):
            idx = [7, 2, 9, 0]
            want = batch_tokens(data.records, idx, tokenizer, k, seed=3, epoch=4, with_replacement=rep, trim=trim)
            got = cache.batch(idx, k, seed=3, epoch=4, with_replacement=rep, trim=trim)
            assert got.dtype == torch.int64 and torch.equal(got, want)
    records = json.loads(degla_json.read_text())
    batch = next(iter(data))
    idx = batch.indices.tolist()
    negs = [choose_negatives(data.records[i], i, 3, seed=5, epoch=0) for i in idx]
    texts = [records[i]["original"] for i in idx] + [n for g in negs for n in g]
    assert torch.equal(batch.tokens, text_mod.trim_tokens(tokenizer(texts)))


def test_cache_hit_then_rebuilt_when_the_file_changes(degla_json, tokenizer, monkeypatch):
    calls = _count_builds(monkeypatch)
    _data(degla_json, tokenizer)
    cache_file = _cache_file(degla_json, tokenizer)
    assert len(calls) == 1 and (degla_json.parent / cache_file).exists()
    before = open(cache_file, "rb").read()
    _data(degla_json, tokenizer)  # hit: nothing tokenised, file untouched
    assert len(calls) == 1 and open(cache_file, "rb").read() == before
    # Same number of records and negatives, one caption changed: the file hash differs.
    items = json.loads(degla_json.read_text())
    items[4]["original"] = "a completely different caption about zebras"
    degla_json.write_text(json.dumps(items))
    data = _data(degla_json, tokenizer)
    assert len(calls) == 2
    want = batch_tokens(data.records, [4], tokenizer, 0, seed=0, epoch=0)
    assert torch.equal(data.token_cache.batch([4], 0), want)
    _data(degla_json, tokenizer)
    assert len(calls) == 2
    # Another tokenizer (another context length) gets its own cache file.
    import open_clip

    other = open_clip.get_tokenizer("ViT-B-32", context_length=32)
    assert _cache_file(degla_json, other) != cache_file
    assert _data(degla_json, other, trim_text=False).token_cache.rows([0], trim=False).shape == (1, 32)
    assert len(calls) == 3


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_torn_or_corrupt_cache_is_rebuilt(degla_json, tokenizer, monkeypatch, damage):
    _data(degla_json, tokenizer)
    cache_file = _cache_file(degla_json, tokenizer)
    raw = open(cache_file, "rb").read()
    if damage == "truncate":
        raw = raw[:len(raw) // 2]
    elif damage == "flip":  # a byte inside the token ids: the zip member's CRC-32 no longer matches
        raw = raw[:200] + bytes([raw[200] ^ 0xFF]) + raw[201:]
    elif damage == "garbage":
        raw = b"not a cache at all"
    else:
        raw = b""
    open(cache_file, "wb").write(raw)
    assert TokenCache.load(cache_file) is None
    calls = _count_builds(monkeypatch)
    data = _data(degla_json, tokenizer)
    assert len(calls) == 1
    assert TokenCache.load(cache_file) is not None
    idx = [1, 5]
    assert torch.equal(data.token_cache.batch(idx, 3, seed=1, epoch=1),
                       batch_tokens(data.records, idx, tokenizer, 3, seed=1, epoch=1))


def test_cache_write_is_atomic_and_failures_keep_it_in_memory(degla_json, tokenizer, monkeypatch, tmp_path):
    data = _data(degla_json, tokenizer, token_cache=False)
    assert data.token_cache is None
    target = tmp_path / "c.npz"

    def boom(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(text_mod.np if hasattr(text_mod, "np") else __import__("numpy"), "savez", boom)
    with pytest.warns(UserWarning, match="cannot write the token cache .*disk full"):
        cache = cached_tokens(data.records, tokenizer, degla_json, path=target)
    assert cache.num_records == 10 and not target.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary left behind
    monkeypatch.setenv("DEGLA_TOKEN_CACHE", "0")
    assert _data(degla_json, tokenizer).token_cache is None
