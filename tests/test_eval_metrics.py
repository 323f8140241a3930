"""Metric math of degla_fast.evaluate.metrics against hand-computed values."""
import math

import pytest
import torch

from degla_fast.evaluate.metrics import (accuracy, choice_correct, group_accuracies, macro_accuracy,
                                         retrieval_recalls, topk_accuracy)


def test_choice_correct_is_strict_and_uses_the_best_wrong_caption():
    scores = torch.tensor([
        [0.9, 0.1, 0.2],     # true caption wins
        [0.5, 0.5, 0.1],     # tie with a wrong caption: wrong
        [0.4, 0.1, 0.6],     # a later wrong caption wins
        [0.3, float("-inf"), float("-inf")],  # padding never wins
    ])
    assert choice_correct(scores).tolist() == [True, False, False, True]
    assert accuracy(choice_correct(scores)) == pytest.approx(50.0)


def test_choice_correct_rejects_a_single_column():
    with pytest.raises(ValueError):
        choice_correct(torch.zeros(3, 1))


def test_accuracy_of_nothing_is_nan():
    assert math.isnan(accuracy([]))


def test_group_and_macro_accuracy_with_exclusions_and_minimum_counts():
    correct = [True, False, True, True, False, True]
    groups = ["on", "on", "under", "with", "with", "on"]
    per_group = group_accuracies(correct, groups)
    assert per_group == {"on": (pytest.approx(200 / 3), 3), "under": (100.0, 1), "with": (50.0, 2)}
    # macro: mean of per-group accuracies, not of items
    assert macro_accuracy(correct, groups) == pytest.approx((200 / 3 + 100 + 50) / 3)
    assert macro_accuracy(correct, groups, exclude={"with"}) == pytest.approx((200 / 3 + 100) / 2)
    assert macro_accuracy(correct, groups, min_count=2) == pytest.approx((200 / 3 + 50) / 2)
    assert math.isnan(macro_accuracy(correct, groups, min_count=10))


def test_topk_accuracy():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    labels = torch.tensor([0, 2, 1, 1])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(25.0)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(75.0)
    assert topk_accuracy(logits, labels, 5) == pytest.approx(100.0)  # k clipped to the class count


def test_retrieval_recalls_by_hand():
    # 3 images, 5 captions; captions 0, 1 describe image 0, caption 2 image 1, captions 3, 4 image 2.
    scores = torch.tensor([
        [0.9, 0.1, 0.0],
        [0.2, 0.8, 0.1],   # ranks image 1 first: text->image miss at 1, hit at 2
        [0.0, 0.7, 0.3],
        [0.1, 0.2, 0.6],
        [0.5, 0.4, 0.3],   # its image ranks last
    ])
    owner = torch.tensor([0, 0, 1, 2, 2])
    out = retrieval_recalls(scores, owner, ks=(1, 2))
    assert out["image_retrieval_recall@1"] == pytest.approx(60.0)   # captions 0, 2, 3
    assert out["image_retrieval_recall@2"] == pytest.approx(80.0)   # + caption 1
    # image -> text: image 0's best caption is 0 (hit); image 1's best is 1 (image 0's caption: miss),
    # second best 2 (hit); image 2's best is 3 (hit).
    assert out["text_retrieval_recall@1"] == pytest.approx(200 / 3)
    assert out["text_retrieval_recall@2"] == pytest.approx(100.0)
