"""AdamW with the CLIP parameter groups and the cosine-with-warm-up learning-rate schedule."""
from __future__ import annotations

import math
from typing import Any

import torch

from ..compat.torch_optim import set_last_lr, step_supports_amp_scaling

# open_clip's convention: the learned temperature never exceeds 100.
MAX_LOGIT_SCALE = math.log(100.0)


def param_groups(model: torch.nn.Module, weight_decay: float, *, named: bool = False) -> list[dict]:
    """Two AdamW groups: decayed weight matrices, and undecayed gains, biases, embeddings' scale.

    Following open_clip, tensors with fewer than 2 dimensions (LayerNorm gains and biases, all
    biases, ``logit_scale``) and anything named ``bias`` or ``logit_scale`` get no
    weight decay. Frozen parameters are left out. ``named``: the groups hold ``(name, param)``
    pairs (torch keeps the names as the group's ``param_names``), as AdamWEMA needs to find
    each parameter's teacher by name.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exclude = param.ndim < 2 or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append((name, param) if named else param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float, fused: bool = True, teacher: Any = None, ema_backend: str = "auto"
                    ) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`; the fused kernel when asked and every parameter is on CUDA
    or the CPU (torch has both). The fused AdamW honours a device-side ``found_inf`` (as
    GradScaler passes it), which is how a non-finite step is skipped without a host read.

    With ``teacher`` (an :class:`~degla_fast.ema.EMATeacher` of ``model``): an
    :class:`~degla_fast.optim_ema.AdamWEMA` over the same groups (mapped to the teacher by
    name), whose ``step()`` also moves the teacher with its own decay; ``fused`` does not apply
    and ``ema_backend`` picks its implementation.
    """
    if teacher is not None:
        from ..optim_ema import AdamWEMA

        # logit_scale in a group of its own, clamped inside the step before the teacher moves
        # toward it: the teacher follows the clamped temperature, as step, clamp, update() does.
        no_decay, decay = param_groups(model, weight_decay, named=True)
        scale = [(n, p) for n, p in no_decay["params"] if n == "logit_scale"]
        no_decay["params"] = [(n, p) for n, p in no_decay["params"] if n != "logit_scale"]
        # First: open_clip registers logit_scale before the undecayed tensors, so the parameters keep
        # AdamW's order (and its state's indices).
        groups = ([{"params": scale, "weight_decay": 0.0, "clamp_max": MAX_LOGIT_SCALE}] if scale else []) + [
            no_decay, decay]
        return AdamWEMA(groups, teacher, lr=lr, betas=betas, eps=eps, decay=teacher.decay, backend=ema_backend)
    groups = param_groups(model, weight_decay)
    supported = all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=bool(fused and supported) or None)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours a device tensor ``optimizer.found_inf`` (1 = skip the
    step, state and step count untouched), as torch's fused Adam/AdamW do."""
    return step_supports_amp_scaling(optimizer) and bool(
        any(g.get("fused") for g in optimizer.param_groups))


def cosine_with_warmup(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warm-up to 1, then cosine to ``min_ratio``.

    Warm-up follows open_clip: step ``s < warmup`` gets ``(s + 1) / warmup``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                    min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`cosine_with_warmup` (step it once per optimiser step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, warmup_steps=warmup_steps, total_steps=total_steps,
                                                min_ratio=min_ratio))


def rewind_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int) -> None:
    """Undo ``steps`` calls of ``scheduler.step()`` (steps that were skipped on the device and
    are only counted when the host next reads the step counters): the next step gets the
    learning rate it would have had had the skipped steps never advanced the schedule."""
    if steps <= 0:
        return
    scheduler.last_epoch -= steps
    apply_schedule(scheduler)


def apply_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Give the optimiser's groups the learning rate ``scheduler`` has at its current step. A
    resume needs it when the schedule changed (another ``max_steps``): the groups' lr comes from
    the checkpoint's optimiser, written under the old schedule; with the same schedule it is the
    same number."""
    lrs = [base * fn(scheduler.last_epoch) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    set_last_lr(scheduler, lrs)
