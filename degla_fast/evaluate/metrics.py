"""Metric math shared by every benchmark: multiple-choice accuracy, macro averages, top-k, recall@k.

All accuracies are percentages in [0, 100]. Scores are similarities (higher = better match).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Hashable, Iterable, Sequence

import torch


def choice_correct(scores: torch.Tensor) -> torch.Tensor:
    """Which multiple-choice items are answered correctly.

    ``scores``: [N, C] float, column 0 the true caption's score, columns 1.. the wrong ones (C >= 2).
    Returns bool [N]: True where the true caption scores *strictly* above every wrong one, so a tie
    counts as wrong (the benchmarks' ``>`` convention, and ARO's argmax with the true caption last).
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [N, C>=2], got {tuple(scores.shape)}")
    return scores[:, 0] > scores[:, 1:].max(dim=1).values


def accuracy(correct: torch.Tensor | Sequence[bool]) -> float:
    """Percentage of True in ``correct`` (bool [N]); NaN for an empty set."""
    correct = torch.as_tensor(correct, dtype=torch.bool)
    if correct.numel() == 0:
        return float("nan")
    return 100.0 * correct.double().mean().item()


def mean(values: Iterable[float]) -> float:
    """Plain mean of a list of percentages (the macro average of sub-benchmarks); NaN when empty."""
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def group_accuracies(correct: torch.Tensor | Sequence[bool], groups: Sequence[Hashable], *,
                     exclude: Iterable[Hashable] = (), min_count: int = 1) -> dict[Hashable, tuple[float, int]]:
    """Accuracy per group.

    ``correct``: bool [N]; ``groups``: N group labels (a relation, an attribute pair, a file).
    Groups in ``exclude`` or with fewer than ``min_count`` items are left out.
    Returns {group: (accuracy %, item count)} in sorted group order.
    """
    correct = torch.as_tensor(correct, dtype=torch.bool).tolist()
    if len(correct) != len(groups):
        raise ValueError(f"{len(correct)} results for {len(groups)} group labels")
    members: dict[Hashable, list[bool]] = defaultdict(list)
    for ok, group in zip(correct, groups):
        members[group].append(ok)
    excluded = set(exclude)
    return {
        group: (accuracy(values), len(values))
        for group, values in sorted(members.items(), key=lambda kv: str(kv[0]))
        if group not in excluded and len(values) >= min_count
    }


def macro_accuracy(correct: torch.Tensor | Sequence[bool], groups: Sequence[Hashable], *,
                   exclude: Iterable[Hashable] = (), min_count: int = 1) -> float:
    """Mean over groups of the per-group accuracy (see :func:`group_accuracies`), in %."""
    return mean(acc for acc, _ in group_accuracies(correct, groups, exclude=exclude, min_count=min_count).values())


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Top-k classification accuracy in %.

    ``logits``: [N, num_classes]; ``labels``: long [N]. An item counts as correct when its label is among
    the k highest logits (``torch.topk`` order; exact ties between classes are vanishingly rare in floats).
    """
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return accuracy((top == labels.view(-1, 1)).any(dim=1))


def retrieval_recalls(scores: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                      batch_size: int = 256) -> dict[str, float]:
    """Image and text retrieval recall@k in %, the CLIP-paper convention (clip_benchmark's metric code).

    ``scores``: [num_texts, num_images] similarities; ``text_to_image``: long [num_texts], the index of
    each caption's image. Text->image: a caption scores 1 if its image is in its top k images.
    Image->text: an image scores 1 if any of its captions is in its top k captions.
    Returns {"image_retrieval_recall@k": %, "text_retrieval_recall@k": %} for every k.
    """
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(scores.shape[0]), text_to_image] = True
    out = {}
    for k in ks:
        k_img = min(k, scores.shape[1])
        k_txt = min(k, scores.shape[0])
        hits_i = batchify(recall_at_k, scores, positive, batch_size, "cpu", k=k_img) > 0
        hits_t = batchify(recall_at_k, scores.T, positive.T, batch_size, "cpu", k=k_txt) > 0
        out[f"image_retrieval_recall@{k}"] = accuracy(hits_i)
        out[f"text_retrieval_recall@{k}"] = accuracy(hits_t)
    return out
