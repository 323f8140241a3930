"""The ``reference`` backend: the DeGLA loss written the way the authors' release writes it.

Full logits matrices, IGC and TGC as masked B x B*K matrices, but with the paper's TGC indexing
by default. It is the baseline of the benchmarks; the tests check every backend, this one
included, against an independent float64 expectation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _own_negative_mask(rows: int, num_negatives: int, row_offset: int, num_neg_rows: int,
                       official: bool, device) -> torch.Tensor:
    """Boolean [rows, num_neg_rows] mask of the negatives each anchor row is contrasted with.

    Paper: row i owns negatives (row_offset+i)*K .. +K-1 (``repeat_interleave``).
    Release (``official=True``): the mask is built with ``repeat`` so row i gets columns
    i + B*m, negatives of other samples.
    """
    anchors = torch.arange(rows, device=device) + row_offset
    owner = torch.arange(num_neg_rows, device=device)
    if official:
        owner_of_col = owner % (num_neg_rows // num_negatives)       # repeat(1, K) layout
    else:
        owner_of_col = owner // num_negatives                        # repeat_interleave(K) layout
    return owner_of_col[None, :] == anchors[:, None]


def _masked_local_ce(pos_logit: torch.Tensor, neg_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with target 0 over [pos, negatives where mask] (the release's -inf masking)."""
    neg_logits = neg_logits.masked_fill(~mask, float("-inf"))
    logits = torch.cat([pos_logit[:, None], neg_logits], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def global_loss(image_rows, text_all, image_all, text_rows, logit_scale, *, num_negatives: int, row_offset: int = 0):
    """Global CLIP loss with hard negatives from full logits matrices.

    image_rows [R,D] anchors of the image-to-text softmax; text_all [Bg*(1+K),D] every caption
    and negative (positives first); image_all [Bg,D]; text_rows [R,D] positive captions that
    anchor the text-to-image softmax; row r's target is column row_offset + r.
    Returns (L_i2t + L_t2i) / 2.
    """
    rows = image_rows.shape[0]
    labels = torch.arange(rows, device=image_rows.device) + row_offset
    logits_per_image = logit_scale * image_rows @ text_all.T
    logits_per_text = logit_scale * text_rows @ image_all.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def igc_loss(image_rows, text_all, logit_scale, *, num_negatives: int, row_offset: int = 0):
    """Image-grounded contrast: each image against its own caption and K negatives (masked matrix)."""
    rows = image_rows.shape[0]
    batch = text_all.shape[0] // (1 + num_negatives)
    positives, negatives = text_all[:batch], text_all[batch:]
    own = torch.arange(rows, device=image_rows.device) + row_offset
    pos_logit = logit_scale * (image_rows * positives[own]).sum(-1)
    neg_logits = logit_scale * image_rows @ negatives.T
    mask = _own_negative_mask(rows, num_negatives, row_offset, negatives.shape[0], False, image_rows.device)
    return _masked_local_ce(pos_logit, neg_logits, mask)


def tgc_loss(text, teacher_text, *, num_negatives: int, tgc_scale: float = 10.0, official_indexing: bool = False):
    """Text-grounded contrast: student caption vs teacher caption (positive) and its K negatives."""
    batch = text.shape[0] // (1 + num_negatives)
    positives, negatives = text[:batch], text[batch:]
    pos_logit = tgc_scale * (positives * teacher_text[:batch]).sum(-1)
    neg_logits = tgc_scale * positives @ negatives.T
    mask = _own_negative_mask(batch, num_negatives, 0, negatives.shape[0], official_indexing, text.device)
    return _masked_local_ce(pos_logit, neg_logits, mask)


def distill_loss(image, text, teacher_image, teacher_text):
    """Self-distillation: summed squared error of images and all captions against the teacher."""
    return F.mse_loss(image, teacher_image, reduction="sum") + F.mse_loss(text, teacher_text, reduction="sum")

