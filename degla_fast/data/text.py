"""Caption tokenisation into the loss's text layout, trimmed to the batch's longest caption."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..stop_signals import held, leave_to_parent


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
    """``[N, L]`` -> ``[N, L']``: drop the trailing columns that are padding (id 0) in every row
    (``L' >= 1``). Reads the tokens on the host: call it where they still live on the CPU."""
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


# ---------------------------------------------------------------------------------------------
# Token cache: every caption and negative of a data set tokenised once, kept next to the data.
# ---------------------------------------------------------------------------------------------

CACHE_VERSION = 1
_PROBE = ["a photo of a cat.", "Ünïcödé — “quotes” &amp; <b>html</b>!  Two  spaces", "x " * 100, "", "!!"]


def tokenizer_fingerprint(tokenizer) -> tuple[str, int]:
    """``(sha256 hex, context_length)`` of what ``tokenizer`` makes of a fixed probe (its class, the
    ids and the padded width): two tokenizers with one fingerprint give one cache."""
    import hashlib

    out = torch.as_tensor(tokenizer(list(_PROBE)))
    kind = type(tokenizer)
    digest = hashlib.sha256(f"{kind.__module__}.{kind.__qualname__}|{tuple(out.shape)}|".encode())
    digest.update(out.to(torch.int64).numpy().tobytes())
    return digest.hexdigest(), int(out.shape[1])


def _tokenize_chunk(args):
    tokenizer, texts = args
    return _ragged(torch.as_tensor(tokenizer(texts)))


def _ragged(tokens: torch.Tensor):
    """Row lengths (up to and including the last non-zero id: end-of-text) and the ids, flat."""
    import numpy as np

    ids = tokens.to(torch.int64).numpy()
    nonzero = ids != 0
    lengths = np.where(nonzero.any(1), ids.shape[1] - np.argmax(nonzero[:, ::-1], axis=1), 0)
    keep = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    return lengths.astype(np.int64), ids[keep]


class TokenCache:
    """The token ids of every text of a data set, ragged: record ``r``'s caption is text
    ``first[r]`` and its negatives ``first[r]+1 ... first[r+1]-1``; text ``t`` is
    ``ids[offsets[t]:offsets[t+1]]`` (open_clip's row without its padding). :meth:`batch` builds the
    loss's ``[B*(1+K), L]`` layout with a few numpy gathers instead of BPE, equal to
    :func:`batch_tokens` bit for bit."""

    def __init__(self, ids, offsets, first, context_length: int, meta: dict | None = None):
        import numpy as np

        self.ids, self.offsets, self.first = ids, np.asarray(offsets, np.int64), np.asarray(first, np.int64)
        self.context_length, self.meta = int(context_length), dict(meta or {})

    @property
    def num_records(self) -> int:
        return len(self.first) - 1

    @classmethod
    def build(cls, records, tokenizer, *, workers: int = 0, chunk: int = 4096, meta: dict | None = None):
        """Tokenise every caption and negative of ``records`` (``workers`` spawned processes when > 1)."""
        import numpy as np

        counts = np.fromiter((1 + len(r.negatives) for r in records), np.int64, len(records))
        first = np.concatenate([[0], np.cumsum(counts)])
        texts = [t for r in records for t in (r.caption, *r.negatives)]
        _, context_length = tokenizer_fingerprint(tokenizer)
        jobs = [(tokenizer, texts[i:i + chunk]) for i in range(0, len(texts), chunk)]
        if workers > 1 and len(texts) > 50_000:  # spawning costs seconds: only for large data sets
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # A stop signal to the process group waits for the end of this start-up work (the
            # trainer then stops) instead of ending the pool's processes under it.
            with held(), ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                                             initializer=leave_to_parent) as ex:
                parts = list(ex.map(_tokenize_chunk, jobs))
        else:
            parts = [_tokenize_chunk(job) for job in jobs]
        lengths = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        flat = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
        dtype = np.uint16 if flat.size == 0 or (flat.min() >= 0 and flat.max() < 2**16) else np.int32
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        return cls(flat.astype(dtype), offsets, first, context_length, meta)

    def matches(self, records) -> bool:
        """Whether this cache has the records' shape (count and texts per record)."""
        import numpy as np

        if self.num_records != len(records):
            return False
        counts = np.fromiter((1 + len(r.negatives) for r in records), np.int64, len(records))
        return bool(np.array_equal(np.diff(self.first), counts))

    def rows(self, text_ids, *, trim: bool = True) -> torch.Tensor:
        """int64 ``[len(text_ids), L]`` token rows padded with 0; ``L`` = the longest (``trim``) or
        ``context_length``."""
        import numpy as np

        text_ids = np.asarray(text_ids, np.int64)
        starts, lengths = self.offsets[text_ids], self.offsets[text_ids + 1] - self.offsets[text_ids]
        width = (max(int(lengths.max()), 1) if len(lengths) else 1) if trim else self.context_length
        out = np.zeros((len(text_ids), width), np.int64)
        if len(lengths) and lengths.sum():
            cols = np.arange(width)[None, :]
            mask = cols < lengths[:, None]
            out[mask] = self.ids[(starts[:, None] + cols)[mask]]
        return torch.from_numpy(out)

    def batch(self, indices: Sequence[int], num_negatives: int, *, seed: int = 0, epoch: int = 0,
              with_replacement: bool = False, trim: bool = True) -> torch.Tensor:
        """What :func:`batch_tokens` gives for these records, from the cache."""
        from .sampling import negative_picks

        indices = [int(i) for i in indices]
        ids = [int(self.first[i]) for i in indices]
        for i in indices:
            pool = int(self.first[i + 1] - self.first[i]) - 1
            base = int(self.first[i]) + 1
            ids.extend(base + p for p in negative_picks(pool, i, num_negatives, seed=seed, epoch=epoch,
                                                         with_replacement=with_replacement))
        return self.rows(ids, trim=trim)

    # -- on disk ------------------------------------------------------------------------------

    def save(self, path) -> None:
        """Write atomically (a temporary file in the same folder, fsynced, then renamed)."""
        import json
        import os
        import tempfile

        import numpy as np

        path = os.fspath(path)
        meta = np.frombuffer(json.dumps({**self.meta, "version": CACHE_VERSION,
                                         "context_length": self.context_length}).encode(), np.uint8)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                                   dir=os.path.dirname(path) or ".")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, ids=self.ids, offsets=self.offsets, first=self.first, meta=meta)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    @classmethod
    def load(cls, path, *, key: dict | None = None) -> "TokenCache | None":
        """The cache at ``path``, or None when it is missing, torn (a truncated or corrupt file fails
        the zip's CRC), of another version, or its ``meta`` differs from ``key``."""
        import json
        import zipfile

        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                ids, offsets, first = z["ids"], z["offsets"], z["first"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError):
            return None
        if meta.get("version") != CACHE_VERSION or any(meta.get(k) != v for k, v in (key or {}).items()):
            return None
        if (offsets.ndim != 1 or first.ndim != 1 or len(offsets) < 1 or len(first) < 1 or offsets[0] != 0
                or offsets[-1] != len(ids) or first[0] != 0 or first[-1] != len(offsets) - 1
                or (np.diff(offsets) < 0).any() or (np.diff(first) < 1).any()):
            return None
        return cls(ids, offsets, first, meta["context_length"], meta)


def _source_digest(source, source_options: dict) -> tuple[str, list[str]]:
    """sha256 of the data file's bytes (shards: of each shard's name, size and mtime: their images
    make them large) plus the options that pick the texts; and the files it covers."""
    import hashlib
    import json
    import os

    from .sources import expand_shards

    source = os.fspath(source)
    digest = hashlib.sha256(json.dumps(sorted((k, str(v)) for k, v in source_options.items())).encode())
    if os.path.isfile(source) and not source.endswith(".tar"):
        with open(source, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
        return digest.hexdigest(), [source]
    files = expand_shards(source)
    for f in files:
        st = os.stat(f)
        digest.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest(), files


def cache_path(source, tokenizer_hash: str) -> str:
    """Where the cache of ``source`` lives: ``<file>.tokens-<tokenizer>.npz`` next to a data file;
    ``.degla-tokens-<pattern>-<tokenizer>.npz`` in the first shard's folder."""
    import hashlib
    import os

    source = os.fspath(source)
    if os.path.isfile(source) and not source.endswith(".tar"):
        return f"{source}.tokens-{tokenizer_hash[:12]}.npz"
    from .sources import expand_shards

    folder = os.path.dirname(expand_shards(source)[0])
    return os.path.join(folder, f".degla-tokens-{hashlib.sha256(source.encode()).hexdigest()[:12]}-"
                                f"{tokenizer_hash[:12]}.npz")


def cached_tokens(records, tokenizer, source, *, source_options: dict | None = None, workers: int = 0,
                  path=None) -> TokenCache:
    """The :class:`TokenCache` of a data set: loaded from ``path`` (default :func:`cache_path`) when its
    key (data file hash, text options, tokenizer fingerprint) and shape match ``records``, else
    built and written there atomically (one process builds while the others of the node wait on a
    lock; a folder that cannot be written keeps the cache in memory, with a warning)."""
    import os
    import warnings

    tok_hash, _ = tokenizer_fingerprint(tokenizer)
    file_hash, _ = _source_digest(source, source_options or {})
    key = {"data": file_hash, "tokenizer": tok_hash}
    path = os.fspath(path) if path is not None else cache_path(source, tok_hash)
    cache = TokenCache.load(path, key=key)
    if cache is not None and cache.matches(records):
        return cache
    lock = None
    try:
        import fcntl

        lock = open(path + ".lock", "a")
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = TokenCache.load(path, key=key)  # built by another process while this one waited
        if cache is not None and cache.matches(records):
            return cache
    except (OSError, ImportError):
        lock = None
    try:
        cache = TokenCache.build(records, tokenizer, workers=workers, meta=key)
        try:
            cache.save(path)
        except OSError as e:
            warnings.warn(f"cannot write the token cache {path} ({e}); keeping it in memory", stacklevel=2)
        return cache
    finally:
        if lock is not None:  # the lock file stays: unlinking it would let a third process skip the wait
            lock.close()
