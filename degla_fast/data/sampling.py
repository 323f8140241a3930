"""Epoch order, rank split and K-negative choice: pure functions of (seed, epoch, sample index)."""
from __future__ import annotations

import numpy as np

from ..errors import DataError
from .sources import Record


def _rng(*keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys])))


def epoch_batches(num_samples: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1) -> list[list[int]]:
    """This rank's batches of record indices for one epoch.

    One permutation of all samples per (seed, epoch), shared by every rank; the tail that does not
    fill ``batch_size * world_size`` is dropped, and global batch ``b`` gives rank ``r`` the slice
    ``[r*B, (r+1)*B)``. Returns ``num_samples // (B*world_size)`` lists of ``B`` indices.
    """
    order = _rng(seed, epoch, 0x5EED).permutation(num_samples)
    step = batch_size * world_size
    batches = []
    for start in range(0, num_samples - step + 1, step):
        lo = start + rank * batch_size
        batches.append(order[lo:lo + batch_size].tolist())
    return batches


def check_negatives(records: list[Record], num_negatives: int, *, source: str, with_replacement: bool,
                    replacement_hint: bool = True) -> None:
    """Raise one :class:`DataError` counting the records with fewer than ``num_negatives`` negatives.

    With ``with_replacement`` only records with no negative at all are errors. ``replacement_hint``:
    the message points to ``sample_with_replacement`` (False where the caller has no such setting).
    """
    if num_negatives <= 0:
        return
    need = 1 if with_replacement else num_negatives
    short = [r for r in records if len(r.negatives) < need]
    if short and short[0].extra.get("missing_column"):
        extra = short[0].extra
        raise DataError(f"{source}:1: no {extra['missing_column']!r} column of hard negatives (columns: "
                        f"{', '.join(extra['columns'])}); num_negatives={num_negatives} needs one "
                        "(captions joined by '|'), or set num_negatives=0 for plain CLIP")
    if short:
        hint = "" if with_replacement or not replacement_hint else "; sample_with_replacement=True reuses negatives"
        raise DataError(f"{source}: {len(short)} of {len(records)} records have fewer than {need} negatives "
                        f"(num_negatives={num_negatives}; first: {short[0].where} with {len(short[0].negatives)})"
                        f"{hint}")


def choose_negatives(record: Record, index: int, num_negatives: int, *, seed: int, epoch: int,
                     with_replacement: bool = False) -> list[str]:
    """``num_negatives`` of the record's negatives, drawn without replacement (with, if asked)
    from a generator keyed by (seed, epoch, index); so the same sample gets the same ones on resume."""
    pool = record.negatives
    return [pool[i] for i in negative_picks(len(pool), index, num_negatives, seed=seed, epoch=epoch,
                                            with_replacement=with_replacement)]


def negative_picks(pool_size: int, index: int, num_negatives: int, *, seed: int, epoch: int,
                   with_replacement: bool = False) -> list[int]:
    """The positions in its negatives that :func:`choose_negatives` takes for sample ``index``."""
    if num_negatives <= 0:
        return []
    rng = _rng(seed, epoch, index, 0xBEE)
    replace = with_replacement and pool_size < num_negatives
    return rng.choice(pool_size, size=num_negatives, replace=replace).tolist()
