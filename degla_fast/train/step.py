"""One DeGLA training step, and the pieces it needs (loss choice, autocast, timing).

``train_step`` is the whole step on one screen: student forward on images and
``[positives; negatives]``, teacher forward without grad, the loss, backward, optimiser and
schedule, ``logit_scale`` clamp, EMA update (or, with ``optim.fused_ema``, an optimiser whose
step moves the teacher). The trainer and ``benchmarks/bench_step.py`` both call it, so what is
benchmarked is what trains.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..ema import ema_update_
from ..functional import LossOutput, clip_loss
from ..losses import DeGLALoss
from ..model import clip_features

# open_clip's convention: the learned temperature never exceeds 100.
MAX_LOGIT_SCALE = math.log(100.0)
PHASES = ("forward", "backward", "optim", "ema")


def make_loss(*, num_negatives: int, igc_weight: float = 0.1, tgc_weight: float = 0.1, distill_weight: float = 0.005,
              tgc_scale: float = 10.0, backend: str = "auto", official_tgc_indexing: bool = False,
              local_loss: bool = False, gather_with_grad: bool = False, rank: int = 0,
              world_size: int = 1) -> Callable[..., LossOutput]:
    """The loss callable ``(img [B,D], txt [B*(1+K),D], scale, t_img, t_txt) -> LossOutput``.

    ``num_negatives == 0`` gives the plain CLIP loss (IGC, TGC and distillation reported as 0).
    """
    dist_args = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size)
    if num_negatives > 0:
        return DeGLALoss(num_negatives=num_negatives, igc_weight=igc_weight, tgc_weight=tgc_weight,
                         distill_weight=distill_weight, tgc_scale=tgc_scale, backend=backend,
                         official_tgc_indexing=official_tgc_indexing, **dist_args)

    def plain_clip(image, text, logit_scale, teacher_image=None, teacher_text=None) -> LossOutput:
        loss = clip_loss(image, text, logit_scale, num_negatives=0, backend=backend, **dist_args)
        zero = loss.detach().new_zeros(())
        return LossOutput(total=loss, clip=loss, igc=zero, tgc=zero, distill=zero)

    return plain_clip


def needs_teacher(num_negatives: int, tgc_weight: float, distill_weight: float) -> bool:
    """Whether the loss reads teacher features (TGC's positives or the distillation target)."""
    return num_negatives > 0 and (tgc_weight != 0 or distill_weight != 0)


def autocast_dtype(precision: str, device: torch.device, deepspeed: bool = False) -> torch.dtype | None:
    """The forward's autocast dtype: None for ``fp32``, bf16 for ``bf16``; for ``amp`` fp16 on CUDA
    (with a GradScaler) and bf16 elsewhere or under DeepSpeed (whose own loss scaling belongs to
    its ``fp16`` config section, which autocast does not need)."""
    if precision == "fp32":
        return None
    if precision == "amp" and device.type == "cuda" and not deepspeed:
        return torch.float16
    return torch.bfloat16


@dataclass
class StepParts:
    """What one step touches. ``model`` is the student (or the DeepSpeed engine around it);
    ``engine`` is that engine or None; ``teacher`` an ``EMATeacher`` or None (plain CLIP);
    ``scaler`` a ``torch.amp.GradScaler`` for fp16 or None; ``clamp_logit_scale`` a callable
    that keeps the student's ``logit_scale <= ln 100`` (see :func:`clamp_logit_scale_`);
    ``autocast_dtype`` / ``teacher_autocast_dtype``: the forwards' autocast (None: off);
    ``all_finite(loss) -> bool`` agrees across ranks; ``optimizer_moves_teacher``: the
    optimiser is an ``AdamWEMA`` of ``teacher`` (its step is the EMA update)."""

    model: torch.nn.Module
    loss_fn: Callable[..., LossOutput]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    clamp_logit_scale: Callable[[], None]
    teacher: Any = None
    engine: Any = None
    scaler: Any = None
    autocast_dtype: torch.dtype | None = None
    teacher_autocast_dtype: torch.dtype | None = None
    max_grad_norm: float = 0.0
    sync: Callable[[], None] | None = None
    all_finite: Callable[[torch.Tensor], bool] = field(default=lambda t: bool(torch.isfinite(t)))
    optimizer_moves_teacher: bool = False


@dataclass
class StepResult:
    """A step's detached losses (``LossOutput`` of 0-d tensors), whether it was applied
    (False: non-finite loss, skipped), the ``logit_scale`` used (exp applied) and phase times in seconds."""

    losses: LossOutput
    applied: bool
    logit_scale: torch.Tensor
    times: dict[str, float]


def train_step(parts: StepParts, images: torch.Tensor, tokens: torch.Tensor) -> StepResult:
    """One optimiser step on ``images [B,3,H,W]`` and ``tokens [B*(1+K), L]`` (already on the device)."""
    times, clock = {}, _Clock(parts.sync)
    device_type = images.device.type
    with torch.autocast(device_type, dtype=parts.autocast_dtype, enabled=parts.autocast_dtype is not None):
        image, text, scale = clip_features(parts.model, images, tokens)
    t_image = t_text = None
    if parts.teacher is not None:
        amp = parts.teacher_autocast_dtype
        with torch.no_grad(), torch.autocast(device_type, dtype=amp, enabled=amp is not None):
            t_image, t_text, _ = clip_features(parts.teacher.module, images, tokens)
    # The loss runs in fp32: its logits and log-sum-exps are where low precision hurts.
    out = parts.loss_fn(image.float(), text.float(), scale.float(), _float(t_image), _float(t_text))
    times["forward"] = clock.lap()
    if not parts.all_finite(out.total.detach()):
        # Every rank skips together (all_finite agrees across ranks): no collective is left hanging.
        parts.optimizer.zero_grad(set_to_none=True)
        return StepResult(_detach(out), False, scale.detach(), times)
    fused = parts.teacher is not None and parts.optimizer_moves_teacher
    teacher_moved = False
    if parts.engine is not None:
        parts.engine.backward(out.total)
        times["backward"] = clock.lap()
        parts.engine.step()
    else:
        (parts.scaler.scale(out.total) if parts.scaler is not None else out.total).backward()
        times["backward"] = clock.lap()
        if parts.max_grad_norm > 0:
            if parts.scaler is not None:
                parts.scaler.unscale_(parts.optimizer)
            torch.nn.utils.clip_grad_norm_(parts.model.parameters(), parts.max_grad_norm)
        scale_fix = _TeacherLogitScale(parts.teacher, _student_module(parts)) if fused else None
        if parts.scaler is not None:
            loss_scale = parts.scaler.get_scale() if fused else 0.0
            parts.scaler.step(parts.optimizer)
            parts.scaler.update()
            # The scaler skips the optimiser step on inf/NaN gradients, then lowers its scale.
            teacher_moved = fused and parts.scaler.get_scale() >= loss_scale
        else:
            parts.optimizer.step()
            teacher_moved = fused
        parts.optimizer.zero_grad(set_to_none=True)
    parts.scheduler.step()
    parts.clamp_logit_scale()
    times["optim"] = clock.lap()
    if teacher_moved:
        # The fused step moved the teacher toward the unclamped logit_scale: redo that one value.
        scale_fix.follow_clamped()
    elif parts.teacher is not None:
        parts.teacher.update(_student_module(parts))
    times["ema"] = clock.lap()
    return StepResult(_detach(out), True, scale.detach(), times)


def clamp_logit_scale_(model: torch.nn.Module) -> None:
    """``model.logit_scale <= ln 100`` in place (a plain, non-DeepSpeed model)."""
    with torch.no_grad():
        model.logit_scale.clamp_(max=MAX_LOGIT_SCALE)


class _TeacherLogitScale:
    """The teacher's ``logit_scale`` before a fused step, to redo its EMA toward the clamped value.

    Unfused, the EMA follows the clamp (optimiser step, clamp, ``teacher.update``); AdamWEMA moves
    the teacher inside the step, before the clamp. Restoring this one value and averaging it
    toward the clamped student (the update's own lerp and backend) gives the unfused numbers.
    """

    def __init__(self, teacher, student: torch.nn.Module):
        self.teacher = teacher
        self.student = getattr(student, "module", student)  # DDP wraps the student
        names, states, forwards = teacher.parameter_views()
        index = names.index("logit_scale")
        self.state = states[index]
        self.forward = forwards[index] if forwards is not None else None  # a separate forward_dtype copy
        self.saved = self.state.detach().clone()

    def follow_clamped(self) -> None:
        with torch.no_grad():
            self.state.copy_(self.saved)
            ema_update_([self.state], [self.student.logit_scale.detach()], self.teacher.decay,
                        backend=self.teacher.backend)
            if self.forward is not None:
                self.forward.copy_(self.state)


def _student_module(parts: StepParts) -> torch.nn.Module:
    return parts.engine.module if parts.engine is not None else parts.model


def _float(t):
    return None if t is None else t.float()


def _detach(out: LossOutput) -> LossOutput:
    return LossOutput(**{k: getattr(out, k).detach() for k in ("total", "clip", "igc", "tgc", "distill")})


class _Clock:
    """Lap timer; ``sync`` (e.g. ``torch.cuda.synchronize``) makes laps cover the device's work."""

    def __init__(self, sync):
        self.sync = sync
        self.last = time.perf_counter()

    def lap(self) -> float:
        if self.sync is not None:
            self.sync()
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed
