"""Float64 expectation of the DeGLA loss, written from the method doc with per-sample loops.

Independent of degla_fast.loss.reference (no masks, no full matrices): every term is built row
by row exactly as section 3 of the method doc states it. The loss tests (tests/test_losses.py,
tests/test_kernels_gpu.py) check the backends against it and benchmarks/bf16_loss_error.py
measures bf16's error with it; it sits here, beside the scripts, so that both import it by name
(a script's own folder is on its sys.path; pytest.ini puts this folder on the tests').
"""
import torch


def _ce(logits: torch.Tensor, target: int) -> torch.Tensor:
    return torch.logsumexp(logits, 0) - logits[target]


def oracle_terms(image, text, scale, teacher_image, teacher_text, num_negatives, tgc_scale=10.0, official=False):
    """(clip, igc, tgc, distill) in float64 for one process's batch."""
    image, text, scale = image.double(), text.double(), scale.double()
    teacher_image, teacher_text = teacher_image.double(), teacher_text.double()
    batch, k = image.shape[0], num_negatives
    positives, negatives = text[:batch], text[batch:]
    i2t, t2i, igc, tgc = [], [], [], []
    for i in range(batch):
        i2t.append(_ce(scale * (text @ image[i]), i))                     # all captions and all negatives
        t2i.append(_ce(scale * (image @ positives[i]), i))                # positives anchor against images
        own = negatives[i * k:(i + 1) * k]
        igc.append(_ce(scale * torch.cat([(positives[i] @ image[i])[None], own @ image[i]]), 0))
        tgc_neg = negatives[[i + batch * m for m in range(k)]] if official else own
        tgc.append(_ce(tgc_scale * torch.cat([(positives[i] @ teacher_text[i])[None], tgc_neg @ positives[i]]), 0))
    clip = (torch.stack(i2t).mean() + torch.stack(t2i).mean()) / 2
    distill = ((image - teacher_image) ** 2).sum() + ((text - teacher_text) ** 2).sum()
    return clip, torch.stack(igc).mean(), torch.stack(tgc).mean(), distill


def oracle_total(image, text, scale, teacher_image, teacher_text, num_negatives, weights=(0.1, 0.1, 0.005), **kw):
    clip, igc, tgc, distill = oracle_terms(image, text, scale, teacher_image, teacher_text, num_negatives, **kw)
    return clip + weights[0] * igc + weights[1] * tgc + weights[2] * distill
